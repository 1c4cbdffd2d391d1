"""Every method on every backbone at a tiny input: shapes, finite loss, a step changes weights,
and DMG's prediction modes against their definitions."""
import pytest
import torch

from dmgcli.backbones import BACKBONES, build_backbone, split_at
from dmgcli.errors import DmgError
from dmgcli.methods import DMG, METHODS, MethodConfig, build_method

NUM_CLASSES, NUM_DOMAINS = 7, 3
OPTIMIZERS = {"lr": 1e-4, "mask_lr": 1e-4, "weight_decay": 0.0}  # MethodConfig takes them from a schedule
# AlexNet's conv stack needs at least 63 px; the others run at 32.
SIZES = {"alexnet": 64, "resnet18": 32, "resnet50": 32, "convnet": 16, "efficientnet_lite0": 32,
         "efficientnet_lite0_mlp": 32}


def batch(size: int, n: int = 6):
    torch.manual_seed(1)
    x = torch.rand(n, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (n,))
    d = torch.arange(n) % NUM_DOMAINS
    return x, y, d


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_every_backbone(method, backbone):
    torch.manual_seed(0)
    m = build_method(method, MethodConfig(backbone=backbone, num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS, lr=1e-3,
                                          mask_lr=1e-4, weight_decay=0.0))
    x, y, d = batch(SIZES[backbone])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stats = m.update(x, y, d)
    assert torch.isfinite(stats["loss"])
    changed = [n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "an update step must change parameters"
    if method == "dmg":
        assert all(f"masks.logits.{i}" in changed for i in range(len(m.masks)))
    m.eval()
    with torch.no_grad():
        for mode in ("average", "known_domain", "hard"):
            out = m.predict(x, mode=mode, domains=d)
            assert out.shape == (len(x), NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_dmg_gradient_reaches_every_mask_logit(backbone):
    torch.manual_seed(0)
    m = build_method("dmg", MethodConfig(backbone=backbone, num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS,
                                         **OPTIMIZERS))
    x, y, d = batch(SIZES[backbone], n=9)
    loss, _ = m.objective(x, y, d)
    loss.backward()
    for logits in m.masks.logits:
        assert logits.grad is not None
        assert (logits.grad != 0).all(), "the overlap loss alone touches every unit of every domain"


def test_reference_mask_points_and_units():
    expected = {"alexnet": [9216, 4096, 4096], "resnet18": [128, 256, 512], "resnet50": [512, 1024, 2048],
                "efficientnet_lite0": [112, 192, 1280], "efficientnet_lite0_mlp": [1280, 512, 512]}
    for name, units in expected.items():
        bb = build_backbone(name, NUM_CLASSES)
        _, segments, got = split_at(bb, bb.default_mask_points)
        assert got == units and len(segments) == 3


def test_dmg_turns_dropout_off_and_baselines_keep_it():
    dmg = build_method("dmg", MethodConfig(backbone="alexnet", num_classes=2, num_domains=2, **OPTIMIZERS))
    agg = build_method("aggregate", MethodConfig(backbone="alexnet", num_classes=2, num_domains=2, **OPTIMIZERS))
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in dmg.modules())
    assert any(isinstance(mod, torch.nn.Dropout) for mod in agg.modules())


def make_dmg(**kw) -> DMG:
    torch.manual_seed(0)
    m = build_method("dmg", MethodConfig(backbone="convnet", num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS,
                                         **OPTIMIZERS, **kw))
    with torch.no_grad():  # spread the keep-probabilities so domains really differ
        for logits in m.masks.logits:
            logits.normal_(0, 2)
    return m.eval()


def test_average_equals_mean_of_per_domain_outputs():
    m = make_dmg()
    x, _, _ = batch(16)
    with torch.no_grad():
        per_domain = torch.stack([m.predict(x, "known_domain", torch.full((len(x),), k)) for k in range(NUM_DOMAINS)])
        assert torch.allclose(m.predict(x, "average"), per_domain.mean(0), atol=1e-5)
        probs = build_method("dmg", MethodConfig(backbone="convnet", num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS,
                                                 **OPTIMIZERS))
        probs.average_over = "probs"  # evaluate.average_over, as stages/evaluate.py sets it
        probs.load_state_dict(m.state_dict())
        probs.eval()
        assert torch.allclose(probs.predict(x, "average"), per_domain.softmax(-1).mean(0), atol=1e-5)


def test_known_domain_uses_each_samples_own_mask():
    m = make_dmg()
    x, _, d = batch(16)
    with torch.no_grad():
        joint = m.predict(x, "known_domain", d)
        for i in range(len(x)):
            alone = m.predict(x[i:i + 1], "known_domain", d[i:i + 1])
            assert torch.allclose(joint[i], alone[0], atol=1e-5)
        other = m.predict(x, "known_domain", (d + 1) % NUM_DOMAINS)
        assert not torch.allclose(joint, other)


def test_trunk_runs_once_per_batch_at_test_time():
    m = make_dmg()
    calls = []
    m.trunk.register_forward_hook(lambda *args: calls.append(1))
    x, _, _ = batch(16)
    with torch.no_grad():
        m.predict(x, "average")
    assert len(calls) == 1


def test_registries_raise_listing_valid_names():
    with pytest.raises(DmgError, match="valid: .*dmg"):
        build_method("nope", MethodConfig(backbone="convnet", num_classes=2, num_domains=2, **OPTIMIZERS))
    with pytest.raises(DmgError, match="valid: .*resnet18"):
        build_backbone("vgg", 2)
    with pytest.raises(DmgError, match="unknown mask point"):
        build_method("dmg", MethodConfig(backbone="convnet", num_classes=2, num_domains=2, mask_points=("nope",),
                                               **OPTIMIZERS))


def test_pretrained_without_weights_file_says_where_to_put_it(tmp_path):
    with pytest.raises(DmgError, match="download https://.*to that path"):
        build_backbone("resnet18", 2, pretrained=True, pretrained_path=str(tmp_path / "missing.pth"))


def test_pretrained_loads_a_local_weights_file(tmp_path):
    from torchvision import models
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    bb = build_backbone("resnet18", 2, pretrained=True, pretrained_path=str(path))
    conv1 = dict(bb.layers)["conv1"]
    assert torch.equal(conv1.weight, reference.conv1.weight)


def test_hard_mode_applies_the_thresholded_own_mask():
    m = make_dmg()
    x, _, d = batch(16)
    with torch.no_grad():
        hard = m.predict(x, "hard", d)
        saved = [l.clone() for l in m.masks.logits]
        for logits in m.masks.logits:  # +-20 logits: soft masks equal to the 0/1 threshold of the originals
            logits.copy_(torch.where(logits > 0, 20.0, -20.0))
        assert torch.allclose(hard, m.predict(x, "known_domain", d), atol=1e-4)
        for logits, original in zip(m.masks.logits, saved):
            logits.copy_(original)


def test_training_samples_each_samples_own_domain_mask():
    m = make_dmg()
    m.train()
    with torch.no_grad():  # domain 0 keeps everything, the others drop everything at the first mask point
        m.masks.logits[0].copy_(torch.full_like(m.masks.logits[0], -30.0))
        m.masks.logits[0][0] = 30.0
    seen = []
    m.segments[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x, y, d = batch(16)
    m.objective(x, y, d)
    kept = seen[0].flatten(1).abs().sum(1) > 0  # [B]: did any activation survive the mask?
    assert torch.equal(kept, d == 0)
