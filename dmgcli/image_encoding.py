"""Source image files -> the squares `dmg preprocess` stores (one function per step, run in
the worker processes): decoded, turned RGB (transparent pixels over white; 16-bit images
scaled to 8 bits), made a square of the stored size (`center_crop` or `squash`), encoded
as JPEG bytes or kept as raw pixels."""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageEncoder:
    """Source file -> stored image; runs in the worker processes."""
    size: int
    encoding: str
    quality: int
    resize: str = "center_crop"  # or "squash"

    def __call__(self, path: str | None):
        """(payload, sha256 of the source file, error): payload is JPEG bytes or uint8 [S, S, 3]."""
        if path is None:  # a repeat of an image already stored: the main process copies it
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return None, None, f"{type(exc).__name__}: {exc.strerror or exc}"
        digest = hashlib.sha256(data).digest()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF/palette chatter, once per image otherwise
                image = make_square(load_rgb(data, self.size), self.size, self.resize)
        except Exception as exc:  # any decoder failure means "unreadable image", never a crash midway
            return None, digest, error_text(exc)
        return self.encode(image), digest, None

    def encode(self, image):
        if self.encoding == "raw":
            return np.asarray(image, dtype=np.uint8)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=self.quality)
        return buffer.getvalue()


def error_text(exc: Exception) -> str:
    """An exception as `Type: message`, without object addresses (`<_io.BytesIO object at 0x7f..>`),
    so the report of identical inputs is identical."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image data", f"{type(exc).__name__}: {exc}")


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(data: bytes, size: int):
    """Decode to RGB; transparent pixels are put over white (the usual clipart background).

    16-bit images (Pillow's I;16 and I modes, e.g. 16-bit grey PNGs) are scaled to 8 bits
    (v / 257); Pillow's own convert would clip them to 255, storing them almost white.
    """
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale still >= size (fast for big photos)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


RESIZE_NOTES = {"center_crop": "shorter side to image_size (bilinear), central square kept",
                "squash": "whole image to image_size x image_size (bilinear), aspect not kept"}


def make_square(image, size: int, resize: str):
    """A size x size image: `squash` resizes the whole image (aspect not kept; the DomainNet
    reference stored 224 x 224 squares, cv2 cubic, and resized them to 256 when training, dmg
    resizes once, straight to `size`); `center_crop` resizes the shorter side to `size` and keeps
    the central square, by one resize of the central box."""
    from PIL import Image

    width, height = image.size
    if (width, height) == (size, size):
        return image
    if resize == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)
