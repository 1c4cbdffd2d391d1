"""The whole DVC pipeline on the embedded dataset, in a scratch git + DVC repository:
repro, a no-op second repro, `dvc exp run -S`, and models moved through a local DVC remote."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


def run(cmd: str, cwd: Path, ok: bool = True) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert (result.returncode == 0) == ok, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def copy_project(root: Path, **matrix) -> None:
    """dvc.yaml, params.yaml (two epochs, `matrix` merged in) and the package sources, in a fresh git + DVC repo."""
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["matrix"].update(matrix)
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # dvc.yaml's code deps point at the package sources; a snapshot of them goes into the scratch repo
    for folder in ("stages", "dmgcli"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run("git init -q && dvc init -q && git add -A && git commit -qm init", root)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small copy of the project: two targets, all three methods, two epochs."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root, targets=["rot0", "rot45"])
    return root


def test_repro_then_nothing_to_do(project):
    run("dvc repro", project)
    metrics = sorted(p for p in (project / "metrics" / "digits").rglob("*.json") if ".details" not in p.name)
    assert len(metrics) == 6  # 2 targets x 3 methods
    for path in metrics:
        record = json.loads(path.read_text())
        assert 0 <= record["out_of_domain"] <= 100 and record["best_epoch"] in (1, 2)
    tables = (project / "reports" / "digits" / "tables.md").read_text()
    assert "Aggregate" in tables and "DMG" in tables
    shown = run("dvc metrics show --json", project)
    assert "out_of_domain" in shown
    table = run("dvc metrics show", project).splitlines()
    assert max(len(line) for line in table) < 160  # the headline only (it was 1,408 characters wide)
    second = run("dvc repro", project)
    assert "Running stage" not in second


def test_readme_examples_leave_the_pipeline_untouched(project):
    """The README's "Using it" commands after a finished `dvc repro`: `dvc status` stays clean."""
    run("dvc repro", project)
    refused = run("dmg train --target rot0 --method dmg", project, ok=False)
    assert "holds a finished run (run.json); --resume continues it, --force replaces it" in refused
    run("dmg train --target rot0 --method dmg --epochs 1 --out scratch/rot0-dmg", project)
    run("dmg evaluate --target rot0 --method dmg --run scratch/rot0-dmg --out scratch/rot0-dmg.json", project)
    run("dmg report", project)
    run("dvc plots show", project)
    assert "up to date" in run("dvc status", project)
    untracked = run("git status --porcelain", project).split()
    assert untracked in ([], ["??", "dvc.lock"])  # scratch/ and dvc_plots/ are git-ignored


def test_bytecode_in_the_package_leaves_dvc_status_clean(project):
    """pytest and every dmg command import dmgcli, writing __pycache__ into dmgcli/datasets/, a
    folder the check, download and preprocess stages depend on: .dvcignore keeps it out of their hash."""
    run("dvc repro", project)
    env = "env -u PYTHONDONTWRITEBYTECODE"  # the machine may forbid bytecode; this test needs it written
    run(f"{env} python -c 'import dmgcli.datasets.folder, stages.check'", project)  # cwd first on sys.path: the copy
    assert list((project / "dmgcli" / "datasets" / "__pycache__").glob("*.pyc"))
    assert "up to date" in run("dvc status", project)


def test_a_bad_matrix_fails_before_anything_trains(tmp_path):
    copy_project(tmp_path, targets=["rot0", "rot31"])
    out = run("dvc repro", tmp_path, ok=False)
    assert "unknown domain 'rot31' for dataset digits" in out
    assert "Running stage 'check'" in out and "train@" not in out and not (tmp_path / "data" / "raw").exists()


def test_models_travel_through_a_local_remote(project, tmp_path):
    remote = tmp_path / "remote"
    run(f"dvc remote add -d -f local {remote} && dvc push -q", project)
    run("git add -A && git commit -qm 'trained'", project)  # the clone needs dvc.lock to know what to pull
    clone = tmp_path / "clone"
    run(f"git clone -q {project} {clone}", project)
    run(f"dvc remote add -d -f local {remote} && dvc pull -q", clone)
    best = Path("data/runs/digits/convnet/dmg/rot0/seed0/best.pt")
    assert (clone / best).read_bytes() == (project / best).read_bytes()


def test_exp_run_with_set_param_retrains(project):
    out = run("dvc exp run -S train.overlap_lambda=0.5", project)
    assert "Running stage 'train@rot0-dmg-convnet-0'" in out
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["overlap_lambda"] == 0.5
