"""Stage 3, train: one leave-one-domain-out run of one method on one backbone.

Trains on every domain but the target, selects the epoch with the best mean
source-validation accuracy (the target is never looked at), and writes into the run folder:
  best.pt, last.pt   checkpoints (last.pt after every epoch, atomically; --resume continues it)
  log.csv            one row per epoch: loss terms, source-validation accuracy, lr, img/s
  run.json           what was trained: dataset, domains, method config, schedule, best epoch
"""
from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from dmgcli import augment as aug
from dmgcli.data import BatchStream, DomainImages
from dmgcli.datasets import DatasetInfo, require_h5
from dmgcli.engine import (accuracy, autocast_for, load_checkpoint, load_model_state, make_scheduler, resolve_device, rng_state,
                           save_checkpoint, seed_everything, set_rng_state, train_one_epoch)
from dmgcli.errors import DmgError
from dmgcli.fileio import write_json, write_text
from dmgcli.h5data import SplitReader, read_info
from dmgcli.methods import Method, MethodConfig, build_method
from dmgcli.params import TrainParams


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies a run; a checkpoint must match it to be resumed or evaluated."""
    dataset: str
    target: str
    sources: tuple[str, ...]
    method: str
    config: MethodConfig

    def identity(self) -> dict:
        return {"dataset": self.dataset, "target": self.target, "sources": list(self.sources),
                "method": self.method, "backbone": self.config.backbone}


def run_dir(data_dir: str | Path, dataset: str, backbone: str, method: str, target: str, seed: int) -> Path:
    """Where a run's checkpoints live (a DVC output)."""
    return Path(data_dir) / "runs" / dataset / backbone / method / target / f"seed{seed}"


def make_spec(info: DatasetInfo, h5: Path, params: TrainParams, average_over: str = "logits") -> RunSpec:
    file_info = read_info(h5)
    if params.target not in file_info.domains:
        raise DmgError(f"target {params.target!r} is not a domain of {h5}; valid: {', '.join(file_info.domains)}")
    sources = tuple(d for d in file_info.domains if d != params.target)
    schedule = params.schedules.get(info.name)
    if schedule is None:
        raise DmgError(f"params: train.schedules has no entry for dataset {info.name!r}")
    config = MethodConfig(
        backbone=params.backbone, num_classes=len(file_info.classes), num_domains=len(sources),
        pretrained=params.pretrained, pretrained_path=params.pretrained_path, mask_points=params.mask_points,
        mask_init=params.mask_init, overlap_lambda=params.overlap_lambda,
        lr=schedule.lr if params.lr is None else params.lr,
        mask_lr=schedule.mask_lr if params.mask_lr is None else params.mask_lr,
        weight_decay=schedule.weight_decay, average_over=average_over)
    return RunSpec(info.name, params.target, sources, params.method, config)


def check_identity(checkpoint: dict, spec: RunSpec, path: Path) -> None:
    """Refuse a checkpoint of another backbone, method or domain set."""
    saved = checkpoint.get("identity", {})
    for key, value in spec.identity().items():
        if saved.get(key) != value:
            raise DmgError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, not {value!r}; "
                           f"use another output folder or drop --resume")


def source_streams(h5: Path, sources: tuple[str, ...], split: str, batch_size: int, device, workers: int):
    readers = [SplitReader(h5, d, split) for d in sources]
    return readers, BatchStream(DomainImages(readers, list(range(len(sources)))), batch_size, device, workers)


def validate(method: Method, h5: Path, spec: RunSpec, batch_size: int, device, workers: int, augment) -> dict:
    """Accuracy on each source's validation split in the method's validation mode, and their mean."""
    per_domain = {}
    for k, domain in enumerate(spec.sources):
        stream = BatchStream(DomainImages([SplitReader(h5, domain, "val")], [k]), batch_size, device, workers)
        per_domain[domain] = accuracy(method, stream, augment, method.validation_mode)
    return {"mean": sum(per_domain.values()) / len(per_domain), "per_domain": per_domain}


LOG_FIELDS = ["epoch", "loss", "ce", "overlap", "val_accuracy", "lr", "images_per_second", "seconds"]


def write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def train(info: DatasetInfo, data_dir: str | Path, params: TrainParams, out_dir: str | Path | None = None,
          resume: bool = False, quiet: bool = False) -> Path:
    """Train one run; returns its folder (best.pt, last.pt, log.csv, run.json)."""
    h5 = require_h5(data_dir, info.name)
    spec = make_spec(info, h5, params)
    out = Path(out_dir) if out_dir else run_dir(data_dir, info.name, params.backbone, params.method, params.target,
                                                 params.seed)
    device = resolve_device(params.device)
    schedule = params.schedules[info.name]
    epochs = params.epochs if params.epochs is not None else (
        schedule.epochs if params.method == "dmg" else schedule.baseline_epochs)

    seed_everything(params.seed)
    method = build_method(params.method, spec.config).to(device)
    method.autocast = autocast_for(device)
    scheduler, scheduler_unit = make_scheduler(method.optimizers[0], schedule)
    train_aug, eval_aug = aug.get_augmentation(info.augmentation)
    _, train_stream = source_streams(h5, spec.sources, "train", params.batch_size, device, params.workers)

    start_epoch, best, rows = 0, {"epoch": -1, "val_accuracy": -1.0}, []
    last_path = out / "last.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        check_identity(ckpt, spec, last_path)
        load_model_state(method, ckpt["model"], last_path)
        for opt, state in zip(method.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best, rows = ckpt["epoch"] + 1, ckpt["best"], ckpt["log"]
    out.mkdir(parents=True, exist_ok=True)

    for epoch in range(start_epoch, epochs):
        stats = train_one_epoch(method, train_stream, train_aug, params.seed, epoch, scheduler,
                                step_scheduler=scheduler_unit == "step", desc=f"epoch {epoch + 1}/{epochs}")
        lr = method.optimizers[0].param_groups[0]["lr"]
        if scheduler_unit == "epoch":
            scheduler.step()
        val = validate(method, h5, spec, params.batch_size * 4, device, params.workers, eval_aug)
        row = {"epoch": epoch + 1, "loss": stats.loss, "ce": stats.extra.get("ce", stats.loss),
               "overlap": stats.extra.get("overlap", 0.0), "val_accuracy": val["mean"], "lr": lr,
               "images_per_second": stats.images_per_second, "seconds": stats.seconds}
        rows.append(row)
        if not quiet:
            print(f"epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}  source-val {val['mean']:.2f}%  "
                  f"{stats.images_per_second:.0f} img/s", flush=True)
        payload = {"identity": spec.identity(), "config": dataclasses.asdict(spec.config), "model": method.state_dict()}
        if val["mean"] > best["val_accuracy"]:
            best = {"epoch": epoch + 1, "val_accuracy": val["mean"], "val_per_domain": val["per_domain"]}
            save_checkpoint(out / "best.pt", {**payload, "epoch": epoch})
        save_checkpoint(last_path, {**payload, "epoch": epoch, "best": best, "log": rows,
                                    "optimizers": [o.state_dict() for o in method.optimizers],
                                    "scheduler": scheduler.state_dict(), "rng": rng_state()})
        write_log(out / "log.csv", rows)

    if not (out / "best.pt").exists():
        raise DmgError(f"no epoch was trained (epochs={epochs}); nothing to select")
    write_json(out / "run.json", {**spec.identity(), "seed": params.seed, "epochs": epochs, "best": best,
                                  "config": dataclasses.asdict(spec.config),
                                  "schedule": dataclasses.asdict(schedule), "device": str(device),
                                  "torch": torch.__version__})
    return out
