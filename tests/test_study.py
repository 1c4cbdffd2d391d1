"""`dmg study`: several runs at once end exactly as the same runs one after the other, the
memory check holds back a run while memory is short, and a failed run is reported."""
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_params
from dmgcli.cli import app
from dmgcli.params import MatrixParams
from stages import study as study_stage

RUNS = [("rot0", "dmg"), ("rot0", "aggregate")]


def project(digits_dir, folder):
    """A params.yaml with its own data_dir holding the prepared digits (linked, not copied)."""
    prepared = folder / "data" / "prepared"
    prepared.mkdir(parents=True)
    os.symlink(digits_dir / "data" / "prepared" / "digits.h5", prepared / "digits.h5")
    return write_params(folder)


def run_folder(folder, target, method):
    return folder / "data" / "runs" / "digits" / "convnet" / method / target / "seed0"


def without_timing(log) -> list[list[str]]:
    return [row.split(",")[:6] for row in log.read_text().splitlines()]


def test_two_concurrent_runs_equal_the_same_runs_one_after_the_other(digits_dir, tmp_path, monkeypatch):
    together, alone = tmp_path / "together", tmp_path / "alone"
    params = project(digits_dir, together)
    monkeypatch.chdir(together)  # metrics/ lands in the working folder, as under dvc repro
    result = CliRunner().invoke(app, ["study", "--params", str(params), "--jobs", "2", "--target", "rot0",
                                      "--method", "dmg", "--method", "aggregate", "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 running" in result.output and "study: 2 runs done" in result.output

    params = project(digits_dir, alone)
    monkeypatch.chdir(alone)
    for target, method in RUNS:
        flags = ["--params", str(params), "--target", target, "--method", method, "--device", "cpu"]
        for command in (["train", *flags, "--epochs", "2"], ["evaluate", *flags]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 0, result.output

    for target, method in RUNS:
        a, b = run_folder(together, target, method), run_folder(alone, target, method)
        assert without_timing(a / "log.csv") == without_timing(b / "log.csv")
        wa, wb = (torch.load(f / "best.pt", weights_only=True)["model"] for f in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        metrics = [json.loads((f / "metrics" / "digits" / "convnet" / method / target / "seed0.json").read_text())
                   for f in (together, alone)]
        assert metrics[0] == metrics[1]
        assert (together / "data" / "study" / "digits" / f"convnet-{method}-{target}-seed0.log").exists()


def test_runs_wait_while_memory_is_short(digits_dir, tmp_path, monkeypatch):
    params = project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_stage, "available_memory", lambda device: 2**30)  # 1 GiB free, 2 asked for
    lines = []
    matrix = MatrixParams(targets=("rot0", "rot15"), methods=("aggregate",), backbones=("convnet",), seeds=(0,))
    seconds = study_stage.study("digits", tmp_path / "data", matrix, params, jobs=2, device="cpu", min_free_gb=2.0,
                                train_flags=("--epochs", "1"), evaluate=False, progress=lines.append)
    assert sorted(seconds) == ["convnet-aggregate-rot0-seed0", "convnet-aggregate-rot15-seed0"]
    starts = [l for l in lines if l.startswith("study: started")]
    assert len(starts) == 2 and all("(1 running" in l for l in starts), lines  # never two at once


def test_a_failed_run_is_named_with_its_log(digits_dir, tmp_path, monkeypatch):
    params = project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    matrix = MatrixParams(targets=("rot0",), methods=("nomethod",), backbones=("convnet",), seeds=(0,))
    with pytest.raises(Exception, match=r"1 of 1 runs failed \(convnet-nomethod-rot0-seed0\)"):
        study_stage.study("digits", tmp_path / "data", matrix, params, jobs=2, device="cpu", evaluate=False,
                          progress=lambda line: None)
    log = tmp_path / "data" / "study" / "digits" / "convnet-nomethod-rot0-seed0.log"
    assert "unknown method 'nomethod'" in log.read_text()
    with pytest.raises(Exception, match="--jobs must be at least 1"):
        study_stage.study("digits", tmp_path / "data", matrix, params, jobs=0, device="cpu")
