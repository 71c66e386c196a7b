"""What the command line sets up for a CUDA device (CI has none: the setting itself is checked)."""

import torch

from pconv.cli._loading import full_fp32_convolutions, resolve_device


def test_cuda_commands_run_convolutions_in_ieee_float32():
    """TF32 (torch's default for cuDNN convolutions) rounds pre-activations enough to move spikes."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision)
    try:
        full_fp32_convolutions()
        assert cudnn.conv.fp32_precision == "ieee" and matmul.fp32_precision == "ieee"
    finally:
        cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = saved


def test_cpu_leaves_torch_settings_alone():
    before = torch.backends.cudnn.conv.fp32_precision
    assert resolve_device("cpu").type == "cpu"
    assert torch.backends.cudnn.conv.fp32_precision == before
