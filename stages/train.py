"""Stage 3, train: one leave-one-domain-out run of one method on one backbone.

Trains on every domain but the target, selects the epoch with the best mean
source-validation accuracy (the target is never looked at), and writes into the run folder:
  best.pt, last.pt   checkpoints (last.pt after every epoch, atomically; --resume continues it):
                     model with masks, optimizers, scheduler, every process's RNG state, epoch
  log.csv            one row per epoch: loss terms, source-validation accuracy, lr, img/s
  run.json           what was trained: dataset, domains, method config, schedule, best epoch and
                     the protocol (the report compares it with the paper's); written last, so a
                     folder without run.json holds an unfinished run
A finished run folder is never replaced unless asked (force=True, `dmg train --force`).
A killed run resumed with --resume ends exactly as an uninterrupted one would (on the CPU,
same seed): the epoch's sample order is a function of seed and epoch, the RNG states are restored.
Under torchrun (dmgcli/distributed.py) every process trains; rank 0 alone writes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dmgcli import augment as aug
from dmgcli import distributed, features
from dmgcli.checkpoint import rng_state, save_checkpoint
from dmgcli.data import BatchStream
from dmgcli.datasets import DatasetInfo, require_h5
from dmgcli.engine import (EpochStats, Schedulers, autocast_for, fit, make_scheduler, place, resolve_device,
                           seed_everything, training_objective)
from dmgcli.errors import DmgError
from dmgcli.fileio import run_lock, write_json, write_text
from dmgcli.fingerprint import check_same_data, data_record, recorded, require_images
from dmgcli.methods import Method, MethodConfig, build_method
from dmgcli.params import Schedule, TrainParams
from dmgcli.results import still_learning
from dmgcli.runfolder import check_run_folder, recover, replacing
from dmgcli.runs import (RunSpec, epochs_to_train, make_spec, per_process_batch, restore, run_dir, run_protocol,
                         seed_process, source_stream, training_settings, validate)


def train(info: DatasetInfo, data_dir: str | Path, params: TrainParams, out_dir: str | Path | None = None,
          resume: bool = False, quiet: bool = False, force: bool = False) -> Path:
    """Train one run; returns its folder (best.pt, last.pt, log.csv, run.json).

    A folder holding a run is refused unless resume (continue it) or force (replace it); the run
    they change is kept aside until the new process has a checkpoint (dmgcli/runfolder.py).
    Under torchrun every process calls this; only rank 0 writes files and prints.
    """
    h5 = require_h5(data_dir, info.name)
    spec = make_spec(info, h5, params)
    out = Path(out_dir) if out_dir else run_dir(data_dir, info.name, params.backbone, params.method, params.target,
                                                 params.seed)
    check_run_folder(out, resume, force)
    autocast_for(torch.device("cpu"), params.precision)  # rejects an unknown precision before any work
    with distributed.session(resolve_device(params.device)) as (proc, device):
        with run_lock(out, enabled=proc.is_main):  # one writer per run folder; clears a killed run's temp files
            if proc.is_main:
                recover(out)  # what a killed --force or --resume kept aside
                check_run_folder(out, resume, force)
            with replacing(out, link=resume, enabled=proc.is_main and (resume or force)):
                return _train(info, Path(data_dir), h5, spec, params, out, device, proc, resume, quiet)


def trunk_cache(info: DatasetInfo, data_dir: Path, h5: Path, config: MethodConfig, params: TrainParams,
                device: torch.device, proc: distributed.Dist, quiet: bool) -> tuple[features.TrunkKey, Path | None]:
    """The feature-cache key of a frozen-trunk run, and its cache (built by rank 0 if missing or
    stale), or None when the trunk runs at every step (train.trunk_cache: false)."""
    key = features.trunk_key(config, info.augmentation, h5, params.image_size, params.trunk_views)
    if not params.trunk_cache:
        return key, None
    path = features.cache_path(data_dir, info.name, config.backbone)
    if proc.is_main:
        features.ensure_cache(path, key, h5, config, device, quiet)
    if proc.world > 1:
        torch.distributed.barrier()
    return key, path


def input_streams(info: DatasetInfo, h5: Path, spec: RunSpec, params: TrainParams, method: Method, batch_size: int,
                  device: torch.device, trunk: tuple[features.TrunkKey, Path | None] | None
                  ) -> tuple[BatchStream, BatchStream, Callable, Callable]:
    """The sources' training and validation batches, and the augmentation each gets: images, or
    with a frozen trunk (trunk: its cache key and cache) the trunk's features, augmented already."""
    train_aug, eval_aug = aug.get_augmentation(info.augmentation, params.image_size)
    if trunk is not None:  # batches of trunk features, ready for the layers above
        key, cache = trunk
        train_stream, val_stream = features.feature_streams(key, cache, h5, method, spec.sources, ("train", "val"),
                                                            (batch_size, batch_size * 4), device, info.augmentation)
        return train_stream, val_stream, features.unchanged, features.unchanged
    train_stream = source_stream(h5, spec.sources, "train", batch_size, device, params.workers, params.resident)
    val_stream = source_stream(h5, spec.sources, "val", batch_size * 4, device, params.workers, params.resident)
    return train_stream, val_stream, train_aug, eval_aug


