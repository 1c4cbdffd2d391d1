"""The DMG core math against hand-computed values, and against an oracle.

dmgcli/core.py holds each operation once, batched over masked points and domain pairs as
training runs it. The oracle below writes the same maths per pair and per point, the way
equation (1) and section 2 of the paper state it; it is checked against hand-computed
values, and the production code against it.
"""
import itertools

import pytest
import torch

from dmgcli.core import (IOU_SMOOTHING, DomainMasks, apply_mask, domain_pairs, hard_iou_matrix, keep_probability,
                         mean_pairwise_iou, straight_through_bernoulli)

# ----------------------------------------------------------------------------- the oracle


def soft_iou(p_i: torch.Tensor, p_j: torch.Tensor, eps: float = IOU_SMOOTHING) -> torch.Tensor:
    """Soft IoU of two mask distributions over the last dimension, equation (1):

        sIoU(m_i, m_j) = (m_i . m_j) / sum_k (m_i + m_j - m_i * m_j)

    p_i, p_j: [..., U] keep-probabilities in [0, 1] -> [...]; `eps` smooths both terms."""
    intersection = (p_i * p_j).sum(-1)
    union = (p_i + p_j - p_i * p_j).sum(-1)
    return (intersection + eps) / (union + eps)


def overlap_loss(probs: torch.Tensor) -> torch.Tensor:
    """The overlap term of one masked point: sIoU averaged over all pairs of domains. probs: [D, U]."""
    pairs = domain_pairs(probs.shape[0])
    if not pairs:
        return probs.new_zeros(())
    i, j = zip(*pairs)
    return soft_iou(probs[list(i)], probs[list(j)]).mean()


def soft_mask(masks: DomainMasks, layer: int, domains: torch.Tensor) -> torch.Tensor:
    """Each sample's own-domain keep-probabilities at one point: domains [B] -> [B, U]."""
    return masks.probs(layer)[domains]


def hard_mask(masks: DomainMasks, layer: int, domains: torch.Tensor) -> torch.Tensor:
    """Each sample's own-domain mask thresholded at 0.5 at one point: domains [B] -> [B, U]."""
    return (masks.probs(layer)[domains] > 0.5).float()


# ----------------------------------------------------------------------------- hand-computed values (oracle and core)


def test_soft_iou_of_binary_masks_is_jaccard():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert soft_iou(a, a).item() == pytest.approx(1.0)
    assert soft_iou(a, 1 - a).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_iou(a, b).item() == pytest.approx(1 / 3, abs=1e-6)  # |{0}| / |{0,1,2}|


def test_soft_iou_hand_computed_soft_values():
    a = torch.tensor([0.5, 1.0])
    b = torch.tensor([0.5, 0.0])
    # intersection 0.25; union (0.5 + 0.5 - 0.25) + (1 + 0 - 0) = 1.75
    assert soft_iou(a, b).item() == pytest.approx(0.25 / 1.75, rel=1e-5)


def test_soft_iou_symmetric_and_bounded():
    torch.manual_seed(0)
    p = torch.rand(50, 2, 17)
    forward, backward = soft_iou(p[:, 0], p[:, 1]), soft_iou(p[:, 1], p[:, 0])
    assert torch.allclose(forward, backward)
    assert (forward >= 0).all() and (forward <= 1).all()


def test_overlap_loss_averages_over_pairs():
    probs = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # pairs (0,1): 1, (0,2): 0, (1,2): 0 -> mean 1/3
    assert overlap_loss(probs).item() == pytest.approx(1 / 3, abs=1e-6)
    assert domain_pairs(4) == list(itertools.combinations(range(4), 2))
    assert overlap_loss(torch.rand(1, 5)).item() == 0.0  # one domain: no pairs


