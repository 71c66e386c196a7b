"""The count engine's fused CPU loop (nn/cpu_kernel.py): its result must be torch's five passes', bit for bit, in
the input's memory exactly when asked, and the count engine must use it on large CPU maps. Its speed is
measured by `pconv bench` (docs/benchmarks.md)."""

import subprocess
import sys

import pytest
import torch

import nets
import pconv
from pconv.nn import cpu_kernel
from pconv.nn import functional as PF

pytestmark = pytest.mark.skipif(not cpu_kernel.enabled(), reason="PCONV_CPU_KERNEL=0 turns the fused loop off")


def torch_passes(x, scale, offset, amplitude, levels):
    k = PF.counted(x, scale, offset, levels)
    return k * PF.per_channel(amplitude, k)


def factors(channels, levels, g):
    scale = torch.rand(channels, generator=g) * levels + 0.5
    offset = torch.rand(channels, generator=g) - 0.5
    return scale, offset, torch.rand(channels, generator=g) + 0.1


def fused(x, scale, offset, amplitude, levels, in_place):
    out = cpu_kernel.cpu_count(x, scale, offset, amplitude, levels, in_place)
    if out is None:
        pytest.skip("inductor could not compile the fused loop here (no C++ compiler?)")
    return out


@pytest.mark.parametrize("in_place", [False, True])
def test_fused_loop_is_torch_passes_bit_for_bit(in_place):
    g = torch.Generator().manual_seed(0)
    cases = [((4, 16, 96, 96), False), ((4, 16, 96, 96), True), ((4200, 128), False), ((8, 24, 2800), False)]
    assert all(torch.Size(shape).numel() >= cpu_kernel.MIN_ELEMENTS for shape, _ in cases)
    for shape, channels_last in cases:
        for levels in (8, 48, 96):  # one neuron at T=8; populations of 6 and 3 at T=8 and 32
            scale, offset, amplitude = factors(shape[1], levels, g)
            x = torch.randn(*shape, generator=g) * 3
            # a quarter of the values on a level boundary, where a contracted multiply-add would round differently
            grid = (torch.randint(-2, levels + 2, shape, generator=g) - PF.per_channel(offset, x)) / PF.per_channel(scale, x)
            x = torch.where(torch.rand(shape, generator=g) < 0.25, grid, x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            want = torch_passes(x, scale, offset, amplitude, levels)
            given = x.clone(memory_format=torch.preserve_format)
            got = fused(given, scale, offset, amplitude, levels, in_place)
            assert torch.equal(got, want), (shape, channels_last, levels)
            assert (got.data_ptr() == given.data_ptr()) == in_place
            assert torch.equal(given, want if in_place else x)


def test_small_maps_other_dtypes_and_autograd_take_torch_passes():
    g = torch.Generator().manual_seed(1)
    scale, offset, amplitude = factors(8, 8, g)
    small = torch.randn(2, 8, 4, 4)
    assert cpu_kernel.cpu_count(small, scale, offset, amplitude, 8) is None
    large = torch.randn(8, 8, 128, 128, dtype=torch.float64)
    assert cpu_kernel.cpu_count(large, scale.double(), offset.double(), amplitude.double(), 8) is None
    assert cpu_kernel.cpu_count(large.float().requires_grad_(), scale, offset, amplitude, 8) is None


def test_count_engine_uses_it_and_gives_the_passes_result(monkeypatch):
    model = nets.vgg_small()
    images = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    snn = pconv.convert(model, pconv.calibrate(model, images, time_steps=[4], method="none"), time_steps=4)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # 64*16*32*32 values at the first site
    assert 64 * 16 * 32 * 32 >= cpu_kernel.MIN_ELEMENTS
    with torch.inference_mode():
        monkeypatch.setattr(cpu_kernel, "_enabled", False)
        want = snn(x)
        monkeypatch.setattr(cpu_kernel, "_enabled", True)
        calls = []
        real = cpu_kernel.cpu_count

        def counting(*args):
            out = real(*args)
            calls.append(out is not None)
            return out

        monkeypatch.setattr("pconv.nn.neurons.cpu_count", counting)
        got = snn(x)
    if not any(calls):
        pytest.skip("inductor could not compile the fused loop here (no C++ compiler?)")
    assert torch.equal(got, want)
    assert calls[0]  # the first site's map is large enough


def test_a_failed_compilation_turns_it_off(monkeypatch):
    def failing(in_place, with_amplitude):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(cpu_kernel, "_compiled", failing)
    monkeypatch.setattr(cpu_kernel, "_enabled", True)
    x = torch.randn(8, 8, 128, 128)
    ones = torch.ones(8)
    assert cpu_kernel.cpu_count(x, ones, ones, ones, 8) is None
    assert not cpu_kernel.enabled()


def test_the_environment_turns_it_off():
    code = "from pconv.nn import cpu_kernel; print(cpu_kernel.enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PCONV_CPU_KERNEL": "0", "PATH": ""}).stdout
    assert out.strip() == "False"


def test_with_a_count_hook_it_gives_the_counts_then_the_amplitude(monkeypatch):
    model = nets.vgg_small()
    images = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    snn = pconv.convert(model, pconv.calibrate(model, images, time_steps=[8], method="none"), time_steps=8)
    neuron = next(iter(snn.neurons().values()))
    x = torch.randn(64, neuron.theta_in.numel(), 32, 32, generator=torch.Generator().manual_seed(3)) * 2
    seen = []
    neuron.count_hook = lambda k, m: seen.append(k.clone())
    results = []
    with torch.inference_mode():
        for enabled in (False, True):
            monkeypatch.setattr(cpu_kernel, "_enabled", enabled)
            results.append(neuron(x.clone()))
    if not cpu_kernel.enabled():
        pytest.skip("inductor could not compile the fused loop here (no C++ compiler?)")
    assert torch.equal(seen[0], seen[1]) and torch.equal(results[0], results[1])
    assert seen[1].max() > 1 and torch.equal(seen[1], seen[1].round())  # counts, not amplitudes
    calls = []
    monkeypatch.setattr("pconv.nn.neurons.cpu_count", lambda *a: calls.append(a[3]) or cpu_kernel.cpu_count(*a))
    with torch.inference_mode():
        neuron(x.clone())
    assert calls == [None]  # asked for the counts alone
