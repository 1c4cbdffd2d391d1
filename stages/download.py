"""Stage 1, download: put a dataset's raw files under data/raw/<dataset>/.

Where the files come from is the dataset adapter's business (dmgcli/datasets/); every
adapter lands them in one layout (dmgcli/datasets/sources.py): images/<domain>/<class>/<file>,
splits/, and MANIFEST.json with the sha256 of every file and archive. Each part is fetched
only if it is not already present and verified against MANIFEST.json, so a second run does
nothing and an interrupted run starts where it stopped.
"""
from __future__ import annotations

from pathlib import Path

from dmgcli.datasets import get_dataset, raw_dir
from dmgcli.fileio import run_lock
from dmgcli.params import DownloadParams


def download(dataset: str, data_dir: str | Path, params: DownloadParams) -> Path:
    """Fetch `dataset` into data_dir/raw/<dataset>; returns the folder."""
    info = get_dataset(dataset)
    out_dir = raw_dir(data_dir, info.name)
    with run_lock(out_dir):  # one writer per raw folder; clears a killed run's staging folders
        info.download(out_dir, params)
    return out_dir
