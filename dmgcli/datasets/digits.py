"""digits: scikit-learn's 1,797 handwritten 8x8 digits as six rotation domains (embedded, no download)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DmgError
from ..fetch import sha256_file
from ..fileio import atomic_path, write_json
from ..params import DownloadParams, PreprocessParams
from .base import DatasetInfo, report_path

DIGITS_ANGLES = (0, 15, 30, 45, 60, 75)
DIGITS_SPLIT = (0.6, 0.2, 0.2)  # train / val / test share of each domain's images


def rotate(images, degrees: float):
    """Rotate float images [N, 1, H, W] about their centre (bilinear, zero fill)."""
    import torch
    import torch.nn.functional as F

    angle = torch.tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(())]), torch.stack([sin, cos, torch.zeros(())])])
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def digits_source() -> Path:
    """scikit-learn's own copy of the digits, the reference every raw copy is compared with."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


@dataclass(frozen=True)
class Digits(DatasetInfo):
    generated = True

    def download(self, out_dir: Path, params: DownloadParams) -> None:
        """The embedded dataset ships inside scikit-learn: copy its data file (no network).
        A copy whose content differs (not only its size: a flipped byte keeps the size) is replaced."""
        source, target = digits_source(), out_dir / "digits.csv.gz"
        if target.is_file() and sha256_file(target) == sha256_file(source):
            return
        if target.exists():
            print(f"digits: {target} differs from scikit-learn's copy; replaced", flush=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)

    def generate(self, raw: Path, out: Path, params: PreprocessParams) -> None:
        """Rotated-digits benchmark in the style of Rotated MNIST.

        The 1,797 8x8 digits (values 0-16) are shuffled with `params.seed` and dealt into six
        disjoint shares, one per domain; each share is upsampled to digits_size px, rotated by
        its domain's angle and split 60/20/20 into train / val / test.
        """
        import torch
        import torch.nn.functional as F

        source = raw / "digits.csv.gz"
        if not source.exists():
            raise DmgError(f"{source} not found: run `dmg download digits` first")
        if sha256_file(source) != sha256_file(digits_source()):  # the whole content, read in well under a second
            raise DmgError(f"{source} differs from scikit-learn's copy (sha256): it is corrupt; run "
                           f"`dmg download digits` to restore it")
        table = np.loadtxt(source, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0, table[:, -1].astype(np.int64)
        order = np.random.default_rng(params.seed).permutation(len(labels))
        shares = np.array_split(order, len(DIGITS_ANGLES))
        size = params.digits_size
        from ..h5data import FileInfo, check_room, write_split, writing  # h5data imports torch: not at CLI start

        check_room(out, len(labels), size * size)  # raw pixels, one channel

        file_info = FileInfo(dataset="digits", encoding="raw", height=size, width=size, channels=1,
                             classes=tuple(str(c) for c in range(10)), domains=self.domains,
                             provenance={"source": "sklearn.datasets.load_digits", "seed": params.seed,
                                         "angles": list(DIGITS_ANGLES), "split": list(DIGITS_SPLIT), "size": size})
        counts: dict[str, dict[str, int]] = {}
        with writing(out, file_info) as f:
            for domain, angle, share in zip(self.domains, DIGITS_ANGLES, shares):
                images = F.interpolate(torch.from_numpy(pixels[share]), size=(size, size), mode="bilinear",
                                       align_corners=False)
                images = rotate(images, angle).clamp(0, 1).mul(255).round().to(torch.uint8)  # [n, 1, S, S]
                images = images.permute(0, 2, 3, 1).numpy()  # [n, S, S, 1], the layout's HWC order
                n_train, n_val = int(DIGITS_SPLIT[0] * len(share)), int(DIGITS_SPLIT[1] * len(share))
                bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                          "test": (n_train + n_val, len(share))}
                for split, (a, b) in bounds.items():
                    write_split(f, domain, split, images[a:b], labels[share[a:b]],
                                [f"digits/{i}" for i in share[a:b]])
                    counts.setdefault(domain, {})[split] = b - a
            # the same report file as the real datasets, so the pipeline's outputs do not depend on the dataset
            write_json(report_path(out), {"dataset": "digits", "listed": counts, "stored": counts, "unreadable": [],
                                          "duplicates": {"policy": "not checked (generated images)", "groups": []}})


DIGITS = Digits(
    name="digits", domains=tuple(f"rot{a}" for a in DIGITS_ANGLES), num_classes=10, augmentation="none",
    description="scikit-learn's 1,797 handwritten digits as 6 rotation domains (embedded, no download)",
)