LOG_FIELDS = ["epoch", "loss", "ce", "overlap", "val_accuracy", "lr", "images_per_second", "seconds"]


def write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


@dataclass
class Training:
    """One run being trained: what stays fixed while it trains, and the log and best epoch so far."""
    spec: RunSpec
    params: TrainParams
    schedule: Schedule
    epochs: int
    out: Path
    proc: distributed.Dist
    quiet: bool
    data: dict  # the dataset file's record (dmgcli/fingerprint.py)
    settings: dict  # what a resume must share (dmgcli/runs.py training_settings)
    protocol: dict = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)  # log.csv
    best: dict = dataclasses.field(default_factory=lambda: {"epoch": -1, "val_accuracy": -1.0})


def _train(info: DatasetInfo, data_dir: Path, h5: Path, spec: RunSpec, params: TrainParams, out: Path,
           device: torch.device, proc: distributed.Dist, resume: bool, quiet: bool) -> Path:
    """Build the method and its inputs (continuing last.pt with resume), then fit it; after every
    epoch validate on the sources, select, log and checkpoint (end_of_epoch); run.json at the end."""
    schedule = params.schedule_for(info.schedule_key)
    batch_size = per_process_batch(params.batch_size, proc.world)
    data = data_record(h5)  # the file the run trains on (recorded); empty splits refused before any work
    require_images(data, spec.sources, ("train", "val"), "training")
    run = Training(spec, params, schedule, epochs_to_train(params, schedule), out, proc, quiet, data,
                   training_settings(spec, params, schedule))
    # before seeding: building a trunk draws initial weights from the global RNG
    trunk = trunk_cache(info, data_dir, h5, spec.config, params, device, proc, quiet) if params.frozen_trunk else None

    seed_everything(params.seed)
    method = place(build_method(params.method, spec.config), device, params.precision)
    seed_process(params.seed, proc)
    scheduler = make_scheduler(method.optimizers, schedule)
    train_stream, val_stream, train_aug, eval_aug = input_streams(info, h5, spec, params, method, batch_size, device,
                                                                  trunk)
    start_epoch = resume_from_last(run, h5, method, scheduler) if resume and (out / "last.pt").exists() else 0
    # after loading: under torchrun, DDP broadcasts rank 0's weights
    objective = training_objective(method, device, params.compile, params.compile_mode)
    precision = params.precision if device.type == "cuda" else "fp32"
    run.protocol = run_protocol(info, h5, spec, params, schedule, run.epochs, precision)
    if proc.is_main:  # run.json of a run being replaced or continued is kept aside (train())
        out.mkdir(parents=True, exist_ok=True)

    def end_of_epoch(epoch: int, stats: EpochStats) -> None:
        val = validate(method, val_stream, spec, eval_aug, params.validation_mode)
        improved = record_epoch(run, epoch, stats, val)
        rng = distributed.gather_objects(rng_state())  # every process's, so a resume repeats each stream
        if proc.is_main:
            report_epoch(run, epoch, stats, val)
            save_epoch(run, epoch, method, scheduler, rng, improved)

    fit(method, train_stream, train_aug, params.seed, run.epochs, scheduler, end_of_epoch, start_epoch, objective,
        progress=proc.is_main)
    if run.best["epoch"] < 0:
        raise DmgError(f"no epoch was trained (epochs={run.epochs}); nothing to select")
    if proc.is_main:
        write_run_json(run, device, precision)
    return out


