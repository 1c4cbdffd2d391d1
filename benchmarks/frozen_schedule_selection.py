"""Choose the frozen-trunk PACS schedule on source validation only (never the target).

For each candidate (method, lr, mask_lr) every target's leave-one-domain-out run is trained
for a fixed number of epochs (seed 0), and its per-epoch mean source-validation accuracy
(the selection criterion dmg train uses) is read from log.csv. The table gives, per candidate,
the best source-validation accuracy averaged over targets and the epochs at which the runs
peaked, from which the schedule's lr, mask_lr and epochs are chosen. Target accuracy is never
computed here.

    python benchmarks/frozen_schedule_selection.py --params studies/pacs_frozen_cpu.yaml \
        --out benchmarks/results/pacs_frozen_cpu/selection.md
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmgcli.datasets import declare, get_dataset  # noqa: E402
from dmgcli.params import load_params  # noqa: E402
from stages.train import train  # noqa: E402

# (method, lr, mask_lr, epochs): the reference's fine-tuning lr 1e-4 and a head-training lr 1e-3
# for the baselines; for DMG the masks' lr from the reference's 1e-4 up (benchmarks/FIDELITY.md:
# at 1e-4 the masks barely move in 30 epochs).
CANDIDATES = [
    ("aggregate", 1e-4, None, 30),
    ("aggregate", 1e-3, None, 30),
    ("dmg", 1e-3, 1e-4, 40),
    ("dmg", 1e-3, 1e-2, 40),
]


def curve(folder: Path) -> list[float]:
    with open(folder / "log.csv") as f:
        return [float(row["val_accuracy"]) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="studies/pacs_frozen_cpu.yaml")
    parser.add_argument("--work", default="scratch/selection", help="run folders (kept: a re-run reuses finished ones)")
    parser.add_argument("--out", default="benchmarks/results/pacs_frozen_cpu/selection.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", help="repeat; default: the matrix's targets (run several "
                        "processes with disjoint targets to use more cores, then one with all to summarise)")
    parser.add_argument("--candidates", type=int, nargs="*", help="indices into CANDIDATES; default all")
    args = parser.parse_args()
    params = load_params(args.params)
    declare(params)
    info = get_dataset(params.dataset)
    rows, curves = [], {}
    targets = tuple(args.target or params.matrix.targets)
    chosen = [CANDIDATES[i] for i in args.candidates] if args.candidates is not None else CANDIDATES
    for method, lr, mask_lr, epochs in chosen:
        name = f"{method}-lr{lr:g}" + (f"-masklr{mask_lr:g}" if mask_lr else "")
        best, peaks, seconds = [], [], 0.0
        for target in targets:
            folder = Path(args.work) / name / target
            if not (folder / "run.json").exists():
                start = time.perf_counter()
                settings = dataclasses.replace(params.train, method=method, target=target, seed=args.seed, lr=lr,
                                               mask_lr=mask_lr, epochs=epochs)
                train(info, params.data_dir, settings, out_dir=folder, quiet=True, force=True)
                seconds += time.perf_counter() - start
            values = curve(folder)
            curves[f"{name}/{target}"] = values
            best.append(max(values))
            peaks.append(values.index(max(values)) + 1)
        mean_curve = [sum(c[e] for t, c in curves.items() if t.startswith(name + "/")) / len(best)
                      for e in range(epochs)]
        rows.append((name, epochs, sum(best) / len(best), peaks, mean_curve.index(max(mean_curve)) + 1, seconds))
        print(f"{name}: mean best source val {rows[-1][2]:.2f}, peaks {peaks}", flush=True)
    lines = ["| candidate | epochs | mean best source val | best epoch per target | peak of the mean curve | train s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {e} | {v:.2f} | {', '.join(map(str, p))} | {m} | {s:.0f} |" for n, e, v, p, m, s in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"targets": list(targets),
                                                               "seed": args.seed, "curves": curves}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
