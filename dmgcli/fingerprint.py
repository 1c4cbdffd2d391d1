"""Which prepared dataset a run was trained on, and splits that hold images.

A run records the fingerprint of its HDF5 file (in run.json and in every checkpoint), and
evaluate and --resume refuse a file with another one: a dataset preprocessed again with
another split seed deals other images into the test split, some of which the run trained on.

The fingerprint is cheap (no image is read): a sha256 over the file's image size, classes and
domains and, per domain and split, its labels and per-image CRC32s (paths in version-1 files
without CRCs), so it changes with any image, label or split membership.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from .errors import DmgError

SPLITS = ("train", "val", "test")
ATTRS = ("dataset", "encoding", "height", "width", "channels", "classes", "domains")


def _attr(value) -> str:
    return value if isinstance(value, str) else json.dumps(value.item() if hasattr(value, "item") else value)


def data_record(h5: str | Path) -> dict:
    """{"file", "fingerprint" (16 hex digits), "split_seed" (None when the file does not say),
    "sizes" {domain: {split: images}}} of a dmg HDF5 file (already checked by read_info)."""
    digest = hashlib.sha256()
    sizes: dict[str, dict[str, int]] = {}
    try:
        with h5py.File(h5, "r") as f:
            for key in ATTRS:
                digest.update(f"{key}={_attr(f.attrs.get(key, ''))};".encode())
            provenance = json.loads(f.attrs.get("provenance", "{}") or "{}")
            for domain in json.loads(f.attrs["domains"]):
                sizes[domain] = {}
                for split in SPLITS:
                    group = f.get(f"{domain}/{split}")
                    if group is None:
                        continue
                    labels = np.asarray(group["labels"][:], dtype=np.int64)
                    sums = group["crc32"][:] if "crc32" in group else np.array(group["paths"][:], dtype=bytes)
                    digest.update(f"{domain}/{split}:{len(labels)};".encode())
                    digest.update(labels.tobytes())
                    digest.update(np.ascontiguousarray(sums).tobytes())
                    sizes[domain][split] = len(labels)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DmgError(f"{h5}: its splits cannot be read ({type(exc).__name__}); run `dmg info --verify` on it, "
                       f"or delete it and run `dmg preprocess` again") from None
    seed = provenance.get("seed") if isinstance(provenance, dict) else None
    if seed is None and isinstance(provenance, dict) and isinstance(provenance.get("params"), dict):
        seed = provenance["params"].get("seed")
    return {"file": Path(h5).name, "fingerprint": digest.hexdigest()[:16], "split_seed": seed, "sizes": sizes}


def recorded(record: dict) -> dict:
    """What a run keeps of a data record (the sizes are for checks only)."""
    return {k: record[k] for k in ("file", "fingerprint", "split_seed")}


def _describe(data: dict) -> str:
    seed = data.get("split_seed")
    return f"fingerprint {data.get('fingerprint')}" + (f", split seed {seed}" if seed is not None else "")


def check_same_data(trained_on, now: dict, h5: Path, run: Path) -> None:
    """Refuse a run trained on another version of the dataset file (runs from before the
    fingerprint was recorded pass: they cannot tell)."""
    if not isinstance(trained_on, dict) or "fingerprint" not in trained_on:
        return
    if trained_on["fingerprint"] != now["fingerprint"]:
        raise DmgError(f"{run} was trained on {trained_on.get('file')} with {_describe(trained_on)}, but {h5} now has "
                       f"{_describe(now)} (preprocessed again: other splits, so the run may have trained on test "
                       f"images); use the file it was trained on, or train it again")


def require_images(record: dict, domains, splits: tuple[str, ...], purpose: str) -> None:
    """Refuse empty splits before any work (they would score 0.00% or train on nothing)."""
    for domain in domains:
        for split in splits:
            if not record["sizes"].get(domain, {}).get(split):
                raise DmgError(f"{record['file']}: the {split} split of domain {domain!r} holds no images; {purpose} "
                               f"needs it (check the dataset's split settings and run `dmg preprocess` again)")
