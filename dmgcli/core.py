"""The DMG core: domain-specific masks, the soft-IoU overlap loss and mask metrics.

Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity and Invariance for In and
Out of Domain Generalization", ECCV 2020 (section 2, equation (1)).

Everything here is a pure function (of tensors; `mean_pairwise_iou` of stored IoU matrices)
except `DomainMasks`, the one module that owns the mask logits. Shapes: D = number of source
domains, U = units (channels or features) at one masked point l, N = sum of U_l over the L masked points (every point's
units side by side), B = batch size, P = D(D-1)/2 pairs of domains.

The training step's mask operations are written once, in the batched form training runs
(all masked points in one tensor); tests/test_core.py holds the readable per-pair,
per-point versions as the oracle that checks them. Why batched: one Bernoulli draw for all
points fixes the order in which training consumes the random generator, and summing per
point with one index_add fixes the arithmetic, so trained numbers stay what they were; on
the CPU the two forms cost about the same (well under 5% of a convnet step, under 1% of
an AlexNet step).
"""
from __future__ import annotations

import itertools
import statistics

import torch
from torch import nn

from .params import MASK_INITS, TrainParams

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


def domain_pairs(num_domains: int) -> list[tuple[int, int]]:
    """All unordered pairs (i, j), i < j, of source-domain indices."""
    return list(itertools.combinations(range(num_domains), 2))


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


def mean_pairwise_iou(iou_matrices: list[list[list[float]]]) -> float | None:
    """Mean over masked points of the mean IoU over pairs of distinct domains (the paper's
    footnote: it falls as lambda_O grows). iou_matrices: one [D, D] matrix per point, as
    `hard_iou_matrix(...).tolist()` gives and a details file stores. None when no point has
    two domains (nothing overlaps)."""
    per_point = [statistics.fmean(m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j)
                 for m in iou_matrices if len(m) > 1]
    return statistics.fmean(per_point) if per_point else None


class DomainMasks(nn.Module):
    """The learned masks: one logit tensor [D, U_l] per masked point l.

    Keep-probabilities are sigmoid(logits). Initialised U[0, 1) as in the reference code
    (keep-probability 0.5 to 0.73), or to a constant `init_value` when given.
    """

    def __init__(self, units: list[int], num_domains: int, init: str, init_value: float = TrainParams.mask_init_value):
        super().__init__()
        if init not in MASK_INITS:
            raise ValueError(f"unknown mask init {init!r}; valid: {', '.join(MASK_INITS)}")
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
        """Keep-probabilities of one masked point: [D, U_l] (metrics and the report's histograms)."""
        return torch.sigmoid(self.logits[layer])

    def all_probs(self) -> torch.Tensor:
        """Keep-probabilities of every masked point side by side: [D, N] (one sigmoid)."""
        return torch.sigmoid(torch.cat(list(self.logits), dim=1))

    def batch_masks(self, kind: str, domains: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's own-domain mask m_d at every masked point: domains [B] -> [B, U_l] per point.

        kind: "train" (a 0/1 sample of Bernoulli(sigmoid(logits)), straight-through, section 2),
        "soft" (the keep-probabilities themselves, test time) or "hard" (p > 0.5, source
        validation as in the reference code). One lookup and, for "train", one Bernoulli draw
        for all points at once: the order in which training consumes the random generator.
        """
        probs = self.all_probs()[domains]  # [B, N]: row b is domain domains[b]'s probabilities
        if kind == "train":
            masks = straight_through_bernoulli(probs)
        elif kind == "soft":
            masks = probs
        elif kind == "hard":
            masks = (probs > 0.5).float()
        else:
            raise ValueError(f"unknown mask kind {kind!r}; valid: train, soft, hard")
        return list(masks.split(self.units, dim=1))  # [B, N] -> [B, U_l] per point

    def overlap(self) -> torch.Tensor:
        """The overlap term of the objective (scalar): the soft IoU of equation (1),

            sIoU(m_i, m_j) = sum_u p_i[u] p_j[u] / sum_u (p_i[u] + p_j[u] - p_i[u] p_j[u]),

        per masked point and pair of domains i < j, averaged over the pairs and summed over
        the points. The paper's objective sums over pairs; the reference code averages, which
        keeps lambda_O's scale independent of the number of source domains; we follow the
        code, so lambda_O = 0.1 means what it meant in the authors' experiments. Both sums
        over u carry the reference's smoothing IOU_SMOOTHING, so two all-zero masks count as
        identical (IoU 1) instead of 0/0. For 0/1 masks sIoU is the Jaccard index.

        All points and pairs at once: the per-unit terms of every point side by side, summed
        into their point with one index_add (no matrix product, so bf16 autocast leaves it in fp32).
        """
        if len(self.pair_i) == 0:  # one source domain: nothing to overlap with
            return self.logits[0].new_zeros(())
        probs = self.all_probs()
        p_i, p_j = probs[self.pair_i], probs[self.pair_j]  # [P, N]: the two domains of each pair
        both = p_i * p_j
        terms = torch.stack([both, p_i + p_j - both])  # intersection and union terms, [2, P, N]
        # unit u adds into its point layer_of_unit[u]: [2, P, N] -> [2, P, L]
        sums = terms.new_zeros(2, len(self.pair_i), len(self.units)).index_add(2, self.layer_of_unit, terms)
        iou = (sums[0] + IOU_SMOOTHING) / (sums[1] + IOU_SMOOTHING)  # [P, L], equation (1)
        return iou.mean(0).sum()  # mean over pairs, sum over points

    @torch.no_grad()
    def metrics(self, layer_names: list[str], domain_names: list[str]) -> dict:
        """Per masked point, the pairwise hard IoU [D x D] and each domain's mean keep-probability;
        and the mean pairwise IoU over points (the lambda_O sweep's measure)."""
        out = {"iou": {}, "keep_probability": {}}
        for l, name in enumerate(layer_names):
            probs = self.probs(l).float().cpu()
            out["iou"][name] = hard_iou_matrix(probs).tolist()
            out["keep_probability"][name] = dict(zip(domain_names, keep_probability(probs).tolist()))
        out["mean_pairwise_iou"] = mean_pairwise_iou(list(out["iou"].values()))
        return out
