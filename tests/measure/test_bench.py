"""`pconv bench` and the benchmark library: every field present and consistent (speed itself is measured in
bench/, never asserted in a test)."""

import json

import pytest
import torch
from click.testing import CliRunner

import nets
import pconv
from pconv.measure.benchmark import BENCH_ENGINES, BenchConfig, EngineResult, benchmark
from pconv.cli.main import cli


@pytest.fixture(scope="module")
def snn_file(tmp_path_factory):
    snn = pconv.convert(nets.vgg_small(), [torch.randn(8, 3, 32, 32)], time_steps=8)
    return pconv.save(snn, tmp_path_factory.mktemp("bench") / "vgg.safetensors")


def test_bench_json_reports_every_field(snn_file):
    result = CliRunner().invoke(cli, ["bench", str(snn_file), "--trust-factory", "--batch-size", "4", "--iters", "1", "--warmup", "1",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["time_steps"] == 8 and doc["img_size"] == 32 and doc["input_size"] == [3, 32, 32]
    # timm's units: parameters in millions (2 decimals), times in ms
    assert doc["param_count"] == round(sum(p.numel() for p in nets.vgg_small().parameters()) / 1e6, 2)
    assert [e["engine"] for e in doc["engines"]] == list(BENCH_ENGINES)
    fields = set(EngineResult.__dataclass_fields__)
    for e in doc["engines"]:
        assert set(e) == fields
        assert e["batch_size"] == 4 and e["samples_per_sec"] > 0 and e["latency_ms"] > 0
        assert e["step_time"] == pytest.approx(4000 / e["samples_per_sec"], rel=1e-3)
        assert e["peak_memory_mb"] > 0
        assert e["samples_per_sec_vs_ann"] > 0 and e["latency_vs_ann"] > 0
    ann = doc["engines"][0]
    assert ann["samples_per_sec_vs_ann"] == 1.0 and ann["latency_vs_ann"] == 1.0
    by = {e["engine"]: e for e in doc["engines"]}
    # The spike engine holds T copies of every activation; the count engine one.
    assert by["spikes"]["peak_memory_mb"] > 4 * by["counts"]["peak_memory_mb"]


def test_bench_table_and_bad_options(snn_file):
    runner = CliRunner()
    ok = runner.invoke(cli, ["bench", str(snn_file), "--trust-factory", "-b", "2", "--iters", "1", "--warmup", "0",
                             "--engines", "counts,ann", "--device", "cpu"])
    assert ok.exit_code == 0, ok.stderr
    rows = [line.split()[1] for line in ok.stdout.splitlines() if line.startswith("│")]
    assert rows == ["counts", "ann"]  # the engines asked for, in the order asked, and no other
    bad = runner.invoke(cli, ["bench", str(snn_file), "--trust-factory", "--engines", "ann,warp"])
    assert bad.exit_code == 2 and "'warp' is not an engine" in bad.stderr  # a usage mistake
    graph = runner.invoke(cli, ["bench", str(snn_file), "--trust-factory", "--cuda-graph", "--device", "cpu"])
    assert graph.exit_code == 2 and "CUDA graphs need a CUDA device" in graph.stderr


def test_reduced_precision_reports_agreement():
    snn = pconv.convert(nets.vgg_small(), [torch.randn(8, 3, 32, 32)], time_steps=4)
    config = BenchConfig(batch_size=8, precision="bf16", engines=("ann", "counts"), iters=1, latency_iters=1, warmup=0)
    result = benchmark(snn, (3, 32, 32), config)
    assert result.precision == "bf16"
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # benchmark's input
    for e, module in zip(result.engines, (snn.to_ann(), snn)):
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                reduced = module(x).float().argmax(1)
            full = module(x).argmax(1)
        assert e.top1_agreement_vs_fp32 == pytest.approx(100.0 * (reduced == full).float().mean().item())


def test_bench_times_the_images_of_a_folder(snn_file, tmp_path, monkeypatch):
    """--data: the engines are timed on the folder's images (read with the file's data config), and reduced
    precision's agreement with fp32 is measured on them, not on noise."""
    import cli_models
    from pconv.cli import bench as bench_command
    from pconv.cli._loading import make_loader
    from pconv.data.batches import images_of

    folder = cli_models.write_random_folder(tmp_path / "images", classes=2, per_class=3, size=40)
    timed = {}

    def spy(snn, input_size, config, images=None, progress=None):
        timed["images"] = images
        return benchmark(snn, input_size, config, images=images, progress=progress)

    monkeypatch.setattr(bench_command, "benchmark", spy)
    result = CliRunner().invoke(cli, ["bench", str(snn_file), "--trust-factory", "-b", "4", "--iters", "1", "--warmup",
                                      "0", "--rounds", "1", "--engines", "ann,counts", "--device", "cpu", "--precision",
                                      "bf16", "--data", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["inputs"] == f"{folder}: 4 images"
    snn = pconv.load(snn_file, trust_factory=True)
    loader = make_loader(folder, snn.info.data_config, 4, None, seed=0, workers=0, cap=4, labelled=False)
    x = images_of(next(iter(loader)))
    assert torch.equal(timed["images"], x)
    for e, module in zip(doc["engines"], (snn.to_ann(), snn)):
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                reduced = module(x).float().argmax(1)
            full = module(x).argmax(1)
        assert e["top1_agreement_vs_fp32"] == pytest.approx(100.0 * (reduced == full).float().mean().item())
    plain = CliRunner().invoke(cli, ["bench", str(snn_file), "--trust-factory", "-b", "2", "--iters", "1", "--warmup",
                                     "0", "--rounds", "1", "--engines", "ann", "--device", "cpu", "--json"])
    assert json.loads(plain.stdout)["inputs"] == "random"
    # a folder smaller than the batch: all of its images, repeated to fill the batch
    small = CliRunner().invoke(cli, ["bench", str(snn_file), "--trust-factory", "-b", "16", "--iters", "1", "--warmup",
                                     "0", "--rounds", "1", "--engines", "ann", "--device", "cpu", "--data", str(folder),
                                     "--json"])
    assert small.exit_code == 0, small.stderr
    assert json.loads(small.stdout)["inputs"] == f"{folder}: 6 images"


def test_engines_alternate_which_runs_first(monkeypatch):
    from pconv.measure import benchmark as bm

    snn = pconv.convert(nets.vgg_small(), [torch.randn(8, 3, 32, 32)], time_steps=4)
    order = []
    real = bm._runners

    def tagged(snn, engines):
        runners = real(snn, engines)
        for engine, module in runners.items():
            module.register_forward_pre_hook(lambda m, i, e=engine: order.append((e, i[0].shape[0])))
        return runners

    monkeypatch.setattr(bm, "_runners", tagged)
    config = BenchConfig(batch_size=2, engines=("ann", "counts"), iters=1, latency_iters=1, warmup=0, rounds=3)
    benchmark(snn, (3, 32, 32), config)
    batch_calls = [engine for engine, batch in order if batch == 2][:10]  # the three rounds' (and peak memory's)
    # round 1 without warm-up: ann, counts; round 2 reversed, one warm-up call each: counts ×2, ann ×2; round 3
    # in the first order again: ann ×2, counts ×2
    assert batch_calls == ["ann", "counts"] + ["counts"] * 2 + ["ann"] * 2 + ["ann"] * 2 + ["counts"] * 2
