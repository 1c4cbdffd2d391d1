"""`dmg study`: the whole matrix of runs, several `dmg train` processes at once on this machine.

One run of a small network cannot fill a large GPU (the step is launch-bound), so a study
of targets x methods x backbones x seeds runs up to `jobs` runs side by side: each slot runs
`dmg train` and then `dmg evaluate` of one run, exactly the commands of dvc.yaml's matrix
stages, so the files land where `dvc repro` puts them (`dvc commit` then records them).
`--launcher slurm` (stages/study_slurm.py) sends the same runs to a cluster instead.

A study is something one comes back to, so what a run still needs is read from its files
each time (`run_state`): a finished run (run.json and metrics newer than it) is skipped, a
trained one is only evaluated, an interrupted one continues from its last.pt (`--resume`).
The whole matrix is checked before any process starts, and the processes end with the study:
on SIGTERM or Ctrl-C it stops them itself; killed outright, the kernel sends them SIGTERM
(PR_SET_PDEATHSIG), so no orphaned `dmg train` keeps the GPU.

Memory check: a run is started only when the device has at least `min_free_gb` free (GPU
memory on CUDA, available RAM on the CPU), and at least `stagger` seconds after the previous
start, so the previous run's model and resident dataset show in the free memory first.
Each slot's output is appended to <data_dir>/study/<dataset>/<backbone>-<method>-<target>-seed<N>.log.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dmgcli.backbones import BACKBONES
from dmgcli.data import available_memory
from dmgcli.datasets import DatasetInfo, check_domain
from dmgcli.engine import resolve_device
from dmgcli.errors import DmgError
from dmgcli.methods import METHODS
from dmgcli.params import MatrixParams
from dmgcli.results import details_path, metrics_path
from dmgcli.runs import run_dir

POLL_SECONDS = 0.2
STOP_SECONDS = 10.0  # a stopped run gets this long after SIGTERM before SIGKILL


@dataclass(frozen=True)
class StudyRun:
    target: str
    method: str
    backbone: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.method}-{self.target}-seed{self.seed}"

    def flags(self, dataset: str) -> list[str]:
        return ["--dataset", dataset, "--target", self.target, "--method", self.method,
                "--backbone", self.backbone, "--seed", str(self.seed)]


def matrix_runs(matrix: MatrixParams) -> list[StudyRun]:
    """Every (target, method, backbone, seed), in dvc.yaml's order."""
    return [StudyRun(t, m, b, s) for t in matrix.targets for m in matrix.methods for b in matrix.backbones
            for s in matrix.seeds]


def check_matrix(info: DatasetInfo, matrix: MatrixParams) -> list[StudyRun]:
    """The study's runs, once every target, method and backbone is known to be valid: a typo in
    the fifth target must not surface after four targets' runs have trained."""
    for key, names in (("targets", matrix.targets), ("methods", matrix.methods), ("backbones", matrix.backbones),
                       ("seeds", matrix.seeds)):
        if not names:
            raise DmgError(f"study: no {key} given; the study would run nothing")
    for target in matrix.targets:
        try:
            check_domain(info, target)
        except DmgError as exc:
            raise DmgError(f"study: {exc}") from None
    for key, names, valid in (("method", matrix.methods, METHODS), ("backbone", matrix.backbones, BACKBONES)):
        for name in names:
            if name not in valid:
                raise DmgError(f"study: unknown {key} {name!r}; valid: {', '.join(valid)}")
    runs = matrix_runs(matrix)
    if len(set(runs)) != len(runs):
        raise DmgError("study: the matrix names a run twice (a repeated target, method, backbone or seed)")
    return runs


# What a run still needs, from its files alone (the same answer in any process, on any node).
FINISHED, TRAINED, INTERRUPTED, NEW = "finished", "trained", "interrupted", "new"
STATE_NOTES = {TRAINED: " (evaluate only)", INTERRUPTED: " (resumes its last.pt)"}  # beside "started"/"submitted"


def run_state(data_dir: str | Path, dataset: str, run: StudyRun, evaluate: bool = True,
              metrics_dir: str | Path = "metrics") -> str:
    """finished: run.json and (if evaluated) both metrics files, written after it; trained: run.json
    only; interrupted: last.pt without run.json (continue with --resume); new: none of these."""
    folder = run_dir(data_dir, dataset, run.backbone, run.method, run.target, run.seed)
    record = folder / "run.json"
    if record.exists():
        if not evaluate:
            return FINISHED
        head = metrics_path(metrics_dir, dataset, run.backbone, run.method, run.target, run.seed)
        written = [p.stat().st_mtime for p in (head, details_path(head)) if p.exists()]
        return FINISHED if len(written) == 2 and min(written) >= record.stat().st_mtime else TRAINED
    return INTERRUPTED if (folder / "last.pt").exists() else NEW


