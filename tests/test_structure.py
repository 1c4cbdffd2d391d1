"""The code's shape (issue 19): DVC re-runs a stage when the code it runs changes, no two
modules import each other, and no module of the package or the stages outgrows 400 lines.

Imports are read with `ast` (module-level and inside functions alike), so nothing is executed.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGES = ("dmgcli", "stages")

# Modules a stage imports that are deliberately not among its DVC deps: none of them changes
# what a stage computes from its inputs.
NOT_DEPS = {
    "dmgcli/__init__.py": "the version string",
    "dmgcli/errors.py": "error types and messages",
    "dmgcli/fileio.py": "atomic writes and locks: how files are written, not what they hold",
    "dmgcli/params.py": "parsing; the values a stage reads are its `params:` in dvc.yaml",
    "dmgcli/params_io.py": "parsing; the values a stage reads are its `params:` in dvc.yaml",
    "dmgcli/h5write.py": "the HDF5 writer; the file a stage reads is its dependency",
    "dmgcli/results.py": "reading metrics files; in training only the still-learning mark of run.json",
    # the dataset adapters (download code, split lists) reach the training stages only through the
    # prepared HDF5 file, which is their dependency; preprocess lists dmgcli/datasets
    "dmgcli/datasets/": "dataset adapters: their data reaches the stage through the prepared file",
    "dmgcli/fetch.py": "downloads (imported by the dataset adapters)",
    "dmgcli/archives.py": "downloads (imported by the dataset adapters)",
    "dmgcli/transfer.py": "downloads (imported by the dataset adapters)",
}
STAGE_MODULES = {"preprocess": "stages.preprocess", "features": "stages.features", "train": "stages.train",
                 "evaluate": "stages.evaluate", "sweep": "stages.sweep", "report": "stages.report"}


def module_file(name: str) -> Path | None:
    """The file of a module of ours (`dmgcli.x`, `stages.y`), relative to the repository; else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if (REPO / candidate).exists():
            return candidate
    return None


def imported(path: Path) -> set[Path]:
    """Files of our modules that `path` imports, at module level or inside a function."""
    package = list(path.with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {f for f in map(module_file, names) if f is not None and f != path}


def not_a_dep(path: str) -> bool:
    return any(path == e or (e.endswith("/") and path.startswith(e)) for e in NOT_DEPS)


def closure(module: str) -> set[Path]:
    """Files `module` imports, directly or through others; not through a NOT_DEPS module (what it
    imports reaches the stage only through it)."""
    seen, todo = set(), [module_file(module)]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [] if not_a_dep(str(path)) else imported(path)
    return seen


def ours() -> list[Path]:
    return sorted(p.relative_to(REPO) for package in PACKAGES for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_each_stage_lists_the_code_it_runs(stage):
    """A module a stage imports (directly or not) is among its deps, or in NOT_DEPS with the reason:
    code that moves into a new module must not leave DVC blind to it."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]

    def listed(path: str) -> bool:  # a file, or a folder holding it
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)

    unlisted = sorted(str(p) for p in closure(STAGE_MODULES[stage]) if not listed(str(p)) and not not_a_dep(str(p)))
    assert not unlisted, f"dvc.yaml stage {stage!r} runs {unlisted} but does not list them as deps"


def test_no_two_modules_import_each_other():
    edges = {path: imported(path) for path in ours()}
    circles = [(a, b) for a, b in itertools.combinations(edges, 2) if b in edges[a] and a in edges[b]]
    assert not circles


def test_no_module_is_over_400_lines():
    long = {str(p): n for p in ours() if (n := len((REPO / p).read_text().splitlines())) > 400}
    assert not long, f"split these along their seams: {long}"


def test_the_checks_see_what_they_check():
    """The import reader finds a known chain, so the tests above cannot pass by reading nothing."""
    assert Path("dmgcli/runs.py") in imported(Path("stages/train.py"))
    assert Path("dmgcli/core.py") in closure("stages.train")
    assert len(ours()) > 40