def resume_from_last(run: Training, h5: Path, method: Method, scheduler: Schedulers) -> int:
    """Continue the run's last.pt: weights, optimizers, scheduler, random state, log and best
    epoch; returns the number of epochs it completed."""
    ckpt = restore(run.out / "last.pt", run.spec, run.settings, method, scheduler, run.proc, run.params.seed)
    check_same_data(ckpt.get("data"), run.data, h5, run.out)
    run.best, run.rows = ckpt["best"], ckpt["log"]
    return ckpt["epoch"]


def record_epoch(run: Training, epoch: int, stats: EpochStats, val: dict) -> bool:
    """Add the epoch's log row and select it if its mean source-validation accuracy is the best
    so far (the first best epoch wins ties); returns whether it was selected."""
    run.rows.append({"epoch": epoch + 1, "loss": stats.loss, "ce": stats.extra.get("ce", stats.loss),
                     "overlap": stats.extra.get("overlap", 0.0), "val_accuracy": val["mean"], "lr": stats.lr,
                     "images_per_second": stats.images_per_second, "seconds": stats.seconds})
    improved = val["mean"] > run.best["val_accuracy"]
    if improved:
        run.best = {"epoch": epoch + 1, "val_accuracy": val["mean"], "val_per_domain": val["per_domain"]}
    return improved


def report_epoch(run: Training, epoch: int, stats: EpochStats, val: dict) -> None:
    if not run.quiet:
        print(f"epoch {epoch + 1}/{run.epochs}  loss {stats.loss:.4f}  source-val {val['mean']:.2f}%  "
              f"{stats.images_per_second:.0f} img/s", flush=True)


def save_epoch(run: Training, epoch: int, method: Method, scheduler: Schedulers, rng: list, improved: bool) -> None:
    """last.pt (everything a resume needs), best.pt if the epoch was selected, and log.csv."""
    epochs_run = epoch + 1  # "epoch" in a checkpoint = epochs completed (1-based, as in log.csv and run.json)
    payload = {"identity": run.spec.identity(), "config": dataclasses.asdict(run.spec.config),
               "model": method.state_dict(), "epoch": epochs_run,
               "protocol": {**run.protocol, "epochs_run": epochs_run}, "data": recorded(run.data)}
    save_checkpoint(run.out / "last.pt", {**payload, "best": run.best, "log": run.rows, "settings": run.settings,
                                          "optimizers": [o.state_dict() for o in method.optimizers],
                                          "scheduler": scheduler.state_dict(), "rng": rng})
    if improved:
        save_checkpoint(run.out / "best.pt", payload)
    write_log(run.out / "log.csv", run.rows)


def write_run_json(run: Training, device: torch.device, precision: str) -> None:
    """run.json, written last: a folder holding it holds a finished run."""
    still = still_learning([r["val_accuracy"] for r in run.rows], run.epochs)
    write_json(run.out / "run.json", {
        **run.spec.identity(), "seed": run.params.seed, "epochs": run.epochs, "best": run.best,
        "config": dataclasses.asdict(run.spec.config), "schedule": dataclasses.asdict(run.schedule),
        "device": str(device), "processes": run.proc.world, "batch_size": run.params.batch_size,
        "precision": precision, "torch": torch.__version__,
        "protocol": {**run.protocol, "epochs_run": len(run.rows), "still_learning": still},
        "data": recorded(run.data)})