def run_commands(run: StudyRun, state: str, dataset: str, params_file: str | Path, device: str,
                 train_flags: tuple[str, ...] = (), evaluate: bool = True) -> list[list[str]]:
    """The dvc.yaml commands a run still needs in `state` (train with --resume after an interruption)."""
    base = [sys.executable, "-m", "dmgcli.cli"]
    common = ["--params", str(params_file), "--device", device, *run.flags(dataset)]
    commands = []
    if state in (NEW, INTERRUPTED):
        commands.append([*base, "train", *common, *train_flags, *(["--resume"] if state == INTERRUPTED else [])])
    if evaluate and state != FINISHED:
        commands.append([*base, "evaluate", *common])
    return commands


PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: loading a library there could deadlock on a lock
# another thread of the parent held at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_this_process() -> Callable[[], None]:
    """A preexec_fn for a child: the kernel sends it SIGTERM when this process dies, even by SIGKILL."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # this process died before prctl took effect
            os._exit(1)
    return preexec


def start(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_this_process())


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL for any still alive after STOP_SECONDS."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Terminated(DmgError):
    pass


def raise_terminated(signum, frame):
    raise Terminated("study: stopped by SIGTERM; its running runs were stopped (run `dmg study` again to "
                     "continue them from their last checkpoints)")


@dataclass
class Slot:
    """One run in progress: its current process (train, then evaluate) and its log file."""
    run: StudyRun
    phases: list[list[str]]  # commands still to start after the current one
    process: subprocess.Popen
    log: object
    started: float


def study(info: DatasetInfo, data_dir: str | Path, matrix: MatrixParams, params_file: str | Path, *, jobs: int,
          device: str, min_free_gb: float, stagger: float | None = None,
          train_flags: tuple[str, ...] = (), evaluate: bool = True,
          progress: Callable[[str], None] = print) -> dict[str, float]:
    """Run what the matrix still needs, up to `jobs` runs at once; returns each run's seconds
    (finished runs are skipped). Raises if any failed."""
    if jobs < 1:
        raise DmgError(f"study: --jobs must be at least 1, got {jobs}")
    if min_free_gb < 0:
        raise DmgError(f"study: --min-free-gb must be at least 0, got {min_free_gb}")
    dataset = info.name
    runs = check_matrix(info, matrix)
    placed = resolve_device(device)
    if stagger is None:  # a CUDA run takes a few seconds to build its model and load its data
        stagger = 20.0 if placed.type == "cuda" else 0.0
    states = {run: run_state(data_dir, dataset, run, evaluate) for run in runs}
    pending = [run for run in runs if states[run] != FINISHED]
    logs = Path(data_dir) / "study" / dataset
    logs.mkdir(parents=True, exist_ok=True)
    done = len(runs) - len(pending)
    progress(f"study: {len(runs)} runs of {dataset}" + (f" ({done} finished already, skipped)" if done else "")
             + f", {jobs} at a time on {placed}")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    running: list[Slot] = []
    try:
        return _run(pending, states, running, logs, dataset, params_file, device, train_flags, evaluate, jobs,
                    placed, min_free_gb, stagger, progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop([slot.process for slot in running])  # empty unless interrupted
        for slot in running:
            slot.log.close()


def _run(pending, states, running, logs, dataset, params_file, device, train_flags, evaluate, jobs, placed,
         min_free_gb, stagger, progress) -> dict[str, float]:
    total, seconds, failed = len(pending), {}, []
    last_start = -float("inf")
    while pending or running:
        for slot in [s for s in running if s.process.poll() is not None]:
            code = slot.process.returncode
            if code == 0 and slot.phases:
                slot.process = start(slot.phases.pop(0), slot.log)
                continue
            running.remove(slot)
            slot.log.close()
            seconds[slot.run.name] = time.monotonic() - slot.started
            if code != 0:
                failed.append(slot.run.name)
            progress(f"study: {'finished' if code == 0 else f'FAILED (exit {code})'} {slot.run.name} "
                     f"in {seconds[slot.run.name]:.0f} s ({len(seconds)}/{total})")
        if pending and len(running) < jobs and time.monotonic() - last_start >= stagger \
                and enough_memory(placed, min_free_gb, alone=not running):
            run = pending.pop(0)
            commands = run_commands(run, states[run], dataset, params_file, device, train_flags, evaluate)
            log = open(logs / f"{run.name}.log", "a")
            running.append(Slot(run, commands, start(commands.pop(0), log), log, time.monotonic()))
            last_start = time.monotonic()
            what = STATE_NOTES.get(states[run], "")
            progress(f"study: started {run.name}{what} ({len(running)} running, {len(pending)} waiting)")
        time.sleep(POLL_SECONDS)
    if failed:
        raise DmgError(f"study: {len(failed)} of {total} runs failed ({', '.join(failed)}); "
                       f"their output is in {logs}/")
    return seconds


def enough_memory(device, min_free_gb: float, alone: bool) -> bool:
    """Free memory for one more run; the first run is always started (it may fit where the check
    is pessimistic, and if not it fails with dmg's out-of-memory message)."""
    return alone or available_memory(device) >= min_free_gb * 2**30


def last_line(log: Path) -> str:
    """The last non-empty line of a log (progress bars' carriage returns split lines too)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""
