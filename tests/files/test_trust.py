"""A file names its architecture, it never carries code: crafted `model` entries run nothing, anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import cli_models
import pconv
from pconv.cli.main import cli
from pconv.files.format import read_header
from pconv.models import ModelSource, UntrustedFactoryError

TINY = "cli_models:tiny_cnn"

# Callables a crafted file might name, each with kwargs that would leave the marker file if it ran.
CRAFTED = [
    ("os:system", {"command": "touch MARKER"}),
    ("subprocess:call", {"args": ["touch", "MARKER"]}),
    ("builtins:exec", {"source": "open('MARKER', 'w').close()"}),
    ("pconv.zoo:os.system", {"command": "touch MARKER"}),  # pconv's own module, walked to os.system
    ("pconv.pretrained:torch.save", {"obj": 1, "f": "MARKER"}),
]


@pytest.fixture(scope="module")
def snn_file(tmp_path_factory):
    folder = cli_models.write_random_folder(tmp_path_factory.mktemp("trust_data") / "calib", per_class=2)
    path = tmp_path_factory.mktemp("trust") / "snn.safetensors"
    result = CliRunner().invoke(cli, ["convert", TINY, "--data", str(folder), "-T", "2", "-o", str(path),
                                      "--calibration", "none", "--encoding-levels", "0", "--population-budget", "0"])
    assert result.exit_code == 0, result.stderr
    return path


def with_model_entry(snn_file, tmp_path, entry: dict, name: str = "crafted.safetensors"):
    meta = dict(read_header(snn_file).metadata, model=json.dumps(entry))
    path = tmp_path / name
    save_file(load_file(str(snn_file)), str(path), metadata=meta)
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("factory, kwargs", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_crafted_factory_runs_nowhere(snn_file, tmp_path, monkeypatch, factory, kwargs):
    monkeypatch.chdir(tmp_path)
    crafted = with_model_entry(snn_file, tmp_path, {"kind": "factory", "name": factory, "kwargs": kwargs})
    data = cli_models.write_random_folder(tmp_path / "test", per_class=1)
    with pytest.raises(pconv.ModelLoadError):
        pconv.load(crafted)
    runner = CliRunner()
    for command in (["eval", str(crafted), "--data", str(data)], ["bench", str(crafted), "--iters", "1"]):
        line = one_error_line(runner.invoke(cli, command))
        if "kwargs" not in line:  # refused for its factory (a path in the kwargs is refused before that)
            assert factory in line and "--trust-factory" in line
    shown = runner.invoke(cli, ["inspect", str(crafted), "--json"])
    assert shown.exit_code == 0
    model = json.loads(shown.stdout)["model"]
    assert model["name"] == factory and model["needs_trust"] is True
    assert "--trust-factory" in runner.invoke(cli, ["inspect", str(crafted)]).stdout
    assert not (tmp_path / "MARKER").exists()


def test_untrusted_factory_error_names_the_factory_and_the_flag(snn_file):
    with pytest.raises(UntrustedFactoryError) as info:
        pconv.load(snn_file)
    assert info.value.factory == TINY and "--trust-factory" in str(info.value) and "trust_factory=True" in str(info.value)
    assert pconv.load(snn_file, trust_factory=True).time_steps == 2


def test_pconvs_own_architectures_need_no_trust():
    source = ModelSource("factory", "pconv.zoo:cifar10_resnet20", {})
    assert source.is_own and not source.needs_trust
    assert source.build().linear.out_features == 10  # built from pconv's table, no trust flag
    assert ModelSource("timm", "resnet18", {}).needs_trust is False
    assert ModelSource("factory", "cli_models:tiny_cnn", {}).needs_trust is True


@pytest.mark.parametrize("kwargs, needle", [
    ({"pretrained": True}, "'pretrained'"),
    ({"checkpoint_path": "weights.pth"}, "'checkpoint_path'"),
    ({"pretrained_cfg_overlay": {"file": "x"}}, "'pretrained_cfg_overlay'"),
    ({"num_classes": 3, "drop_rate": "https://example.com/w.pth"}, "a path or URL"),
    ({"act_layer": "../../weights.bin"}, "a path or URL"),
    ({"num_classes": float("nan")}, "not plain JSON"),
])
def test_kwargs_from_a_file_never_name_weights_files_or_urls(snn_file, tmp_path, kwargs, needle):
    crafted = with_model_entry(snn_file, tmp_path, {"kind": "timm", "name": "resnet18", "kwargs": kwargs})
    with pytest.raises((pconv.FormatError, pconv.ModelLoadError), match=needle):
        pconv.load(crafted)


@pytest.mark.parametrize("entry", [
    {"kind": "factory", "name": "os.system"},  # not an import path
    {"kind": "factory", "name": "a:b; rm -rf /"},
    {"kind": "shell", "name": "ls"},
    {"kind": "timm", "name": "resnet18", "kwargs": [1, 2]},
    {"kind": "timm", "name": "resnet18", "extra": 1},
])
def test_malformed_model_entries_are_refused(snn_file, tmp_path, entry):
    crafted = with_model_entry(snn_file, tmp_path, entry)
    with pytest.raises(pconv.FormatError):
        pconv.load(crafted)
    assert "Error: " in CliRunner().invoke(cli, ["inspect", str(crafted)]).stderr


def test_trusted_factory_round_trips(snn_file):
    snn = pconv.load(snn_file, trust_factory=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert snn(x).shape == (2, 3)

