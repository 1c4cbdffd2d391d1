"""`dmg info`: what an HDF5 dataset file holds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmgcli.datasets import SPLITS
from dmgcli.h5data import open_file, read_info


def describe(path: str | Path) -> str:
    """Per domain and split: images and distinct classes; then the provenance."""
    info = read_info(path)
    lines = [f"{path}: dataset {info.dataset}, {len(info.classes)} classes, {len(info.domains)} domains, "
             f"{info.encoding} {info.height}x{info.width}x{info.channels}",
             f"{'domain':<14}" + "".join(f"{s:>18}" for s in SPLITS)]
    with open_file(path) as f:
        for domain in info.domains:
            cells = []
            for split in SPLITS:
                key = f"{domain}/{split}"
                if key in f:
                    labels = f[key]["labels"][:]
                    cells.append(f"{len(labels)} ({len(np.unique(labels))} cls)")
                else:
                    cells.append("-")
            lines.append(f"{domain:<14}" + "".join(f"{c:>18}" for c in cells))
        lines.append("provenance: " + json.dumps(info.provenance, indent=2, sort_keys=True))
        lines.append(f"tool version: {f.attrs.get('tool_version')}")
    return "\n".join(lines)
