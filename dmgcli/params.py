"""params.yaml as typed, frozen dataclasses: the one table of every default.

Each section's dataclass declares its keys, their types and their defaults (the training
schedules in DEFAULT_SCHEDULES), the way DomainBed's hparams_registry declares its
hyperparameters once; params.yaml writes the same values out (tests/test_params.py checks
that they agree), and MethodConfig takes its defaults from here. Every stage reads its own
section. Reading a file and checking values: dmgcli/params_io.py; command-line flags
override values after loading, through `params_io.override`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import DmgError
from .params_io import check_choice, check_range, check_seeds, from_dict, quote, read_mapping


RESIDENT_MODES = ("auto", "always", "never")  # train.resident; see dmgcli/data.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass(frozen=True)
class MatrixParams:
    """The experiment grid DVC expands: one training run per combination."""
    # every other rotation of the embedded digits: the main job's 9 runs stay a few minutes on 2 cores
    # (all six targets: 18 runs, about twice the time; the README has both results)
    targets: tuple[str, ...] = ("rot0", "rot30", "rot60")
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
VALIDATION_MODES = ("hard", "known_domain", "average")  # prediction modes, dmgcli.methods.PREDICT_MODES too
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
    mask_init_value: float = 0.0  # mask_init constant: every mask logit's start (3.0: keep-probability 0.95)
    overlap_lambda: float = 0.1
    lr: Optional[float] = None  # None: the dataset schedule's lr
    mask_lr: Optional[float] = None  # None: the dataset schedule's mask_lr
    batch_size: int = 64
    epochs: Optional[int] = None  # None: the dataset schedule's epochs
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # DataLoader workers for JPEG files; None: min(8, cores) (on CUDA they only read bytes)
    workers: Optional[int] = None
    resident: str = "auto"  # hold each decoded split on the device: auto (if it fits), always or never
    precision: str = "bf16"  # CUDA: bf16 autocast or fp32; the CPU always computes in fp32
    compile: bool = False  # torch.compile the training step (CUDA; costs a minute or more at the start)
    # torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs
    compile_mode: str = "default"
    image_size: Optional[int] = None  # side of the images the network sees (pacs/domainnet augmentations); None: 224
    frozen_trunk: bool = False  # freeze the (pretrained) layers below the first mask point; train only those above
    trunk_cache: bool = True  # frozen_trunk: compute the trunk once per image and view (dmg features), not every step
    trunk_views: int = 4  # frozen_trunk: fixed augmented views of each training image
    # model selection on source val: hard, known_domain or average; None: the method's reference rule
    validation_mode: Optional[str] = None
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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml; a missing file gives the defaults, a malformed one an error."""
    path = Path(path)
    if not path.exists() and path.name == "params.yaml" and path.parent == Path("."):
        return Params()
    return from_dict(Params, read_mapping(path))
