"""What `dmg --help` and `dmg <command> --help` show beyond Typer's defaults: the commands in
pipeline order, and each option's default as params.yaml gives it (read only when help is shown)."""
from __future__ import annotations

import functools
from pathlib import Path

from typer.core import TyperCommand, TyperGroup

from .errors import DmgError
from .params import load_params

# `dmg --help` lists the commands in pipeline order (dvc.yaml's stages), then the tools.
COMMAND_ORDER = ("check", "download", "preprocess", "train", "evaluate", "sweep", "report", "study", "info", "bench")


class PipelineOrder(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


# The params.yaml key behind each option whose default comes from there: `--help` shows its value.
TRAIN_KEYS = ("target", "backbone", "method", "seed", "epochs", "batch_size", "lr", "mask_lr", "overlap_lambda",
              "pretrained", "device", "precision", "compile", "compile_mode", "workers", "resident")
HELP_DEFAULTS = {
    "download": {"source": "download.source", "splits": "download.splits"},
    "preprocess": {k: f"preprocess.{k}" for k in ("image_size", "workers", "encoding")},
    "train": {"dataset": "dataset", **{k: f"train.{k}" for k in TRAIN_KEYS}},
    "evaluate": {"dataset": "dataset", **{k: f"train.{k}" for k in ("target", "backbone", "method", "seed")},
                 "average_over": "evaluate.average_over", "device": "evaluate.device"},
    "report": {"dataset": "dataset", "fmt": "report.format", "figures": "report.figures"},
    "sweep": {"dataset": "dataset", "lambdas": "report.sweep.lambdas", "targets": "report.sweep.targets",
              "seeds": "report.sweep.seeds", "epochs": "report.sweep.epochs", "device": "train.device"},
    "study": {k: f"matrix.{k}" for k in ("targets", "methods", "backbones", "seeds")},
}


def as_yaml(value) -> str:
    """A params value as params.yaml spells it: lists space-separated, booleans lower case."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_defaults(command: str, path: Path = Path("params.yaml")) -> dict[str, str]:
    """Option name -> its value in params.yaml of the current folder, as --help shows it.

    Read only when help is shown (about 20 ms, no torch); no file or a broken one: none shown."""
    keys = HELP_DEFAULTS.get(command, {})
    if not keys or not path.is_file():
        return {}
    try:
        params = load_params(path)
    except DmgError:
        return {}
    shown = {}
    for option, key in keys.items():
        value = functools.reduce(getattr, key.split("."), params)
        if value is not None:
            shown[option] = f"{as_yaml(value)} from params.yaml"
    return shown


class ParamsHelp(TyperCommand):
    """A command whose --help shows, as each option's default, the value params.yaml gives it."""

    def format_options(self, ctx, formatter) -> None:
        defaults = help_defaults(self.name)
        for param in self.params:
            if param.name in defaults:
                param.show_default = defaults[param.name]
        super().format_options(ctx, formatter)
