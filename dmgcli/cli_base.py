"""What every `dmg` command shares: the Typer app, the --params option, params loading, and
the handling that turns a user's error into one line on stderr (exit 1).

The commands themselves live in dmgcli/cli_data.py, cli_runs.py and cli_reports.py and
register on `app` here; dmgcli/cli.py puts them together. Nothing here imports torch.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import typer

from . import __version__
from .datasets import BUILT_IN, declare, resolve_dataset
from .errors import DmgError
from .fileio import shorten
from .help import PipelineOrder
from .params import Params, load_params
from .params_io import override

app = typer.Typer(help="DMG (ECCV 2020) and its baselines: download -> preprocess -> train -> evaluate -> report.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, cls=PipelineOrder)  # plain click help: no "<bool>" labels, long defaults wrap


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"dmg {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                              help="Print dmg's version and exit.")):
    """DMG (ECCV 2020) and its baselines: download -> preprocess -> train -> evaluate -> report."""


DEFAULTS = "defaults"  # --params defaults: the built-in defaults, no file
PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params",
                             help=f"Parameters file; flags override its values. `--params {DEFAULTS}`: the built-in "
                                  "defaults (outputs then land in the current folder).")


def project_params(path: Path) -> Params:
    """The params file, which must exist: without one, the outputs would land in whatever folder
    the command ran in. `--params defaults` asks for the built-in defaults explicitly."""
    if str(path) == DEFAULTS:
        return Params()
    if not path.exists():
        raise DmgError(f"params file {path} not found in {Path.cwd()}: run dmg in the project folder (the one with "
                       f"params.yaml), pass --params FILE, or --params {DEFAULTS} for the built-in defaults")
    return load_params(path)


MAX_MESSAGE = 400  # characters; a message quoting a huge path or value is cut


def fail(message: str, code: int = 1):
    typer.echo(f"dmg: error: {shorten(message, MAX_MESSAGE)}", err=True)
    raise typer.Exit(code)


def one_line(exc: DmgError) -> str:
    """The message of a DmgError. One raised in a DataLoader worker arrives re-raised with the
    worker's traceback inside its message; its last line is the original message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def handle_errors(fn):
    """Turn user-facing errors into one line on stderr and a non-zero exit, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DmgError as exc:
            fail(one_line(exc))
        except KeyboardInterrupt:
            fail("interrupted; completed checkpoints and files are intact", 130)
        except OSError as exc:
            if exc.filename is None or exc.strerror is None:
                raise  # not about a file the user named: a bug to see in full
            # a folder that is a file, a read-only place, a full disk: the user's to fix
            fail(f"{shorten(exc.filename, 200)}: {exc.strerror}")
        except Exception as exc:
            # torch.OutOfMemoryError, or a RuntimeError from a library that ran out (cuDNN, nvJPEG)
            if type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                                             and "out of memory" in str(exc).lower()):
                fail("out of GPU memory; try a smaller --batch-size (or --precision bf16 if it was fp32)")
            raise
    return wrapper


def load(params_file: Path) -> Params:
    """The project's params file (project_params), with its folder datasets (`datasets:`) put
    into the dataset registry."""
    params = project_params(params_file)
    declare(params)
    return params


DATASET_NAMES = ", ".join(BUILT_IN)


def cpu_threads_for(train_params) -> None:
    """The digits' convnet and the layers above a frozen trunk compute with one CPU thread
    (unless OMP_NUM_THREADS says otherwise).

    Their tensors are too small to share out: a second thread only waits, and on a busy
    machine the threads spin while waiting for each other (measured on 2 shared cores at load
    3-5: 6 DMG epochs took 26-34 s with 2 threads, 7-8 s with 1). Set before torch loads."""
    if train_params.backbone == "convnet" or train_params.frozen_trunk:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if "torch" in sys.modules and os.environ["OMP_NUM_THREADS"] == "1":
            sys.modules["torch"].set_num_threads(1)  # loaded already (dmg called in-process): same arithmetic


def params_with_train_flags(params_file: Path, **flags):
    """Load params, apply train-section flags, and resolve the dataset from --dataset/--target."""
    params = load(params_file)
    dataset = flags.pop("dataset")
    train = override(params.train, **flags)
    info = resolve_dataset(train.target, dataset, params.dataset)
    return params, train, info
