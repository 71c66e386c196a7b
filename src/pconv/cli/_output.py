"""The single output sink of the CLI: results to stdout (a rich table, or one JSON document), everything
else (progress bars, notes, errors) to a rich console on stderr."""

from __future__ import annotations

import io
import json
import math
import os
import sys
from typing import Any, Callable

import click
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..calibration import Calibration
from ..utils import distributed

#: Width used when stdout is not a terminal, so piped tables do not wrap at 80 columns.
PIPE_WIDTH = 120


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    is_tty = stream.isatty()
    # Resolve the stream at creation time: click's CliRunner swaps sys.stdout/sys.stderr per invocation.
    return Console(file=stream, width=None if is_tty else PIPE_WIDTH, highlight=False, soft_wrap=False,
                   force_terminal=None if is_tty else False)


class RichProgress:
    """pconv.progress.Progress on a rich progress bar (stderr); silent when disabled."""

    def __init__(self, console: Console, enabled: bool):
        self.enabled = enabled
        self._bar = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), console=console, disable=not enabled,
                             transient=False)
        self._current: int | None = None

    def __enter__(self) -> "RichProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish_current()
        self._bar.stop()

    def _finish_current(self) -> None:
        if self._current is not None:
            task = self._bar.tasks[-1]
            if task.total is not None:
                self._bar.update(self._current, completed=task.total)
            self._current = None

    def stage(self, description: str, total: int | None) -> Callable[[], None]:
        self._finish_current()
        task = self._bar.add_task(description, total=total)
        self._current = task
        return lambda: self._bar.advance(task)


