"""The HDF5 layout every dataset is preprocessed into, with its writer and reader.

Layout (format "dmg-hdf5", version 2), one file per dataset:

  /                         attrs: format, version, dataset, encoding ("raw" or "jpeg"),
                                   height, width, channels, classes (JSON list, label order),
                                   domains (JSON list), provenance (JSON object), tool_version
  /<domain>/<split>/        split in train, val, test
      labels   int64 [N]            0-based class index
      paths    utf-8 str [N]        source path relative to the dataset root
      encoding "raw":   images  uint8 [N, H, W, C]   one image per chunk
      encoding "jpeg":  images  uint8 [total_bytes]  encoded files back to back (not compressed again)
                        offsets int64 [N + 1]        image i is images[offsets[i]:offsets[i+1]]
      crc32    uint32 [N]           zlib.crc32 of each image as stored (version 2; version 1 files lack it)

Every image read is checked against its crc32, so flipped bytes are reported by name rather
than decoded into garbage; `dmg info --verify` checks a whole file.

Every image of a file has the same H x W x C, so decoded batches stack without resizing.
Files are written to a temporary name and renamed when complete (see `writing`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from . import __version__
from .errors import DmgError, disk_full
from .fileio import atomic_path, shorten

FORMAT = "dmg-hdf5"
VERSION = 2  # 2 added crc32 per image
READABLE_VERSIONS = (1, 2)
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
    with atomic_path(path) as tmp, failed_flushes(tmp) as failed:
        f = h5py.File(tmp, "w")
        try:
            f.attrs.update({
                "format": FORMAT, "version": VERSION, "dataset": info.dataset, "encoding": info.encoding,
                "height": info.height, "width": info.width, "channels": info.channels,
                "classes": json.dumps(list(info.classes)), "domains": json.dumps(list(info.domains)),
                "provenance": json.dumps(info.provenance), "tool_version": __version__,
            })
            yield f
            if failed:  # a metadata flush failed while the file was written: it is not whole
                raise failed[0]
        except BaseException as exc:
            if disk_full(exc) or failed:
                # The temporary file is deleted anyway: emptying it gives the space back for the
                # metadata HDF5 writes when it closes the file.
                os.truncate(tmp, 0)
            raise
        finally:
            f.close()


PER_IMAGE_BYTES = 48  # at least, besides the pixels: label 8, crc32 4, path reference 16 + heap entry 16, offset


def check_room(path: str | Path, images: int, image_bytes: float) -> None:
    """Refuse to start a file that cannot fit: HDF5 fails badly on a full disk (its own tracebacks,
    and a crash at exit with HDF5 1.14), so the common case, a disk already too full, is caught
    before the first write. image_bytes: a lower bound of one stored image's size."""
    needed = int(images * (image_bytes + PER_IMAGE_BYTES))
    folder = Path(path).absolute().parent
    place = next(p for p in (folder, *folder.parents) if p.exists())  # the folder may not exist yet
    free = shutil.disk_usage(place).free
    if needed > free:
        raise DmgError(f"disk full: {path} needs at least {needed / 1e6:.1f} MB, {folder} has {free / 1e6:.1f} MB "
                       f"free (ENOSPC); free some space and run again")


@contextlib.contextmanager
def failed_flushes(path: Path) -> Iterator[list[OSError]]:
    """Collect the write errors h5py can only print (HDF5 flushes an object's metadata when the
    object is freed, where no exception can be raised): writing would carry on and rename an
    incomplete file into place. The list they are collected in tells `writing` to fail instead."""
    failed: list[OSError] = []
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        text = str(unraisable.exc_value)
        if disk_full(unraisable.exc_value) or ("errno = 28" in text and str(path.name) in text):
            failed.append(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield failed
    finally:
        sys.unraisablehook = previous


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
        group.create_dataset("crc32", data=np.array([checksum(im) for im in images], dtype=np.uint32))
    else:
        group.create_dataset("crc32", data=np.array([checksum(b) for b in images], dtype=np.uint32))
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
        self.crcs: list[int] = []
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
        self.crcs.append(checksum(image))

    def close(self) -> None:
        n = len(self.labels)
        self.group.create_dataset("labels", data=np.asarray(self.labels, dtype=np.int64))
        self.group.create_dataset("paths", data=np.array(self.paths, dtype=object), dtype=h5py.string_dtype())
        self.group.create_dataset("crc32", data=np.asarray(self.crcs, dtype=np.uint32))
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


def checksum(image) -> int:
    """zlib.crc32 of an image as stored: encoded bytes, or uint8 pixels in C order."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return zlib.crc32(image)
    return zlib.crc32(np.ascontiguousarray(image, dtype=np.uint8).data)


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
