"""The lambda_O sweep: DMG trained and evaluated once per (lambda_O, target, seed).

The paper's footnote claims in- and out-of-domain accuracy are robust to lambda_O (minor
in-domain drops at extreme values) and that the mean pairwise IoU of the source-domain masks
falls as lambda_O grows. This stage measures those three numbers for each lambda_O in
params.yaml `report.sweep` (default 0, 0.1, 1.0). Everything else comes from the
`train` section. Each point is trained from scratch (a rerun replaces the folder's runs:
they are the sweep's own, not the pipeline's train outputs).

Writes <data_dir>/sweeps/<dataset>/:
  lambda<l>/<target>/seed<N>/   run folder (best.pt, last.pt, log.csv, run.json) and metrics.json
  sweep.json                    settings, every run's numbers, and per lambda_O mean +- std over seeds
  lambda_sweep.png, .svg        the figure (the report stage draws it again into reports/<dataset>/)
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Callable

from dmgcli.datasets import DatasetInfo, check_domain
from dmgcli.errors import DmgError
from dmgcli.fileio import write_json
from dmgcli.params import EvaluateParams, SweepParams, TrainParams
from dmgcli.results import SWEEP_MEASURES as MEASURES
from dmgcli.results import stat, summary_markdown, summary_path, sweep_dir  # noqa: F401 - re-exported
from stages.evaluate import evaluate
from stages.train import train


def measure(metrics: dict) -> dict:
    """The sweep's numbers of one evaluated run."""
    return {"out_of_domain": metrics["out_of_domain"]["accuracy"],
            "in_domain": metrics["in_domain"]["average"]["mean"],
            "in_domain_known": metrics["in_domain"]["known_domain"]["mean"],
            "mean_iou": metrics["masks"]["mean_pairwise_iou"]}  # as evaluate recorded it (dmgcli/core.py)


def summarize(points: list[dict], lambdas: tuple[float, ...]) -> list[dict]:
    """Per lambda_O and measure: per seed the mean over targets, then mean +- std over seeds."""
    summary = []
    for lam in lambdas:
        rows = [p for p in points if p["lambda"] == lam]
        entry = {"lambda": lam}
        for key in MEASURES:
            per_seed = {s: statistics.fmean(p[key] for p in rows if p["seed"] == s) for s in {p["seed"] for p in rows}}
            s = stat(per_seed)
            entry[key] = {"mean": s.mean, "std": s.std, "n": s.n}
        summary.append(entry)
    return summary


def check_settings(info: DatasetInfo, settings: SweepParams) -> None:
    if not settings.lambdas or not settings.targets or not settings.seeds:
        raise DmgError("sweep: report.sweep needs at least one lambda, one target and one seed")
    if any(lam < 0 for lam in settings.lambdas):
        raise DmgError(f"sweep: lambda_O must be >= 0, got {', '.join(f'{lam:g}' for lam in settings.lambdas)}")
    for target in settings.targets:
        check_domain(info, target)


def sweep(info: DatasetInfo, data_dir: str | Path, train_params: TrainParams, eval_params: EvaluateParams,
          settings: SweepParams, progress: Callable[[str], None] = print) -> dict:
    """Train and evaluate DMG on the grid; writes and returns the summary (sweep.json)."""
    check_settings(info, settings)
    folder = sweep_dir(data_dir, info.name)
    schedule = train_params.schedule_for(info.schedule_key)
    # the epochs every point trains for (DMG's schedule unless set), so the summary can say it
    epochs = settings.epochs or train_params.epochs or schedule.epochs
    points = []
    for lam in settings.lambdas:
        for target in settings.targets:
            for seed in settings.seeds:
                params = dataclasses.replace(train_params, method="dmg", overlap_lambda=lam, target=target,
                                             seed=seed, epochs=epochs)
                run = folder / f"lambda{lam:g}" / target / f"seed{seed}"
                train(info, data_dir, params, out_dir=run, quiet=True, force=True)
                metrics = evaluate(info, data_dir, params, eval_params, run=run, out=run / "metrics.json")
                point = {"lambda": lam, "target": target, "seed": seed, **measure(metrics)}
                points.append(point)
                progress(f"lambda_O {lam:g}  target {target}  seed {seed}: out-of-domain {point['out_of_domain']:.2f}%"
                         f"  in-domain {point['in_domain']:.2f}%  mean pairwise IoU {point['mean_iou']:.3f}")
    summary = {"dataset": info.name, "backbone": train_params.backbone, "epochs": epochs,
               "lambdas": list(settings.lambdas), "targets": list(settings.targets), "seeds": list(settings.seeds),
               "points": points, "summary": summarize(points, settings.lambdas)}
    write_json(summary_path(data_dir, info.name), summary)
    from stages.plots import plot_sweep  # matplotlib only once there is something to draw

    plot_sweep(summary, folder / "lambda_sweep")
    return summary
