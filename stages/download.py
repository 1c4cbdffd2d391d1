"""Stage 1, download: put a dataset's raw files under data/raw/<dataset>/.

Where the files come from is the dataset adapter's business (dmgcli/datasets/); every
adapter lands them in one layout (dmgcli/datasets/sources.py): images/<domain>/<class>/<file>,
splits/, and MANIFEST.json with the sha256 of every file and archive. Each part is fetched
only if it is not already present and verified against MANIFEST.json, so a second run does
nothing and an interrupted run starts where it stopped.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dmgcli.datasets import get_dataset, raw_dir
from dmgcli.errors import DmgError, disk_full
from dmgcli.fileio import run_lock
from dmgcli.params import DownloadParams


def download(dataset: str, data_dir: str | Path, params: DownloadParams) -> Path:
    """Fetch `dataset` into data_dir/raw/<dataset>; returns the folder."""
    info = get_dataset(dataset)
    out_dir = raw_dir(data_dir, info.name)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        with run_lock(out_dir):  # one writer per raw folder; clears a killed run's staging folders
            info.download(out_dir, params)
    except BaseException as exc:
        remove_empty_folders(out_dir, created)  # a failed first try leaves no empty data/raw/<dataset>
        if disk_full(exc):  # a write no step above named (the manifest, a folder): still the user's to fix
            raise DmgError(f"disk full while writing {out_dir} (ENOSPC); free some space and run "
                           f"`dmg download {info.name}` again") from None
        raise
    return out_dir


def remove_empty_folders(out_dir: Path, created: list[Path]) -> None:
    """Remove the empty folders under out_dir, then those of `created` left empty (deepest first);
    files (a resumable .part among them) stay."""
    for folder, _, _ in sorted(os.walk(out_dir), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()
