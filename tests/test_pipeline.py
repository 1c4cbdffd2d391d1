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


def run(cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small copy of the project: two targets, all three methods, two epochs."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["matrix"]["targets"] = ["rot0", "rot45"]
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # dvc.yaml's code deps point at the package sources; a snapshot of them goes into the scratch repo
    for folder in ("stages", "dmgcli"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run("git init -q && dvc init -q && git add -A && git commit -qm init", root)
    return root


def test_repro_then_nothing_to_do(project):
    run("dvc repro", project)
    metrics = sorted((project / "metrics" / "digits").rglob("*.json"))
    assert len(metrics) == 6  # 2 targets x 3 methods
    for path in metrics:
        record = json.loads(path.read_text())
        assert 0 <= record["out_of_domain"]["accuracy"] <= 100
    tables = (project / "reports" / "digits" / "tables.md").read_text()
    assert "Aggregate" in tables and "DMG" in tables
    shown = run("dvc metrics show --json", project)
    assert "out_of_domain" in shown
    second = run("dvc repro", project)
    assert "Running stage" not in second


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
