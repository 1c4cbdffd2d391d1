"""How long the paper-schedule PACS study takes on this GPU: measure a part, project the whole.

The study: ResNet-18 at 224 px, 4 targets x 3 methods x 1 seed; DMG 150 epochs, Aggregate and
Multi-Headed 100 (train.schedules.pacs). Its training images are counted from the prepared
file (each target: its three sources' train splits x epochs, summed over methods).

Measured: `dmg study --jobs J` of the 4 targets x `--method` for `--epochs E`, end to end
(process start, resident decode, training, per-epoch validation, evaluation). From each
run's log.csv, the steady training rate (epochs after the first, summed over the J runs
that ran together) and the wall time of the whole part. Projection: all images / steady
rate, plus the part's overhead (run-seconds not in training epochs) counted once per run
(optimistic) or once per epoch (pessimistic). Writes JSON to --out and prints all three.

    python benchmarks/pacs_study_projection.py --params P --jobs 4 --epochs 3 --out OUT.json
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dmgcli.datasets import get_dataset  # noqa: E402
from dmgcli.h5data import SplitReader, read_info  # noqa: E402
from dmgcli.params import load_params  # noqa: E402

def method_epochs(params) -> dict[str, int]:
    """Epochs per method in the dataset's schedule (PACS: DMG 150, the baselines 100)."""
    schedule = params.train.schedule_for(get_dataset(params.dataset).schedule_key)
    return {"dmg": schedule.epochs, "aggregate": schedule.baseline_epochs, "multihead": schedule.baseline_epochs}


def study_images(h5: Path, epochs: dict[str, int]) -> int:
    """Training images of the whole study: per target, its sources' train images x each method's epochs."""
    domains = read_info(h5).domains
    sizes = {d: len(SplitReader(h5, d, "train")) for d in domains}
    per_target = {t: sum(n for d, n in sizes.items() if d != t) for t in domains}
    return sum(images * e for images in per_target.values() for e in epochs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--method", default="dmg", help="the method of the measured part (DMG: the slowest step)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    h5 = Path(params.data_dir) / "prepared" / f"{params.dataset}.h5"
    targets = read_info(h5).domains
    epochs = method_epochs(params)
    start = time.monotonic()
    cmd = [sys.executable, "-m", "dmgcli.cli", "study", "--params", str(args.params), "--jobs", str(args.jobs),
           "--epochs", str(args.epochs), "--method", args.method, "--backbone", args.backbone, "--device", args.device,
           "--stagger", "5", "--min-free-gb", "8" if args.device.startswith("cuda") else "1",
           *[f"--target={t}" for t in targets]]
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - start
    rows = {}
    for t in targets:
        log = (Path(params.data_dir) / "runs" / params.dataset / args.backbone / args.method / t /
               f"seed{params.matrix.seeds[0]}" / "log.csv")
        rows[t] = list(csv.DictReader(log.open()))
    trained = sum(float(r["images_per_second"]) * float(r["seconds"]) for rs in rows.values() for r in rs)
    epoch_seconds = sum(float(r["seconds"]) for rs in rows.values() for r in rs)
    steady_per_run = [sum(float(r["images_per_second"]) for r in rs[1:]) / max(len(rs) - 1, 1) for rs in rows.values()]
    together = min(args.jobs, len(targets))
    steady_rate = sum(steady_per_run) / len(steady_per_run) * together  # `together` runs shared the device
    total, runs, all_epochs = study_images(h5, epochs), len(targets) * len(epochs), len(targets) * sum(epochs.values())
    # Run-seconds of the part not spent in training epochs: start, decode, validation, checkpoints, evaluation.
    overhead = max(0.0, wall * together - epoch_seconds)
    training = total / steady_rate
    once_per_run = training + overhead / len(targets) * runs / together  # all overhead fixed per run
    per_epoch = training + overhead / (len(targets) * args.epochs) * all_epochs / together  # all overhead per epoch
    result = {"dataset": params.dataset, "backbone": args.backbone, "schedule_epochs": epochs, "jobs": args.jobs, "epochs_measured": args.epochs, "method_measured": args.method,
              "part_wall_seconds": wall, "part_trained_images": trained, "part_overhead_run_seconds": overhead,
              "steady_rate_img_s": steady_rate, "steady_per_run_img_s": steady_per_run, "study_images": total,
              "projection_training_minutes": training / 60,
              "projection_overhead_per_run_minutes": once_per_run / 60,
              "projection_overhead_per_epoch_minutes": per_epoch / 60,
              "note": "overhead = wall x runs together - training-epoch seconds of the part; the two projections "
                      "count it once per run (optimistic) or once per epoch (pessimistic: start-up charged 150 times)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{params.dataset} study ({args.backbone}, {len(targets)} targets x 3 methods, {total:,} training images), "
          f"{together} runs at once: "
          f"steady {steady_rate:,.0f} img/s -> {training / 60:.1f} min of training; with the part's overhead "
          f"{once_per_run / 60:.1f} min (once per run) to {per_epoch / 60:.1f} min (per epoch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
