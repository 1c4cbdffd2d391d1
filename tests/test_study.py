"""`dmg study`: several runs at once end exactly as the same runs one after the other, the
memory check holds back a run while memory is short, a failed run is reported, finished runs
are skipped and interrupted ones resumed, the matrix is checked before any process starts, and
the study's processes end with it (SIGTERM, SIGINT, SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_params
from dmgcli.cli import app
from dmgcli.datasets import get_dataset
from dmgcli.errors import DmgError
from dmgcli.params import MatrixParams
from stages import study as study_stage

DIGITS = get_dataset("digits")

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

    # Run again: both runs are finished, so nothing starts and nothing is rewritten (it used to fail both).
    monkeypatch.chdir(together)
    before = {m: run_folder(together, "rot0", m).joinpath("best.pt").stat().st_mtime_ns for _, m in RUNS}
    result = CliRunner().invoke(app, ["study", "--params", str(together / "params.yaml"), "--target", "rot0",
                                      "--method", "dmg", "--method", "aggregate", "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 finished already, skipped" in result.output and "started" not in result.output
    assert before == {m: run_folder(together, "rot0", m).joinpath("best.pt").stat().st_mtime_ns for _, m in RUNS}


def test_runs_wait_while_memory_is_short(digits_dir, tmp_path, monkeypatch):
    params = project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_stage, "available_memory", lambda device: 2**30)  # 1 GiB free, 2 asked for
    lines = []
    matrix = MatrixParams(targets=("rot0", "rot15"), methods=("aggregate",), backbones=("convnet",), seeds=(0,))
    seconds = study_stage.study(DIGITS, tmp_path / "data", matrix, params, jobs=2, device="cpu", min_free_gb=2.0,
                                train_flags=("--epochs", "1"), evaluate=False, progress=lines.append)
    assert sorted(seconds) == ["convnet-aggregate-rot0-seed0", "convnet-aggregate-rot15-seed0"]
    starts = [l for l in lines if l.startswith("study: started")]
    assert len(starts) == 2 and all("(1 running" in l for l in starts), lines  # never two at once


def test_a_failed_run_is_named_with_its_log(digits_dir, tmp_path, monkeypatch):
    params = project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    matrix = MatrixParams(targets=("rot0",), methods=("aggregate",), backbones=("convnet",), seeds=(0,))
    with pytest.raises(DmgError, match=r"1 of 1 runs failed \(convnet-aggregate-rot0-seed0\)"):
        study_stage.study(DIGITS, tmp_path / "data", matrix, params, jobs=2, device="cpu", min_free_gb=2.0, evaluate=False,
                          train_flags=("--batch-size", "0"), progress=lambda line: None)
    log = tmp_path / "data" / "study" / "digits" / "convnet-aggregate-rot0-seed0.log"
    assert "train.batch_size must be at least 1" in log.read_text()
    with pytest.raises(DmgError, match="--jobs must be at least 1"):
        study_stage.study(DIGITS, tmp_path / "data", matrix, params, jobs=0, device="cpu", min_free_gb=2.0)


@pytest.mark.parametrize("bad, message", [
    ({"targets": ("rot0", "rot99")}, "unknown domain 'rot99'"),
    ({"methods": ("aggregate", "nomethod")}, "unknown method 'nomethod'"),
    ({"backbones": ("convnet", "vgg")}, "unknown backbone 'vgg'"),
    ({"seeds": (0, 0)}, "names a run twice"),
    ({"methods": ()}, "no methods given"),
])
def test_the_whole_matrix_is_checked_before_any_process_starts(tmp_path, bad, message):
    """A typo in the last target used to surface only after the runs before it had trained."""
    matrix = MatrixParams(**{"targets": ("rot0",), "methods": ("aggregate",), "backbones": ("convnet",),
                             "seeds": (0,), **bad})
    with pytest.raises(DmgError, match=message):
        study_stage.study(DIGITS, tmp_path / "data", matrix, tmp_path / "params.yaml", jobs=1, device="cpu",
                          min_free_gb=2.0, progress=lambda line: None)
    assert not (tmp_path / "data").exists()  # no log folder, no process


def test_run_state_reads_what_a_run_still_needs_from_its_files(tmp_path):
    run = study_stage.StudyRun("rot0", "dmg", "convnet", 0)
    folder = run_folder(tmp_path, "rot0", "dmg")
    head = tmp_path / "metrics" / "digits" / "convnet" / "dmg" / "rot0" / "seed0.json"

    def state():
        return study_stage.run_state(tmp_path / "data", "digits", run, metrics_dir=tmp_path / "metrics")

    def commands():
        return [c[3:] for c in study_stage.run_commands(run, state(), "digits", "p.yaml", "cpu", ("--epochs", "2"))]

    assert state() == "new" and [c[0] for c in commands()] == ["train", "evaluate"]
    assert "--resume" not in commands()[0]
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"x")
    assert state() == "interrupted" and commands()[0][-3:] == ["--epochs", "2", "--resume"]
    head.parent.mkdir(parents=True)
    for path in (head, head.with_name("seed0.details.json")):  # metrics of an earlier run
        path.write_text("{}")
        os.utime(path, (1, 1))
    (folder / "run.json").write_text("{}")
    assert state() == "trained" and [c[0] for c in commands()] == ["evaluate"]
    for path in (head, head.with_name("seed0.details.json")):
        os.utime(path)
    assert state() == "finished" and commands() == []
    assert study_stage.run_state(tmp_path / "data", "digits", run, evaluate=False) == "finished"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_killed_study_takes_its_training_process_with_it(digits_dir, tmp_path, sig):
    params = project(digits_dir, tmp_path)
    study = subprocess.Popen([sys.executable, "-m", "dmgcli.cli", "study", "--params", str(params), "--target", "rot0",
                              "--method", "aggregate", "--epochs", "1000", "--no-evaluate", "--device", "cpu"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def training():
            return [p for p in children(study.pid) if b"train" in open(f"/proc/{p}/cmdline", "rb").read()]

        (child,) = wait_for(training, 120, "the study's dmg train process")
        study.send_signal(sig)
        output, _ = study.communicate(timeout=60)
        wait_for(lambda: not alive(child), 30, f"dmg train (pid {child}) to end after the study got {sig.name}")
    finally:
        if study.poll() is None:
            study.kill()
    if sig == signal.SIGTERM:
        assert study.returncode == 1 and "stopped by SIGTERM" in output, output
    elif sig == signal.SIGINT:
        assert study.returncode == 130 and "interrupted" in output, output
    else:
        assert study.returncode == -signal.SIGKILL


def test_study_takes_a_dataset_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path)
    result = CliRunner().invoke(app, ["study", "--params", str(params), "--dataset", "pacs", "--target", "rot0",
                                      "--status"])
    assert result.exit_code == 1 and "unknown domain 'rot0' for dataset pacs" in result.output
    result = CliRunner().invoke(app, ["study", "--params", str(params), "--dataset", "pacs", "--target", "photo",
                                      "--method", "dmg", "--status"])
    assert result.exit_code == 0, result.output
    assert "pending    alexnet-dmg-photo-seed0" not in result.output  # backbones from params.yaml: convnet
    assert result.output.startswith("pending    convnet-dmg-photo-seed0  not submitted"), result.output
