"""The real `pconv` commands on image folders written to tmp_path, with tiny importable models.

Every command is run through click's CliRunner (stdout and stderr kept apart), its JSON parsed, and its
numbers compared with the library's. Bad inputs: one test each, all expecting one `Error: ... — ...` line.
"""

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

import pconv
from pconv.cli.main import cli
from pconv.cli._loading import make_loader
from pconv.data.folders import image_loader
from pconv.measure.evaluate import evaluate
from pconv.files.format import read_header, read_metadata

import cli_models

TINY = "cli_models:tiny_cnn"
REPO = Path(__file__).resolve().parents[2]


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def run_json(*args) -> dict:
    result = run(*args, "--json")
    return json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout


def error_line(result, code: int = 1) -> str:
    """The single `Error: ...` line of a failed command (no traceback)."""
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.stderr
    if code == 1:
        assert len(lines) == 1 and " — " in lines[0], result.stderr
    assert result.stdout == ""
    return lines[-1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    return {
        "calib": cli_models.write_random_folder(root / "calib", per_class=4, seed=1),
        "test": cli_models.write_random_folder(root / "test", per_class=6, seed=2),
    }


@pytest.fixture(scope="module")
def calib_file(folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_files") / "calib.safetensors"
    doc = run_json("calibrate", TINY, "--data", folders["calib"], "-T", "2,4", "-o", path)
    assert doc["time_steps"] == [2, 4] and doc["num_images"] == 12
    return path


@pytest.fixture(scope="module")
def snn_file(calib_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_snn") / "snn.safetensors"
    run_json("convert", TINY, "--calib", calib_file, "-T", "4", "-o", path)
    return path


# --- the happy paths -------------------------------------------------------------------------------------


def test_help_lists_every_command():
    result = run("--help")
    for command in ("calibrate", "convert", "eval", "inspect", "demo"):
        assert command in result.stdout


def test_python_dash_m_and_version():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pconv", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and pconv.__version__ in proc.stdout


def test_calibrate_records_every_T(calib_file):
    calibration = pconv.load_calibration(calib_file)
    assert calibration.time_steps == [2, 4]
    assert [s.name for s in calibration.sites] == ["relu1", "act2"]
    provenance = calibration.provenance
    assert provenance["num_images"] == 12 and provenance["seed"] == 0
    assert provenance["weights_sha256"] == pconv.models.weights_fingerprint(cli_models.tiny_cnn())
    assert calibration.data_config["input_size"] == [3, 16, 16]


def test_calibrate_with_recon_records_its_steps_and_refitted_weights(folders, tmp_path):
    path = tmp_path / "recon.safetensors"
    # one neuron per hidden channel: with the budget's population on act2 the block error is already so small
    # that three steps leave it worse, and recon keeps fit's values (and no weights) for it
    doc = run_json("calibrate", TINY, "--data", folders["calib"], "-T", "2", "-o", path, "--calibration", "recon",
                   "--recon-steps", "3", "--recon-drop", "0.25", "--population-budget", "0")
    assert doc["calibration"] == "recon" and doc["config"]["recon_steps"] == 3
    assert doc["config"]["recon_drop"] == 0.25
    calibration = pconv.load_calibration(path)
    assert calibration.config.recon_steps == 3 and calibration.provenance["recon_steps"] == 3
    assert calibration.config.recon_drop == 0.25 and calibration.provenance["recon_drop"] == 0.25
    assert len(calibration.provenance["recon_error"]["2"]) == calibration.provenance["recon_blocks"] >= 1
    assert calibration.weights[2], "recon tunes the layers' weights, and the file keeps them"


def test_convert_from_data_equals_library_and_calibration_file(folders, calib_file, tmp_path):
    """convert --data == calibrate + convert --calib == the library on the same images."""
    direct = tmp_path / "direct.safetensors"
    doc = run_json("convert", TINY, "--data", folders["calib"], "-T", "4", "-o", direct, "--batch-size", "5")
    assert doc["time_steps"] == 4 and doc["neuron"] == "parallel" and doc["num_sites"] == 2
    via_calib = tmp_path / "via_calib.safetensors"
    run_json("convert", TINY, "--calib", calib_file, "-T", "4", "-o", via_calib)

    model = cli_models.tiny_cnn()
    loader = make_loader(folders["calib"], pconv.data.config.data_config_of(model), 64, None, 0, 0)
    library = pconv.convert(model, [x for x, _ in loader], time_steps=4)
    files = [pconv.load(direct, trust_factory=True), pconv.load(via_calib, trust_factory=True)]
    for name, neuron in library.neurons().items():
        for snn in files:
            for leaf in ("theta_in", "bias", "theta_out"):
                assert torch.equal(getattr(snn.neurons()[name], leaf), getattr(neuron, leaf)), (name, leaf)


def test_convert_default_T_is_the_calibrations_only_T(folders, tmp_path):
    calib = tmp_path / "c.safetensors"
    run_json("calibrate", TINY, "--data", folders["calib"], "-T", "3", "-o", calib, "--calibration", "none")
    doc = run_json("convert", TINY, "--calib", calib, "-o", tmp_path / "s.safetensors")
    assert doc["time_steps"] == 3 and doc["calibration"] == "none"


def test_convert_serial_neuron_and_threshold_options(folders, tmp_path):
    out = tmp_path / "serial.safetensors"
    doc = run_json("convert", TINY, "--data", folders["calib"], "-T", "4", "-o", out, "--neuron", "serial",
                   "--threshold", "percentile:99.9", "--num-images", "6", "--seed", "3")
    assert doc["neuron"] == "serial" and doc["threshold"] == "percentile:99.9"
    meta, _ = read_metadata(out)
    assert meta.neuron == "serial"
    assert meta.provenance["num_images"] == 6


def test_eval_json_agrees_with_library(snn_file, folders):
    doc = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--batch-size", "7", "--sop-images", "5")
    snn = pconv.load(snn_file, trust_factory=True)
    loader = image_loader(folders["test"], snn.info.data_config, batch_size=7)
    expected = evaluate(snn, loader, sop_images=5).to_dict()
    for key in ("num_images", "top1", "top5", "ann_top1", "ann_top5", "top1_agreement", "mean_firing_rate",
                "sops_per_image", "ann_macs_per_image", "snn_macs_per_image", "time_steps", "neuron", "engine",
                "top1_diff", "top1_diff_ci95_low", "top1_diff_ci95_high", "top1_ann_only", "top1_snn_only"):
        assert doc[key] == expected[key], key
    assert doc["sites"] == expected["sites"]
    assert doc["layers"] == expected["layers"]
    assert doc["num_images"] == 18 and doc["batch_size"] == 7 and doc["img_size"] == 16
    assert doc["samples_per_sec"] > 0 and doc["step_time"] > 0
    assert doc["top1_err"] == pytest.approx(100 - doc["top1"])
    # conv2 is fed by relu1, the encoding site with 16 neurons per channel: a population's summed spikes
    assert [layer["input"] for layer in doc["layers"]] == ["image", "population", "graded"]
    for key in ("ann_energy_uj", "snn_energy_uj", "snn_energy_per_step_uj", "energy_ratio", "pj_per_ac", "pj_per_mac"):
        assert doc[key] == expected[key], key
    assert doc["energy_ratio"] == pytest.approx(doc["snn_energy_uj"] / doc["ann_energy_uj"], rel=1e-4)


def test_eval_ann_numbers_are_the_source_model(snn_file, folders):
    doc = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--sop-images", "0")
    model = cli_models.tiny_cnn()
    correct = total = 0
    with torch.inference_mode():
        for x, y in image_loader(folders["test"], pconv.data.config.data_config_of(model), batch_size=64):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert doc["ann_top1"] == round(100.0 * correct / total, 4)
    assert doc["sops_per_image"] is None and doc["sop_images"] == 0


def test_eval_engines_and_serial_baseline(snn_file, folders):
    counts = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--sop-images", "2")
    spikes = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--sop-images", "2", "--engine", "spikes")
    assert counts["engine"] == "counts" and spikes["engine"] == "spikes"
    assert spikes["top1"] == counts["top1"] and spikes["sites"] == counts["sites"]
    serial = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--neuron", "serial", "--sop-images", "2")
    assert serial["neuron"] == "serial" and serial["engine"] == "spikes" and serial["time_steps"] == 4


def test_eval_num_images_subset(snn_file, folders):
    doc = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--num-images", "5", "--seed", "1")
    assert doc["num_images"] == 5


def test_eval_human_output(snn_file, folders):
    result = run("eval", snn_file, "--trust-factory", "--data", folders["test"])
    text = result.stdout
    for needle in ("SNN (T=4)", "ANN", "top-1", "top-1 agreement SNN vs ANN", "images/s", "ms per batch",
                   "SOPs per image", "energy per image", "Spiking layers", "Synaptic layers", "0.9 pJ per accumulate",
                   "x the ANN's energy per image", "relu1", "conv2", "top-1 SNN - ANN:", "95% interval",
                   "images right only by the ANN"):
        assert needle in text, needle
    assert result.stderr == ""  # no progress bars when stderr is not a terminal


def test_eval_plot_draws_a_png_with_the_step_curve(snn_file, folders, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "eval.png"
    doc = run_json("eval", snn_file, "--trust-factory", "--data", folders["test"], "--sop-images", "2", "--plot", plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # the curve drawn: top-1 of the output after t = 1..T steps; after all T it is the SNN's top-1
    assert len(doc["step_top1"]) == doc["time_steps"] and doc["step_top1"][-1] == doc["top1"]
    before = plot.read_bytes()
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folders["test"], "--plot", plot, ok=False))
    assert "exists" in line and plot.read_bytes() == before  # refused before evaluating, file intact


def test_inspect_snn_and_calibration(snn_file, calib_file):
    doc = run_json("inspect", snn_file)
    assert doc["kind"] == "snn" and doc["time_steps"] == 4 and doc["neuron"] == "parallel"
    assert doc["model"]["name"] == TINY and doc["format_version"] == 7 and doc["encoding_levels"] == 64
    # relu1 sees the image through conv1/bn1 only: it encodes it, with what the budget chose for it (always
    # listed, at most ceil(64/4) = 16 neurons per channel); act2 with what the budget gave it, one if nothing
    relu1, act2 = doc["populated"]["4"]["relu1"], doc["populated"]["4"].get("act2", 1)
    assert 1 <= relu1 <= 16 and doc["sites"][0]["encoding"]
    assert [s["population"] for s in doc["sites"]][:2] == [relu1, act2]
    assert [n.population for n in pconv.load(snn_file, trust_factory=True).neurons().values()] == [relu1, act2]
    snn = pconv.load(snn_file, trust_factory=True)
    for site in doc["sites"]:
        theta = snn.neurons()[site["name"]].theta_in
        assert site["theta"]["max"] == pytest.approx(float(theta.max()), rel=1e-6)
    doc = run_json("inspect", calib_file)
    assert doc["kind"] == "calibration" and doc["time_steps"] == [2, 4] and set(doc["sites"][0]["theta"]) == {"2", "4"}
    text = run("inspect", snn_file).stdout
    assert "relu1" in text and "weights_sha256" in text and "θ mean" in text
    # the default's overflow neuron at the last quarter of the two sites: in the JSON, the file and the table
    assert doc["overflow"] == ["act2"] and [s["overflow"] for s in doc["sites"]] == [False, True]
    assert [n.overflow is not None for n in snn.neurons().values()] == [False, True]
    assert "overflow" in text and "+1" in text


def test_input_overrides_for_a_model_without_data_config(folders, tmp_path):
    out = tmp_path / "bare.safetensors"
    run_json("convert", "cli_models:bare_cnn", "--data", folders["calib"], "-T", "2", "-o", out,
             "--input-size", "16", "--mean", "0.5", "--std", "0.2,0.3,0.4")
    config = read_metadata(out)[0].data_config
    assert config["input_size"] == [3, 16, 16] and config["mean"] == [0.5] * 3 and config["std"] == [0.2, 0.3, 0.4]
    doc = run_json("eval", out, "--trust-factory", "--data", folders["test"], "--sop-images", "0")
    assert doc["input_size"] == [3, 16, 16]


def test_checkpoint_pth_and_safetensors(folders, tmp_path):
    weights = cli_models.tiny_cnn(seed=5).state_dict()
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": weights}, pth)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(st))
    for ckpt in (pth, st):
        out = tmp_path / f"{ckpt.suffix[1:]}.safetensors"
        run_json("convert", TINY, "-c", ckpt, "--data", folders["calib"], "-T", "2", "-o", out)
        loaded = pconv.load(out, trust_factory=True)
        assert torch.equal(loaded.net.conv1.weight, weights["conv1.weight"])


def test_timm_model_name_with_num_classes(folders, tmp_path):
    out = tmp_path / "timm.safetensors"
    doc = run_json("convert", "resnet10t", "--num-classes", "3", "--data", folders["calib"], "-T", "2", "-o", out,
                   "--input-size", "32", "--num-images", "3", "--calibration", "none", "--random-weights")
    assert doc["num_sites"] > 5
    header = read_header(out)
    assert json.loads(header.metadata["model"]) == {"kind": "timm", "name": "resnet10t", "kwargs": {"num_classes": 3}}


# --- one test per bad input ----------------------------------------------------------------------------


def test_unknown_model_suggests_close_names(folders, tmp_path):
    line = error_line(run("convert", "resnet19", "--data", folders["calib"], "-o", tmp_path / "x.st", ok=False))
    assert "unknown timm model 'resnet19'" in line and "resnet18" in line


def test_unknown_factory(folders, tmp_path):
    line = error_line(run("convert", "cli_models:no_such_net", "--data", folders["calib"], "-o", tmp_path / "x",
                          ok=False))
    assert "no_such_net" in line


def test_checkpoint_that_does_not_fit(folders, tmp_path):
    wrong_shapes = tmp_path / "five_classes.safetensors"
    save_file(cli_models.tiny_cnn(num_classes=5).state_dict(), str(wrong_shapes))
    line = error_line(run("convert", TINY, "-c", wrong_shapes, "--data", folders["calib"], "-o", tmp_path / "o",
                          ok=False))
    assert "does not fit" in line and "fc.weight" in line and "--num-classes" in line
    wrong_keys = tmp_path / "renamed.pth"
    torch.save({f"backbone.{k}": v for k, v in cli_models.tiny_cnn().state_dict().items()}, wrong_keys)
    line = error_line(run("convert", TINY, "-c", wrong_keys, "--data", folders["calib"], "-o", tmp_path / "o",
                          ok=False))
    assert "missing" in line and "unexpected" in line


def test_corrupt_checkpoint(folders, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    line = error_line(run("convert", TINY, "-c", bad, "--data", folders["calib"], "-o", tmp_path / "o", ok=False))
    assert "cannot read checkpoint" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "foreign", "future_version", "short"])
def test_corrupt_or_truncated_pconv_file(snn_file, folders, tmp_path, damage):
    data = snn_file.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) - 100])
        expect = "truncated"
    elif damage == "garbage_header":
        bad.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
        expect = "corrupt"
    elif damage == "foreign":
        save_file({"x": torch.zeros(2)}, str(bad))
        expect = "not a pconv file"
    elif damage == "future_version":
        tensors = load_file(str(snn_file))
        meta = dict(read_header(snn_file).metadata, **{"pconv.format_version": "99"})
        save_file(tensors, str(bad), metadata=meta)
        expect = "format version '99'"
    else:
        bad.write_bytes(b"\x01\x02")
        expect = "too short"
    for command in (["eval", bad, "--data", folders["test"]], ["inspect", bad]):
        assert expect in error_line(run(*command, ok=False))
    with pytest.raises(pconv.FormatError):
        pconv.load(bad, trust_factory=True)


