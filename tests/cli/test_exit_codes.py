"""Usage mistakes exit 2, failed operations exit 1 with one `Error:` line, and nothing is silently wrong:
no random weights unless asked for, no calibration applied to a model it was not made for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import cli_models
import nets
import pconv
from pconv import ConfigError, ModelLoadError
from pconv.cli.main import cli
from pconv.files.format import read_header

TINY = "cli_models:tiny_cnn"
REPO = Path(__file__).resolve().parents[2]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def usage_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    return result.stderr


def failure(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and " — " in lines[0], result.stderr
    assert "unexpected" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_codes")
    return {"calib": cli_models.write_random_folder(root / "calib", per_class=2, seed=1)}


@pytest.fixture(scope="module")
def snn_file(folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("exit_snn") / "snn.safetensors"
    assert invoke("convert", TINY, "--data", folders["calib"], "-T", "2", "-o", path,
                  "--calibration", "none").exit_code == 0
    return path


@pytest.mark.parametrize("args, needle", [
    (["-n", "0"], "--num-images"),
    (["--mean", "0.5,0.5"], "2 values for 3 input channels"),
    (["--std", "0"], "std values must be positive"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--recon-steps", "5"], "recon steps are an option of the recon method"),
    (["--recon-steps", "300"], "--recon-steps applies to --calibration recon only"),
    (["--recon-drop", "0.5"], "--recon-drop applies to --calibration recon only"),
    (["--recon-drop", "0.25"], "drop probability is an option of the recon method"),
    (["--calibration", "recon", "--recon-drop", "2"], "not in the range"),
])
def test_usage_mistakes_inside_a_command_exit_2(folders, tmp_path, args, needle):
    text = usage_error(invoke("calibrate", TINY, "--data", folders["calib"], "-o", tmp_path / "c.safetensors", *args))
    assert needle in text
    assert not (tmp_path / "c.safetensors").exists()


def test_bench_with_an_unknown_engine_is_a_usage_error(snn_file):
    assert "'foo' is not an engine" in usage_error(invoke("bench", snn_file, "--engines", "foo", "--trust-factory"))


@pytest.mark.parametrize("key, value, needle", [
    ("time_steps", "abc", "'time_steps' is 'abc'"),
    ("encoding_levels", "-1", "'encoding_levels'"),
    ("sites", "[{\"name\": 3}]", "malformed site"),
    ("data_config", "{\"input_size\": [3, 0, 16]}", "'data_config' is invalid"),
    ("neuron", "pa rallel", "'neuron'"),
    ("num_classes", "many", "'num_classes'"),
])
def test_a_corrupt_metadata_value_names_its_field(snn_file, tmp_path, key, value, needle):
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(snn_file)), str(bad), metadata=dict(read_header(snn_file).metadata, **{key: value}))
    for command in (["eval", bad, "--data", tmp_path], ["inspect", bad], ["bench", bad]):
        assert needle in failure(invoke(*command))
    with pytest.raises(pconv.FormatError, match=needle):
        pconv.load(bad, trust_factory=True)


def test_a_pickled_checkpoint_is_one_clear_line(folders, tmp_path):
    pickled = tmp_path / "whole_model.pth"
    torch.save(cli_models.tiny_cnn(), pickled)  # the module object, not its state dict
    line = failure(invoke("convert", TINY, "-c", pickled, "--data", folders["calib"], "-o", tmp_path / "o"))
    assert "weights-only" in line and "state_dict" in line and "weights_only=False" not in line


def test_an_unwritable_output_folder_is_refused_before_any_work(folders, tmp_path, monkeypatch):
    import pconv.pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("calibration ran although the output cannot be written")

    monkeypatch.setattr(pconv.pipeline, "calibrate", must_not_run)
    folder = Path("/proc") if os.geteuid() == 0 else tmp_path / "read_only"
    if folder != Path("/proc"):
        folder.mkdir()
        folder.chmod(0o555)
    line = failure(invoke("calibrate", TINY, "--data", folders["calib"], "-o", folder / "c.safetensors"))
    assert "cannot write to folder" in line


def test_a_full_disk_is_one_line_and_leaves_nothing(folders, tmp_path):
    """The file-size limit makes every write past 4 KiB fail, as a full disk does."""
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from pconv.cli.main import main\n"
        "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, "convert", TINY, "--data", str(folders["calib"]), "-T", "2",
                           "--input-size", "64", "-o", str(out / "snn.safetensors"), "--calibration", "none"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: cannot write") and "disk space" in lines[0]
    assert list(out.iterdir()) == []


# --- random weights -------------------------------------------------------------------------------------------


def test_random_weights_are_refused_unless_asked_for(folders, tmp_path):
    for model in ("test_resnet", "pconv.zoo:cifar10_resnet20"):
        line = failure(invoke("convert", model, "--data", folders["calib"], "-o", tmp_path / "o.safetensors"))
        assert "has no weights" in line and "--checkpoint" in line and "--random-weights" in line
    doc = json.loads(invoke("convert", "test_resnet", "--num-classes", "3", "--random-weights", "--data",
                            folders["calib"], "--input-size", "32", "-T", "2", "--calibration", "none", "-o",
                            tmp_path / "r.safetensors", "--json").stdout)
    assert doc["num_sites"] > 1
    with pytest.raises(ModelLoadError, match="has no weights"):
        pconv.create_model("resnet18")
    assert isinstance(pconv.create_model("test_resnet", random_weights=True), nn.Module)


# --- the library checks that a calibration fits the model --------------------------------------------------------


class VGGPlusReLU(nets.VGGSmall):
    """vgg_small with one more activation site, after its classifier; the same state dict."""

    def __init__(self):
        super().__init__()
        self.extra = nn.ReLU()

    def forward(self, x):
        return self.extra(super().forward(x))


def test_the_library_refuses_a_calibration_of_another_model():
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    model = nets.vgg_small()
    calibration = pconv.calibrate(model, images, time_steps=[4], method="none")

    extra = VGGPlusReLU()
    extra.load_state_dict(model.state_dict())  # same weights, same fingerprint: only the sites differ
    extra.pretrained_cfg = model.pretrained_cfg
    with pytest.raises(ConfigError, match="another model"):  # it would keep an analog ReLU inside the SNN
        pconv.convert(extra.eval(), calibration, time_steps=4)

    wider = nets.VGGSmall()
    wider.features[12] = nn.Conv2d(32, 48, 3)  # the last site sees 48 channels instead of 32
    wider.fc1 = nn.Linear(48, 64)
    wider.pretrained_cfg = model.pretrained_cfg
    with pytest.raises(ConfigError, match="another model") as info:  # pconv's error, not a shape error
        pconv.convert(wider.eval(), calibration, time_steps=4)
    assert "48 channels" in str(info.value)

    with pytest.raises(ConfigError, match="other weights"):
        pconv.convert(nets.vgg_small(seed=7), calibration, time_steps=4)
    assert pconv.convert(model, calibration, time_steps=4).time_steps == 4
