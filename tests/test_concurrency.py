"""One writer per output, and no debris after kill -9: a second writer of a run folder, an
HDF5 file or a raw folder is refused in one line naming the holder; the lock dies with a
killed process; a re-run removes the temporary files a killed run left."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, write_params
from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.fileio import HOST, MARKER, run_lock
from test_engine import run_until, train_command

runner = CliRunner()


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("dmg: error: "), result.output
    return lines[0]


def hold_lock(target, folder: bool = True) -> subprocess.Popen:
    """Another process holding run_lock on target, until killed."""
    code = ("import sys, time; from dmgcli.fileio import run_lock\n"
            f"with run_lock({str(target)!r}, folder={folder}):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    """The pid of a process that has ended (not reused this soon on a machine this idle)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def marked(name: str, pid: int, kind: str = "tmp", host: str = HOST) -> str:
    """The temporary name dmg gives `name` in process `pid` (dmgcli/fileio.py temp_name)."""
    return f".{name}.{MARKER}-{pid}-{host}-0badc0de.{kind}"


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    target = tmp_path / "run"
    holder = hold_lock(target)
    try:
        with pytest.raises(DmgError) as refused:
            with run_lock(target):
                pass
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "started " in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(target):  # kill -9 left no stale lock
        assert (target / ".dmg.lock").exists()
    assert not (target / ".dmg.lock").exists()
    fresh = tmp_path / "fresh"
    with run_lock(fresh):
        pass
    assert not fresh.exists(), "a folder the lock created is removed again when left empty"


def test_second_training_into_one_folder_is_refused(digits_dir, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        result = runner.invoke(app, ["train", "--params", str(digits_dir / "params.yaml"), "--target", "rot0",
                                     "--epochs", "1", "--device", "cpu", "--out", str(out)])
        line = one_error_line(result)
        assert f"{out} is being written by another dmg process (pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [".dmg.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_second_preprocess_and_download_are_refused(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command, target, folder in (("preprocess", tmp_path / "data" / "prepared" / "digits.h5", False),
                                    ("download", tmp_path / "data" / "raw" / "digits", True)):
        holder = hold_lock(target, folder)
        try:
            line = one_error_line(runner.invoke(app, [command, "digits"]))
            assert f"{target} is being written by another dmg process (pid {holder.pid}" in line
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()


def test_rerun_removes_what_killed_runs_left(tmp_path, monkeypatch):
    """Temporary files as a kill -9 mid-write leaves them (atomic writes, staging folders), and
    only those: marked names of dead dmg processes on this host."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    raw, prepared = tmp_path / "data" / "raw" / "digits", tmp_path / "data" / "prepared"
    assert runner.invoke(app, ["download", "digits"]).exit_code == 0
    prepared.mkdir(parents=True)
    dead = dead_pid()
    debris = [raw / marked("fetch", dead) / "unpacked" / "x.jpg", raw / marked("MANIFEST.json", dead),
              raw / marked("images", dead) / "y.jpg", prepared / marked("digits.h5", dead),
              prepared / marked("digits.report.json", dead)]
    # another output's temporary file, a live writer's, another host's, a transfer to resume,
    # and names of the user's that look like temporaries: all kept
    keep = [prepared / marked("pacs.h5", dead), prepared / marked("digits.h5", os.getpid()),
            prepared / marked("digits.h5", dead, host="0123abcd"), raw / "downloads" / "pacs.zip.part",
            raw / ".notes.tmp", raw / ".images.old.4242" / "y.jpg", prepared / ".digits.h5.q9w8.tmp"]
    for path in debris + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    for command in ("download", "preprocess"):
        result = runner.invoke(app, [command, "digits"])
        assert result.exit_code == 0, result.output
    assert not [p for p in debris if p.exists()] and all(p.exists() for p in keep)
    assert sorted(p.name for p in raw.iterdir()) == [".images.old.4242", ".notes.tmp", "digits.csv.gz", "downloads"]
    assert sorted(p.name for p in prepared.iterdir()) == sorted([p.name for p in keep if p.parent == prepared]
                                                                + ["digits.h5", "digits.report.json"])


@pytest.mark.slow  # a subprocess trains (about 30 s on 2 busy cores)
def test_killed_training_rerun_cleans_its_debris_and_resumes(digits_dir, tmp_path):
    params, out = digits_dir / "params.yaml", tmp_path / "run"
    killed = run_until(train_command(params, out, 2), REPO, out / "log.csv", rows=1, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # what a kill during a checkpoint write leaves (the kill above may or may not have hit one)
    for name in ("last.pt", "best.pt", "log.csv"):
        (out / marked(name, dead_pid())).write_bytes(b"half a checkpoint")
    assert (out / ".dmg.lock").exists(), "the killed run's lock file stays, unlocked"
    result = runner.invoke(app, train_command(params, out, 2, "--resume")[3:])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.csv", "run.json"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert json.loads((out / "run.json").read_text())["epochs"] == 2
