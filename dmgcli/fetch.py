"""Placing raw dataset files safely: the manifest, hashing, copies and searches.

- `Manifest`: `MANIFEST.json` of a raw dataset folder. It records the sha256 of every
  archive and list fetched and of every file placed in the folder the first time they are
  seen (trust on first use) and compares them on every later run; a difference is an error
  that names the file.
- `copy_tree` / `copy_file`: copies built under a temporary name and renamed when complete.
- Transfers (HTTP, Google Drive) live in dmgcli/transfer.py, archive extraction in
  dmgcli/archives.py; their entry points are re-exported here for the adapters.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from .archives import CHUNK, replace_dir, safe_extract, safe_extract_tar, write_new_file  # noqa: F401
from .errors import DmgError
from .fileio import temp_dir, write_json
from .transfer import download_gdrive, download_url, is_gdrive, is_url, url_basename  # noqa: F401


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: list[Path], desc: str = "verify") -> list[str]:
    """sha256 of many files; threads overlap the reads (hashlib releases the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_hash_or_none, paths, chunksize=64)
        return list(tqdm(results, total=len(paths), desc=desc, unit="file", disable=True if len(paths) < 1000 else None,
                         leave=False))


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- manifest

class Manifest:
    """MANIFEST.json of one raw dataset folder.

    sources: archives and lists as fetched: name -> {"sha256", "size", "origin"}
    files:   every file placed under the folder: path relative to it -> sha256
    """

    NAME = "MANIFEST.json"

    def __init__(self, folder: str | Path, dataset: str):
        self.folder, self.dataset = Path(folder), dataset
        self.path = self.folder / self.NAME
        data = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise DmgError(f"{self.path} is unreadable ({exc}); delete it to record the files afresh") from None
        self.sources: dict[str, dict] = data.get("sources", {})
        self.files: dict[str, str] = data.get("files", {})

    def under(self, prefix: str) -> dict[str, str]:
        """Recorded files whose relative path starts with `prefix` (a folder, with trailing /)."""
        return {rel: sha for rel, sha in self.files.items() if rel.startswith(prefix)}

    def verify(self, prefix: str) -> list[str]:
        """Re-hash the recorded files under `prefix`; return those missing, raise on a changed one.

        An empty list means everything recorded under prefix is present and unchanged; with
        nothing recorded at all, the prefix counts as missing.
        """
        recorded = self.under(prefix)
        if not recorded:
            return [prefix]
        names = sorted(recorded)
        hashes = hash_files([self.folder / rel for rel in names], desc=f"verify {prefix}")
        missing = []
        for rel, sha in zip(names, hashes):
            if sha is None:
                missing.append(rel)
            elif sha != recorded[rel]:
                raise DmgError(f"{self.folder / rel} changed since it was fetched (sha256 {sha[:16]}..., "
                               f"{self.NAME} has {recorded[rel][:16]}...): delete it and run "
                               f"`dmg download {self.dataset}` again to restore it")
        return missing

    def check_source(self, name: str, path: Path, origin: str) -> str:
        """Hash a fetched archive or list; record it the first time, compare it afterwards."""
        sha = sha256_file(path)
        recorded = self.sources.get(name)
        if recorded and recorded["sha256"] != sha:
            raise DmgError(f"{path}: sha256 {sha} differs from {recorded['sha256']} recorded in {self.path} "
                           f"when {name} was first fetched; it is corrupt or another release: delete it to "
                           f"fetch it again, or delete {self.path} to trust the new file")
        self.sources[name] = {"sha256": sha, "size": path.stat().st_size, "origin": origin}
        return sha

    def check_files(self, prefix: str, hashes: dict[str, str], origin: str) -> None:
        """Compare a freshly placed folder (`hashes`: path under prefix -> sha256) with the record.

        Nothing recorded under prefix: record it (trust on first use). Otherwise the new copy
        must hold exactly the recorded files with the recorded contents.
        """
        new = {prefix + rel: sha for rel, sha in hashes.items()}
        recorded = self.under(prefix)
        if recorded:
            for rel, sha in sorted(new.items()):
                if rel not in recorded:
                    raise DmgError(f"{origin}: {rel} is not in {self.path}; delete the manifest to trust this copy")
                if recorded[rel] != sha:
                    raise DmgError(f"{origin}: {rel} has sha256 {sha[:16]}..., {self.path} recorded "
                                   f"{recorded[rel][:16]}...; delete the manifest to trust this copy")
            absent = sorted(set(recorded) - set(new))
            if absent:
                raise DmgError(f"{origin} lacks {absent[0]} (and {len(absent) - 1} more) recorded in {self.path}")
        self.files.update(new)

    def check_file(self, rel: str, sha: str, origin: str) -> None:
        """Record one file's sha256 the first time; afterwards it must match."""
        recorded = self.files.get(rel)
        if recorded and recorded != sha:
            raise DmgError(f"{origin}: sha256 {sha[:16]}... differs from {recorded[:16]}... recorded for {rel} in "
                           f"{self.path}; delete the manifest to trust this copy")
        self.files[rel] = sha

    def save(self) -> None:
        write_json(self.path, {"dataset": self.dataset, "sources": self.sources,
                               "files": dict(sorted(self.files.items()))})


# --------------------------------------------------------------------------- copies and searches

def copy_tree(src: Path, into: Path) -> dict[str, str]:
    """Copy a folder (links followed) to `into` through a temporary sibling; path -> sha256."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    hashes = {}
    with temp_dir(into.parent, into.name) as tmp:
        for path in tqdm(files, desc=f"copy {src.name}", unit="file", leave=False, disable=None):
            rel = path.relative_to(src).as_posix()
            with open(path, "rb") as fin:
                hashes[rel] = write_new_file(fin, tmp / rel)
        os.rename(tmp, into)
    return hashes


def copy_file(src: Path, dst: Path) -> str:
    """Copy one file atomically (temporary name, then rename); returns its sha256."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a killed earlier copy's (write_new_file makes a new file)
    try:
        with open(src, "rb") as fin:
            sha = write_new_file(fin, tmp)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return sha


def find_files(roots: Iterable[Path], names: set[str], max_depth: int = 3,
               skip: frozenset[str] = frozenset()) -> dict[str, Path]:
    """First file found for each wanted name, searching each root breadth-first to max_depth.

    Folders named in `skip` (image folders holding thousands of files) are not entered.
    """
    found: dict[str, Path] = {}
    for root in roots:
        level = [root] if root.is_dir() else []
        for _ in range(max_depth + 1):
            following = []
            for folder in level:
                try:
                    children = sorted(folder.iterdir())
                except OSError:
                    continue
                for child in children:
                    if child.name in names and child.name not in found and child.is_file():
                        found[child.name] = child
                    elif child.name not in skip and child.is_dir():
                        following.append(child)
            level = following
    return found


def find_folder(root: Path, children: set[str], max_depth: int = 3) -> Path | None:
    """The shallowest folder under root (root included) that holds every name in `children`
    as a sub-folder, e.g. the folder holding PACS's four domain folders."""
    level = [root]
    for _ in range(max_depth + 1):
        following = []
        for folder in level:
            if all((folder / name).is_dir() for name in children):
                return folder
            try:
                following += sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in children)
            except OSError:
                continue
        level = following
    return None


def subtree(hashes: dict[str, str], root: Path, base: Path) -> dict[str, str]:
    """The entries of `hashes` (paths relative to base) under folder root, made relative to root."""
    prefix = root.relative_to(base).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    return {rel[len(prefix):]: sha for rel, sha in hashes.items() if rel.startswith(prefix)}
