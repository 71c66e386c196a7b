"""Zoo architectures against their real checkpoints and real data (skipped if data absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.data import create_dataset, create_transform, resolve_data_config
from torch import nn

from pconv import zoo

import shared_data as sd

# checkpoint stem -> (factory, data folder fixture, sidecar measured_accuracy key)
CASES = {
    "cifar10_resnet20_akamaster": (zoo.cifar10_resnet20, "cifar10_test_dir", "cifar10_test_lossless_1000"),
    "cifar10_avgpool_cnn_snntoolbox": (zoo.cifar10_cnn, "cifar10_test_dir", "cifar10_test_lossless_1000"),
    "mnist_lenet5_snntoolbox": (zoo.mnist_lenet5, "mnist_test_dir", "mnist_test_10000"),
}
FACTORIES = [zoo.cifar10_resnet20, zoo.cifar10_cnn, zoo.mnist_lenet5]
TOLERANCE = 0.3  # accuracy points


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo_data")


@pytest.fixture(scope="module")
def cifar10_test_dir(data_root) -> Path:
    return sd.cifar10_test_folder(data_root)


@pytest.fixture(scope="module")
def mnist_test_dir(data_root) -> Path:
    return sd.mnist_test_folder(data_root)


def _load(name: str) -> nn.Module:
    model = CASES[name][0]()
    model.load_state_dict(load_file(sd.checkpoint(name)), strict=True)  # stored weights need no flip
    return model.eval()


def _input_mode(model: nn.Module) -> str:
    return "L" if model.pretrained_cfg["input_size"][0] == 1 else "RGB"


@torch.inference_mode()
def _top1(model: nn.Module, folder: Path) -> tuple[float, int]:
    """Top-1 (%) over the folder via timm's dataset and the model's own eval transform."""
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    dataset = sd.timm_dataset(folder, transform=transform, input_img_mode=_input_mode(model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1000, shuffle=False, num_workers=0)
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / total, total


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_accuracy_matches_sidecar(name, request):
    _, folder_fixture, acc_key = CASES[name]
    expected = sd.sidecar(name)["measured_accuracy"][acc_key]
    acc, n = _top1(_load(name), request.getfixturevalue(folder_fixture))
    assert n == expected["n"]
    assert abs(acc - expected["top1"]) <= TOLERANCE, f"{name}: top-1 {acc:.2f}% vs sidecar {expected['top1']}%"


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_matches_sidecar(name):
    meta = sd.sidecar(name)
    state = CASES[name][0]().state_dict()
    params = {k: list(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert params == meta["tensors"]
    assert sum(p.numel() for p in CASES[name][0]().parameters()) == meta["num_params"]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_every_relu_is_a_distinct_single_use_module(factory):
    model = factory()
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert len({id(m) for m in relus.values()}) == len(relus)
    calls = dict.fromkeys(relus, 0)
    for name, m in relus.items():
        m.register_forward_hook(lambda mod, inp, out, name=name: calls.__setitem__(name, calls[name] + 1))
    c, h, w = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        model(torch.rand(2, c, h, w))
    assert calls and all(v == 1 for v in calls.values()), calls
    # no functional activations hidden in forward(): the traced graph's relus are all modules
    graph = torch.fx.symbolic_trace(model).graph
    functional = [n for n in graph.nodes if n.op in ("call_function", "call_method") and "relu" in str(n.target)]
    assert not functional
    assert sum(n.op == "call_module" and n.target in relus for n in graph.nodes) == len(relus)


def test_relu_counts():
    count = lambda m: sum(isinstance(x, nn.ReLU) for x in m.modules())  # noqa: E731
    assert count(zoo.cifar10_resnet20()) == 1 + 9 * 2
    assert count(zoo.cifar10_cnn()) == 5
    assert count(zoo.mnist_lenet5()) == 4


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_pretrained_cfg(factory):
    model = factory()
    assert not model.training
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == f"pconv.zoo:{factory.__name__}"
    data_cfg = resolve_data_config(model=model)
    assert data_cfg["input_size"] == cfg["input_size"]
    assert data_cfg["crop_pct"] == 1.0
    c, h, w = cfg["input_size"]
    assert len(cfg["mean"]) == len(cfg["std"]) == c
    assert model(torch.rand(1, c, h, w)).shape == (1, cfg["num_classes"])
    assert factory(num_classes=7)(torch.rand(1, c, h, w)).shape == (1, 7)


def test_shortcut_a_is_parameter_free_and_linear():
    sc = zoo.ShortcutA(8)
    assert not list(sc.parameters()) and not list(sc.buffers())
    x, y = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    torch.testing.assert_close(sc(2.0 * x - 3.0 * y), 2.0 * sc(x) - 3.0 * sc(y))


# ---- the shared-data folder helpers themselves --------------------------------------------


def test_cifar10_folder_pixels_and_labels_are_exact(cifar10_test_dir):
    npz = np.load(sd.require_shared_data(sd.CIFAR10_TEST) / sd.CIFAR10_TEST)
    model = zoo.cifar10_cnn()  # mean 0 / std 1: transform output is exactly x/255
    transform = create_transform(**resolve_data_config(model=model))
    dataset = sd.timm_dataset(cifar10_test_dir, transform=transform)
    assert len(dataset) == 1000
    for i in (0, 123, 999):
        row = int(Path(dataset.reader.samples[i][0]).stem)
        x, y = dataset[i]
        assert y == npz["labels"][row]
        assert torch.equal(x, torch.from_numpy(npz["images"][row]).permute(2, 0, 1).float() / 255)


def test_mnist_folder_is_grayscale(mnist_test_dir):
    npz = np.load(sd.require_shared_data(sd.MNIST_TEST) / sd.MNIST_TEST)
    model = zoo.mnist_lenet5()
    dataset = sd.timm_dataset(mnist_test_dir, create_transform(**resolve_data_config(model=model)), "L")
    row = int(Path(dataset.reader.samples[42][0]).stem)
    x, y = dataset[42]
    assert x.shape == (1, 28, 28) and y == npz["labels"][row]
    assert torch.equal(x[0], torch.from_numpy(npz["images"][row]).float() / 255)


def test_jpeg_folders_keep_bytes_and_true_class_index(tmp_path):
    npz = np.load(sd.require_shared_data(sd.IMAGENET_SAMPLES) / sd.IMAGENET_SAMPLES)
    rows = [0, 1, 7, 250, 499]
    folder = sd.imagenet_samples_folder(tmp_path, indices=rows)
    dataset = sd.timm_dataset(folder)
    assert len(dataset) == len(rows)
    for path, target in dataset.reader.samples:
        row = int(Path(path).stem)
        assert target == npz["labels"][row] == 2 * row  # standard ImageNet-1k index, odd classes absent
        offsets = npz["offsets"]
        assert Path(path).read_bytes() == npz["jpeg"][offsets[row]:offsets[row + 1]].tobytes()
    # without the class map timm would renumber the present classes 0..k-1
    plain = create_dataset("", root=str(folder), split="")
    assert [t for _, t in plain.reader.samples] == list(range(len(rows)))

    calib = sd.cifar10_calib_folder(tmp_path, n=20)
    targets = [t for _, t in sd.timm_dataset(calib).reader.samples]
    assert sorted(targets) == sorted(list(range(10)) * 2)  # round-robin subset stays balanced
