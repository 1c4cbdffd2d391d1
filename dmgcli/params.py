"""params.yaml as typed, frozen dataclasses.

Every stage reads its own section. Unknown keys and values of the wrong type are errors
that name the key (the reference code printed a warning and carried on). Command-line
flags override values after loading, through `override`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import DmgError
from .fileio import shorten


def quote(value) -> str:
    """A value as an error message quotes it: its repr, cut to 80 characters (and safe for any depth)."""
    import reprlib
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 6, 60, 60
    text = short.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_range(key: str, value, minimum: float | None = None, positive: bool = False,
                maximum: float | None = None) -> None:
    """One-line errors for values of the right type but out of range (None means "default")."""
    if value is None:
        return
    if minimum is not None and value < minimum:
        raise DmgError(f"params: {key} must be at least {minimum}, got {quote(value)}")
    if maximum is not None and value > maximum:
        raise DmgError(f"params: {key} must be at most {maximum}, got {quote(value)}")
    if positive and value <= 0:
        raise DmgError(f"params: {key} must be positive, got {quote(value)}")


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DmgError(f"params: {key} must be one of {', '.join(choices)}, got {quote(value)}")


SEED_LIMIT = 2**32  # numpy and torch seed generators with 32-bit values


def check_seeds(key: str, seeds) -> None:
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            raise DmgError(f"params: {key} must be in [0, 2^32), got {quote(seed)}")


RESIDENT_MODES = ("auto", "always", "never")  # train.resident; see dmgcli/data.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass(frozen=True)
class MatrixParams:
    """The experiment grid DVC expands: one training run per combination."""
    targets: tuple[str, ...] = ("rot0", "rot15", "rot30", "rot45", "rot60", "rot75")
    methods: tuple[str, ...] = ("aggregate", "multihead", "dmg")
    backbones: tuple[str, ...] = ("convnet",)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        check_seeds("matrix.seeds", self.seeds)


@dataclass(frozen=True)
class DownloadParams:
    source: Optional[str] = None  # local zip, extracted folder or mirror URL (--from)
    splits: Optional[str] = None  # folder holding the split lists (--splits); None: look beside the images
    retries: int = 3  # further attempts after a failed transfer (each resumes it)
    timeout: float = 60.0  # seconds without data before an attempt counts as failed
    allow_large: bool = False  # extract archives far larger than the dataset's (--allow-large)

    def __post_init__(self):
        check_range("download.retries", self.retries, minimum=0)
        check_range("download.timeout", self.timeout, positive=True)


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

    def __post_init__(self):
        check_range("preprocess.image_size", self.image_size, minimum=8)
        check_choice("preprocess.encoding", self.encoding, ("jpeg", "raw"))
        check_range("preprocess.jpeg_quality", self.jpeg_quality, minimum=1, maximum=100)
        check_range("preprocess.workers", self.workers, minimum=0)
        check_seeds("preprocess.seed", [self.seed])
        check_choice("preprocess.val_split", self.val_split, ("tv_0.9", "seeded"))
        if not 0 < self.val_fraction < 1:
            raise DmgError(f"params: preprocess.val_fraction must be between 0 and 1, got {quote(self.val_fraction)}")
        check_range("preprocess.digits_size", self.digits_size, minimum=8)


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
    decay_masks: bool = False  # the schedule also decays the masks' lr (the reference: DomainNet yes, PACS no)

    def optimizer_settings(self) -> dict:
        """lr, mask_lr and weight_decay as MethodConfig takes them (for methods built outside a run)."""
        return {"lr": self.lr, "mask_lr": self.mask_lr, "weight_decay": self.weight_decay}

    def check(self, key: str) -> None:
        """Range checks; key names the schedule (train.schedules.<dataset>)."""
        check_range(f"{key}.epochs", self.epochs, minimum=1)
        check_range(f"{key}.baseline_epochs", self.baseline_epochs, minimum=1)
        check_range(f"{key}.lr", self.lr, positive=True)
        check_range(f"{key}.mask_lr", self.mask_lr, positive=True)
        check_range(f"{key}.weight_decay", self.weight_decay, minimum=0)
        check_choice(f"{key}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_schedule == "exponential" and not 0 < self.gamma <= 1:
            raise DmgError(f"params: {key}.gamma must be in (0, 1] for an exponential schedule, "
                           f"got {quote(self.gamma)}")
        if self.lr_schedule == "inverse":
            check_range(f"{key}.gamma", self.gamma, positive=True)
            check_range(f"{key}.power", self.power, positive=True)


LR_SCHEDULES = ("exponential", "inverse", "constant")
VALIDATION_MODES = ("hard", "known_domain", "average")  # dmgcli.methods.PREDICT_MODES
MASK_INITS = ("uniform", "constant")  # what dmgcli.core.DomainMasks accepts


DEFAULT_SCHEDULES = {
    # Digits train from scratch, so they take a larger step than the reference's fine-tuning lr.
    "digits": Schedule(epochs=96, baseline_epochs=32, lr=1e-3, mask_lr=1e-2, weight_decay=1e-5,
                       lr_schedule="exponential", gamma=0.99),
    "pacs": Schedule(epochs=150, baseline_epochs=100, lr=1e-4, mask_lr=1e-4, weight_decay=1e-5,
                     lr_schedule="exponential", gamma=0.99),
    "domainnet": Schedule(epochs=50, baseline_epochs=50, lr=1e-4, mask_lr=1e-4, weight_decay=0.0,
                          lr_schedule="inverse", gamma=1e-4, decay_masks=True),
    # Folder datasets and VLCS / Office-Home / TerraIncognita: the PACS recipe (fine-tuning from
    # ImageNet weights), DMG trained 1.5 times as long as the baselines as the reference did on
    # PACS (its masks' dropout slows fitting: benchmarks/FIDELITY.md).
    "default": Schedule(epochs=75, baseline_epochs=50, lr=1e-4, mask_lr=1e-4, weight_decay=1e-5,
                        lr_schedule="exponential", gamma=0.99),
    # Runs from scratch of datasets on `default` (folder datasets, vlcs, ...): the digits' step sizes
    # (a network that starts from random weights needs more than the fine-tuning lr of 1e-4).
    "scratch": Schedule(epochs=60, baseline_epochs=30, lr=1e-3, mask_lr=1e-2, weight_decay=1e-5,
                        lr_schedule="exponential", gamma=0.99),
    # Above a frozen ImageNet trunk (train.frozen_trunk; studies/pacs_frozen_cpu.yaml), also for datasets
    # on `default`: only the classifier learns, from cached features; chosen on PACS source validation
    # (benchmarks/FIDELITY.md).
    "frozen_trunk": Schedule(epochs=40, baseline_epochs=30, lr=1e-3, mask_lr=1e-4, weight_decay=1e-5,
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
    mask_init: str = "uniform"  # uniform: logits ~ U[0, 1) as the reference code; constant: every logit mask_init_value
    mask_init_value: float = 0.0  # mask_init constant: the starting logit of every mask entry (3.0: keep-probability 0.95)
    overlap_lambda: float = 0.1
    lr: Optional[float] = None  # None: the dataset schedule's lr
    mask_lr: Optional[float] = None  # None: the dataset schedule's mask_lr
    batch_size: int = 64
    epochs: Optional[int] = None  # None: the dataset schedule's epochs
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    workers: Optional[int] = None  # DataLoader workers for JPEG files; None: min(8, cores) (on CUDA they only read bytes)
    resident: str = "auto"  # hold each decoded split on the device: auto (if it fits), always or never
    precision: str = "bf16"  # CUDA: bf16 autocast or fp32; the CPU always computes in fp32
    compile: bool = False  # torch.compile the training step (CUDA; costs a minute or more at the start)
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs
    image_size: Optional[int] = None  # side of the images the network sees (pacs/domainnet augmentations); None: 224
    frozen_trunk: bool = False  # freeze the (pretrained) layers below the first mask point; train only those above
    trunk_cache: bool = True  # frozen_trunk: compute the trunk once per image and view (dmg features), not every step
    trunk_views: int = 4  # frozen_trunk: fixed augmented views of each training image
    validation_mode: Optional[str] = None  # model selection on source val: hard, known_domain or average; None: the method's reference rule
    schedule: Optional[str] = None  # the entry of `schedules` to train with; None: the dataset's (its schedule key)
    schedules: dict[str, Schedule] = field(default_factory=lambda: dict(DEFAULT_SCHEDULES))

    def __post_init__(self):
        check_range("train.batch_size", self.batch_size, minimum=1)
        check_range("train.epochs", self.epochs, minimum=1)
        check_range("train.workers", self.workers, minimum=0)
        check_range("train.overlap_lambda", self.overlap_lambda, minimum=0)
        check_range("train.lr", self.lr, positive=True)
        check_range("train.mask_lr", self.mask_lr, positive=True)
        check_seeds("train.seed", [self.seed])
        check_choice("train.mask_init", self.mask_init, MASK_INITS)
        if self.mask_init != "constant" and self.mask_init_value != 0.0:
            raise DmgError(f"params: train.mask_init_value {quote(self.mask_init_value)} takes effect only with "
                           f"train.mask_init: constant (it is {self.mask_init})")
        check_choice("train.resident", self.resident, RESIDENT_MODES)
        check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        check_range("train.image_size", self.image_size, minimum=16)
        check_range("train.trunk_views", self.trunk_views, minimum=1, maximum=64)
        if self.validation_mode is not None:
            check_choice("train.validation_mode", self.validation_mode, VALIDATION_MODES)
        if self.frozen_trunk and not self.pretrained:
            raise DmgError("params: train.frozen_trunk needs train.pretrained: true (a frozen trunk of random "
                           "weights computes nothing worth learning from)")
        for name, schedule in self.schedules.items():
            schedule.check(f"train.schedules.{name}")
        if self.schedule is not None and self.schedule not in self.schedules:
            raise DmgError(f"params: train.schedule {quote(self.schedule)} is not an entry of train.schedules; "
                           f"valid: {', '.join(self.schedules)}")


    def schedule_for(self, dataset_key: str) -> Schedule:
        """The schedule a run trains with: `schedule` if set, else the dataset's entry (its schedule
        key). `default` is a recipe for fine-tuning a whole pretrained network (lr 1e-4): on a
        dataset that uses it, a run from scratch takes `scratch` and a run above a frozen trunk
        takes `frozen_trunk` instead, each made for that. The one lookup train, check and sweep share."""
        key = self.schedule or dataset_key
        if key == "default" and self.schedule is None:
            special = "scratch" if not self.pretrained else "frozen_trunk" if self.frozen_trunk else None
            key = special if special in self.schedules else key
        if key not in self.schedules:
            raise DmgError(f"params: train.schedules has no entry {key!r} (the schedule of {dataset_key}); "
                           f"valid: {', '.join(self.schedules)}")
        return self.schedules[key]


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
    lambdas: tuple[float, ...] = (0.0, 0.1, 1.0)
    targets: tuple[str, ...] = ("rot0",)  # domains of `dataset`
    seeds: tuple[int, ...] = (0,)
    epochs: Optional[int] = None  # None: the dataset schedule's epochs, so sweep points match the main runs

    def __post_init__(self):
        check_seeds("report.sweep.seeds", self.seeds)
        check_range("report.sweep.epochs", self.epochs, minimum=1)


@dataclass(frozen=True)
class ReportParams:
    format: str = "text"  # what `dmg report` prints: text, markdown, csv, latex or json
    figures: bool = True  # draw training curves, mask plots and the sweep figure
    sweep: SweepParams = SweepParams()


@dataclass(frozen=True)
class StudyParams:
    """What each run's job asks a SLURM cluster for (`dmg study --launcher slurm`; flags override)."""
    partition: Optional[str] = None  # None: the cluster's default partition
    time_min: int = 240  # wall-clock limit of one run's job, minutes (a run that needs more is requeued and resumes)
    gpus: int = 1  # GPUs per run; 0 on a CPU partition
    cpus: int = 8  # CPUs per run (DataLoader workers decode JPEGs)
    mem_gb: int = 32  # memory per run
    array_parallelism: int = 64  # at most this many runs of one submission at once
    timeout_requeues: int = 3  # how often a job stopped by its time limit or preemption is requeued
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options: {account: proj, qos: high}

    def __post_init__(self):
        check_range("study.time_min", self.time_min, minimum=1)
        check_range("study.gpus", self.gpus, minimum=0)
        check_range("study.cpus", self.cpus, minimum=1)
        check_range("study.mem_gb", self.mem_gb, minimum=1)
        check_range("study.array_parallelism", self.array_parallelism, minimum=1)
        check_range("study.timeout_requeues", self.timeout_requeues, minimum=0)


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
    study: StudyParams = StudyParams()
    datasets: dict[str, FolderDatasetParams] = field(default_factory=dict)  # one's own folder datasets, by name

    def __post_init__(self):
        for name, spec in self.datasets.items():  # as preprocess.image_size: smaller cannot be trained on
            check_range(f"datasets.{name}.image_size", spec.image_size, minimum=8)


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
        raise DmgError(f"params: {key} must be {_describe(tp)}, got {quote(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {quote(value)}")
        return from_dict(tp, value, key)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise DmgError(f"params: {key} must be a list, got {quote(value)}")
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DmgError(f"params: {key} must be a mapping, got {quote(value)}")
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool):
            raise DmgError(f"params: {key} must be a number, got {quote(value)}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and not math.isfinite(number):
            raise DmgError(f"params: {key} must be a finite number, got {quote(value)}")
        if number is not None:
            return number
        raise DmgError(f"params: {key} must be a number, got {quote(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DmgError(f"params: {key} must be an integer, got {quote(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DmgError(f"params: {key} must be true or false, got {quote(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise DmgError(f"params: {key} must be a string, got {quote(value)}")
        return value
    raise TypeError(f"unsupported params annotation {tp!r} for {key}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise DmgError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise DmgError(f"params: unknown key {quote(where)}; valid: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            values[f.name] = _convert(data[f.name], hints[f.name], where)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise DmgError(f"params: {prefix or 'root'}: {exc}") from None


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few kB; anything past 1 MB is a mistake


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases can expand
    to gigabytes ("billion laughs"), and params files have no need for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise DmgError(f"params: YAML aliases (*{shorten(event.anchor, 40)}) are not supported "
                           f"(line {event.start_mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is an error (YAML keeps the last silently: a second `train:` section
        would drop the whole first one)."""
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise DmgError(f"params: key {quote(key_node.value)} is given twice (lines {seen[key_node.value]} "
                                   f"and {line}); keep one")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml; a missing file gives the defaults, a malformed one an error."""
    path = Path(path)
    if not path.exists():
        if path.name == "params.yaml" and path.parent == Path("."):
            return Params()
        raise DmgError(f"params file {path} not found")
    if not path.is_file():
        raise DmgError(f"params file {path} is not a file")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise DmgError(f"params file {path} is {path.stat().st_size} bytes; more than {MAX_PARAMS_BYTES} is "
                       f"not a params file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DmgError(f"params file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DmgError(f"params file {path} could not be read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DmgError(f"params: {path} is not valid YAML{where}") from None
    except RecursionError:
        raise DmgError(f"params: {path} is nested too deeply") from None
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
