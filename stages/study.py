"""`dmg study`: the whole matrix of runs with several `dmg train` processes at once.

One run of a small network cannot fill a large GPU (the step is launch-bound), so a study
of targets x methods x backbones x seeds runs up to `jobs` runs side by side: each slot runs
`dmg train` and then `dmg evaluate` of one run, exactly the commands of dvc.yaml's matrix
stages, so the files land where `dvc repro` puts them (`dvc commit` then records them).

Memory check: a run is started only when the device has at least `min_free_gb` free (GPU
memory on CUDA, available RAM on the CPU), and at least `stagger` seconds after the previous
start, so the previous run's model and resident dataset show in the free memory first.
Each slot's output goes to <data_dir>/study/<dataset>/<backbone>-<method>-<target>-seed<N>.log.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dmgcli.data import available_memory
from dmgcli.engine import resolve_device
from dmgcli.errors import DmgError
from dmgcli.params import MatrixParams

POLL_SECONDS = 0.2


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


@dataclass
class Slot:
    """One run in progress: its current process (train, then evaluate) and its log file."""
    run: StudyRun
    phases: list[list[str]]  # commands still to start after the current one
    process: subprocess.Popen
    log: object
    started: float


def study(dataset: str, data_dir: str | Path, matrix: MatrixParams, params_file: str | Path, jobs: int = 1,
          device: str = "auto", min_free_gb: float = 4.0, stagger: float | None = None,
          train_flags: tuple[str, ...] = (), evaluate: bool = True,
          progress: Callable[[str], None] = print) -> dict[str, float]:
    """Run the matrix with up to `jobs` runs at once; returns each run's seconds. Raises if any failed."""
    if jobs < 1:
        raise DmgError(f"study: --jobs must be at least 1, got {jobs}")
    if min_free_gb < 0:
        raise DmgError(f"study: --min-free-gb must be at least 0, got {min_free_gb}")
    placed = resolve_device(device)
    if stagger is None:  # a CUDA run takes a few seconds to build its model and load its data
        stagger = 20.0 if placed.type == "cuda" else 0.0
    runs = matrix_runs(matrix)
    logs = Path(data_dir) / "study" / dataset
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "dmgcli.cli"]
    common = ["--params", str(params_file), "--device", device]

    def phases(run: StudyRun) -> list[list[str]]:
        train = [*base, "train", *common, *run.flags(dataset), *train_flags]
        return [train, [*base, "evaluate", *common, *run.flags(dataset)]] if evaluate else [train]

    pending, running, seconds, failed = list(runs), [], {}, []
    last_start = -float("inf")
    progress(f"study: {len(runs)} runs of {dataset}, {jobs} at a time on {placed}")
    while pending or running:
        for slot in [s for s in running if s.process.poll() is not None]:
            code = slot.process.returncode
            if code == 0 and slot.phases:
                slot.process = subprocess.Popen(slot.phases.pop(0), stdout=slot.log, stderr=subprocess.STDOUT)
                continue
            running.remove(slot)
            slot.log.close()
            seconds[slot.run.name] = time.monotonic() - slot.started
            if code != 0:
                failed.append(slot.run.name)
            progress(f"study: {'finished' if code == 0 else f'FAILED (exit {code})'} {slot.run.name} "
                     f"in {seconds[slot.run.name]:.0f} s ({len(seconds)}/{len(runs)})")
        if pending and len(running) < jobs and time.monotonic() - last_start >= stagger \
                and enough_memory(placed, min_free_gb, alone=not running):
            run = pending.pop(0)
            commands = phases(run)
            log = open(logs / f"{run.name}.log", "w")
            process = subprocess.Popen(commands.pop(0), stdout=log, stderr=subprocess.STDOUT)
            running.append(Slot(run, commands, process, log, time.monotonic()))
            last_start = time.monotonic()
            progress(f"study: started {run.name} ({len(running)} running, {len(pending)} waiting)")
        time.sleep(POLL_SECONDS)
    if failed:
        raise DmgError(f"study: {len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); "
                       f"their output is in {logs}/")
    return seconds


def enough_memory(device: torch.device, min_free_gb: float, alone: bool) -> bool:
    """Free memory for one more run; the first run is always started (it may fit where the check
    is pessimistic, and if not it fails with dmg's out-of-memory message)."""
    return alone or available_memory(device) >= min_free_gb * 2**30
