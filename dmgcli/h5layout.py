"""The HDF5 layout every dataset is preprocessed into: its constants, `FileInfo` and `checksum`.

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
Files are written to a temporary name and renamed when complete (`dmgcli.h5write.writing`);
`dmgcli.h5data` reads them and is the one module to import all of it from.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

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


def checksum(image) -> int:
    """zlib.crc32 of an image as stored: encoded bytes, or uint8 pixels in C order."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return zlib.crc32(image)
    return zlib.crc32(np.ascontiguousarray(image, dtype=np.uint8).data)