def test_hard_iou_matrix_thresholds_at_half():
    probs = torch.tensor([[0.9, 0.6, 0.1, 0.2], [0.8, 0.4, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    iou = hard_iou_matrix(probs)
    # binary: [1,1,0,0], [1,0,1,0], [0,0,0,0]
    assert iou[0, 1].item() == pytest.approx(1 / 3)
    assert iou[0, 0].item() == 1.0 and iou[2, 2].item() == 1.0  # an empty mask equals itself
    assert iou[0, 2].item() == 0.0
    assert torch.equal(iou, iou.T)


def test_mean_pairwise_iou_averages_distinct_pairs_then_points():
    three = [[1.0, 0.2, 0.5], [0.2, 1.0, 0.8], [0.5, 0.8, 1.0]]  # pairs 0.2, 0.5, 0.8: mean 0.5
    two = [[1.0, 0.1], [0.1, 1.0]]
    assert mean_pairwise_iou([three]) == pytest.approx(0.5)
    assert mean_pairwise_iou([three, two]) == pytest.approx(0.3)  # (0.5 + 0.1) / 2: the diagonal never counts
    assert mean_pairwise_iou([[[1.0]]]) is None  # one domain: no pair


def test_keep_probability_is_mean_per_domain():
    probs = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    assert keep_probability(probs).tolist() == [0.5, 0.5]


def test_straight_through_forward_is_binary_and_gradient_is_identity():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    probs = torch.sigmoid(logits)
    sample = straight_through_bernoulli(probs)
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn(4, 6)
    (sample * weights).sum().backward()
    expected = weights * probs.detach() * (1 - probs.detach())  # d/dlogits of sum(w * sigmoid(logits))
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_apply_mask_broadcasts_per_channel_over_space():
    x = torch.ones(2, 3, 4, 5)
    mask = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    out = apply_mask(x, mask)
    assert out.shape == x.shape
    assert torch.equal(out[0, 1], torch.zeros(4, 5)) and torch.equal(out[0, 2], torch.full((4, 5), 0.5))
    assert torch.equal(out[1, 0], torch.zeros(4, 5))
    flat = apply_mask(torch.ones(2, 3), mask)
    assert torch.equal(flat, mask)


def test_domain_masks_shapes_init_and_every_logit_gets_gradient():
    torch.manual_seed(0)
    masks = DomainMasks([8, 5], num_domains=3, init="uniform")
    for logits in masks.logits:
        assert logits.shape[0] == 3 and (logits >= 0).all() and (logits < 1).all()  # U[0, 1)
    domains = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = sum(m.sum() for m in masks.batch_masks("train", domains)) + masks.overlap()
    loss.backward()
    for logits in masks.logits:
        assert logits.grad is not None and (logits.grad != 0).all()


def test_domain_masks_soft_and_hard_select_own_domain():
    masks = DomainMasks([3], num_domains=2, init="constant", init_value=0.0)
    with torch.no_grad():
        masks.logits[0].copy_(torch.tensor([[5.0, -5.0, 5.0], [-5.0, 5.0, 0.2]]))
    d = torch.tensor([1, 0])
    (soft,) = masks.batch_masks("soft", d)
    assert torch.allclose(soft, torch.sigmoid(masks.logits[0].detach())[d])
    assert masks.batch_masks("hard", d)[0].tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    metrics = masks.metrics(["layer"], ["a", "b"])
    assert metrics["iou"]["layer"][0][1] == pytest.approx(1 / 3)
    assert set(metrics["keep_probability"]["layer"]) == {"a", "b"}
    assert metrics["mean_pairwise_iou"] == mean_pairwise_iou([metrics["iou"]["layer"]])


# ----------------------------------------------------------------------------- production against the oracle


def test_batched_overlap_equals_the_per_layer_sum_and_its_gradient():
    torch.manual_seed(1)
    masks = DomainMasks([7, 3, 12], num_domains=4, init="uniform").double()
    with torch.no_grad():
        for logits in masks.logits:
            logits.normal_(0, 2)  # far from the init, so every pair differs
    per_layer = sum(overlap_loss(masks.probs(l)) for l in range(len(masks)))
    batched = masks.overlap()
    assert batched.item() == pytest.approx(per_layer.item(), rel=1e-12)
    grads_per_layer = torch.autograd.grad(per_layer, list(masks.logits))
    grads_batched = torch.autograd.grad(batched, list(masks.logits))
    for a, b in zip(grads_per_layer, grads_batched):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # Hand-computed: two domains, one unit each at one point, p = 0.5 and 0.5:
    # IoU = (0.25 + eps) / (0.5 + 0.5 - 0.25 + eps), about 1/3.
    one = DomainMasks([1], num_domains=2, init="constant", init_value=0.0)
    assert one.overlap().item() == pytest.approx((0.25 + 1e-6) / (0.75 + 1e-6), rel=1e-6)
    assert DomainMasks([4], num_domains=1, init="uniform").overlap().item() == 0.0


def test_batch_masks_equal_the_per_point_masks():
    torch.manual_seed(2)
    masks = DomainMasks([5, 2, 6], num_domains=3, init="uniform")
    with torch.no_grad():
        for logits in masks.logits:
            logits.normal_(0, 2)
    d = torch.tensor([2, 0, 1, 1, 0])
    for kind, per_point in (("soft", soft_mask), ("hard", hard_mask)):
        batched = masks.batch_masks(kind, d)
        assert [tuple(m.shape) for m in batched] == [(5, 5), (5, 2), (5, 6)]
        assert all(torch.equal(b, per_point(masks, l, d)) for l, b in enumerate(batched)), kind
    sampled = masks.batch_masks("train", d)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in sampled)
    # Straight-through: the gradient of sum(mask) reaches logit (d, u) once per sample of domain d,
    # scaled by sigmoid'(logit), as it does through the per-point masks.
    grads = torch.autograd.grad(sum(m.sum() for m in sampled), list(masks.logits))
    counts = torch.bincount(d, minlength=3).double()[:, None]
    for logits, grad in zip(masks.logits, grads):
        p = torch.sigmoid(logits.detach()).double()
        assert torch.allclose(grad.double(), counts * p * (1 - p), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown mask kind"):
        masks.batch_masks("noisy", d)