def test_tensors_that_do_not_match_metadata(snn_file, folders, tmp_path):
    tensors = load_file(str(snn_file))
    meta = read_header(snn_file).metadata
    bad = tmp_path / "mismatch.safetensors"
    tensors["neurons.relu1.theta_in"] = torch.ones(99)
    save_file(tensors, str(bad), metadata=meta)
    assert "do not match its metadata" in error_line(run("eval", bad, "--trust-factory", "--data", folders["test"], ok=False))
    del tensors["neurons.relu1.theta_in"]
    save_file(tensors, str(bad), metadata=meta)
    assert "missing" in error_line(run("inspect", bad, ok=False))


def test_missing_and_empty_data_folder(tmp_path):
    line = error_line(run("convert", TINY, "--data", tmp_path / "nowhere", "-o", tmp_path / "o", ok=False))
    assert "does not exist" in line
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    line = error_line(run("calibrate", TINY, "--data", tmp_path / "empty", "-o", tmp_path / "o", ok=False))
    assert "0 images" in line or "no images" in line


def test_unreadable_image(tmp_path, snn_file):
    folder = cli_models.write_random_folder(tmp_path / "broken", per_class=2)
    (folder / "c1" / "bad.png").write_bytes(b"\x89PNG but not really")
    line = error_line(run("convert", TINY, "--data", folder, "-o", tmp_path / "o", ok=False))
    assert "cannot read image" in line and "bad.png" in line
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folder, ok=False))
    assert "bad.png" in line
    # raised in a DataLoader worker process: still one line naming the file
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folder, "--workers", "1", ok=False))
    assert "cannot read image" in line and "bad.png" in line and "Traceback" not in line


