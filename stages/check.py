"""Stage 0, check: every parameter of the whole pipeline, before any work.

`dvc repro` runs this first (every other stage depends on its output through download), so a
params.yaml whose matrix names a domain the dataset lacks, an unknown method or backbone, a
dataset without a schedule or a sweep target of another dataset fails in seconds instead of
after the runs before it have trained. Loading params.yaml (dmgcli/params.py) has already
checked the keys, the types and the ranges.

Writes <data_dir>/params.checked with constant text: its hash never changes, so a passing
check never makes DVC re-run the stages after it.
"""
from __future__ import annotations

from pathlib import Path

from dmgcli.backbones import BACKBONES
from dmgcli.datasets import check_domain, get_dataset
from dmgcli.engine import PRECISIONS
from dmgcli.errors import DmgError
from dmgcli.fileio import write_text
from dmgcli.methods import METHODS
from dmgcli.params import Params
from stages.report import FORMATS
from stages.sweep import check_settings as check_sweep


def checked_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "params.checked"


def check_names(key: str, names: tuple[str, ...], valid) -> None:
    if not names:
        raise DmgError(f"params: {key} is empty; the pipeline would run nothing")
    for name in names:
        if name not in valid:
            raise DmgError(f"params: {key} has unknown {name!r}; valid: {', '.join(valid)}")


def check(params: Params) -> str:
    """Raise DmgError naming the first bad parameter; returns a one-line summary of the grid."""
    info = get_dataset(params.dataset)
    matrix = params.matrix
    if not matrix.targets:
        raise DmgError("params: matrix.targets is empty; the pipeline would run nothing")
    for target in matrix.targets:
        try:
            check_domain(info, target)
        except DmgError as exc:
            raise DmgError(f"params: matrix.targets: {exc}") from None
    check_names("matrix.methods", matrix.methods, METHODS)
    check_names("matrix.backbones", matrix.backbones, BACKBONES)
    if not matrix.seeds:
        raise DmgError("params: matrix.seeds is empty; the pipeline would run nothing")
    if len(set(matrix.seeds)) != len(matrix.seeds):
        raise DmgError(f"params: matrix.seeds repeats a seed: {list(matrix.seeds)}")
    params.train.schedule_for(info.schedule_key)  # the lookup train makes (loading params checked each schedule)
    if params.train.precision not in PRECISIONS:
        raise DmgError(f"params: train.precision must be one of {', '.join(PRECISIONS)}, "
                       f"got {params.train.precision!r}")
    if params.train.backbone not in BACKBONES:  # the sweep trains train.backbone
        raise DmgError(f"params: train.backbone {params.train.backbone!r} is unknown; valid: {', '.join(BACKBONES)}")
    try:
        check_sweep(info, params.report.sweep)
    except DmgError as exc:
        raise DmgError(f"params: report.sweep: {str(exc).removeprefix('sweep: ')}") from None
    if params.report.format not in FORMATS:
        raise DmgError(f"params: report.format must be one of {', '.join(FORMATS)}, got {params.report.format!r}")
    write_text(checked_path(params.data_dir), "params checked by `dmg check`\n")
    runs = len(matrix.targets) * len(matrix.methods) * len(matrix.backbones) * len(matrix.seeds)
    sweep = params.report.sweep
    return (f"ok: {info.name}, {runs} runs ({len(matrix.targets)} targets x {len(matrix.methods)} methods x "
            f"{len(matrix.backbones)} backbones x {len(matrix.seeds)} seeds), sweep "
            f"{len(sweep.lambdas) * len(sweep.targets) * len(sweep.seeds)} runs")
