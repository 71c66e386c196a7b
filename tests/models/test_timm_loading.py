"""Speaking timm: pretrained weights from a Hugging Face cache (offline), timm's training checkpoints, the data
config as validate.py resolves it, its result fields and --results-file, --model-kwargs."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import cli_models
import pconv
from pconv.data.config import data_config_of

REPO = Path(__file__).resolve().parents[2]
TAGGED = "test_resnet.r160_in1k"
HUB = f"hf-hub:timm/{TAGGED}"


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache (the hub's folder layout) holding `files` for `repo_id` at revision main."""
    commit = "0" * 40
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Random weights of test_resnet.r160_in1k as the hub would serve them (model.safetensors, config.json)."""
    root = tmp_path_factory.mktemp("hf_home")
    torch.manual_seed(3)
    model = timm.create_model(TAGGED, pretrained=False)
    weights = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = timm.models.get_pretrained_cfg(TAGGED).to_dict()
    config = {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": cfg}
    hub_cache(root, f"timm/{TAGGED}", {"model.safetensors": weights.read_bytes(),
                                        "config.json": json.dumps(config).encode()})
    return root, load_file(str(weights))


def pconv_cli(*args, hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "pconv", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("name, recorded", [(TAGGED, TAGGED), (HUB, "test_resnet")])
def test_pretrained_weights_from_the_local_cache(cached, tmp_path, name, recorded):
    hf_home, weights = cached
    folder = cli_models.write_random_folder(tmp_path / "calib", per_class=2, size=40)
    out = tmp_path / "snn.safetensors"
    proc = pconv_cli("convert", name, "--pretrained", "--data", folder, "-T", "4", "--calibration", "none",
                     "--population-budget", "0", "-o", out, "--json", hf_home=hf_home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pretrained"] is True and doc["data_config"]["input_size"] == [3, 160, 160]
    snn = pconv.load(out)  # a timm architecture: no trust needed, and no hub either
    assert snn.info.source.name == recorded and snn.info.source.kwargs == {"num_classes": 1000}
    ann = snn.to_ann().state_dict()
    assert all(torch.equal(ann[k], v) for k, v in weights.items())  # the cached weights, not random ones


def test_weights_missing_from_the_cache_are_one_clear_line(tmp_path):
    folder = cli_models.write_random_folder(tmp_path / "calib", per_class=1)
    proc = pconv_cli("convert", TAGGED, "--pretrained", "--data", folder, "-o", tmp_path / "x.safetensors",
                     hf_home=tmp_path / "empty_cache", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "not in the local Hugging Face cache" in lines[0] and "HF_HOME" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_a_tag_timm_does_not_have_is_refused_naming_its_tags():
    with pytest.raises(pconv.ModelLoadError, match="no pretrained tag 'bogus_tag' for test_resnet") as info:
        pconv.create_model("test_resnet.bogus_tag", pretrained=True)
    assert "r160_in1k" in info.value.hint


def training_checkpoint(path: Path, state: dict, ema: dict | None, prefix: str = "") -> Path:
    """What timm's train.py saves: epoch, arch, state_dict, optionally state_dict_ema, and args (a Namespace)."""
    checkpoint = {"epoch": 7, "arch": "tiny_cnn", "state_dict": {prefix + k: v for k, v in state.items()},
                  "args": argparse.Namespace(lr=0.1, model="tiny_cnn"), "metric": 61.2}
    if ema is not None:
        checkpoint["state_dict_ema"] = {prefix + k: v for k, v in ema.items()}
    torch.save(checkpoint, path)
    return path


def test_timm_training_checkpoints_with_and_without_ema(tmp_path):
    plain, ema = cli_models.tiny_cnn(seed=1).state_dict(), cli_models.tiny_cnn(seed=2).state_dict()
    both = training_checkpoint(tmp_path / "last.pth.tar", plain, ema)
    compiled = training_checkpoint(tmp_path / "compiled.pth.tar", plain, None, prefix="_orig_mod.")
    weight = "conv1.weight"
    assert torch.equal(pconv.create_model("cli_models:tiny_cnn", checkpoint=both).state_dict()[weight], plain[weight])
    assert torch.equal(pconv.create_model("cli_models:tiny_cnn", checkpoint=both, use_ema=True).state_dict()[weight],
                       ema[weight])
    assert torch.equal(pconv.create_model("cli_models:tiny_cnn", checkpoint=compiled).state_dict()[weight],
                       plain[weight])  # torch.compile's _orig_mod. prefix removed
    with pytest.raises(pconv.ModelLoadError, match="holds no EMA weights"):
        pconv.create_model("cli_models:tiny_cnn", checkpoint=compiled, use_ema=True)


def test_the_data_config_is_validate_pys():
    """resnet18.a1_in1k trains at 224 px, crop 0.95, and is tested at 288 px, crop 1.0: validate.py's default."""
    from timm.data import resolve_data_config

    model = pconv.create_model("resnet18.a1_in1k", random_weights=True)
    tested = data_config_of(model)
    assert tested["input_size"] == [3, 288, 288] and tested["crop_pct"] == 1.0
    assert tested == {k: list(v) if isinstance(v, tuple) else v
                      for k, v in resolve_data_config({}, model=model, use_test_size=True).items()}
    trained = data_config_of(model, use_test_size=False)
    assert trained["input_size"] == [3, 224, 224] and trained["crop_pct"] == 0.95


def test_the_cli_takes_validate_pys_data_flags_and_writes_results_files(tmp_path):
    from click.testing import CliRunner

    from pconv.cli.main import cli

    calib = cli_models.write_random_folder(tmp_path / "calib", per_class=2, size=40)
    test = cli_models.write_random_folder(tmp_path / "test", per_class=2, size=40)
    runner = CliRunner()
    out = tmp_path / "r18.safetensors"
    result = runner.invoke(cli, ["convert", "resnet18.a1_in1k", "--random-weights", "--num-classes", "3",
                                 "--data", str(calib), "-T", "2", "--calibration", "none", "--population-budget", "0",
                                 "--img-size", "64", "--crop-pct", "0.9", "--interpolation", "bilinear",
                                 "--model-kwargs", "drop_rate=0.0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["data_config"]["input_size"] == [3, 64, 64] and doc["data_config"]["crop_pct"] == 0.9
    assert doc["data_config"]["interpolation"] == "bilinear"
    assert pconv.load(out).info.source.kwargs == {"num_classes": 3, "drop_rate": 0.0}
    rows = {}
    for suffix in ("csv", "json"):
        path = tmp_path / f"results.{suffix}"
        result = runner.invoke(cli, ["eval", str(out), "--data", str(test), "--sop-images", "0",
                                     "--results-file", str(path), "--json"])
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        rows[suffix] = list(csv.DictReader(path.open())) if suffix == "csv" else json.loads(path.read_text())
        assert len(rows[suffix]) == 1
        row = rows[suffix][0]
        assert list(row)[:9] == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                                 "crop_pct", "interpolation"]  # validate.py's columns first
        assert float(row["top1"]) == doc["top1"] and float(row["param_count"]) == doc["param_count"]
        assert doc["param_count"] == round(sum(p.numel() for p in pconv.load(out).net.parameters()) / 1e6, 2)
        assert "step_time" in doc and "step_time_ms" not in doc
    again = runner.invoke(cli, ["eval", str(out), "--data", str(test), "--results-file", str(tmp_path / "results.csv")])
    assert again.exit_code == 1 and "already exists" in again.stderr  # checked before the evaluation