@pytest.mark.parametrize("steps", ["0", "100000", "-3", "eight", "4,0"])
def test_bad_time_steps_are_usage_errors(folders, tmp_path, steps):
    line = error_line(run("calibrate", TINY, "--data", folders["calib"], "-T", steps, "-o", tmp_path / "o",
                          ok=False), code=2)
    assert "--time-steps" in line
    assert not (tmp_path / "o").exists()


def test_num_images_larger_than_folder(folders, tmp_path):
    line = error_line(run("convert", TINY, "--data", folders["calib"], "-n", "500", "-o", tmp_path / "o", ok=False))
    assert "500" in line and "12" in line
    assert not (tmp_path / "o").exists()


def test_existing_output_is_left_untouched_without_force(folders, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    for command in (["calibrate", TINY], ["convert", TINY]):
        line = error_line(run(*command, "--data", folders["calib"], "-o", out, ok=False))
        assert "already exists" in line and "--force" in line
        assert out.read_bytes() == b"precious"
    run("convert", TINY, "--data", folders["calib"], "-T", "2", "-o", out, "--force")
    assert pconv.load(out, trust_factory=True).time_steps == 2


def test_interrupted_write_leaves_no_file(folders, tmp_path, monkeypatch):
    import pconv.files.export

    def half_then_interrupt(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pconv.files.export, "save_file", half_then_interrupt)
    out = tmp_path / "snn.safetensors"
    result = run("convert", TINY, "--data", folders["calib"], "-T", "2", "-o", out, ok=False)
    assert result.exit_code == 130 and "Interrupted" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unsupported_activation(folders, tmp_path):
    line = error_line(run("convert", "cli_models:gelu_cnn", "--data", folders["calib"], "-o", tmp_path / "o",
                          ok=False))
    assert "act2" in line and "gelu" in line.lower()


def test_calibration_of_another_model_is_refused(calib_file, folders, tmp_path):
    line = error_line(run("convert", "cli_models:tiny_cnn_relu6", "--calib", calib_file, "-T", "4", "-o",
                          tmp_path / "o", ok=False))
    assert "another model" in line and "act2" in line
    other = tmp_path / "other.safetensors"
    save_file(cli_models.tiny_cnn(seed=9).state_dict(), str(other))
    line = error_line(run("convert", TINY, "-c", other, "--calib", calib_file, "-T", "4", "-o", tmp_path / "o",
                          ok=False))
    assert "other weights" in line


def test_calibration_without_the_requested_T(calib_file, tmp_path):
    line = error_line(run("convert", TINY, "--calib", calib_file, "-T", "8", "-o", tmp_path / "o", ok=False))
    assert "T=8" in line and "2, 4" in line


def test_calibration_file_is_not_an_snn(calib_file, folders):
    line = error_line(run("eval", calib_file, "--trust-factory", "--data", folders["test"], ok=False))
    assert "calibration file, not an SNN" in line


@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of --calib"),
    (["--data", "DATA", "--calib", "CALIB"], "exactly one of --calib"),
    (["--calib", "CALIB", "--threshold", "mse"], "--threshold"),
    (["--calib", "CALIB", "--num-images", "3"], "--num-images"),
    (["--data", "DATA", "--threshold", "percentile:120"], "percentile"),
    (["--data", "DATA", "--threshold", "median"], "unknown threshold method"),
    (["--calib", "CALIB"], "choose one with -T"),
])
def test_usage_errors_exit_2(folders, calib_file, tmp_path, args, needle):
    args = [{"DATA": folders["calib"], "CALIB": calib_file}.get(a, a) for a in args]
    line = error_line(run("convert", TINY, *args, "-o", tmp_path / "o", ok=False), code=2)
    assert needle in line


