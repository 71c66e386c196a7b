"""The count engine overwrites a site's input exactly where the model's own activation did (its `inplace` flag),
and computes the same values either way."""

import copy

import torch

import nets
import pconv
from pconv.nn.network import SpikingNetwork
from pconv.observe.sites import module_path


def _snn(model, T=4, **kwargs) -> SpikingNetwork:
    images = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    calibration = pconv.calibrate(model, images, time_steps=[T], method="none", **kwargs)
    return pconv.convert(model, calibration, time_steps=T)


def test_neurons_take_the_flag_of_the_activation_they_replace():
    model = nets.vgg_small()
    flags = {type(m).__name__ + str(m.inplace) for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))}
    assert flags == {"ReLUTrue", "ReLU6True", "ReLUFalse"}  # the test needs both kinds of site
    expected = {name: model.get_submodule(name).inplace for name, m in model.named_modules()
                if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))}
    snn = _snn(model)
    neurons = snn.neurons()
    assert {module_path(name): n.inplace for name, n in neurons.items()} == expected
    assert {name: n.inplace for name, n in snn.with_neuron("serial").neurons().items()} == \
        {name: n.inplace for name, n in neurons.items()}
    ann = snn.to_ann()
    assert {name: ann.get_submodule(name).inplace for name in expected} == expected


def test_in_place_counts_are_the_same_values_in_the_input_memory():
    model = nets.vgg_small()
    snn = _snn(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    copied = copy.deepcopy(snn)
    for n in copied.neurons().values():
        n.inplace = False
    with torch.inference_mode():
        assert torch.equal(snn(x), copied(x))
    neuron = next(n for n in snn.neurons().values() if n.inplace)
    fresh = torch.randn(4, neuron.theta_in.numel(), 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        kept = fresh.clone()
        out = neuron(fresh)
        assert out.data_ptr() == fresh.data_ptr()  # written where the input was
        neuron.inplace = False
        assert torch.equal(neuron(kept.clone()), out)
        assert torch.equal(neuron(kept), out) and not torch.equal(kept, out)  # the input left as it was
        assert out.data_ptr() != kept.data_ptr()


def test_never_in_place_on_a_tensor_autograd_needs():
    snn = _snn(nets.vgg_small())
    neuron = next(n for n in snn.neurons().values() if n.inplace)
    x = torch.randn(2, neuron.theta_in.numel(), 4, 4, requires_grad=True)
    before = x.detach().clone()
    out = neuron(x)
    assert torch.equal(x.detach(), before) and out.data_ptr() != x.data_ptr()


def test_eval_gives_each_network_its_own_batch_when_the_first_activation_overwrites_the_image():
    from pconv.measure.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(inplace=True),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    images = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    calibration = pconv.calibrate(model, images, time_steps=[4], method="none", population_budget=0)
    snn = pconv.convert(model, calibration, time_steps=4)
    assert all(n.inplace for n in snn.neurons().values())
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    copies = [(x.clone(), y) for x, y in batches]
    result = evaluate(snn, batches, sop_images=0)
    assert all(torch.equal(x, c) for (x, _), (c, _) in zip(batches, copies))  # the caller's images untouched
    for n in snn.neurons().values():
        n.inplace = False
    plain = evaluate(snn, copies, ann=_out_of_place_ann(snn), sop_images=0)
    assert (result.top1, result.top1_agreement, result.mean_firing_rate) == \
        (plain.top1, plain.top1_agreement, plain.mean_firing_rate)


def _out_of_place_ann(snn):
    ann = snn.to_ann()
    for m in ann.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    return ann


def test_the_default_calibration_takes_a_model_whose_first_activation_overwrites_the_image():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(inplace=True),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    images = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    calibration = pconv.calibrate(model, images, time_steps=[4], method="none")  # the budget's sensitivity pass
    assert calibration.config.population_budget > 0