class Output:
    """Where a command's results and messages go."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)
        # Under torchrun only rank 0 speaks: one table or JSON document, one progress bar.
        self.silent = not distributed.is_main()

    def progress(self) -> RichProgress:
        enabled = (not self.as_json and self.err.is_terminal and not os.environ.get("PCONV_NO_PROGRESS")
                   and not self.silent)
        return RichProgress(self.err, enabled)

    def note(self, text: str) -> None:
        """A message for a human (stderr; never pollutes stdout or the JSON document)."""
        if not self.as_json and not self.silent:
            self.err.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        if self.silent:
            return
        self.err.print(f"Warning: {text}", markup=False, highlight=False, style="yellow")

    def result(self, document: dict[str, Any], render: Callable[[Console], None]) -> None:
        """Exactly one JSON document with --json, else the human rendering."""
        if self.silent:
            return
        if self.as_json:
            click.echo(json.dumps(document, indent=2, allow_nan=False))
        elif self.out.is_terminal:
            render(self.out)
        else:
            # Piped or captured: plain text without the padding rich adds to fill table widths.
            capture = Console(file=io.StringIO(), width=PIPE_WIDTH, highlight=False, force_terminal=False,
                              color_system=None)
            render(capture)
            text = capture.file.getvalue()
            click.echo("\n".join(line.rstrip() for line in text.splitlines()))


def key_value_table(rows: list[tuple[str, Any]], title: str | None = None) -> RenderableType:
    """Two columns without borders, under a one-line title (never wrapped to the table's width)."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, "" if value is None else str(value))
    return table if title is None else Group(Text(title, style="bold"), table)


def si(value: float | None, digits: int = 3) -> str:
    """1234567 -> '1.23 M'."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    units = ["", " k", " M", " G", " T"]
    exp = min(int(math.floor(math.log10(abs(value)) / 3)), len(units) - 1) if abs(value) >= 1 else 0
    return f"{value / 1000 ** exp:.{digits}g}{units[exp]}"


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}%"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def encoding_summary(calibration: Calibration, time_steps: list[int]) -> str:
    """One line: how many neurons per channel the encoding sites have at each T, and whether the budget chose it
    (since format version 6) or the encoding levels gave it (ceil(levels/T))."""
    encoders = [s.name for s in calibration.sites if s.encoding]
    levels = calibration.encoding_levels
    if not encoders or levels == 0:
        return "one neuron per channel at every site"
    parts = []
    for T in time_steps:
        sizes = calibration.populations(T)
        parts.append(f"{'/'.join(str(m) for m in dict.fromkeys(sizes[n] for n in encoders))} at T={T}")
    chosen = any(n in calibration.populated.get(T, {}) for T in time_steps for n in encoders)
    how = f"chosen within the budget, at most {levels} levels" if chosen else f"≥ {levels} levels"
    return f"{', '.join(encoders)}: neurons per channel {', '.join(parts)} ({how})"


def population_summary(calibration: Calibration, time_steps: list[int]) -> str:
    """One line: the hidden sites population-coded at each T (chosen under --population-budget), counted by
    their neurons per channel, named in network order (the encoding sites are encoding_summary's)."""
    encoders = {s.name for s in calibration.sites if s.encoding}
    parts = []
    for T in time_steps:
        sizes = {n: m for n, m in calibration.populated.get(T, {}).items() if n not in encoders}
        if sizes:
            by_size = {m: [n for n, k in sizes.items() if k == m] for m in sorted(set(sizes.values()))}
            counts = ", ".join(f"{len(names)} × {m}" for m, names in by_size.items())
            names = list(sizes)
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            sites = "1 site" if len(names) == 1 else f"{len(names)} sites"
            parts.append(f"T={T}: {sites} ({counts} neurons per channel: {shown})")
    return "; ".join(parts) or "none"


def overflow_summary(calibration: Calibration) -> str:
    """One line: the sites with an overflow neuron per channel (the last ones, at every T), first and last named."""
    names = calibration.overflow
    shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
    return (f"{len(names)} of {len(calibration.sites)} sites ({shown}): one more neuron per channel for up to T "
            "levels above the top one")


#: The provenance entries about memory that calibrate and convert report.
MEMORY_KEYS = ("memory_budget_mb", "peak_tensor_mb", "peak_rss_mb")


def memory_summary(provenance: dict) -> str:
    """One line: what the calibration held at its peak, against its budget."""
    return (f"peak {provenance['peak_tensor_mb'] / 1024:.2f} GiB of tensors (budget "
            f"{provenance['memory_budget_mb'] / 1024:.2f} GiB), process peak {provenance['peak_rss_mb'] / 1024:.2f} GiB")


def plan_summary(calibration: Calibration, time_steps: list[int]) -> str:
    """One line: the configured method, and what ran at each T where that differs (`auto`)."""
    steps = {T: calibration.step(T) for T in time_steps}
    ran = [f"{step} at T={T}" for T, step in steps.items()
           if step.method != calibration.method or str(step.threshold) != calibration.threshold]
    return calibration.method + (f" ({', '.join(ran)})" if ran else "")


RESULTS_FORMATS = ("csv", "json")
#: The columns of a results row: timm's validate.py's first, then the SNN's (scalars only, so rows of CSV files
#: from both join).
RESULTS_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                   "interpolation", "time_steps", "neuron", "engine", "ann_top1", "ann_top5", "top1_agreement",
                   "top1_diff", "top1_diff_ci95_low", "top1_diff_ci95_high", "top1_ann_only", "top1_snn_only",
                   "mean_firing_rate", "sops_per_image", "ann_macs_per_image", "snn_macs_per_image",
                   "graded_macs_per_image", "neurons_per_image", "ann_energy_uj", "snn_energy_uj",
                   "snn_energy_per_step_uj", "energy_ratio", "pj_per_ac", "pj_per_mac",
                   "samples_per_sec", "step_time", "ann_samples_per_sec", "ann_step_time", "batch_size",
                   "num_images", "file", "data")


def results_row(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc.get(key) for key in RESULTS_COLUMNS}


def write_results_file(path, rows: list[dict[str, Any]], fmt: str | None, force: bool) -> None:
    """The rows as validate.py writes its results: a CSV table with a header, or a JSON list (atomically)."""
    import csv

    from ..files.atomic import atomic_write

    fmt = fmt or ("json" if str(path).lower().endswith(".json") else "csv")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "json":
                json.dump(rows, f, indent=4)
            else:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    atomic_write(path, write, force)
