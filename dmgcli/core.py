"""The DMG core: domain-specific masks, the soft-IoU overlap loss and mask metrics.

Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity and Invariance for In and
Out of Domain Generalization", ECCV 2020 (section 2, equation (1)).

Everything here is a pure function of tensors except `DomainMasks`, the one module that
owns the mask logits. Shapes: D = number of source domains, U = units (channels or
features) at one masked point, B = batch size.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

IOU_SMOOTHING = 1e-6  # the reference implementation's smoothing term


def straight_through_bernoulli(probs: torch.Tensor) -> torch.Tensor:
    """Sample a 0/1 mask from Bernoulli(probs), differentiable through `probs`.

    Forward value: the binary sample. Backward: identity to `probs` (the straight-through
    estimator, `hard + p - p.detach()` in the reference code).
    """
    # NaN keep-probabilities (a diverged run) would stop torch.bernoulli with an error (a device
    # assert on CUDA); drawn at 0.5 instead, the NaN still flows on through the bracket into the
    # loss, and training ends with its "training diverged" message.
    hard = torch.bernoulli(probs.detach().nan_to_num(0.5))
    return hard + (probs - probs.detach())  # the bracket is exactly 0 forward: the sample stays 0/1


def apply_mask(activations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale activations by a per-sample, per-unit mask.

    activations: [B, U] (fully connected) or [B, U, H, W] (conv: one entry per channel,
    broadcast over H x W without copying). mask: [B, U].
    """
    if activations.dim() == 4:
        mask = mask[:, :, None, None]  # [B, U, 1, 1]
    return activations * mask.to(activations.dtype)


def soft_iou(p_i: torch.Tensor, p_j: torch.Tensor, eps: float = IOU_SMOOTHING) -> torch.Tensor:
    """Soft IoU of two mask distributions over the last dimension, equation (1):

        sIoU(m_i, m_j) = (m_i . m_j) / sum_k (m_i + m_j - m_i * m_j)

    p_i, p_j: [..., U] keep-probabilities in [0, 1]. Returns [...] in [0, 1].
    For 0/1 masks this is the ordinary Jaccard index. `eps` smooths both terms, so two
    all-zero masks count as identical (IoU 1) instead of 0/0.
    """
    intersection = (p_i * p_j).sum(-1)
    union = (p_i + p_j - p_i * p_j).sum(-1)
    return (intersection + eps) / (union + eps)


def domain_pairs(num_domains: int) -> list[tuple[int, int]]:
    """All unordered pairs (i, j), i < j, of source-domain indices."""
    return list(itertools.combinations(range(num_domains), 2))


def overlap_loss(probs: torch.Tensor) -> torch.Tensor:
    """Soft-overlap loss of one masked layer: sIoU averaged over all pairs of domains.

    probs: [D, U]. The paper's objective sums over pairs; the reference code averages, which
    keeps lambda_O's scale independent of the number of source domains. We follow the code,
    so lambda_O = 0.1 means what it meant in the authors' experiments.
    """
    pairs = domain_pairs(probs.shape[0])
    if not pairs:
        return probs.new_zeros(())
    i, j = zip(*pairs)
    return soft_iou(probs[list(i)], probs[list(j)]).mean()


