"""Reading a params file into typed, frozen dataclasses, and the one-line checks of their values.

The machinery under dmgcli/params.py, which declares the sections: YAML without aliases or
duplicate keys, each value converted to its field's annotation (lists to tuples, mappings to
dataclasses), unknown keys and wrong types an error that names the key (the reference code
printed a warning and carried on). Command-line flags override values through `override`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import DmgError
from .fileio import shorten


def quote(value) -> str:
    """A value as an error message quotes it: its repr, cut to 80 characters (and safe for any depth)."""
    import reprlib
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 6, 60, 60
    text = short.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_range(key: str, value, minimum: float | None = None, positive: bool = False,
                maximum: float | None = None) -> None:
    """One-line errors for values of the right type but out of range (None means "default")."""
    if value is None:
        return
    if minimum is not None and value < minimum:
        raise DmgError(f"params: {key} must be at least {minimum}, got {quote(value)}")
    if maximum is not None and value > maximum:
        raise DmgError(f"params: {key} must be at most {maximum}, got {quote(value)}")
    if positive and value <= 0:
        raise DmgError(f"params: {key} must be positive, got {quote(value)}")


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DmgError(f"params: {key} must be one of {', '.join(choices)}, got {quote(value)}")


SEED_LIMIT = 2**32  # numpy and torch seed generators with 32-bit values


def check_seeds(key: str, seeds) -> None:
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            raise DmgError(f"params: {key} must be in [0, 2^32), got {quote(seed)}")



def _describe(tp) -> str:
    """An annotation in words, for error messages: Optional[float] -> "a number or null"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, "a mapping")


def _convert(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except DmgError:
                continue
        raise DmgError(f"params: {key} must be {_describe(tp)}, got {quote(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {quote(value)}")
        return from_dict(tp, value, key)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise DmgError(f"params: {key} must be a list, got {quote(value)}")
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {quote(value)}")
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool):
            raise DmgError(f"params: {key} must be a number, got {quote(value)}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and not math.isfinite(number):
            raise DmgError(f"params: {key} must be a finite number, got {quote(value)}")
        if number is not None:
            return number
        raise DmgError(f"params: {key} must be a number, got {quote(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DmgError(f"params: {key} must be an integer, got {quote(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DmgError(f"params: {key} must be true or false, got {quote(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise DmgError(f"params: {key} must be a string, got {quote(value)}")
        return value
    raise TypeError(f"unsupported params annotation {tp!r} for {key}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise DmgError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise DmgError(f"params: unknown key {quote(where)}; valid: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            values[f.name] = _convert(data[f.name], hints[f.name], where)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise DmgError(f"params: {prefix or 'root'}: {exc}") from None


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few kB; anything past 1 MB is a mistake


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases can expand
    to gigabytes ("billion laughs"), and params files have no need for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise DmgError(f"params: YAML aliases (*{shorten(event.anchor, 40)}) are not supported "
                           f"(line {event.start_mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is an error (YAML keeps the last silently: a second `train:` section
        would drop the whole first one)."""
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise DmgError(f"params: key {quote(key_node.value)} is given twice (lines {seen[key_node.value]} "
                                   f"and {line}); keep one")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def read_mapping(path: str | Path) -> dict:
    """The mapping of sections a params file holds; a missing, oversized, undecodable or
    malformed file is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise DmgError(f"params file {path} not found")
    if not path.is_file():
        raise DmgError(f"params file {path} is not a file")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise DmgError(f"params file {path} is {path.stat().st_size} bytes; more than {MAX_PARAMS_BYTES} is "
                       f"not a params file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DmgError(f"params file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DmgError(f"params file {path} could not be read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DmgError(f"params: {path} is not valid YAML{where}") from None
    except RecursionError:
        raise DmgError(f"params: {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise DmgError(f"params: {path} must hold a mapping of sections")
    return data


def override(section, **values):
    """Return `section` with the non-None values replaced, type-checked like params.yaml."""
    hints = typing.get_type_hints(type(section))
    changes = {}
    for name, value in values.items():
        if value is None:
            continue
        changes[name] = _convert(value, hints[name], name)
    return dataclasses.replace(section, **changes)


def to_dict(obj) -> dict:
    """A params dataclass as plain JSON-friendly data (recorded with every model)."""
    return dataclasses.asdict(obj)
