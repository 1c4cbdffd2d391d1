"""The one interface every dataset adapter implements.

An adapter knows where its raw files come from (`download`), how to list its images
(`plan`: path, label, domain, split) and which augmentation, training schedule, stored-image
resize and in-domain split apply. Everything after the plan (decoding, resizing, the HDF5
writer, training) is the same for every dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..archives import unsafe_reason
from ..errors import DmgError
from ..fileio import shorten
from ..params import DownloadParams, PreprocessParams

SPLITS = ("train", "val", "test")
RESIZE_MODES = ("center_crop", "squash")


@dataclass
class SplitPlan:
    """One /<domain>/<split> group to write: (path relative to images/, 0-based label) pairs."""
    domain: str
    split: str
    entries: list[tuple[str, int]]


@dataclass
class ImagePlan:
    """Everything preprocessing needs to know about a dataset of image files."""
    classes: tuple[str, ...]  # label order
    parts: list[SplitPlan]
    split_notes: dict  # where each split came from, recorded in the file's provenance
    settings: dict = field(default_factory=dict)  # split parameters the output depends on (fingerprinted)
    image_size: int | None = None  # None: preprocess.image_size
    skipped: list[str] = field(default_factory=list)  # what was left out while listing, reported


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset: its identity, what training uses of it, and how to fetch and list it."""
    name: str
    domains: tuple[str, ...]
    num_classes: int  # 0 where only the files tell (folder datasets before preprocessing)
    augmentation: str  # key into dmgcli.augment.AUGMENTATIONS
    description: str
    # The sources' split that in-domain accuracy is measured on. PACS's official test list is
    # the whole domain (train and crossval included), so its in-domain numbers use crossval.
    in_domain_split: str = "test"
    schedule: str = ""  # key into train.schedules; "" means the dataset's own name
    resize: str = "center_crop"  # how stored squares are made: center_crop (shorter side) or squash (whole image)

    @property
    def schedule_key(self) -> str:
        return self.schedule or self.name

    def prepare_hint(self) -> str:
        """The commands that create this dataset's HDF5 file."""
        return f"dmg download {self.name} && dmg preprocess {self.name}"

    # --- the adapter interface
    generated = False  # True: `generate` writes the HDF5 file itself (no image files)

    def download(self, out_dir: Path, params: DownloadParams) -> None:
        raise DmgError(f"{self.name} cannot be downloaded")

    def plan(self, raw: Path, params: PreprocessParams) -> ImagePlan:
        raise DmgError(f"{self.name} has no image list")

    def generate(self, raw: Path, out: Path, params: PreprocessParams) -> None:
        raise DmgError(f"{self.name} is not generated")


def read_list(path: Path) -> list[tuple[int, str, int]]:
    """Lines `relative/path.jpg label` -> (line number, path, label); blank lines skipped.

    A path must stay inside the images folder (no absolute path, no `..`): a list is read
    from the raw folder, and a line like `photo/dog/../../../../etc/x` would otherwise put a
    file from anywhere into the training set. Text must be UTF-8 (what every list is written in).
    """
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DmgError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                               f"{exc.start + 1}); save the list as UTF-8") from None
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                rows.append((lineno, parts[0], int(parts[1])))
            except (IndexError, ValueError):
                raise DmgError(f"{path}:{lineno}: expected `path label`, got {shorten(line.strip())!r}") from None
            if reason := unsafe_reason(parts[0]):
                raise DmgError(f"{path}:{lineno}: {shorten(parts[0])} leaves the dataset's images folder ({reason}); "
                               f"list paths are relative to images/")
    return rows


def check_entry(list_path: Path, lineno: int, rel: str, label: int, domain: str, classes) -> None:
    """A list line must name an image of its domain, under its class's folder."""
    parts = rel.split("/")
    if len(parts) < 3 or parts[0] != domain:
        raise DmgError(f"{list_path}:{lineno}: {rel} is not an image path of domain {domain}")
    if classes is not None and not (0 <= label < len(classes) and parts[1] == classes[label]):
        raise DmgError(f"{list_path}:{lineno}: label {label} of {rel} does not match its class folder {parts[1]!r}")


KFOLD_LISTS = {"train": "train", "val": "crossval", "test": "test"}  # our split -> PACS's kfold list name


def kfold_plan(raw: Path, dataset: str, domains, classes, hint: str) -> list[SplitPlan]:
    """PACS-format lists `<domain>_{train,crossval,test}_kfold.txt` in raw/splits, labels 1-based."""
    plan = []
    for domain in domains:
        for split, name in KFOLD_LISTS.items():
            path = raw / "splits" / f"{domain}_{name}_kfold.txt"
            if not path.exists():
                raise DmgError(f"{path} not found: {hint}")
            entries = []
            for lineno, rel, label in read_list(path):
                check_entry(path, lineno, rel, label - 1, domain, classes)
                entries.append((rel, label - 1))
            plan.append(SplitPlan(domain, split, entries))
    return plan


def report_path(h5: Path) -> Path:
    """<dataset>.report.json beside <dataset>.h5: counts, unreadable images, duplicates."""
    return h5.with_name(h5.name.removesuffix(".h5") + ".report.json")
