"""Batched image augmentation on the training device (GPU or CPU), per dataset.

Input: uint8 [B, C, H, W]; output: float [B, C, S, S] in [0, 1]. Working on whole batches
with one affine `grid_sample` replaces per-image PIL transforms, which were the bottleneck
of the usual ImageFolder + DataLoader input path (REFERENCE.md, section 3).
Reference augmentations (REFERENCE.md, section 1):
  pacs:      RandomResizedCrop(224, scale 0.8-1) + flip + ColorJitter(0.4, 0.4, 0.4, 0.4);
             eval: resize to 224
  domainnet: RandomCrop 224 of the 256 x 256 image (the whole image, squashed) + flip;
             eval: the whole image resized to 224 x 224
  none:      the embedded digits (rotation is the domain shift, so no geometric augmentation)
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .errors import DmgError

CROP = 224
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator=None) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) * (high - low) + low


def affine_crop(x: torch.Tensor, width: torch.Tensor, height: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop per sample a box (fractions of the image, centre in [-1, 1] coords), resize to size, flip.

    x: float [B, C, H, W]; width/height/cx/cy/flip: [B]. One batched grid_sample.
    """
    sign = 1.0 - 2.0 * flip  # -1 mirrors horizontally
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip, batched (boxes clipped to the image)."""
    b = x.shape[0]
    area = _uniform(b, *scale, x, generator)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), x, generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, device=x.device, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(b, device=x.device, generator=generator) * 2 - 1) * (1 - height)
    flip = (torch.rand(b, device=x.device, generator=generator) < 0.5).to(x.dtype)
    return affine_crop(x, width, height, cx, cy, flip, size)


def random_crop_flip(x: torch.Tensor, size: int, generator=None) -> torch.Tensor:
    """RandomCrop(size) of the stored image + RandomHorizontalFlip, batched, pixel-aligned."""
    b, _, h, w = x.shape
    ox = torch.randint(0, w - size + 1, (b,), device=x.device, generator=generator).to(x.dtype)
    oy = torch.randint(0, h - size + 1, (b,), device=x.device, generator=generator).to(x.dtype)
    width, height = torch.full_like(ox, size / w), torch.full_like(oy, size / h)
    cx = (2 * ox + size) / w - 1
    cy = (2 * oy + size) / h - 1
    flip = (torch.rand(b, device=x.device, generator=generator) < 0.5).to(x.dtype)
    return affine_crop(x, width, height, cx, cy, flip, size)


_GRAY = torch.tensor([0.299, 0.587, 0.114])  # luma weights, as torchvision's rgb_to_grayscale


def color_jitter(x: torch.Tensor, strength: float = 0.4, hue: float = 0.4, generator=None) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter. x: float [B, 3, H, W] in [0, 1].

    Fixed order (torchvision shuffles it per call); hue is a rotation of the YIQ chroma plane,
    a close and cheap stand-in for torchvision's HSV shift. In place on one new tensor: on the
    CPU every extra full-size temporary costs about as much as an arithmetic pass.
    """
    b = x.shape[0]

    def factor():
        return _uniform(b, 1 - strength, 1 + strength, x, generator).view(b, 1, 1, 1)

    gray_weights = _GRAY.to(x)
    x = (x * factor()).clamp_(0, 1)  # brightness
    mean = (x.mean(dim=(2, 3)) @ gray_weights).view(b, 1, 1, 1)  # mean grey level, [B, 1, 1, 1]
    x.sub_(mean).mul_(factor()).add_(mean).clamp_(0, 1)  # contrast
    gray = torch.einsum("bchw,c->bhw", x, gray_weights).unsqueeze(1)  # [B, 1, H, W]
    x.sub_(gray).mul_(factor()).add_(gray).clamp_(0, 1)  # saturation
    angle = _uniform(b, -hue, hue, x, generator) * 2 * math.pi
    yiq = _RGB_TO_YIQ.to(x)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    transform = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3]
    return torch.bmm(transform, x.flatten(2)).view_as(x).clamp_(0, 1)  # hue


def pacs_train(x, generator=None, size=None):
    return color_jitter(random_resized_crop(to_float(x), size or CROP, generator=generator), generator=generator)


def pacs_eval(x, generator=None, size=None):
    size = size or CROP
    return F.interpolate(to_float(x), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def domainnet_train(x, generator=None, size=None):
    """The stored 256 px square resized in proportion (256 -> size * 256 / 224), then the
    reference's random crop: at the default 224 no resize happens."""
    size = size or CROP
    x = to_float(x)
    if size != CROP:
        side = round(x.shape[-1] * size / CROP)
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return random_crop_flip(x, size, generator=generator)


def identity(x, generator=None, size=None):
    return to_float(x)


AUGMENTATIONS = {
    "none": (identity, identity),
    "pacs": (pacs_train, pacs_eval),
    "domainnet": (domainnet_train, pacs_eval),  # both evaluate the whole image resized to 224 x 224
}


def get_augmentation(name: str, size: int | None = None):
    """(train_transform, eval_transform) for a dataset's augmentation name; `size` is the side of
    the images the network sees (train.image_size; None: CROP). Each takes (x, generator=None)."""
    if name not in AUGMENTATIONS:
        raise DmgError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    if size is not None and name == "none":
        raise DmgError("train.image_size applies to the pacs and domainnet augmentations; with augmentation none "
                       "the network sees the stored images: set it to null")
    train, evaluate = AUGMENTATIONS[name]
    if size is None:
        return train, evaluate
    return functools.partial(train, size=size), functools.partial(evaluate, size=size)
