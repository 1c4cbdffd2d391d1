"""`dmg info`: what an HDF5 dataset file holds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmgcli.datasets import SPLITS
from dmgcli.h5data import open_file, read_info

CLASS_TABLE_LIMIT = 12  # more classes than this (DomainNet: 345) are summarised, not tabulated


def describe(path: str | Path) -> str:
    """Per domain and split: images and distinct classes; images per class; then the provenance."""
    info = read_info(path)
    size = Path(path).stat().st_size
    lines = [f"{path}: dataset {info.dataset}, {len(info.classes)} classes, {len(info.domains)} domains, "
             f"{info.encoding} {info.height}x{info.width}x{info.channels}, {size / 1e6:.1f} MB",
             f"{'domain':<14}" + "".join(f"{s:>18}" for s in SPLITS)]
    counts: dict[tuple[str, str], np.ndarray] = {}  # (domain, split) -> images per class
    with open_file(path) as f:
        for domain in info.domains:
            cells = []
            for split in SPLITS:
                key = f"{domain}/{split}"
                if key in f:
                    labels = f[key]["labels"][:]
                    counts[domain, split] = np.bincount(labels, minlength=len(info.classes))
                    cells.append(f"{len(labels)} ({len(np.unique(labels))} cls)")
                else:
                    cells.append("-")
            lines.append(f"{domain:<14}" + "".join(f"{c:>18}" for c in cells))
        total = sum(int(c.sum()) for c in counts.values())
        lines.append(f"{'total':<14}{total:>18}")
        lines += class_counts(info.classes, counts)
        lines += absent_classes(info.classes, info.domains, counts)
        lines.append("provenance: " + json.dumps(info.provenance, indent=2, sort_keys=True))
        lines.append(f"tool version: {f.attrs.get('tool_version')}")
    return "\n".join(lines)


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

