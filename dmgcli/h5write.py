"""Writing a dataset file in the layout of `dmgcli.h5layout`: whole splits (`write_split`) or
image by image in bounded memory (`SplitAppender`), under a temporary name renamed when complete
(`writing`), refused up front when the disk cannot hold it (`check_room`)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from . import __version__
from .errors import DmgError, disk_full
from .fileio import atomic_path
from .h5layout import ENCODINGS, FORMAT, VERSION, FileInfo, checksum


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
