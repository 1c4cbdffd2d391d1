"""`dmg info`: what an HDF5 dataset file holds."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from dmgcli.datasets import SPLITS
from dmgcli.errors import DmgError
from dmgcli.h5data import SplitReader, has_split, open_file, read_info

CLASS_TABLE_LIMIT = 12  # more classes than this (DomainNet: 345) are summarised, not tabulated


def describe(path: str | Path, verify: bool = False) -> str:
    """Per domain and split: images and distinct classes; images per class; then the provenance.

    verify: also read every image and check it against its stored crc32 (and decode it, checking
    its size against the file's); any mismatch is an error naming the images.
    """
    if Path(path).is_file() and Path(path).suffix != ".h5" and not h5py.is_hdf5(path):  # e.g. <dataset>.report.json
        raise DmgError(f"{path} is not an HDF5 file: dmg info reads data/prepared/<dataset>.h5; the "
                       f"<dataset>.report.json beside it (images left out or duplicated) is plain JSON: read it as text")
    info = read_info(path)
    size = Path(path).stat().st_size
    lines = [f"{path}: dataset {info.dataset}, {len(info.classes)} classes, {len(info.domains)} domains, "
             f"{info.encoding} {info.height}x{info.width}x{info.channels}, {size / 1e6:.1f} MB",
             f"{'domain':<14}" + "".join(f"{s:>18}" for s in SPLITS)]
    counts: dict[tuple[str, str], np.ndarray] = {}  # (domain, split) -> images per class
    readers = []
    with open_file(path) as f:
        present = {(d, s) for d in info.domains for s in SPLITS if has_split(f, d, s)}
        tool_version = f.attrs.get("tool_version", "unknown")
    for domain in info.domains:
        cells = []
        for split in SPLITS:
            if (domain, split) in present:
                reader = SplitReader(path, domain, split)  # checks labels, offsets and sizes
                readers.append(reader)
                counts[domain, split] = np.bincount(reader.labels, minlength=len(info.classes))
                cells.append(f"{len(reader)} ({len(np.unique(reader.labels))} cls)")
            else:
                cells.append("-")
        lines.append(f"{domain:<14}" + "".join(f"{c:>18}" for c in cells))
    total = sum(int(c.sum()) for c in counts.values())
    lines.append(f"{'total':<14}{total:>18}")
    lines += class_counts(info.classes, counts)
    lines += absent_classes(info.classes, info.domains, counts)
    lines.append("provenance: " + json.dumps(info.provenance, indent=2, sort_keys=True))
    lines.append(f"tool version: {tool_version}")
    if verify:
        lines.append(verify_images(path, readers, total))
    return "\n".join(lines)


def verify_images(path, readers: list[SplitReader], total: int) -> str:
    """Every image against its checksum; raises naming the first bad images."""
    bad = [name for r in readers for name in r.verify()]
    if any(r.crc32 is None for r in readers):  # layout version 1: decoding is all that can be checked
        checked = "read (no checksums: layout version 1; run `dmg preprocess` again to add them)"
    else:
        size = "x".join(map(str, readers[0].shape[1:] + readers[0].shape[:1])) if readers else ""
        checked = "match their crc32" + (f" and decode to {size}" if readers and readers[0].encoding == "jpeg" else "")
    if bad:
        raise DmgError(f"{len(bad)} of {total} images are damaged, first {bad[0]}; run `dmg preprocess` again")
    return f"verified: all {total} images {checked}"


def class_counts(classes: tuple[str, ...], counts: dict[tuple[str, str], np.ndarray]) -> list[str]:
    """Images per class for each domain/split: a table for few classes, min/median/max for many."""
    if not counts:
        return []
    if len(classes) <= CLASS_TABLE_LIMIT:
        width = max(6, *(len(c) + 1 for c in classes))
        lines = ["images per class:", f"{'':<22}" + "".join(f"{c:>{width}}" for c in classes)]
        for (domain, split), per_class in counts.items():
            lines.append(f"{domain + '/' + split:<22}" + "".join(f"{n:>{width}}" for n in per_class))
        return lines
    lines = [f"images per class (of {len(classes)}): min / median / max, classes without images"]
    for (domain, split), per_class in counts.items():
        lines.append(f"  {domain + '/' + split:<22}{per_class.min():>6} / {int(np.median(per_class)):>4} / "
                     f"{per_class.max():>5}   {int((per_class == 0).sum())} empty")
    return lines


def absent_classes(classes: tuple[str, ...], domains: tuple[str, ...],
                   counts: dict[tuple[str, str], np.ndarray]) -> list[str]:
    """Classes with no image in a domain (any split): allowed for folder datasets, worth knowing."""
    lines = []
    for domain in domains:
        per_class = sum((c for (d, _), c in counts.items() if d == domain), np.zeros(len(classes), dtype=np.int64))
        missing = [c for c, n in zip(classes, per_class) if n == 0]
        if missing:
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            lines.append(f"  {domain}: {shown}")
    return ["classes absent from a domain:", *lines] if lines else []

