"""The dataset registry: every dataset is one adapter module (see base.DatasetInfo).

Built in: digits (embedded), pacs, domainnet, and the DomainBed benchmarks vlcs,
office_home, terra_incognita. Folder datasets declared in params.yaml's `datasets:` section
join the registry through `declare` (the CLI calls it after reading params.yaml).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DmgError
from ..params import FolderDatasetParams, Params
from .base import SPLITS, DatasetInfo, ImagePlan, SplitPlan, report_path
from .benchmarks import OFFICE_HOME, TERRA_INCOGNITA, VLCS
from .digits import DIGITS
from .domainnet import DOMAINNET
from .folder import FolderDataset, check_spec, folders, unwrap
from .pacs import PACS

BUILT_IN: dict[str, DatasetInfo] = {d.name: d for d in (DIGITS, PACS, DOMAINNET, VLCS, OFFICE_HOME, TERRA_INCOGNITA)}
DATASETS: dict[str, DatasetInfo] = dict(BUILT_IN)  # plus the declared folder datasets

__all__ = ["SPLITS", "DatasetInfo", "ImagePlan", "SplitPlan", "report_path", "DATASETS", "BUILT_IN", "declare",
           "get_dataset", "resolve_dataset", "check_domain", "h5_path", "raw_dir", "require_h5"]


def h5_path(data_dir: str | Path, dataset: str) -> Path:
    """Where `dmg preprocess` writes a dataset's HDF5 file."""
    return Path(data_dir) / "prepared" / f"{dataset}.h5"


def raw_dir(data_dir: str | Path, dataset: str) -> Path:
    """Where `dmg download` puts a dataset's raw files."""
    return Path(data_dir) / "raw" / dataset


def folder_dataset(name: str, spec: FolderDatasetParams, data_dir: str | Path) -> FolderDataset:
    """A declared folder dataset; its domains and class count come from what is there so far."""
    check_spec(name, spec)
    if name in BUILT_IN:
        raise DmgError(f"params: datasets.{name}: {name} is a built-in dataset; choose another name")
    domains, num_classes = discover(name, spec, data_dir)
    return FolderDataset(
        name=name, domains=domains, num_classes=num_classes, augmentation=spec.augmentation,
        description=f"folder dataset {name} ({spec.root or 'source given to dmg download --from'})",
        in_domain_split="test" if spec.split == "fractions" else "val",  # otherwise test holds the training images
        schedule=spec.schedule, resize=spec.resize, spec=spec)


def discover(name: str, spec: FolderDatasetParams, data_dir: str | Path) -> tuple[tuple[str, ...], int]:
    """Domains (and classes, once preprocessed) from the HDF5 file, else the raw copy, else the declared root."""
    from ..h5data import read_info

    h5 = h5_path(data_dir, name)
    if h5.exists():
        try:
            info = read_info(h5)
            return info.domains, len(info.classes)
        except DmgError:
            pass
    if spec.domains:
        return spec.domains, 0
    images = raw_dir(data_dir, name) / "images"
    if images.is_dir():
        return tuple(p.name for p in folders(images)), 0
    if spec.root and Path(spec.root).expanduser().is_dir():
        return tuple(p.name for p in folders(unwrap(Path(spec.root).expanduser()))), 0
    return (), 0


def declare(params: Params) -> None:
    """Put params.yaml's folder datasets into the registry (replacing earlier declarations)."""
    DATASETS.clear()
    DATASETS.update(BUILT_IN)
    for name, spec in params.datasets.items():
        DATASETS[name] = folder_dataset(name, spec, params.data_dir)


def get_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DmgError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} (or declare a folder dataset in "
                       f"params.yaml's datasets: section)")
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
        # one owner: that dataset; none (a typo) or several: params.yaml's, whose domains the error lists
        info = owners[0] if len(owners) == 1 else get_dataset(configured)
    check_domain(info, target)
    return info


def check_domain(info: DatasetInfo, domain: str) -> None:
    if not info.domains:
        raise DmgError(f"{info.name} has no domains yet: run `{info.prepare_hint()}` first")
    if domain not in info.domains:
        raise DmgError(f"unknown domain {domain!r} for dataset {info.name}{did_you_mean(domain, info)}; "
                       f"valid: {', '.join(info.domains)}")


def did_you_mean(domain: str, info: DatasetInfo) -> str:
    """" (did you mean 'rot30'?)": the closest domain name of `info`, else of another dataset (named)."""
    import difflib

    others = [d for other in DATASETS.values() if other is not info for d in other.domains]
    for candidates in (info.domains, others):
        close = difflib.get_close_matches(domain, candidates, n=1, cutoff=0.6)
        if close:
            owners = ", ".join(d.name for d in DATASETS.values() if close[0] in d.domains)
            return f" (did you mean {close[0]!r}{'' if candidates is info.domains else f' of --dataset {owners}'}?)"
    return ""


def require_h5(data_dir: str | Path, dataset: str) -> Path:
    path = h5_path(data_dir, dataset)
    if not path.exists():
        raise DmgError(f"{path} not found: prepare {dataset} first with `{get_dataset(dataset).prepare_hint()}`")
    return path

