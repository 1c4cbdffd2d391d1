"""Training methods: Aggregate, Multi-Headed and DMG.

Each is a small `nn.Module` with the same interface (after DomainBed's algorithms):
  objective(x, y, d) -> (loss, stats)   the training loss of one batch
  update(x, y, d)    -> stats           one optimisation step
  predict(x, mode, domains) -> scores   [B, C]; argmax is the prediction
x: float images [B, C, H, W] in [0, 1]; y: labels [B]; d: source-domain index [B] (0..D-1).
Prediction modes: "average" (the default test-time prediction), "known_domain" (use the
sample's own domain: DMG-KnownDomain of Table 3, or the own head), "hard" (DMG's thresholded
own-domain mask, used for source validation as in the reference code). Without masks there
is nothing to threshold: Multi-Headed's "hard" is its "known_domain" (the own head), and
Aggregate's one network gives the same scores in every mode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, build_backbone, disable_dropout, new_head, split_at, split_frozen
from .core import DomainMasks, apply_mask
from .errors import DmgError
from .params import VALIDATION_MODES, EvaluateParams, TrainParams

PREDICT_MODES = VALIDATION_MODES  # declared with train.validation_mode, which takes any of them


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """What a method is built and optimised with. It keeps no copies of params' defaults: lr,
    mask_lr and weight_decay have none (they come from a schedule, dmgcli/params.py), and the
    fields params.yaml also sets default to TrainParams' declared values."""
    backbone: str
    num_classes: int
    num_domains: int
    pretrained: bool = TrainParams.pretrained
    pretrained_path: str | None = TrainParams.pretrained_path
    mask_points: tuple[str, ...] | None = TrainParams.mask_points
    mask_init: str = TrainParams.mask_init
    # mask_init constant: every logit's start; None: uniform (or a config written before the key: logit 0)
    mask_init_value: float | None = None
    overlap_lambda: float = TrainParams.overlap_lambda
    lr: float  # Adam lr of the network
    mask_lr: float  # Adam lr of the masks (DMG)
    weight_decay: float  # of both optimisers
    head_init: str = "default"  # "default" (PyTorch's) or "normal" (N(0, 0.001)): see reference_head_init
    frozen_trunk: bool = TrainParams.frozen_trunk  # layers below the first mask point frozen (eval), see Method.encode
    image_size: int | None = TrainParams.image_size  # side of the input images (None: dmgcli.augment.CROP)
    trunk_views: int = 1  # augmented views per training image (dmgcli/features.py); 1 unless frozen_trunk


def reference_head_init(dataset: str, method: str, pretrained: bool) -> str:
    """How the reference initialised a classifier head that replaces an ImageNet one: N(0, 0.001)
    for DomainNet and for PACS Multi-Headed, PyTorch's default for PACS Aggregate and DMG
    (`configs/PACS/{aggregate,supermask}_training.yml`: PARAM_INIT standard). Other datasets
    follow PACS; from scratch every layer keeps PyTorch's default."""
    if pretrained and (dataset == "domainnet" or method == "multihead"):
        return "normal"
    return "default"


