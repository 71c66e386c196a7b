"""qcfs_straight_through's hand-written gradient against autograd on the formula it stands for."""

import pytest
import torch

from pconv.nn import functional as PF


def _formula(x, theta, delta_in, delta_out, levels, channel_dim=1, relaxed=None):
    """The straight-through quantizer and QDrop's mix as recon first wrote them, differentiated by autograd."""
    t, d_in, d_out = (PF.per_channel(p, x, channel_dim) for p in (theta, delta_in, delta_out))
    u = (levels * (x + d_in) / t + PF.PHI).clamp(0, levels)
    k = u + (torch.floor(u) - u).detach()
    rounded = k * ((t + d_out) / levels)
    if relaxed is None:
        return rounded
    return torch.where(relaxed, PF.qcfs_relaxed(x, theta, delta_in, delta_out, levels, channel_dim), rounded)


def _case(shape, channels, channel_dim, seed, one_theta=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    theta = torch.rand(1 if one_theta else channels, generator=g, dtype=torch.float64) + 0.5
    delta_in = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
    delta_out = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
    relaxed = torch.rand(shape, generator=g) < 0.5
    return x, theta, delta_in, delta_out, relaxed


@pytest.mark.parametrize("shape,channel_dim,one_theta", [((5, 3, 6, 7), 1, False), ((9, 4), 1, False),
                                                         ((4, 6, 5, 3), 3, False), ((5, 3, 6, 7), 1, True)])
@pytest.mark.parametrize("with_relaxed", [False, True])
@pytest.mark.parametrize("levels", [4, 24])
def test_values_and_gradients_are_autograds_on_the_formula(shape, channel_dim, one_theta, with_relaxed, levels):
    x, theta, delta_in, delta_out, relaxed = _case(shape, shape[channel_dim], channel_dim, seed=levels,
                                                   one_theta=one_theta)
    mask = relaxed if with_relaxed else None
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn in (PF.qcfs_straight_through, _formula):
        leaves = [t.clone().requires_grad_(True) for t in (x, theta, delta_in, delta_out)]
        out = fn(*leaves, levels, channel_dim, relaxed=mask)
        (out * weights).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (mine, grads), (expected, expected_grads) = results
    assert torch.equal(mine, expected)  # the same operations in the same order: the same values
    for name, got, want in zip(("x", "theta", "delta_in", "delta_out"), grads, expected_grads):
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
        assert want.abs().sum() > 0, name  # each gradient is exercised


def test_values_are_the_quantizers_and_only_the_requested_gradients_are_computed():
    x, theta, delta_in, delta_out, _ = _case((4, 3, 5, 5), 3, 1, seed=3)
    theta = theta.float().requires_grad_(True)  # float32 parameters against a float64 map, as in the tests of recon
    out = PF.qcfs_straight_through(x, theta, delta_in.float(), delta_out.float(), 8)
    assert torch.allclose(out.detach(), PF.qcfs(x, theta.detach(), delta_in.float(), delta_out.float(), 8),
                          rtol=0, atol=1e-12)
    out.sum().backward()
    assert theta.grad.dtype == torch.float32 and theta.grad.shape == (3,)


def test_a_relaxed_value_at_every_position_is_the_unrounded_quantizer():
    x, theta, delta_in, delta_out, _ = _case((4, 3, 5, 5), 3, 1, seed=4)
    everywhere = torch.ones(x.shape, dtype=torch.bool)
    assert torch.equal(PF.qcfs_straight_through(x, theta, delta_in, delta_out, 8, relaxed=everywhere),
                       PF.qcfs_relaxed(x, theta, delta_in, delta_out, 8))
    assert not torch.equal(PF.qcfs_straight_through(x, theta, delta_in, delta_out, 8),
                           PF.qcfs_relaxed(x, theta, delta_in, delta_out, 8))
