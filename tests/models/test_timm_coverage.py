"""Every ReLU/ReLU6 CNN family of timm in the list converts: the SNN calls no ReLU any more, and its count engine
is the QCFS network exactly (random weights, 96-pixel inputs, T=4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pconv
from pconv.nn.qcfs import quantize

pytestmark = pytest.mark.slow

MODELS = ("resnet18 resnet34 resnet50 resnet101 resnet50d resnet26t resnext50_32x4d wide_resnet50_2 vgg11 vgg16_bn "
          "vgg19_bn regnetx_002 regnetx_016 mobilenetv2_050 mobilenetv2_100 mobilenetv2_140 tf_efficientnet_lite0 "
          "tf_efficientnet_lite2 densenet121 dla34 dpn68 inception_v3 res2net50_26w_4s selecsls42b hrnet_w18_small "
          "repvgg_a0 mnasnet_100 spnasnet_100 fbnetc_100 resnetv2_50 xception41").split()


def qcfs_network(model: nn.Module, calibration, T: int) -> nn.Module:
    """The DA-QCFS network built apart from the SNN, from the calibration's parameters."""
    qnet = copy.deepcopy(model)
    params = calibration.params[T]
    modules = quantize(qnet, calibration.sites, {n: p.theta for n, p in params.items()}, T,
                       calibration.populations(T))
    for name, module in modules.items():
        module.delta_in.copy_(params[name].delta_in)
        module.delta_out.copy_(params[name].delta_out)
    return qnet


@pytest.mark.parametrize("name", MODELS)
def test_the_model_converts_and_its_count_engine_is_the_qcfs_network(name):
    torch.manual_seed(0)
    model = pconv.create_model(name, num_classes=10, random_weights=True)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    calibration = pconv.calibrate(model, [images], time_steps=[4], method="none", population_budget=0)
    snn = pconv.convert(model, calibration, 4)
    relu_calls = []
    hooks = [m.register_forward_hook(lambda *a: relu_calls.append(1)) for m in snn.modules()
             if isinstance(m, (nn.ReLU, nn.ReLU6))]
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = snn(x)
        reference = qcfs_network(model, calibration, 4)(x)
    for hook in hooks:
        hook.remove()
    assert relu_calls == [], f"{name}: {len(relu_calls)} analog activations left in the SNN"
    assert torch.equal(out, reference), f"{name}: max difference {(out - reference).abs().max().item()}"
    assert len(snn.neurons()) == len(calibration.sites) > 0