class Method(nn.Module):
    """Shared plumbing: optimisers, the update step, the combination of per-domain outputs."""

    validation_mode = "average"
    # How the "average" prediction combines per-domain outputs: over logits (the reference's rule,
    # used in training's validation) or probs. An evaluation setting (evaluate.average_over, set by
    # stages/evaluate.py), not a training one: not in MethodConfig, not in checkpoints.
    average_over = EvaluateParams.average_over

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config
        self.optimizers: list[torch.optim.Optimizer] = []
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.frozen = nn.Sequential()  # the frozen trunk (config.frozen_trunk); empty: x passes unchanged

    def build_network(self, load_weights: bool) -> Backbone:
        """The backbone to train. load_weights=False: without reading the pretrained weights, for
        a checkpoint that will supply every weight (evaluation). With config.frozen_trunk the layers
        below the first mask point move into self.frozen (no gradients, always in eval mode) and
        the backbone keeps the rest."""
        config = self.config
        backbone = build_backbone(config.backbone, config.num_classes, config.pretrained, config.pretrained_path,
                                  load_weights=load_weights, head_init=config.head_init)
        if config.frozen_trunk:
            self.frozen = split_frozen(backbone, config.mask_points or backbone.default_mask_points)
        return backbone

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> what the trained layers take: the frozen trunk's output, or x itself when
        nothing is frozen. objective() and predict() take encoded inputs."""
        return self.frozen(x) if len(self.frozen) else x

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # frozen BatchNorm keeps ImageNet's statistics
        return self

    def build_optimizers(self) -> None:
        """Adam on the network (the reference's defaults); DMG adds a second one for the masks."""
        self.optimizers = [torch.optim.Adam(self.network_parameters(), lr=self.config.lr,
                                            weight_decay=self.config.weight_decay)]

    def network_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def objective(self, x, y, d) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def update(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, objective=None) -> dict:
        """One optimisation step. `objective` replaces self.objective (the engine passes a DDP or compiled one)."""
        with self.autocast():
            loss, stats = (objective or self.objective)(x, y, d)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return {"loss": loss.detach(), **stats}

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """Average per-domain outputs [D, B, C] -> [B, C] over logits or probabilities."""
        if self.average_over == "probs":
            return scores.float().softmax(-1).mean(0)
        return scores.mean(0)

    def predict(self, x: torch.Tensor, mode: str = "average", domains: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def _check_mode(mode: str, domains) -> None:
    if mode not in PREDICT_MODES:
        raise DmgError(f"unknown prediction mode {mode!r}; valid: {', '.join(PREDICT_MODES)}")
    if mode != "average" and domains is None:
        raise ValueError(f"prediction mode {mode!r} needs each sample's source-domain index")


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls):
        METHODS[name] = cls
        cls.name = name
        return cls
    return wrap


def build_method(name: str, config: MethodConfig, load_weights: bool = True, optimizers: bool = True) -> Method:
    """The method `name` as `config` trains it. load_weights=False: the same network (ImageNet
    normalisation and head init included) without reading ImageNet weights, for loading a checkpoint.
    optimizers=False: none (evaluation; building the first torch optimizer imports torch._dynamo,
    seconds of CPU in every evaluate process)."""
    if name not in METHODS:
        raise DmgError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    method = METHODS[name](config, load_weights)
    if optimizers:
        method.build_optimizers()
    return method


@register("aggregate")
class Aggregate(Method):
    """One network trained on the shuffled union of all source domains."""

    def __init__(self, config: MethodConfig, load_weights: bool = True):
        super().__init__(config)
        self.net = nn.Sequential(*[m for _, m in self.build_network(load_weights).layers])

    def objective(self, x, y, d):
        return F.cross_entropy(self.net(x), y), {}

    def predict(self, x, mode="average", domains=None):
        """One network for every domain: every mode gives the same scores (domains are not used)."""
        _check_mode(mode, domains)
        return self.net(x)


@register("multihead")
class MultiHead(Method):
    """Shared trunk, one classifier head per source domain; heads averaged at test time.

    Source validation scores each source with its own head, as the reference code does.
    The paper's AlexNet Multi-Headed numbers came from reference code that built one shared
    head (so it trained Aggregate); here every backbone gets the separate heads the paper describes.
    """

    validation_mode = "known_domain"

    def __init__(self, config: MethodConfig, load_weights: bool = True):
        super().__init__(config)
        *body, (_, classifier) = self.build_network(load_weights).layers
        self.trunk = nn.Sequential(*[m for _, m in body])
        self.heads = nn.ModuleList(new_head(classifier.in_features, config.num_classes, config.head_init)
                                   for _ in range(config.num_domains))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """All heads on all samples: [B, F] -> [D, B, C]."""
        weight = torch.stack([h.weight for h in self.heads])  # [D, C, F]
        bias = torch.stack([h.bias for h in self.heads])  # [D, C]
        return torch.einsum("bf,dcf->dbc", features, weight) + bias[:, None, :]

    def own_head(self, features: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """Each sample through its own domain's head: [B, F] -> [B, C]."""
        all_heads = self.head_logits(features)  # [D, B, C]
        return all_heads[domains, torch.arange(features.shape[0], device=features.device)]

    def objective(self, x, y, d):
        return F.cross_entropy(self.own_head(self.trunk(x), d), y), {}

    def predict(self, x, mode="average", domains=None):
        """average: the heads' outputs combined (Method.combine); known_domain: each sample
        through its own domain's head. hard: there is no mask to threshold, so the own head as
        for known_domain (what `train.validation_mode: hard` selects a Multi-Headed run by)."""
        _check_mode(mode, domains)
        features = self.trunk(x)
        if mode == "average":
            return self.combine(self.head_logits(features))
        return self.own_head(features, domains)


@register("dmg")
class DMG(Method):
    """Domain-specific masks (section 2): per-domain Bernoulli masks at the mask points,
    trained with the straight-through estimator, plus lambda_O times the soft-IoU overlap."""

    validation_mode = "hard"

    def __init__(self, config: MethodConfig, load_weights: bool = True):
        super().__init__(config)
        backbone = self.build_network(load_weights)
        disable_dropout(backbone)
        self.mask_points = config.mask_points or backbone.default_mask_points
        self.trunk, segments, units = split_at(backbone, self.mask_points)
        self.segments = nn.ModuleList(segments)
        # None: a uniform init, or a config written before mask_init_value (its `constant` was logit 0)
        init_value = 0.0 if config.mask_init_value is None else config.mask_init_value
        self.masks = DomainMasks(units, config.num_domains, init=config.mask_init, init_value=init_value)

    def network_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("masks.") and p.requires_grad]

    def build_optimizers(self) -> None:
        super().build_optimizers()
        # The reference trains the masks with a second Adam with the network's weight decay
        # (PACS 1e-5, DomainNet 0) and its own learning rate.
        self.optimizers.append(torch.optim.Adam(self.masks.parameters(), lr=self.config.mask_lr,
                                                weight_decay=self.config.weight_decay))

    def masked_forward(self, features: torch.Tensor, domains: torch.Tensor, kind: str) -> torch.Tensor:
        """Run the segments with each sample's own-domain mask of `kind` (train/soft/hard)."""
        h = features
        for segment, mask in zip(self.segments, self.masks.batch_masks(kind, domains)):  # all points' masks at once
            h = segment(apply_mask(h, mask))
        return h

    def objective(self, x, y, d):
        logits = self.masked_forward(self.trunk(x), d, "train")
        ce = F.cross_entropy(logits, y)
        overlap = self.masks.overlap()
        return ce + self.config.overlap_lambda * overlap, {"ce": ce.detach(), "overlap": overlap.detach()}

    def predict(self, x, mode="average", domains=None):
        _check_mode(mode, domains)
        features = self.trunk(x)  # once per batch, whatever the number of source domains
        if mode == "known_domain":
            return self.masked_forward(features, domains, "soft")
        if mode == "hard":
            return self.masked_forward(features, domains, "hard")
        return self.combine(self.every_domain(features, "soft"))  # average: under every domain's soft mask

    def every_domain(self, features: torch.Tensor, kind: str) -> torch.Tensor:
        """Every sample under every source domain's mask of `kind`, in one batched pass: [D, B, C]."""
        batch, num_domains = features.shape[0], self.masks.num_domains
        repeated = features.repeat(num_domains, *[1] * (features.dim() - 1))  # [D*B, ...]
        domain_ids = torch.arange(num_domains, device=features.device).repeat_interleave(batch)  # [D*B]
        return self.masked_forward(repeated, domain_ids, kind).view(num_domains, batch, -1)
