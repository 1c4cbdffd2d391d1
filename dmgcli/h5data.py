"""The HDF5 layout every dataset is preprocessed into, with its writer and reader.

Layout (format "dmg-hdf5", version 1), one file per dataset:

  /                         attrs: format, version, dataset, encoding ("raw" or "jpeg"),
                                   height, width, channels, classes (JSON list, label order),
                                   domains (JSON list), provenance (JSON object), tool_version
  /<domain>/<split>/        split in train, val, test
      labels   int64 [N]            0-based class index
      paths    utf-8 str [N]        source path relative to the dataset root
      encoding "raw":   images  uint8 [N, H, W, C]   one image per chunk
      encoding "jpeg":  images  uint8 [total_bytes]  encoded files back to back (not compressed again)
                        offsets int64 [N + 1]        image i is images[offsets[i]:offsets[i+1]]

Every image of a file has the same H x W x C, so decoded batches stack without resizing.
Files are written to a temporary name and renamed when complete (see `writing`).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from . import __version__
from .errors import DmgError
from .fileio import atomic_path

FORMAT = "dmg-hdf5"
VERSION = 1
ENCODINGS = ("raw", "jpeg")


@dataclass(frozen=True)
class FileInfo:
    dataset: str
    encoding: str
    height: int
    width: int
    channels: int
    classes: tuple[str, ...]
    domains: tuple[str, ...]
    provenance: dict


@contextlib.contextmanager
def writing(path: str | Path, info: FileInfo) -> Iterator[h5py.File]:
    """Open a new dataset file for writing under a temporary name; rename it on success."""
    if info.encoding not in ENCODINGS:
        raise DmgError(f"unknown image encoding {info.encoding!r}; valid: {', '.join(ENCODINGS)}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "format": FORMAT, "version": VERSION, "dataset": info.dataset, "encoding": info.encoding,
                "height": info.height, "width": info.width, "channels": info.channels,
                "classes": json.dumps(list(info.classes)), "domains": json.dumps(list(info.domains)),
                "provenance": json.dumps(info.provenance), "tool_version": __version__,
            })
            yield f


def write_split(f: h5py.File, domain: str, split: str, images, labels, paths) -> None:
    """Write one split. images: uint8 array [N, H, W, C] ("raw") or a list of encoded bytes ("jpeg")."""
    group = f.require_group(f"{domain}/{split}")
    labels = np.asarray(labels, dtype=np.int64)
    group.create_dataset("labels", data=labels)
    group.create_dataset("paths", data=np.array(list(paths), dtype=object), dtype=h5py.string_dtype())
    if f.attrs["encoding"] == "raw":
        images = np.asarray(images, dtype=np.uint8)
        chunks = (1, *images.shape[1:]) if len(images) else None
        group.create_dataset("images", data=images, chunks=chunks)
    else:
        sizes = np.array([len(b) for b in images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        flat = np.frombuffer(b"".join(images), dtype=np.uint8)
        group.create_dataset("images", data=flat)
        group.create_dataset("offsets", data=offsets)
    if len(labels) != (len(group["offsets"]) - 1 if "offsets" in group else len(group["images"])):
        raise ValueError(f"{domain}/{split}: {len(labels)} labels for a different number of images")


class SplitAppender:
    """Write one /<domain>/<split> group image by image, in bounded memory.

    Produces exactly what `write_split` writes. "jpeg": encoded images are spooled to an
    unnamed temporary file beside the output and copied into one contiguous `images`
    dataset at `close` (contiguous: a reader can take any image with one slice, or memory-map
    the whole array). "raw": `images` is allocated for `capacity` images, one per chunk, and
    shrunk at `close` to the number appended.
    """

    SPOOL_BLOCK = 64 << 20  # bytes copied from the spool per write

    def __init__(self, f: h5py.File, domain: str, split: str, capacity: int):
        self.f, self.domain, self.split = f, domain, split
        self.group = f.require_group(f"{domain}/{split}")
        self.encoding = str(f.attrs["encoding"])
        self.labels: list[int] = []
        self.paths: list[str] = []
        if self.encoding == "raw":
            shape = (int(f.attrs["height"]), int(f.attrs["width"]), int(f.attrs["channels"]))
            self.images = self.group.create_dataset("images", shape=(capacity, *shape), maxshape=(None, *shape),
                                                    dtype=np.uint8, chunks=(1, *shape))
        else:
            import tempfile
            self.spool = tempfile.TemporaryFile(dir=Path(f.filename).parent)
            self.sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def append(self, image, label: int, path: str) -> None:
        """image: encoded bytes ("jpeg") or uint8 [H, W, C] ("raw")."""
        if self.encoding == "raw":
            self.images[len(self.labels)] = image
        else:
            self.spool.write(image)
            self.sizes.append(len(image))
        self.labels.append(int(label))
        self.paths.append(path)

    def close(self) -> None:
        n = len(self.labels)
        self.group.create_dataset("labels", data=np.asarray(self.labels, dtype=np.int64))
        self.group.create_dataset("paths", data=np.array(self.paths, dtype=object), dtype=h5py.string_dtype())
        if self.encoding == "raw":
            self.images.resize(n, axis=0)
            return
        offsets = np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64))]).astype(np.int64)
        images = self.group.create_dataset("images", shape=(int(offsets[-1]),), dtype=np.uint8)
        self.spool.seek(0)
        for start in range(0, int(offsets[-1]), self.SPOOL_BLOCK):
            block = np.frombuffer(self.spool.read(self.SPOOL_BLOCK), dtype=np.uint8)
            images[start:start + len(block)] = block
        self.spool.close()
        self.group.create_dataset("offsets", data=offsets)


class StoredSplit:
    """Images of a split already written to an open file, as stored (to copy them to another split)."""

    def __init__(self, f: h5py.File, domain: str, split: str):
        group = f[f"{domain}/{split}"]
        self.images = group["images"]
        self.offsets = group["offsets"][:] if f.attrs["encoding"] == "jpeg" else None

    def __getitem__(self, i: int):
        """Encoded bytes ("jpeg") or uint8 [H, W, C] ("raw")."""
        if self.offsets is None:
            return self.images[i]
        return self.images[self.offsets[i]:self.offsets[i + 1]].tobytes()


def open_file(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DmgError(f"{path} not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DmgError(f"{path} is not a readable HDF5 file ({exc})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DmgError(f"{path} is not a dmg dataset file (missing format attribute {FORMAT!r})")
    return f


def read_info(path: str | Path) -> FileInfo:
    with open_file(path) as f:
        a = f.attrs
        return FileInfo(dataset=str(a["dataset"]), encoding=str(a["encoding"]), height=int(a["height"]),
                        width=int(a["width"]), channels=int(a["channels"]),
                        classes=tuple(json.loads(a["classes"])), domains=tuple(json.loads(a["domains"])),
                        provenance=json.loads(a["provenance"]))


class SplitReader:
    """Read access to one /<domain>/<split> group, safe to pass to DataLoader workers.

    The file is opened lazily on first access in each process (an h5py handle must never
    cross a fork), so a reader built in the main process works inside workers.
    """

    def __init__(self, path: str | Path, domain: str, split: str):
        self.path, self.domain, self.split = str(path), domain, split
        with open_file(path) as f:
            if f"{domain}/{split}" not in f:
                raise DmgError(f"{path} has no split {domain}/{split}")
            group = f[f"{domain}/{split}"]
            self.encoding = str(f.attrs["encoding"])
            self.labels = group["labels"][:]
            self.offsets = group["offsets"][:] if self.encoding == "jpeg" else None
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def _images(self) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[f"{self.domain}/{self.split}/images"]

    def encoded(self, i: int) -> np.ndarray:
        """The stored bytes of image i (encoding "jpeg"): uint8 [n_bytes]."""
        return self._images()[self.offsets[i]:self.offsets[i + 1]]

    def image(self, i: int) -> torch.Tensor:
        """Image i decoded: uint8 [C, H, W]."""
        if self.encoding == "raw":
            return torch.from_numpy(self._images()[i]).permute(2, 0, 1)
        return decode(self.encoded(i))

    def all_images(self) -> torch.Tensor:
        """The whole split decoded into memory: uint8 [N, C, H, W] (small datasets)."""
        if self.encoding == "raw":
            return torch.from_numpy(self._images()[:]).permute(0, 3, 1, 2).contiguous()
        return torch.stack([self.image(i) for i in range(len(self))]) if len(self) else torch.empty(0, dtype=torch.uint8)

    def paths(self) -> list[str]:
        with open_file(self.path) as f:
            return [p.decode() if isinstance(p, bytes) else p for p in f[f"{self.domain}/{self.split}/paths"][:]]


def decode(data: np.ndarray) -> torch.Tensor:
    """Encoded image bytes -> uint8 [C, H, W] (3 channels)."""
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.from_numpy(np.ascontiguousarray(data)), mode=ImageReadMode.RGB)
