"""The concurrent-runs figure of `dmg bench`: several training processes on one device at once.

For each count N, N processes each train the bench's method on the resident synthetic file
(what `dmg study --jobs N` runs side by side). Every process warms up, then waits at a
barrier (a file per process in a shared folder) until all N are warm, then times its steps.
The figure is all images over the span from the first start to the last end (system-wide
monotonic clock), so a process that ran partly alone cannot inflate it.

Run as `python -m stages.bench_concurrent SETTINGS_JSON DEVICE H5 BARRIER INDEX COUNT OUT` (a worker).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from dmgcli.benchmarking import STEP_SETTINGS, BenchSettings, bench_stream, endless, synchronize
from dmgcli.errors import DmgError

BARRIER_TIMEOUT = 600.0  # seconds a warm worker waits for the others
WORKER_TIMEOUT = 1200.0


def concurrent_figure(settings: BenchSettings, device: torch.device, h5: Path, progress: Callable[[str], None]) -> dict:
    """{str(N): {"img_s": together, "per_run_img_s": [...]}} for each N in settings.concurrent."""
    figures = {}
    for count in settings.concurrent:
        progress(f"{count} concurrent training processes ...")
        with tempfile.TemporaryDirectory(prefix="dmg-bench-concurrent-") as tmp:
            outs = [Path(tmp) / f"worker-{k}.json" for k in range(count)]
            procs = [subprocess.Popen([sys.executable, "-m", "stages.bench_concurrent", json.dumps(asdict(settings)),
                                       str(device), str(h5), tmp, str(k), str(count), str(outs[k])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for k in range(count)]
            errors = [p.communicate(timeout=WORKER_TIMEOUT)[1] for p in procs]
            if any(p.returncode for p in procs):
                first = next(e for p, e in zip(procs, errors) if p.returncode).strip().splitlines()
                raise DmgError(f"bench: a concurrent worker failed: {first[-1] if first else 'no message'}")
            parts = [json.loads(out.read_text()) for out in outs]
        span = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        figures[str(count)] = {"img_s": sum(p["images"] for p in parts) / span,
                               "per_run_img_s": [p["images"] / (p["end"] - p["start"]) for p in parts]}
    return figures


def worker(settings_json: str, device_name: str, h5: str, barrier: str, index: int, count: int, out: str) -> None:
    """One training process of the figure: warm up, wait for the others, time the steps, write JSON."""
    from dmgcli import augment as aug
    from dmgcli.engine import model_input, place, seed_everything, training_objective
    from dmgcli.fileio import write_json
    from dmgcli.methods import MethodConfig, build_method

    settings = BenchSettings(**{**json.loads(settings_json), "concurrent": ()})
    device = torch.device(device_name)
    seed_everything(settings.seed + index)
    config = MethodConfig(backbone=settings.backbone, num_classes=settings.classes, num_domains=settings.domains,
                          **STEP_SETTINGS)
    method = place(build_method(settings.method, config), device, settings.precision)
    objective = training_objective(method, device, settings.compile, settings.compile_mode)
    train_aug = aug.get_augmentation(settings.augmentation)[0]
    batches = endless(bench_stream(Path(h5), settings, device, "always"), settings.seed + index)
    method.train()

    def step() -> int:
        x, y, d = next(batches)
        method.update(model_input(train_aug(x)), y, d, objective)
        return len(y)

    for _ in range(settings.warmup):
        step()
    synchronize(device)
    (Path(barrier) / f"ready-{index}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len(list(Path(barrier).glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the other {count - 1} workers did not get ready in {BARRIER_TIMEOUT:.0f} s")
        time.sleep(0.01)
    start, images = time.monotonic(), 0
    for _ in range(settings.steps):
        images += step()
    synchronize(device)
    write_json(out, {"start": start, "end": time.monotonic(), "images": images})


if __name__ == "__main__":
    args = sys.argv[1:]
    worker(args[0], args[1], args[2], args[3], int(args[4]), int(args[5]), args[6])
