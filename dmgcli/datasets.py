"""The dataset registry: domains, classes, where each dataset's HDF5 lives, how to make it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DmgError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    domains: tuple[str, ...]
    num_classes: int
    augmentation: str  # key into dmgcli.augment.AUGMENTATIONS
    description: str
    # The sources' split that in-domain accuracy is measured on. PACS's official test list is
    # the whole domain (train and crossval included), so its in-domain numbers use crossval.
    in_domain_split: str = "test"

    def prepare_hint(self) -> str:
        """The commands that create this dataset's HDF5 file."""
        return f"dmg download {self.name} && dmg preprocess {self.name}"


DIGITS_ANGLES = (0, 15, 30, 45, 60, 75)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        domains=tuple(f"rot{a}" for a in DIGITS_ANGLES),
        num_classes=10,
        augmentation="none",
        description="scikit-learn's 1,797 handwritten digits as 6 rotation domains (embedded, no download)",
    ),
    "pacs": DatasetInfo(
        name="pacs",
        domains=("art_painting", "cartoon", "photo", "sketch"),
        num_classes=7,
        augmentation="pacs",
        description="PACS (Li et al. 2017): 9,991 images, 4 domains, 7 classes",
        in_domain_split="val",
    ),
    "domainnet": DatasetInfo(
        name="domainnet",
        domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        num_classes=345,
        augmentation="domainnet",
        description="DomainNet (Peng et al. 2019): about 586,000 images, 6 domains, 345 classes",
    ),
}

SPLITS = ("train", "val", "test")


def get_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DmgError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_dataset(target: str, explicit: str | None, configured: str) -> DatasetInfo:
    """Pick the dataset for a target domain.

    An explicit --dataset wins. Otherwise a target that names a domain of exactly one
    dataset selects that dataset; an ambiguous name (e.g. `sketch`) uses params.yaml's.
    """
    get_dataset(configured)  # params.yaml's dataset must exist even where the target decides
    if explicit:
        info = get_dataset(explicit)
    else:
        owners = [d for d in DATASETS.values() if target in d.domains]
        if len(owners) == 1:
            info = owners[0]
        elif not owners:
            all_domains = sorted({dom for d in DATASETS.values() for dom in d.domains})
            raise DmgError(f"unknown domain {target!r}; valid: {', '.join(all_domains)}")
        else:
            info = get_dataset(configured)
    check_domain(info, target)
    return info


def check_domain(info: DatasetInfo, domain: str) -> None:
    if domain not in info.domains:
        raise DmgError(f"unknown domain {domain!r} for dataset {info.name}; valid: {', '.join(info.domains)}")


def h5_path(data_dir: str | Path, dataset: str) -> Path:
    """Where `dmg preprocess` writes a dataset's HDF5 file."""
    return Path(data_dir) / "prepared" / f"{dataset}.h5"


def raw_dir(data_dir: str | Path, dataset: str) -> Path:
    """Where `dmg download` puts a dataset's raw files."""
    return Path(data_dir) / "raw" / dataset


def require_h5(data_dir: str | Path, dataset: str) -> Path:
    path = h5_path(data_dir, dataset)
    if not path.exists():
        raise DmgError(f"{path} not found: prepare {dataset} first with `{get_dataset(dataset).prepare_hint()}`")
    return path
