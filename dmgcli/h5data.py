"""The dataset files of `dmg preprocess`: reading them (`SplitReader`, `read_info`), and the
one module to import the format from. The layout, `FileInfo` and `checksum` live in
`dmgcli.h5layout`, the writer in `dmgcli.h5write`; their names are re-exported here, so
callers need one import whichever side they use.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from .errors import DmgError
from .fileio import shorten
from .h5layout import ENCODINGS, FORMAT, READABLE_VERSIONS, VERSION, FileInfo, checksum
from .h5write import PER_IMAGE_BYTES, SplitAppender, StoredSplit, check_room, write_split, writing

__all__ = [  # the re-exported names, and this module's own
    "ENCODINGS", "FORMAT", "READABLE_VERSIONS", "VERSION", "FileInfo", "checksum",
    "PER_IMAGE_BYTES", "SplitAppender", "StoredSplit", "check_room", "write_split", "writing",
    "open_file", "read_info", "has_split", "file_info", "CorruptImage", "H5_ERRORS", "damaged_file_is_an_error",
    "SplitReader", "decode",
]


def open_file(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DmgError(f"{path} not found")
    if not path.is_file():
        raise DmgError(f"{path} is not a file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DmgError(f"{path} is not a readable HDF5 file ({shorten(exc)}); delete it and run "
                       f"`dmg preprocess` again") from None
    try:
        fmt, version = f.attrs.get("format"), f.attrs.get("version")
    except (OSError, RuntimeError, KeyError) as exc:
        f.close()
        raise DmgError(f"{path}: its metadata is corrupt ({shorten(exc)}); delete it and run `dmg preprocess` "
                       f"again") from None
    if fmt != FORMAT:
        f.close()
        raise DmgError(f"{path} is not a dmg dataset file (missing format attribute {FORMAT!r})")
    if version not in READABLE_VERSIONS:
        f.close()
        raise DmgError(f"{path} has layout version {shorten(version)}; this dmg reads versions "
                       f"{', '.join(map(str, READABLE_VERSIONS))}: run `dmg preprocess` again")
    return f


def read_info(path: str | Path) -> FileInfo:
    with open_file(path) as f, damaged_file_is_an_error(path):
        return file_info(f, path)


def has_split(f: h5py.File, domain: str, split: str) -> bool:
    with damaged_file_is_an_error(f.filename):
        return f"{domain}/{split}" in f


def file_info(f: h5py.File, path) -> FileInfo:
    """The root attributes of an open file, checked: one line naming the file if any is missing or malformed."""
    a = f.attrs
    try:
        info = FileInfo(dataset=str(a["dataset"]), encoding=str(a["encoding"]), height=int(a["height"]),
                        width=int(a["width"]), channels=int(a["channels"]),
                        classes=tuple(json.loads(a["classes"])), domains=tuple(json.loads(a["domains"])),
                        provenance=json.loads(a["provenance"]))
    except (KeyError, OSError, RuntimeError, TypeError, ValueError) as exc:
        raise DmgError(f"{path}: its metadata is corrupt or incomplete ({shorten(exc)}); delete it and run "
                       f"`dmg preprocess` again") from None
    names_ok = all(isinstance(n, str) for n in (*info.classes, *info.domains))
    if (info.encoding not in ENCODINGS or not names_ok or not info.classes or not isinstance(info.provenance, dict)
            or min(info.height, info.width, info.channels) < 1):
        raise DmgError(f"{path}: its metadata is malformed (encoding, classes, domains, image size or provenance); "
                       f"delete it and run `dmg preprocess` again")
    return info


class CorruptImage(DmgError):
    """A stored image whose bytes do not match their checksum, or that cannot be read or decoded."""


# What h5py raises on a damaged file: HDF5's errors, bad links, undecodable names, odd shapes.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError)


@contextlib.contextmanager
def damaged_file_is_an_error(path, where: str = "") -> Iterator[None]:
    """Turn what h5py raises while reading a damaged file into one line naming it."""
    try:
        yield
    except DmgError:
        raise
    except H5_ERRORS as exc:
        raise DmgError(f"{path}{': ' + where if where else ''} is damaged ({shorten(exc)}); delete the file and run "
                       f"`dmg preprocess` again") from None


class SplitReader:
    """Read access to one /<domain>/<split> group, safe to pass to DataLoader workers.

    The file is opened lazily on first access in each process (an h5py handle must never
    cross a fork), so a reader built in the main process works inside workers. The split's
    structure (labels within the classes, offsets within the bytes) is checked when the reader
    is made; each image's crc32 when it is read (files of layout version 2).
    """

    def __init__(self, path: str | Path, domain: str, split: str):
        self.path, self.domain, self.split = str(path), domain, split
        with open_file(path) as f:
            info = file_info(f, path)
            if not has_split(f, domain, split):
                raise DmgError(f"{path} has no split {domain}/{split}")
            try:
                group = f[f"{domain}/{split}"]
                self.encoding = info.encoding
                self.shape = (info.channels, info.height, info.width)  # what every image must decode to
                self.labels = np.asarray(group["labels"][:], dtype=np.int64)
                self.offsets = np.asarray(group["offsets"][:], dtype=np.int64) if self.encoding == "jpeg" else None
                self.crc32 = np.asarray(group["crc32"][:], dtype=np.uint32) if "crc32" in group else None
                stored = len(group["images"])
                shape = group["images"].shape[1:]
            except H5_ERRORS as exc:
                raise DmgError(f"{path}: split {domain}/{split} is corrupt ({shorten(exc)}); delete the file and "
                               f"run `dmg preprocess` again") from None
        self._check(info, stored, shape)
        self._file: h5py.File | None = None
        self._paths: list[str] | None = None

    def _check(self, info: FileInfo, stored: int, shape: tuple) -> None:
        """Refuse a split that would crash training later or feed it wrong data."""
        where = f"{self.path}: split {self.domain}/{self.split}"
        n = len(self.labels)
        if n and (self.labels.min() < 0 or self.labels.max() >= len(info.classes)):
            bad = int(self.labels[(self.labels < 0) | (self.labels >= len(info.classes))][0])
            raise DmgError(f"{where} has label {bad}, outside 0..{len(info.classes) - 1} ({len(info.classes)} "
                           f"classes); the file is corrupt: run `dmg preprocess` again")
        if self.offsets is not None:
            if len(self.offsets) != n + 1 or self.offsets[0] != 0 or self.offsets[-1] != stored or (
                    n and np.any(np.diff(self.offsets) <= 0)):
                raise DmgError(f"{where}: its image offsets do not fit its {stored} bytes and {n} labels; "
                               f"the file is corrupt: run `dmg preprocess` again")
        elif stored != n or tuple(shape) != (info.height, info.width, info.channels):
            raise DmgError(f"{where}: {stored} images of shape {tuple(shape)} for {n} labels of "
                           f"{info.height}x{info.width}x{info.channels}; the file is corrupt: run `dmg preprocess` "
                           f"again")
        if self.crc32 is not None and len(self.crc32) != n:
            raise DmgError(f"{where}: {len(self.crc32)} checksums for {n} images; the file is corrupt: "
                           f"run `dmg preprocess` again")

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def _images(self) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[f"{self.domain}/{self.split}/images"]

    def name(self, i: int) -> str:
        """Image i as a user finds it: file, domain/split and source path."""
        if self._paths is None:
            try:
                self._paths = self.paths()
            except (*H5_ERRORS, DmgError):
                self._paths = []
        source = self._paths[i] if i < len(self._paths) else f"#{i}"
        return f"{self.path}: {self.domain}/{self.split}/{source}"

    def _verified(self, i: int, data: np.ndarray) -> np.ndarray:
        if self.crc32 is not None and checksum(data) != int(self.crc32[i]):
            raise CorruptImage(f"{self.name(i)} does not match its checksum (the file is damaged); check it with "
                               f"`dmg info --verify` and run `dmg preprocess` again")
        return data

    def _stored(self, i: int) -> np.ndarray:
        """Image i as stored: encoded bytes ("jpeg") or uint8 [H, W, C] ("raw"), checked."""
        try:
            images = self._images()
            data = images[i] if self.offsets is None else images[self.offsets[i]:self.offsets[i + 1]]
        except H5_ERRORS as exc:
            raise CorruptImage(f"{self.name(i)} cannot be read ({shorten(exc)}); the file is damaged: run "
                               f"`dmg preprocess` again") from None
        return self._verified(i, data)

    def encoded(self, i: int) -> np.ndarray:
        """The stored bytes of image i (encoding "jpeg"), checked: uint8 [n_bytes]."""
        return self._stored(i)

    def image(self, i: int) -> torch.Tensor:
        """Image i decoded and checked to be the file's size: uint8 [C, H, W]."""
        if self.encoding == "raw":
            return torch.from_numpy(self._stored(i)).permute(2, 0, 1)
        data = self.encoded(i)
        try:
            image = decode(data)
        except RuntimeError as exc:
            raise CorruptImage(f"{self.name(i)} cannot be decoded ({shorten(exc)}); run `dmg preprocess` "
                               f"again") from None
        # Its checksum only says the bytes are those written: a JPEG of another size (written by
        # another tool, or a bug) would pass it and break the batch that stacks it.
        if tuple(image.shape) != self.shape:
            c, h, w = image.shape
            raise CorruptImage(f"{self.name(i)} decodes to {h}x{w}x{c}, not the file's {self.shape[1]}x"
                               f"{self.shape[2]}x{self.shape[0]}; run `dmg preprocess` again")
        return image

    def all_images(self) -> torch.Tensor:
        """The whole split decoded into memory: uint8 [N, C, H, W] (small datasets)."""
        if self.encoding == "raw":
            with damaged_file_is_an_error(self.path, f"split {self.domain}/{self.split}"):
                pixels = self._images()[:]
            for i in range(len(pixels)):
                self._verified(i, pixels[i])
            return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        return torch.stack([self.image(i) for i in range(len(self))]) if len(self) else torch.empty(0, dtype=torch.uint8)

    def paths(self) -> list[str]:
        with open_file(self.path) as f, damaged_file_is_an_error(self.path, f"split {self.domain}/{self.split}"):
            return [p.decode() if isinstance(p, bytes) else p for p in f[f"{self.domain}/{self.split}/paths"][:]]

    def verify(self) -> list[str]:
        """Every image checked against its checksum (and decoded, for JPEG): names of the bad ones."""
        bad = []
        for i in range(len(self)):
            try:
                self.image(i)
            except CorruptImage:
                bad.append(self.name(i))
        self.close()
        return bad

    def close(self) -> None:
        """Close this process's handle (HDF5 would otherwise keep serving a replaced file's old contents)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def decode(data: np.ndarray) -> torch.Tensor:
    """Encoded image bytes -> uint8 [C, H, W] (3 channels)."""
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.from_numpy(np.ascontiguousarray(data)), mode=ImageReadMode.RGB)