def test_engine_the_neuron_cannot_run(snn_file, folders):
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folders["test"], "--engine", "steps", ok=False))
    assert "parallel neuron cannot run in the 'steps' engine" in line
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folders["test"], "--neuron", "serial", "--engine", "counts",
                          ok=False))
    assert "serial neuron cannot run in the 'counts' engine" in line and "spikes" in line


def test_labels_outside_the_models_classes(snn_file, tmp_path):
    folder = cli_models.write_random_folder(tmp_path / "five", classes=5, per_class=1)
    line = error_line(run("eval", snn_file, "--trust-factory", "--data", folder, ok=False))
    assert "the class map lists 5 classes, the model has 3" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(snn_file, folders):
    assert "CUDA is not available" in error_line(run("eval", snn_file, "--trust-factory", "--data", folders["test"], "--device",
                                                     "cuda", ok=False))


def test_debug_shows_the_exception(tmp_path):
    result = CliRunner().invoke(cli, ["convert", "resnet19", "--data", str(tmp_path), "-o", str(tmp_path / "o"),
                                      "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, pconv.ModelLoadError)


def run_by_the_spec(snn_file, folders) -> None:
    """docs/format.md, followed by hand: read the raw file, run the count form with plain torch functions."""
    import torch.nn.functional as F
    from safetensors import safe_open

    with safe_open(str(snn_file), framework="pt") as f:
        meta = f.metadata()
        t = {name: f.get_tensor(name) for name in f.keys()}
    assert meta["pconv.format"] == "pconv" and meta["pconv.format_version"] == "7" and meta["neuron"] == "parallel"
    T = int(meta["time_steps"])
    levels = int(meta["encoding_levels"])
    populated = json.loads(meta["populated"])  # {site: neurons per channel} for the sites the budget chose
    encoding = {s["name"]: s["encoding"] for s in json.loads(meta["sites"])}
    cap = {s["name"]: s["cap"] for s in json.loads(meta["sites"])}
    overflow = json.loads(meta["overflow"])  # sites with one more neuron per channel above the top level
    assert overflow == ["act2"]  # the defaults give the last quarter of the two sites one
    cfg = json.loads(meta["data_config"])
    w = {k[len("weights."):]: v for k, v in t.items() if k.startswith("weights.")}

    def neuron(x, site):
        theta_in, bias, theta_out = (t[f"neurons.{site}.{leaf}"].view(1, -1, 1, 1)
                                     for leaf in ("theta_in", "bias", "theta_out"))
        unlisted = (-(-levels // T) if levels > T else 1) if encoding[site] else 1
        m = populated.get(site, unlisted)  # per channel
        k = sum(torch.clamp(torch.floor((T * x + bias + j * theta_in / m) / theta_in), 0, T) for j in range(m))
        if site in overflow:  # its own count, up to E levels (T, fewer under a ReLU6 cap) above the top one
            E = torch.full_like(theta_out, float(T))
            if cap[site] is not None:
                room = torch.floor((cap[site] - theta_out) * m * T / theta_out).clamp(0, T)
                E = torch.where(theta_out > 0, room, torch.zeros_like(room))
            k_o = torch.clamp(torch.floor((T * x + bias - T * theta_in) / (theta_in / m)), 0, T)
            k = k + torch.minimum(k_o, E)
        return theta_out * k / (m * T)

    def forward(x):  # TinyCNN, re-implemented from its weights and the spec
        x = F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=1)
        x = F.batch_norm(x, w["bn1.running_mean"], w["bn1.running_var"], w["bn1.weight"], w["bn1.bias"], eps=1e-5)
        x = F.max_pool2d(neuron(x, "relu1"), 2)
        x = neuron(F.conv2d(x, w["conv2.weight"], w["conv2.bias"], padding=1), "act2")
        return F.linear(x.mean(dim=(2, 3)), w["fc.weight"], w["fc.bias"])

    x, _ = next(iter(image_loader(folders["test"], cfg, batch_size=18)))
    with torch.inference_mode():
        assert torch.allclose(forward(x), pconv.load(snn_file, trust_factory=True)(x), atol=1e-5)


def test_format_spec_is_enough_to_run_the_snn(snn_file, folders):
    run_by_the_spec(snn_file, folders)


def test_population_budget_codes_a_hidden_site_end_to_end(folders, tmp_path):
    calib = tmp_path / "c.safetensors"
    doc = run_json("calibrate", TINY, "--data", folders["calib"], "-T", "4,64", "-o", calib,
                   "--population-budget", "100")
    # a budget this large stops only where a step gains nothing: act2 gets several neurons, at most 16
    m, stem = doc["populations"]["4"]["act2"], doc["populations"]["4"]["relu1"]
    assert doc["population_budget"] == 100 and doc["populations"]["4"] == {"relu1": stem, "act2": m}
    assert 2 < m <= 16 and 1 <= stem <= 16
    assert doc["populations"]["64"] == {}  # 64 levels at T=64: no population anywhere
    info = run_json("inspect", calib)
    assert info["populated"] == {"4": {"relu1": stem, "act2": m}}
    assert info["sites"][1]["population"] == {"4": m, "64": 1}
    snn = tmp_path / "s.safetensors"
    doc = run_json("convert", TINY, "--calib", calib, "-T", "4", "-o", snn)
    assert doc["populations"] == {"relu1": stem, "act2": m}
    assert run_json("inspect", snn)["sites"][1]["population"] == m
    run_by_the_spec(snn, folders)
    text = run("calibrate", TINY, "--data", folders["calib"], "-T", "4", "-o", tmp_path / "c2.safetensors",
               "--population-budget", "100").stdout
    assert f"T=4: 1 site (1 × {m} neurons per channel: act2)" in text


def test_calibration_without_fingerprint_warns(folders, tmp_path):
    model = cli_models.tiny_cnn()
    loader = image_loader(folders["calib"], pconv.data.config.data_config_of(model), batch_size=64)
    calibration = pconv.calibrate(model, loader, time_steps=[2])
    assert calibration.provenance["weights_sha256"] == pconv.models.weights_fingerprint(model)
    del calibration.provenance["weights_sha256"]  # as in files of pconv versions that did not record it
    pconv.save_calibration(calibration, tmp_path / "api.safetensors")
    result = run("convert", TINY, "--calib", tmp_path / "api.safetensors", "-o", tmp_path / "s.safetensors", "--json")
    assert json.loads(result.stdout)["time_steps"] == 2
    assert "Warning:" in result.stderr and "fingerprint" in result.stderr
