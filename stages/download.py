"""Stage 1, download: put a dataset's raw files under data/raw/<dataset>/."""
from __future__ import annotations

import shutil
from pathlib import Path

from dmgcli.datasets import get_dataset, raw_dir
from dmgcli.params import DownloadParams


def download_digits(out_dir: Path, params: DownloadParams) -> Path:
    """The embedded dataset ships inside scikit-learn: copy its data file (no network)."""
    import sklearn.datasets
    from dmgcli.fileio import atomic_path

    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    target = out_dir / "digits.csv.gz"
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return target
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


DOWNLOADERS = {"digits": download_digits}


def download(dataset: str, data_dir: str | Path, params: DownloadParams) -> Path:
    """Fetch `dataset` into data_dir/raw/<dataset>; returns the folder."""
    info = get_dataset(dataset)
    out_dir = raw_dir(data_dir, info.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    DOWNLOADERS[info.name](out_dir, params)
    return out_dir