def hard_iou_matrix(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Pairwise IoU of the binary masks (keep-probability > threshold). probs: [D, U] -> [D, D].

    Two empty masks have IoU 1 (they are identical).
    """
    hard = (probs > threshold).float()  # [D, U]
    intersection = hard @ hard.T  # [D, D]
    sizes = hard.sum(-1)  # [D]
    union = sizes[:, None] + sizes[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def keep_probability(probs: torch.Tensor) -> torch.Tensor:
    """Mean keep-probability of each domain's mask. probs: [D, U] -> [D]."""
    return probs.mean(-1)


class DomainMasks(nn.Module):
    """The learned masks: one logit tensor [D, U_l] per masked point l.

    Keep-probabilities are sigmoid(logits). Initialised U[0, 1) as in the reference code
    (keep-probability 0.5 to 0.73), or to a constant `init_value` when given.
    """

    def __init__(self, units: list[int], num_domains: int, init: str = "uniform", init_value: float = 0.0):
        super().__init__()
        if init not in ("uniform", "constant"):
            raise ValueError(f"unknown mask init {init!r}; valid: uniform, constant")
        self.num_domains, self.units = num_domains, list(units)
        self.logits = nn.ParameterList()
        for u in units:
            tensor = torch.rand(num_domains, u) if init == "uniform" else torch.full((num_domains, u), init_value)
            self.logits.append(nn.Parameter(tensor))
        # Index tensors the batched step uses, made once (not per step) and moved with the module;
        # not persistent, so checkpoints hold the logits alone.
        pairs = domain_pairs(num_domains)
        self.register_buffer("pair_i", torch.tensor([i for i, _ in pairs], dtype=torch.long), persistent=False)
        self.register_buffer("pair_j", torch.tensor([j for _, j in pairs], dtype=torch.long), persistent=False)
        layer_of_unit = torch.cat([torch.full((u,), l, dtype=torch.long) for l, u in enumerate(units)]) if units else \
            torch.zeros(0, dtype=torch.long)
        self.register_buffer("layer_of_unit", layer_of_unit, persistent=False)

    def __len__(self) -> int:
        return len(self.logits)

    def probs(self, layer: int) -> torch.Tensor:
        """Keep-probabilities of one masked point: [D, U]."""
        return torch.sigmoid(self.logits[layer])

    def train_mask(self, layer: int, domains: torch.Tensor) -> torch.Tensor:
        """Sampled 0/1 masks for a batch (straight-through). domains: [B] -> [B, U]."""
        return straight_through_bernoulli(self.probs(layer)[domains])

    def soft_mask(self, layer: int, domains: torch.Tensor) -> torch.Tensor:
        """Soft masks sigma(logits[d]) for a batch, used at test time. domains: [B] -> [B, U]."""
        return self.probs(layer)[domains]

    def hard_mask(self, layer: int, domains: torch.Tensor) -> torch.Tensor:
        """Thresholded masks (p > 0.5), used for source validation. domains: [B] -> [B, U]."""
        return (self.probs(layer)[domains] > 0.5).float()

    def all_probs(self) -> torch.Tensor:
        """Keep-probabilities of every masked point side by side: [D, sum of U_l] (one sigmoid)."""
        return torch.sigmoid(torch.cat(list(self.logits), dim=1))

    def batch_masks(self, kind: str, domains: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's own-domain mask at every masked point, [B, U_l] per point, in one lookup.

        kind: "train" (sampled 0/1, straight-through: one Bernoulli draw for all points),
        "soft" (probabilities, test time) or "hard" (p > 0.5, source validation). The same
        values as `train_mask` / `soft_mask` / `hard_mask` point by point, in a few kernels
        instead of a few per point (the draws of "train" come from the generator in another order).
        """
        probs = self.all_probs()[domains]  # [B, sum U]
        if kind == "train":
            masks = straight_through_bernoulli(probs)
        elif kind == "soft":
            masks = probs
        elif kind == "hard":
            masks = (probs > 0.5).float()
        else:
            raise ValueError(f"unknown mask kind {kind!r}; valid: train, soft, hard")
        return list(masks.split(self.units, dim=1))

    def overlap(self) -> torch.Tensor:
        """Sum over masked points of the pair-averaged soft IoU (scalar): `overlap_loss` per
        point, computed for all points and pairs at once (intersections and unions summed per
        point with one index_add; no matrix product, so bf16 autocast leaves it in fp32)."""
        if len(self.pair_i) == 0:  # one source domain: nothing to overlap with
            return self.logits[0].new_zeros(())
        probs = self.all_probs()
        p_i, p_j = probs[self.pair_i], probs[self.pair_j]  # [P, U]
        both = p_i * p_j
        terms = torch.stack([both, p_i + p_j - both])  # intersection and union terms, [2, P, U]
        sums = terms.new_zeros(2, len(self.pair_i), len(self.units)).index_add(2, self.layer_of_unit, terms)
        iou = (sums[0] + IOU_SMOOTHING) / (sums[1] + IOU_SMOOTHING)  # [P, L], equation (1)
        return iou.mean(0).sum()

    @torch.no_grad()
    def metrics(self, layer_names: list[str], domain_names: list[str]) -> dict:
        """Pairwise hard IoU and mean keep-probability per domain, per masked point."""
        out = {"iou": {}, "keep_probability": {}}
        for l, name in enumerate(layer_names):
            probs = self.probs(l).float().cpu()
            out["iou"][name] = hard_iou_matrix(probs).tolist()
            out["keep_probability"][name] = dict(zip(domain_names, keep_probability(probs).tolist()))
        return out
