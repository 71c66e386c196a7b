"""`pconv bench`: one SNN file timed four ways — the ANN, the serial IF baseline, the spike engine and the
count engine — at a batch size and at batch 1, with peak memory and ratios against the ANN."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..data.batches import images_of
from ..measure.benchmark import BENCH_ENGINES, PRECISIONS, BenchConfig, BenchResult, benchmark
from ..errors import ConfigError
from ..files.export import load
from ._loading import make_loader, resolve_device
from ._options import debug_option, device_option, json_option, trust_factory_option
from ._output import Output


class EngineList(click.ParamType):
    """`ann,counts`: a subset of the bench engines, in the order given."""

    name = "ENGINE[,ENGINE...]"

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        chosen = tuple(e.strip() for e in str(value).split(",") if e.strip())
        unknown = [e for e in chosen if e not in BENCH_ENGINES]
        if unknown or not chosen:
            self.fail(f"{unknown[0] if unknown else value!r} is not an engine — use some of: "
                      f"{', '.join(BENCH_ENGINES)}", param, ctx)
        return chosen


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(console, result: BenchResult, title: str) -> None:
    console.print(title, markup=False, style="bold")
    table = Table()
    for col in ("engine", "images/s", "ms/batch", "ms/image bs1", "peak MiB", "img/s vs ANN", "latency vs ANN"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    if any(e.top1_agreement_vs_fp32 is not None for e in result.engines):
        table.add_column("top-1 agree fp32", justify="right")
    for e in result.engines:
        row = [e.engine, f"{e.samples_per_sec:.1f}", f"{e.step_time:.2f}", f"{e.latency_ms:.2f}",
               f"{e.peak_memory_mb:.1f}", _ratio(e.samples_per_sec_vs_ann), _ratio(e.latency_vs_ann)]
        if e.top1_agreement_vs_fp32 is not None:
            row.append(f"{e.top1_agreement_vs_fp32:.1f}%")
        table.add_row(*row)
    console.print(table)
    console.print("serial = classic IF neurons, T sequential passes; spikes = T*B samples through every layer; "
                  "counts = each neuron emits its time-mean (cost independent of T). Peak memory: tensor bytes "
                  "alive during one batch forward.")


@click.command("bench")
@click.argument("snn_file", metavar="SNN_FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=64, show_default=True,
              help="Batch size of the throughput run (latency is always measured at batch 1).")
@click.option("--engines", type=EngineList(), default=",".join(BENCH_ENGINES), show_default=True,
              help="Comma-separated subset of: " + ", ".join(BENCH_ENGINES) + ".")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="fp32, or bf16/fp16 autocast (top-1 agreement with fp32 is reported).")
@click.option("--channels-last", is_flag=True, help="Run in channels-last memory format.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile every engine.")
@click.option("--cuda-graph", is_flag=True, help="Replay every engine from a CUDA graph (CUDA only).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls first.")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed calls at --batch-size (twice as many at batch 1).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Engines take turns this many times; each reports its median round.")
@click.option("--data", "-d", "data", type=click.Path(path_type=Path), default=None,
              help="Time on real images from this folder (--batch-size of them drawn with seed 0, or all of a smaller "
                   "folder, read with the file's data config); with --precision the agreement with fp32 is then measured on them. "
                   "Without it: random inputs.")
@click.option("--spike-batch-limit", type=click.IntRange(min=1), default=None,
              help="Most samples (T x images) per spike-domain pass; larger batches run in chunks.")
@trust_factory_option
@device_option
@json_option
@debug_option
def bench(snn_file: Path, batch_size: int, engines: tuple[str, ...], precision: str, channels_last: bool,
          use_compile: bool, cuda_graph: bool, warmup: int, iters: int, rounds: int, data: Path | None,
          spike_batch_limit: int | None, trust_factory: bool, device: str, as_json: bool) -> None:
    """Time SNN_FILE against its source ANN: images/s, ms per image at batch 1, peak memory."""
    out = Output(as_json)
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise click.UsageError("CUDA graphs need a CUDA device — pass --device cuda, or drop --cuda-graph")
    snn = load(snn_file, device=dev, trust_factory=trust_factory)
    chosen = engines
    input_size = tuple(snn.info.data_config.get("input_size") or ())
    if not input_size:
        raise ConfigError(f"{snn_file} has no input size in its data config", "re-export it with pconv convert")
    images = None
    if data is not None:
        # --batch-size of them, or all of a smaller folder (the benchmark repeats them to fill the batch)
        loader = make_loader(data, snn.info.data_config, batch_size, None, seed=0, workers=0, cap=batch_size,
                             labelled=False)
        images = images_of(next(iter(loader)))
    with out.progress() as progress:
        tick = progress.stage("timing engines", len(chosen))
        started = []

        def on_engine(name: str) -> None:
            if started:
                tick()
            started.append(name)

        config = BenchConfig(batch_size=batch_size, device=str(dev), engines=chosen, precision=precision,
                             channels_last=channels_last, compile=use_compile, cuda_graph=cuda_graph, warmup=warmup,
                             iters=iters, latency_iters=2 * iters, rounds=rounds, spike_batch_limit=spike_batch_limit)
        result = benchmark(snn, input_size, config, images=images, progress=on_engine)
        if images is not None:
            result.inputs = f"{data}: {images.shape[0]} images"
        tick()
    doc = {"file": str(snn_file), **result.to_dict()}
    title = (f"{snn_file.name}: {result.model}, T={result.time_steps}, {dev}, {precision}, batch {batch_size}, "
             f"inputs: {result.inputs}")
    out.result(doc, lambda console: render(console, result, title))
