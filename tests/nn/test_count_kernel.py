"""The count engine's one-kernel neuron (nn/count_kernel.py), used inside CUDA graphs: its result must be
functional.counted's times the amplitude, bit for bit. CI has no GPU, so the kernel runs here through Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the switch is read when the kernel is built); its speed and
its use inside CUDA graphs are measured by bench/gpu.py (docs/benchmarks.md)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pconv.nn import count_kernel

TESTS = Path(__file__).resolve().parent.parent

INTERPRETED = textwrap.dedent("""
    import torch
    import nets
    import pconv
    from pconv.nn import count_kernel as ck, functional as PF

    g = torch.Generator().manual_seed(0)

    def torch_passes(x, scale, offset, amplitude, levels):
        k = PF.counted(x, scale, offset, levels)
        return k * PF.per_channel(amplitude, k)

    cases = [((3, 5, 7, 9), torch.float32, False), ((3, 5, 7, 9), torch.float32, True), ((4, 6), torch.float32, False),
             ((2, 3, 11), torch.float32, False), ((2, 4, 5, 5), torch.bfloat16, False), ((2, 4, 5, 5), torch.float16, True)]
    for shape, dtype, channels_last in cases:
        for levels in (8, 48):  # one neuron at T=8; a population of 6 at T=8
            x = (torch.randn(*shape, generator=g) * 3).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scale, offset, amplitude = (torch.rand(shape[1], generator=g) * levels + 0.5 for _ in range(3))
            got, want = ck.fused_count(x, scale, offset, amplitude, levels), torch_passes(x, scale, offset, amplitude, levels)
            assert got.dtype == want.dtype and torch.equal(got, want), (shape, dtype, channels_last, levels)
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    # exact level boundaries and their neighbours: x * 2 + 0.5 lands on k, just below it and just above it
    k = torch.arange(-2, 11, dtype=torch.float32)
    at = (k - 0.5) / 2
    x = torch.stack([at, torch.nextafter(at, at - 1), torch.nextafter(at, at + 1)]).reshape(3, 1, -1).expand(3, 2, -1)
    x = x.contiguous()
    scale, offset, amplitude = torch.full((2,), 2.0), torch.full((2,), 0.5), torch.tensor([0.75, 1.0])
    assert torch.equal(ck.fused_count(x, scale, offset, amplitude, 8), torch_passes(x, scale, offset, amplitude, 8))

    # whole networks, every site through the kernel (as inside a capture), populations included
    def always(x, scale, offset, amplitude, levels):
        return ck.fused_count(x, scale, offset, amplitude, levels)

    for model in (nets.vgg_small(), nets.timm_resnet()):
        calib = [torch.randn(4, 3, 32, 32, generator=g)]
        for T in (4, 8):
            snn = pconv.convert(model, calib, time_steps=T)
            assert max(snn.info.populations().values()) > 1
            x = torch.randn(3, 3, 32, 32, generator=g)
            with torch.inference_mode():
                plain = snn(x)
                ck_capturing = pconv.nn.neurons.capturing_count
                pconv.nn.neurons.capturing_count = always
                try:
                    fused = snn(x)
                finally:
                    pconv.nn.neurons.capturing_count = ck_capturing
            assert torch.equal(fused, plain), (type(model).__name__, T)
    print("kernel ok")
""")


def test_kernel_equals_torch_passes_bit_for_bit():
    pytest.importorskip("triton", reason="Triton comes with torch's CUDA builds; this torch has none")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-3000:]


def test_kernel_never_runs_on_the_cpu():
    x, params = torch.randn(2, 3, 4, 4), [torch.rand(3) for _ in range(3)]
    assert count_kernel.capturing_count(x, *params, 8) is None
    assert not count_kernel._compiled  # nothing was compiled for a CPU tensor either


def test_kernel_applies_to_float32_factors_and_plain_layouts_only():
    params = tuple(torch.rand(3) for _ in range(3))
    x = torch.randn(2, 3, 4, 5)
    assert count_kernel._key(x, params) is not None
    assert count_kernel._key(x.contiguous(memory_format=torch.channels_last), params) is not None
    assert count_kernel._key(x.transpose(2, 3), params) is None  # strided view: torch's passes
    assert count_kernel._key(x.double(), tuple(p.double() for p in params)) is None  # float64 stays exact in torch
    assert count_kernel._key(torch.randn(5), params) is None
    assert count_kernel._key(torch.randn(0, 3, 4, 5), params) is None
    assert count_kernel._layout(x) == 20 and count_kernel._layout(torch.randn(2, 3)) == 1
