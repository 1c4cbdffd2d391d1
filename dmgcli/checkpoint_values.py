"""The values inside a checkpoint, checked before anything is built from them.

A checkpoint that loads (sealed, complete) can still hold values no dmg wrote: a negative or
huge number of classes (a head of 10^12 units), a learning rate that is a string, a log that
is not a list. Each is one DmgError line naming the file and the value, instead of a
traceback (or an allocation that takes the machine) further on.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from .errors import DmgError
from .methods import MethodConfig

LIMITS = {"num_classes": (1, 100_000), "num_domains": (1, 1_000)}  # far above any dataset's
MAX_EPOCH = 1_000_000
NONNEGATIVE = ("overlap_lambda", "weight_decay")
POSITIVE = ("lr", "mask_lr")


def _fits(value, tp) -> bool:
    """Whether a plain value matches a MethodConfig annotation (unknown annotations pass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config(config: dict, name: str, advice: str) -> None:
    hints = typing.get_type_hints(MethodConfig)
    for f in dataclasses.fields(MethodConfig):
        if f.name not in config:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DmgError(f"checkpoint {name} is not a complete dmg checkpoint (config lacks {f.name}); {advice}")
            continue
        value = config[f.name]
        bad = not _fits(value, hints[f.name])
        if not bad and f.name in LIMITS:
            low, high = LIMITS[f.name]
            bad = not low <= value <= high
        if not bad and f.name in POSITIVE:
            bad = value <= 0
        if not bad and f.name in NONNEGATIVE:
            bad = value < 0
        if bad:
            raise DmgError(f"checkpoint {name} has an impossible config.{f.name} ({_quote(value)}); {advice}")


def _epoch(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EPOCH


def check_values(ckpt: dict, name: str, keys: tuple[str, ...], advice: str) -> None:
    """Refuse a complete checkpoint whose values no dmg writes (see the module docstring)."""
    check_config(ckpt["config"], name, advice)
    problems = []
    if "epoch" in keys and not _epoch(ckpt["epoch"]):
        problems.append(f"epoch {_quote(ckpt['epoch'])}")
    if "best" in keys and not (_epoch(ckpt["best"].get("epoch")) or ckpt["best"].get("epoch") == -1):
        problems.append(f"best epoch {_quote(ckpt['best'].get('epoch'))}")
    if "log" in keys and not (isinstance(ckpt["log"], list) and all(isinstance(r, dict) for r in ckpt["log"])):
        problems.append("a log that is not a list of rows")
    if "optimizers" in keys and not (isinstance(ckpt["optimizers"], list)
                                     and all(isinstance(o, dict) for o in ckpt["optimizers"])):
        problems.append("optimizer states that are not a list")
    if "rng" in keys and not (isinstance(ckpt["rng"], dict) or (isinstance(ckpt["rng"], list) and ckpt["rng"]
                                                                and all(isinstance(r, dict) for r in ckpt["rng"]))):
        problems.append("random states that are not a mapping per process")
    if "settings" in keys and not isinstance(ckpt["settings"], dict):
        problems.append("settings that are not a mapping")
    if problems:
        raise DmgError(f"checkpoint {name} holds {problems[0]}, which no dmg writes; {advice}")
