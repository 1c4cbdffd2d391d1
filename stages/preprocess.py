"""Stage 2, preprocess: raw files -> one HDF5 file per dataset (layout in dmgcli.h5data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmgcli.datasets import DIGITS_ANGLES, DATASETS, get_dataset, h5_path, raw_dir
from dmgcli.errors import DmgError
from dmgcli.h5data import FileInfo, write_split, writing
from dmgcli.params import PreprocessParams

DIGITS_SPLIT = (0.6, 0.2, 0.2)  # train / val / test share of each domain's images


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate float images [N, 1, H, W] about their centre (bilinear, zero fill)."""
    angle = torch.tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(())]), torch.stack([sin, cos, torch.zeros(())])])
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def preprocess_digits(raw: Path, out: Path, params: PreprocessParams) -> None:
    """Rotated-digits benchmark in the style of Rotated MNIST.

    The 1,797 8x8 digits (values 0-16) are shuffled with `params.seed` and dealt into six
    disjoint shares, one per domain; each share is upsampled to digits_size px, rotated by
    its domain's angle and split 60/20/20 into train / val / test.
    """
    source = raw / "digits.csv.gz"
    if not source.exists():
        raise DmgError(f"{source} not found: run `dmg download digits` first")
    table = np.loadtxt(source, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0, table[:, -1].astype(np.int64)
    order = np.random.default_rng(params.seed).permutation(len(labels))
    shares = np.array_split(order, len(DIGITS_ANGLES))
    size = params.digits_size
    info = get_dataset("digits")
    file_info = FileInfo(dataset="digits", encoding="raw", height=size, width=size, channels=1,
                         classes=tuple(str(c) for c in range(10)), domains=info.domains,
                         provenance={"source": "sklearn.datasets.load_digits", "seed": params.seed,
                                     "angles": list(DIGITS_ANGLES), "split": list(DIGITS_SPLIT), "size": size})
    with writing(out, file_info) as f:
        for domain, angle, share in zip(info.domains, DIGITS_ANGLES, shares):
            images = F.interpolate(torch.from_numpy(pixels[share]), size=(size, size), mode="bilinear",
                                   align_corners=False)
            images = rotate(images, angle).clamp(0, 1).mul(255).round().to(torch.uint8)  # [n, 1, S, S]
            images = images.permute(0, 2, 3, 1).numpy()  # [n, S, S, 1], the layout's HWC order
            n_train, n_val = int(DIGITS_SPLIT[0] * len(share)), int(DIGITS_SPLIT[1] * len(share))
            bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(share))}
            for split, (a, b) in bounds.items():
                write_split(f, domain, split, images[a:b], labels[share[a:b]],
                            [f"digits/{i}" for i in share[a:b]])


PREPROCESSORS = {"digits": preprocess_digits}


def preprocess(dataset: str, data_dir: str | Path, params: PreprocessParams) -> Path:
    """Build data_dir/prepared/<dataset>.h5 from data_dir/raw/<dataset>; returns its path."""
    info = get_dataset(dataset)
    if info.name not in PREPROCESSORS:
        raise DmgError(f"preprocessing {info.name} is not available; valid: {', '.join(PREPROCESSORS)}")
    out = h5_path(data_dir, info.name)
    PREPROCESSORS[info.name](raw_dir(data_dir, info.name), out, params)
    return out
