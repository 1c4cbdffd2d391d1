"""Backbone registry: each builder returns the network as an ordered list of named layers.

A flat list makes "mask the input of layer X" a cut in the list: everything before the
first mask point is the trunk (run once per batch at test time), the rest are segments
that run once per source domain. Mask points are layer names such as `layer3` or
`classifier.1` (REFERENCE.md: the points the authors' code masked are the defaults).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import DmgError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8-range float input in [0, 1] -> normalised 3-channel input (gray is repeated)."""

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        # Persistent: a checkpoint carries the statistics its network was trained with, so an
        # evaluation can never normalise differently from the training (ImageNet vs 0.5).
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1 or 3, H, W]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass
class Backbone:
    layers: list[tuple[str, nn.Module]]  # in forward order; the last one is the classifier
    default_mask_points: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]


BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register(name: str):
    def wrap(fn):
        BACKBONES[name] = fn
        return fn
    return wrap


def build_backbone(name: str, num_classes: int, pretrained: bool = False,
                   pretrained_path: str | None = None, load_weights: bool = True) -> Backbone:
    """The network as a flat layer list.

    `pretrained` fixes the architecture of an ImageNet-initialised run (ImageNet input
    normalisation, a freshly initialised head); `load_weights=False` builds that same network
    without reading the weights file, for a checkpoint that is about to replace every weight.
    """
    if name not in BACKBONES:
        raise DmgError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    path = pretrained_path if load_weights else None
    return BACKBONES[name](num_classes=num_classes, pretrained=pretrained, pretrained_path=path,
                           load_weights=load_weights)


HEAD_INIT_STD = 0.001  # the reference initialises a head that replaces a pretrained one N(0, 0.001), bias 0


def new_head(in_features: int, num_classes: int, pretrained: bool) -> nn.Linear:
    """A classifier head for `num_classes`. On a pretrained network it starts as the reference's
    did (weights N(0, 0.001), bias 0); from scratch it keeps PyTorch's default, like every other layer."""
    head = nn.Linear(in_features, num_classes)
    if pretrained:
        nn.init.normal_(head.weight, 0.0, HEAD_INIT_STD)
        nn.init.zeros_(head.bias)
    return head


def _models():
    """torchvision.models, imported on first use: it costs seconds, and convnet runs never need it."""
    from torchvision import models
    return models


def load_imagenet_weights(model: nn.Module, weights_enum, pretrained_path: str | None) -> None:
    """Load torchvision ImageNet weights from a given file or the local torch hub cache.

    Never downloads: a machine without network gets one line saying where to put the file.
    """
    weights = weights_enum.IMAGENET1K_V1
    filename = Path(weights.url).name
    path = Path(pretrained_path) if pretrained_path else Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.exists():
        raise DmgError(f"ImageNet weights not found at {path}: download {weights.url} to that path "
                       f"(or set train.pretrained_path), or set train.pretrained: false")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad weights file
        raise DmgError(f"could not load ImageNet weights from {path}: {exc}") from None


def _resnet(arch: str, weights_name: str, num_classes: int, pretrained: bool, pretrained_path: str | None,
            load_weights: bool) -> Backbone:
    models = _models()
    weights_enum = getattr(models, weights_name)
    net = getattr(models, arch)(weights=None)
    if pretrained and load_weights:
        load_imagenet_weights(net, weights_enum, pretrained_path)
    net.fc = new_head(net.fc.in_features, num_classes, pretrained)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD) if pretrained else Normalize()
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    layers = [("normalize", norm)] + [(n, getattr(net, n)) for n in names]
    layers += [("flatten", nn.Flatten(1)), ("fc", net.fc)]
    return Backbone(layers, default_mask_points=("layer3", "layer4", "fc"))


@register("resnet18")
def resnet18(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
             load_weights: bool = True) -> Backbone:
    return _resnet("resnet18", "ResNet18_Weights", num_classes, pretrained, pretrained_path, load_weights)


@register("resnet50")
def resnet50(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
             load_weights: bool = True) -> Backbone:
    return _resnet("resnet50", "ResNet50_Weights", num_classes, pretrained, pretrained_path, load_weights)


@register("alexnet")
def alexnet(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
            load_weights: bool = True) -> Backbone:
    models = _models()
    net = models.alexnet(weights=None)
    if pretrained and load_weights:
        load_imagenet_weights(net, models.AlexNet_Weights, pretrained_path)
    net.classifier[6] = new_head(net.classifier[6].in_features, num_classes, pretrained)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD) if pretrained else Normalize()
    layers = [("normalize", norm), ("features", net.features), ("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)]
    return Backbone(layers, default_mask_points=("classifier.1", "classifier.4", "classifier.6"))


@register("convnet")
def convnet(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
            load_weights: bool = True) -> Backbone:
    """A small CNN for small images (the embedded digits): three conv blocks and two fc layers.

    Masked like the ResNets: a channel mask before the last conv block, then the fc inputs.
    """
    if pretrained:
        raise DmgError("convnet has no ImageNet weights; set train.pretrained: false")

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    layers = [
        ("normalize", Normalize()),
        ("conv1", block(3, 16)), ("pool1", nn.MaxPool2d(2)),
        ("conv2", block(16, 32)), ("pool2", nn.MaxPool2d(2)),
        ("conv3", block(32, 64)), ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
        ("fc1", nn.Linear(64, 256)), ("relu", nn.ReLU(inplace=True)),
        ("fc", nn.Linear(256, num_classes)),
    ]
    return Backbone(layers, default_mask_points=("conv3", "fc1", "fc"))


def input_units(module: nn.Module, name: str) -> int:
    """Channels or features entering `module`: those of its first conv or linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return m.in_features
    raise DmgError(f"cannot mask the input of {name!r}: it has no conv or linear layer")


def split_at(backbone: Backbone, mask_points: tuple[str, ...]) -> tuple[nn.Sequential, list[nn.Sequential], list[int]]:
    """Cut the layer list at the mask points: (trunk, segments, units at each mask point)."""
    names = backbone.names
    for p in mask_points:
        if p not in names:
            raise DmgError(f"unknown mask point {p!r}; valid: {', '.join(names[1:])}")
    cuts = [names.index(p) for p in mask_points]
    if cuts != sorted(set(cuts)) or cuts[0] == 0:
        raise DmgError(f"mask points must be distinct and in forward order after the input: {', '.join(mask_points)}")
    modules = [m for _, m in backbone.layers]
    trunk = nn.Sequential(*modules[: cuts[0]])
    bounds = cuts + [len(modules)]
    segments = [nn.Sequential(*modules[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    units = [input_units(modules[c], names[c]) for c in cuts]
    return trunk, segments, units


def disable_dropout(backbone: Backbone) -> None:
    """DMG trains with dropout off (the masks take its place), as the reference did."""
    for i, (name, module) in enumerate(backbone.layers):
        if isinstance(module, nn.Dropout):
            backbone.layers[i] = (name, nn.Identity())
