"""`pconv`: the command group and its error map.

A user's mistake (any PconvError) becomes one line `Error: <what> — <hint>` on stderr and exit 1; usage
errors exit 2 as click does; Ctrl-C exits 130 and SIGTERM 143, neither leaving a partial file (writes are
atomic, and SIGTERM is turned into an exception so that every cleanup runs).
`--debug` (on the group or on any command) shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys

import click

from ..utils import distributed
from ..errors import PconvError
from ..files.atomic import Terminated, raise_terminated
from ..utils.memory import tune_malloc
from ..version import __version__
from ._options import DEBUG_KEY, debug_option

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _fail(message: str, hint: str = "") -> None:
    click.echo(f"Error: {_one_line(message)}" + (f" — {_one_line(hint)}" if hint else ""), err=True)


def _worker_unwrapped(e: PconvError) -> tuple[str, str]:
    """A DataLoader worker re-raises an error with the remote traceback as its message; keep its last line."""
    if "Original Traceback" not in e.message:
        return e.message, e.hint
    last = e.message.strip().splitlines()[-1]
    message, _, hint = last.partition(": ")[2].partition(" — ")
    return message or last, hint


class PconvGroup(click.Group):
    """A click group that maps exceptions from its commands to exit codes and one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("\nInterrupted — no partial output file was left behind.", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Terminated:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("\nTerminated (SIGTERM) — no partial output file was left behind.", err=True)
            ctx.exit(EXIT_TERMINATED)
        except PconvError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            _fail(*_worker_unwrapped(e))
            ctx.exit(EXIT_FAILED)
        except MemoryError:
            if ctx.meta.get(DEBUG_KEY):
                raise
            _fail("out of memory", "lower --batch-size or --num-images")
            ctx.exit(EXIT_FAILED)
        except OSError as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            _fail(f"{e.strerror or e}{where}", "check the path, its permissions and the free disk space")
            ctx.exit(EXIT_FAILED)
        except Exception as e:  # noqa: BLE001 - the last resort: still one line, the traceback on request
            if ctx.meta.get(DEBUG_KEY):
                raise
            if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                _fail("the device ran out of memory", "lower --batch-size, or use --device cpu")
            else:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _fail(f"unexpected {type(e).__name__}: {first}",
                      "rerun with --debug to see the traceback; if the model and data are fine, please report it")
            ctx.exit(EXIT_FAILED)


@click.group(cls=PconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="pconv")
@debug_option
def cli() -> None:
    """Convert a pretrained ReLU classifier into a spiking neural network, without training.

    \b
      pconv calibrate MODEL --data DIR -T 4,8,16 -o calib.safetensors
      pconv convert   MODEL --calib calib.safetensors -T 8 -o snn.safetensors
      pconv eval      snn.safetensors --data DIR
      pconv inspect   snn.safetensors
      pconv bench     snn.safetensors --batch-size 64
      pconv demo      (EfficientNet-Lite0 on real ImageNet images, nothing to prepare)

    MODEL is a timm model name (weights from --checkpoint) or the import path of your own factory,
    package.module:function.
    """


def _register() -> None:
    from .bench import bench
    from .calibrate import calibrate
    from .convert import convert
    from .demo import demo
    from .eval import eval_command
    from .inspect import inspect

    for command in (calibrate, convert, eval_command, inspect, bench, demo):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`pconv`) and `python -m pconv` (also under torchrun)."""
    command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
    tune_malloc(calibrating=command in ("calibrate", "convert"))  # reuse freed memory (pconv.utils.memory)
    started = distributed.init_from_environment()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="pconv")
    except Terminated:  # outside a command (while parsing its options): the same clean exit
        click.echo("\nTerminated (SIGTERM) — no partial output file was left behind.", err=True)
        sys.exit(EXIT_TERMINATED)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started:
            distributed.shutdown()


if __name__ == "__main__":
    main()
