"""params.yaml as typed, frozen dataclasses.

Every stage reads its own section. Unknown keys and values of the wrong type are errors
that name the key (the reference code printed a warning and carried on). Command-line
flags override values after loading, through `override`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import DmgError


def check_range(key: str, value, minimum: float | None = None, positive: bool = False) -> None:
    """One-line errors for values of the right type but out of range (None means "default")."""
    if value is None:
        return
    if minimum is not None and value < minimum:
        raise DmgError(f"params: {key} must be at least {minimum}, got {value!r}")
    if positive and value <= 0:
        raise DmgError(f"params: {key} must be positive, got {value!r}")


@dataclass(frozen=True)
class MatrixParams:
    """The experiment grid DVC expands: one training run per combination."""
    targets: tuple[str, ...] = ("rot0", "rot15", "rot30", "rot45", "rot60", "rot75")
    methods: tuple[str, ...] = ("aggregate", "multihead", "dmg")
    backbones: tuple[str, ...] = ("convnet",)
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class DownloadParams:
    source: Optional[str] = None  # local zip, extracted folder or mirror URL (--from)
    splits: Optional[str] = None  # folder holding the split lists (--splits); None: look beside the images
    retries: int = 3  # further attempts after a failed transfer (each resumes it)
    timeout: float = 60.0  # seconds without data before an attempt counts as failed


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = 256  # stored side length for real datasets (crops of 224 are taken from it)
    encoding: str = "jpeg"  # "jpeg" (encoded bytes + offsets) or "raw" (uint8 pixels)
    jpeg_quality: int = 90
    workers: int = 0  # 0 = all cores
    seed: int = 0  # seeds the digits domain split and DomainNet's "seeded" validation split
    val_split: str = "tv_0.9"  # DomainNet validation: "tv_0.9" (the reference split) or "seeded"
    val_fraction: float = 0.1  # DomainNet "seeded" validation share of the official train list
    digits_size: int = 16  # side length of the upsampled, rotated digits


@dataclass(frozen=True)
class FolderDatasetParams:
    """A dataset of one's own images, <root>/<domain>/<class>/<image> (params.yaml `datasets:`).

    Splits per domain: `fractions` (train/val/test shares, seeded, stratified by class),
    `holdout` (DomainBed's protocol: a seeded random `holdout` share of each domain is val,
    the rest train, test is the whole domain) or `lists` (PACS-format split lists
    `<domain>_{train,crossval,test}_kfold.txt`, given to `dmg download --splits`).
    """
    root: Optional[str] = None  # folder, .zip or .tar[.gz] holding the domain folders; --from overrides it
    domains: Optional[tuple[str, ...]] = None  # domain folders to use; None: every one under the root
    image_size: Optional[int] = None  # stored side length; None: preprocess.image_size
    split: str = "fractions"  # fractions, holdout or lists
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2)  # train, val, test shares of each domain and class
    holdout: float = 0.2  # split holdout: val share of each domain
    seed: int = 0  # seeds the fractions and holdout splits
    augmentation: str = "pacs"  # dmgcli.augment: pacs (crop 224, flip, jitter), domainnet or none (stored size)
    resize: str = "squash"  # stored squares: squash (whole image, aspect not kept) or center_crop
    schedule: str = "default"  # the entry of train.schedules it trains with


@dataclass(frozen=True)
class Schedule:
    """Training schedule of one dataset (REFERENCE.md, section 1)."""
    epochs: int
    baseline_epochs: int  # Aggregate and Multi-Headed (the reference trained them shorter on PACS)
    lr: float  # Adam learning rate of the network
    mask_lr: float  # Adam learning rate of the mask logits (DMG)
    weight_decay: float
    lr_schedule: str  # "exponential" (per epoch), "inverse" (per iteration) or "constant"
    gamma: float = 0.99  # exponential: lr *= gamma each epoch; inverse: lr * (1 + gamma * t) ** -power
    power: float = 0.75


DEFAULT_SCHEDULES = {
    # Digits train from scratch, so they take a larger step than the reference's fine-tuning lr.
    "digits": Schedule(epochs=48, baseline_epochs=32, lr=1e-3, mask_lr=1e-2, weight_decay=1e-5,
                       lr_schedule="exponential", gamma=0.99),
    "pacs": Schedule(epochs=150, baseline_epochs=100, lr=1e-4, mask_lr=1e-4, weight_decay=1e-5,
                     lr_schedule="exponential", gamma=0.99),
    "domainnet": Schedule(epochs=50, baseline_epochs=50, lr=1e-4, mask_lr=1e-4, weight_decay=0.0,
                          lr_schedule="inverse", gamma=1e-4),
    # Folder datasets and VLCS / Office-Home / TerraIncognita: the PACS recipe (fine-tuning from
    # ImageNet weights), with the same number of epochs for every method.
    "default": Schedule(epochs=50, baseline_epochs=50, lr=1e-4, mask_lr=1e-4, weight_decay=1e-5,
                        lr_schedule="exponential", gamma=0.99),
}


@dataclass(frozen=True)
class TrainParams:
    target: str = "rot0"
    sources: Optional[tuple[str, ...]] = None  # None: every domain but the target (leave-one-domain-out)
    method: str = "dmg"
    backbone: str = "convnet"
    seed: int = 0
    pretrained: bool = False
    pretrained_path: Optional[str] = None  # ImageNet weights file; else the torch hub cache
    mask_points: Optional[tuple[str, ...]] = None  # None: the backbone's reference points
    mask_init: str = "uniform"
    overlap_lambda: float = 0.1
    lr: Optional[float] = None  # None: the dataset schedule's lr
    mask_lr: Optional[float] = None  # None: the dataset schedule's mask_lr
    batch_size: int = 64
    epochs: Optional[int] = None  # None: the dataset schedule's epochs
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    workers: int = 2  # DataLoader workers for encoded images (on CUDA they only read bytes; decoding is on the GPU)
    precision: str = "bf16"  # CUDA: bf16 autocast or fp32; the CPU always computes in fp32
    compile: bool = False  # torch.compile the training step (CUDA; costs a minute or more at the start)
    schedules: dict[str, Schedule] = field(default_factory=lambda: dict(DEFAULT_SCHEDULES))

    def __post_init__(self):
        check_range("train.batch_size", self.batch_size, minimum=1)
        check_range("train.epochs", self.epochs, minimum=1)
        check_range("train.workers", self.workers, minimum=0)
        check_range("train.overlap_lambda", self.overlap_lambda, minimum=0)
        check_range("train.lr", self.lr, positive=True)
        check_range("train.mask_lr", self.mask_lr, positive=True)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    average_over: str = "logits"  # "logits" (reference) or "probs"
    device: str = "auto"

    def __post_init__(self):
        check_range("evaluate.batch_size", self.batch_size, minimum=1)
        if self.average_over not in ("logits", "probs"):
            raise DmgError(f"params: evaluate.average_over must be logits or probs, got {self.average_over!r}")


@dataclass(frozen=True)
class SweepParams:
    """The lambda_O sweep (`dmg sweep`): DMG trained and evaluated once per lambda x target x seed."""
    lambdas: tuple[float, ...] = (0.0, 0.01, 0.1, 0.5, 1.0)
    targets: tuple[str, ...] = ("rot0",)  # domains of `dataset`
    seeds: tuple[int, ...] = (0,)
    epochs: Optional[int] = None  # None: the dataset schedule's epochs, so sweep points match the main runs


@dataclass(frozen=True)
class ReportParams:
    format: str = "text"  # what `dmg report` prints: text, markdown, csv, latex or json
    figures: bool = True  # draw training curves, mask plots and the sweep figure
    sweep: SweepParams = SweepParams()


@dataclass(frozen=True)
class Params:
    dataset: str = "digits"
    data_dir: str = "data"
    matrix: MatrixParams = MatrixParams()
    download: DownloadParams = DownloadParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    datasets: dict[str, FolderDatasetParams] = field(default_factory=dict)  # one's own folder datasets, by name


def _describe(tp) -> str:
    """An annotation in words, for error messages: Optional[float] -> "a number or null"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, "a mapping")


