"""Stage 4, evaluate: out-of-domain and in-domain accuracy of a trained run, as JSON.

Two files per run (dmgcli/results.py reads them):
  seed<N>.json          the headline DVC shows (`dvc metrics show`): out_of_domain, in_domain
                        (average), in_domain_known_domain (DMG-KnownDomain / own head), best_epoch
  seed<N>.details.json  everything, below
Details file (accuracies in percent, the paper's unit):
{
  "dataset", "backbone", "method", "target", "seed", "sources": [...],
  "out_of_domain": {"accuracy": float, "mode": "average"},          # target's test split
  "in_domain": {"<mode>": {"per_domain": {source: float}, "mean": float}},  # sources' test splits
  "in_domain_split": "test",   # "val" for PACS, whose test list is the whole domain (train included)
  "selection": {"best_epoch": int, "val_accuracy": float},
  "masks": {"points": [...], "iou": {point: [[D x D]]}, "keep_probability": {point: {source: float}},  # DMG only
            "mean_pairwise_iou": float,  # over masked points of the mean hard IoU of distinct pairs (core)
            "keep_probability_histogram": {"bin_edges": [21 floats], "counts": {point: {source: [20 ints]}}}},
  "finished": bool,   # false: evaluated with allow_unfinished, the run had no run.json
  "protocol": {...}   # how the run was trained (dmgcli/runs.py run_protocol); absent for old checkpoints
}
In-domain modes: "average" for every method; "known_domain" for DMG (DMG-KnownDomain,
Table 3) and Multi-Headed (own head).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dmgcli import augment as aug
from dmgcli import distributed, features
from dmgcli.data import BatchStream, DomainImages
from dmgcli.datasets import DatasetInfo, require_h5
from dmgcli.checkpoint import load_checkpoint, load_model_state
from dmgcli.engine import correct_counts, place, resolve_device
from dmgcli.errors import DmgError
from dmgcli.fileio import check_replaceable, read_record, run_lock, write_json
from dmgcli.fingerprint import check_same_data, data_record, require_images
from dmgcli.h5data import SplitReader
from dmgcli.methods import DMG, MethodConfig, MultiHead, build_method
from dmgcli.params import EvaluateParams, TrainParams
from dmgcli.results import details_path, headline, metrics_path  # noqa: F401 - metrics_path re-exported
from dmgcli.runs import check_identity, make_spec, run_dir


def train_command(info: DatasetInfo, params: TrainParams, run: str | Path | None) -> str:
    """The `dmg train` command that makes the run evaluate looks for."""
    sources = "".join(f" --source {s}" for s in params.sources or ())
    out = f" --out {run}" if run else ""
    return (f"dmg train --dataset {info.name} --target {params.target}{sources} --backbone {params.backbone} "
            f"--method {params.method} --seed {params.seed}{out}")


def run_state(folder: Path, info: DatasetInfo, params: TrainParams, run, allow_unfinished: bool) -> dict:
    """run.json of a finished run; for an unfinished one (allowed), what last.pt says so far."""
    if not (folder / "best.pt").exists():
        raise DmgError(f"no trained run in {folder} (best.pt not found); make it with `{train_command(info, params, run)}`")
    if (folder / "run.json").exists():
        return {**read_record(folder / "run.json", ("best",)), "finished": True}
    last = load_checkpoint(folder / "last.pt") if (folder / "last.pt").exists() else {}
    if not allow_unfinished:
        planned = (last.get("protocol") or {}).get("epochs")
        epochs = f" --epochs {planned}" if planned else ""
        raise DmgError(f"{folder} holds an unfinished run (no run.json: stopped or still training); finish it with "
                       f"`{train_command(info, params, run)}{epochs} --resume`, or pass --allow-unfinished")
    return {"best": last.get("best", {}), "protocol": last.get("protocol"), "finished": False}


KEEP_BINS = 20  # equal-width keep-probability bins over [0, 1] for the report's histograms


@torch.no_grad()
def keep_histograms(method: DMG, sources: list[str]) -> dict:
    """Per masked point and source: how many mask units fall in each keep-probability bin.

    Counts rather than every unit's probability keep the file small (AlexNet has 17,408 units).
    """
    counts = {}
    for layer, point in enumerate(method.mask_points):
        probs = method.masks.probs(layer).float().cpu()  # [D, U]
        counts[point] = {s: torch.histc(p, bins=KEEP_BINS, min=0.0, max=1.0).int().tolist()
                         for s, p in zip(sources, probs)}
    return {"bin_edges": [k / KEEP_BINS for k in range(KEEP_BINS + 1)], "counts": counts}


def evaluate(info: DatasetInfo, data_dir: str | Path, train_params: TrainParams, params: EvaluateParams,
             run: str | Path | None = None, out: str | Path | None = None, metrics_dir: str | Path = "metrics",
             allow_unfinished: bool = False) -> dict:
    """Evaluate the best checkpoint of a run; writes the headline and details files (out is the
    headline's path) and returns the details. An unfinished run (no run.json) is refused
    unless allow_unfinished; its metrics then say finished: false.

    Under torchrun each process scores its share of every split and the counts are summed,
    so each sample counts once; rank 0 writes the files.
    """
    if out is not None:  # before the work, not after it
        check_replaceable(out)
        check_replaceable(details_path(out))
    h5 = require_h5(data_dir, info.name)
    spec = make_spec(info, h5, train_params)
    folder = Path(run) if run else run_dir(data_dir, info.name, train_params.backbone, train_params.method,
                                           train_params.target, train_params.seed)
    state = run_state(folder, info, train_params, run, allow_unfinished)
    ckpt = load_checkpoint(folder / "best.pt")
    check_identity(ckpt, spec, folder / "best.pt", advice="evaluate it with the settings it was trained with "
                   "(--dataset, --target, --source, --backbone, --method), or name another run with --run")
    data = data_record(h5)
    check_same_data(ckpt.get("data", state.get("data")), data, h5, folder)
    require_images(data, [spec.target], ("test",), "evaluation")
    require_images(data, spec.sources, (info.in_domain_split,), "in-domain evaluation")
    with distributed.session(resolve_device(params.device)) as (proc, device):
        metrics = _evaluate(info, Path(data_dir), h5, spec, ckpt, folder, train_params, params, device)
        best = state["best"]
        metrics["selection"] = {"best_epoch": best.get("epoch"), "val_accuracy": best.get("val_accuracy")}
        metrics["finished"] = state["finished"]
        if state.get("protocol"):  # checkpoints from before protocols were recorded have none
            metrics["protocol"] = state["protocol"]
        path = Path(out) if out else metrics_path(metrics_dir, info.name, metrics["backbone"], spec.method, spec.target,
                                                  train_params.seed)
        check_replaceable(path)
        check_replaceable(details_path(path))  # both files or neither
        if proc.is_main:
            with run_lock(path, folder=False):  # one evaluation writes the pair at a time; details first
                write_json(details_path(path), metrics)
                write_json(path, headline(metrics))
    return metrics


def _evaluate(info: DatasetInfo, data_dir: Path, h5: Path, spec, ckpt: dict, folder: Path,
              train_params: TrainParams, params: EvaluateParams, device: torch.device) -> dict:
    # Rebuild the network exactly as it was trained: its config (mask points, pretrained, hence the
    # input normalisation and head) comes from the checkpoint, not from params.yaml now; every weight
    # and buffer, normalisation statistics included, then comes from best.pt.
    config = MethodConfig(**ckpt["config"])
    method = build_method(spec.method, config, load_weights=False, optimizers=False)  # the checkpoint's weights follow
    method = place(method, device, train_params.precision)
    method.average_over = params.average_over  # how the "average" prediction combines the per-domain outputs
    load_model_state(method, ckpt["model"], folder / "best.pt")
    _, eval_aug = aug.get_augmentation(info.augmentation, config.image_size)
    if config.frozen_trunk:  # the trunk's features of the evaluation view, from the run's feature cache
        key = features.trunk_key(config, info.augmentation, h5, config.image_size, config.trunk_views)
        cache = features.ensure_cache(features.cache_path(data_dir, info.name, config.backbone), key, h5, config,
                                      device) if train_params.trunk_cache else None
        eval_aug = features.unchanged

    def stream(domains, split: str = "test"):
        """The `split` of `domains`; each sample carries its domain's position in `domains`."""
        if config.frozen_trunk:
            return features.feature_streams(key, cache, h5, method, tuple(domains), (split,), (params.batch_size,),
                                            device, info.augmentation)[0]
        images = DomainImages([SplitReader(h5, d, split) for d in domains], list(range(len(domains))))
        return BatchStream(images, params.batch_size, device, train_params.workers, train_params.resident)

    # The target's domain index is irrelevant in "average" mode; 0 is a placeholder.
    target_correct, target_total = correct_counts(method, stream([spec.target]), eval_aug, "average", 1)
    sources = stream(spec.sources, info.in_domain_split)
    modes = ["average"] + (["known_domain"] if isinstance(method, (DMG, MultiHead)) else [])
    in_domain = {}
    for mode in modes:
        correct, total = correct_counts(method, sources, eval_aug, mode, len(spec.sources))
        per_domain = {d: 100.0 * c / max(t, 1) for d, c, t in zip(spec.sources, correct, total)}
        in_domain[mode] = {"per_domain": per_domain, "mean": sum(per_domain.values()) / len(per_domain)}
    metrics = {
        "dataset": info.name, "backbone": config.backbone, "method": spec.method, "target": spec.target,
        "in_domain_split": info.in_domain_split,
        "seed": train_params.seed, "sources": list(spec.sources),
        "out_of_domain": {"accuracy": 100.0 * target_correct[0] / max(target_total[0], 1), "mode": "average"},
        "in_domain": in_domain,
    }
    if isinstance(method, DMG):
        metrics["masks"] = {"points": list(method.mask_points),
                            **method.masks.metrics(list(method.mask_points), list(spec.sources)),
                            "keep_probability_histogram": keep_histograms(method, list(spec.sources))}
    return metrics
