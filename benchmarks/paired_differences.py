"""DMG minus the baselines per target, paired over seeds, from the metrics files evaluate writes.

Per target and seed the difference DMG - Aggregate (and DMG - Multi-Headed) of one metric;
per target the mean over seeds and its standard error; over all targets the mean of every
(target, seed) pair and its standard error. Prints a markdown table (and writes it with --out).

    python benchmarks/paired_differences.py --metrics metrics --dataset pacs --backbone efficientnet_lite0_mlp
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

METRICS = {"out_of_domain": "out-of-domain", "in_domain": "in-domain (average)",
           "in_domain_known_domain": "in-domain (KnownDomain / own head)"}


def read_cell(folder: Path) -> dict[int, dict]:
    """seed -> headline metrics of one (backbone, method, target) folder."""
    found = {}
    for path in sorted(folder.glob("seed*.json")):
        match = re.fullmatch(r"seed(\d+)\.json", path.name)
        if match:
            found[int(match.group(1))] = json.loads(path.read_text())
    return found


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(metrics_dir: Path, dataset: str, backbone: str, baseline: str, metric: str) -> dict:
    """{target: [DMG - baseline per common seed]} for one metric."""
    root = metrics_dir / dataset / backbone
    out = {}
    for target_dir in sorted((root / "dmg").iterdir()) if (root / "dmg").is_dir() else []:
        dmg, base = read_cell(target_dir), read_cell(root / baseline / target_dir.name)
        seeds = sorted(set(dmg) & set(base))
        diffs = [dmg[s][metric] - base[s][metric] for s in seeds
                 if dmg[s].get(metric) is not None and base[s].get(metric) is not None]
        if diffs:
            out[target_dir.name] = diffs
    return out


def fmt(mean: float, se: float) -> str:
    return f"{mean:+.2f}" + ("" if math.isnan(se) else f" ± {se:.2f}")


def table(metrics_dir: Path, dataset: str, backbone: str, metric: str = "out_of_domain") -> str:
    columns = {b: paired(metrics_dir, dataset, backbone, b, metric) for b in ("aggregate", "multihead")}
    targets = sorted({t for c in columns.values() for t in c})
    lines = [f"{METRICS[metric]}, {dataset}, {backbone}: DMG minus each baseline, mean ± standard error over seeds "
             f"(paired by seed)", "", "| target | seeds | DMG - Aggregate | DMG - Multi-Headed |", "|---|---|---|---|"]
    for t in targets:
        cells = [fmt(*mean_se(columns[b][t])) if t in columns[b] else "-" for b in columns]
        seeds = max(len(columns[b].get(t, [])) for b in columns)
        lines.append(f"| {t} | {seeds} | {cells[0]} | {cells[1]} |")
    overall = [fmt(*mean_se([d for t in targets for d in columns[b].get(t, [])])) if columns[b] else "-"
               for b in columns]
    pairs = max(sum(len(v) for v in columns[b].values()) for b in columns) if targets else 0
    lines.append(f"| all targets | {pairs} pairs | {overall[0]} | {overall[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--dataset", default="pacs")
    parser.add_argument("--backbone", default="efficientnet_lite0_mlp")
    parser.add_argument("--metric", action="append", choices=sorted(METRICS), help="repeat; default all three")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = "\n".join(table(args.metrics, args.dataset, args.backbone, m) for m in (args.metric or list(METRICS)))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