def _convert(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except DmgError:
                continue
        raise DmgError(f"params: {key} must be {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise DmgError(f"params: {key} must be a list, got {value!r}")
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {value!r}")
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool):
            raise DmgError(f"params: {key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise DmgError(f"params: {key} must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DmgError(f"params: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DmgError(f"params: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise DmgError(f"params: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params annotation {tp!r} for {key}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise DmgError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise DmgError(f"params: unknown key {where!r}; valid: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            values[f.name] = _convert(data[f.name], hints[f.name], where)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise DmgError(f"params: {prefix or 'root'}: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml; a missing file gives the defaults, a malformed one an error."""
    path = Path(path)
    if not path.exists():
        if path.name == "params.yaml" and path.parent == Path("."):
            return Params()
        raise DmgError(f"params file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DmgError(f"params: {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise DmgError(f"params: {path} must hold a mapping of sections")
    return from_dict(Params, data)


def override(section, **values):
    """Return `section` with the non-None values replaced, type-checked like params.yaml."""
    hints = typing.get_type_hints(type(section))
    changes = {}
    for name, value in values.items():
        if value is None:
            continue
        changes[name] = _convert(value, hints[name], name)
    return dataclasses.replace(section, **changes)


def to_dict(obj) -> dict:
    """A params dataclass as plain JSON-friendly data (recorded with every model)."""
    return dataclasses.asdict(obj)
