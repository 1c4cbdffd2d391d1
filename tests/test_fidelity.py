"""Fidelity to the reference code: the evaluated network is the trained one, and the
reference's defaults (head init, schedules on the masks, mask weight decay, Multi-Headed
validation) hold."""
import dataclasses

import pytest
import torch

import stages.evaluate as evaluate_stage
import stages.train as train_stage
from dmgcli.backbones import HEAD_INIT_STD, IMAGENET_MEAN, build_backbone
from dmgcli.datasets import get_dataset
from dmgcli.engine import make_scheduler
from dmgcli.methods import DMG, MethodConfig, MultiHead, build_method, reference_head_init
from dmgcli.params import DEFAULT_SCHEDULES, EvaluateParams, TrainParams, load_params

SOURCES = ("rot0", "rot15")  # two sources keep the resnet18 runs short


def capture_built_methods(monkeypatch, module) -> list:
    """Record every method `module` builds (the live object, as it is at the end of the stage)."""
    built = []
    original = module.build_method

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(module, "build_method", build)
    return built


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory):
    """A file in torchvision's ImageNet state-dict format (random weights: only the format matters)."""
    from torchvision import models

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18-standin.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("pretrained", [True, False], ids=["pretrained", "scratch"])
@pytest.mark.parametrize("method", ["dmg", "multihead"])
def test_evaluate_computes_the_logits_of_the_trained_model(digits_dir, tmp_path, monkeypatch, standin_weights,
                                                           pretrained, method):
    params = load_params(digits_dir / "params.yaml")
    train_params = dataclasses.replace(params.train, target="rot30", sources=SOURCES, method=method,
                                       backbone="resnet18", epochs=1, batch_size=32, pretrained=pretrained,
                                       pretrained_path=str(standin_weights) if pretrained else None, device="cpu")
    info = get_dataset("digits")
    trained = capture_built_methods(monkeypatch, train_stage)
    folder = train_stage.train(info, params.data_dir, train_params, out_dir=tmp_path / "run", quiet=True)
    evaluated = capture_built_methods(monkeypatch, evaluate_stage)
    evaluate_stage.evaluate(info, params.data_dir, train_params, EvaluateParams(device="cpu"), run=folder,
                            out=tmp_path / "metrics.json")
    (at_end_of_training,), (as_evaluated,) = trained, evaluated
    normalize = as_evaluated.trunk[0]
    expected_mean = IMAGENET_MEAN if pretrained else (0.5, 0.5, 0.5)
    assert torch.allclose(normalize.mean.flatten(), torch.tensor(expected_mean))

    torch.manual_seed(0)
    x, d = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 0, 1, 0, 1])
    at_end_of_training.eval(), as_evaluated.eval()
    with torch.no_grad():
        for mode in ("average", "known_domain"):
            assert torch.equal(at_end_of_training.predict(x, mode, d), as_evaluated.predict(x, mode, d)), mode


def test_normalisation_statistics_travel_in_the_checkpoint():
    net = build_method("aggregate", MethodConfig(backbone="convnet", num_classes=10, num_domains=2, lr=1e-4,
                                                 mask_lr=1e-4, weight_decay=0.0))
    state = net.state_dict()
    assert torch.equal(state["net.0.mean"].flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert "net.0.std" in state


def test_evaluation_build_does_not_read_the_weights_file(tmp_path):
    """A checkpoint replaces every weight; building for it must not need the ImageNet file."""
    config = MethodConfig(backbone="resnet18", num_classes=7, num_domains=3, pretrained=True,
                          pretrained_path=str(tmp_path / "absent.pth"), lr=1e-4, mask_lr=1e-4, weight_decay=0.0)
    method = build_method("dmg", config, load_weights=False)
    assert torch.allclose(method.trunk[0].mean.flatten(), torch.tensor(IMAGENET_MEAN))


@pytest.mark.parametrize("backbone,head", [("resnet18", "fc"), ("alexnet", "classifier.6")])
def test_a_head_replacing_a_pretrained_one_starts_as_the_references(backbone, head):
    """N(0, 0.001) where the reference used it (DomainNet, PACS Multi-Headed), PyTorch's default
    elsewhere (PACS Aggregate and DMG: PARAM_INIT standard)."""
    torch.manual_seed(0)
    normal = dict(build_backbone(backbone, 345, pretrained=True, load_weights=False, head_init="normal").layers)[head]
    assert torch.count_nonzero(normal.bias) == 0
    assert abs(normal.weight.std().item() - HEAD_INIT_STD) < 0.1 * HEAD_INIT_STD
    default = dict(build_backbone(backbone, 345, pretrained=True, load_weights=False).layers)[head]
    assert default.weight.std().item() > 5 * HEAD_INIT_STD  # PyTorch default U(+-1/sqrt(in)): std 0.009 at 4096 inputs
    for dataset, method, expected_normal in [("pacs", "multihead", True), ("pacs", "dmg", False),
                                              ("pacs", "aggregate", False), ("domainnet", "aggregate", True)]:
        config = MethodConfig(backbone=backbone, num_classes=345, num_domains=3, pretrained=True,
                              head_init=reference_head_init(dataset, method, True), lr=1e-4, mask_lr=1e-4,
                              weight_decay=0.0)
        built = build_method(method, config, load_weights=False)
        heads = built.heads if method == "multihead" else [
            dict(built.named_modules())[n] for n, m in built.named_modules() if m is built_head(built)]
        assert all((h.weight.std().item() < 2 * HEAD_INIT_STD) == expected_normal for h in heads), (dataset, method)


def built_head(method):
    """The last linear layer of a built Aggregate or DMG: its classifier head."""
    return [m for m in method.modules() if isinstance(m, torch.nn.Linear)][-1]


def lrs(method):
    return [opt.param_groups[0]["lr"] for opt in method.optimizers]


@pytest.mark.parametrize("dataset,masks_decay", [("domainnet", True), ("pacs", False)])
def test_schedule_decays_the_masks_where_the_reference_did(dataset, masks_decay):
    schedule = DEFAULT_SCHEDULES[dataset]
    method = build_method("dmg", MethodConfig(backbone="convnet", num_classes=10, num_domains=3, lr=1e-4,
                                              mask_lr=1e-2, weight_decay=0.0))
    scheduler = make_scheduler(method.optimizers, schedule)
    assert scheduler.unit == ("step" if dataset == "domainnet" else "epoch")
    for _ in range(1000):
        scheduler.step()
    network_factor = (1 + 1e-4 * 1000) ** -0.75 if dataset == "domainnet" else 0.99 ** 1000
    assert lrs(method)[0] == pytest.approx(1e-4 * network_factor)
    assert lrs(method)[1] == pytest.approx(1e-2 * network_factor if masks_decay else 1e-2)
    state = scheduler.state_dict()
    fresh = build_method("dmg", MethodConfig(backbone="convnet", num_classes=10, num_domains=3, lr=1e-4,
                                             mask_lr=1e-2, weight_decay=0.0))
    for opt, saved in zip(fresh.optimizers, method.optimizers):  # a resume restores both, as dmgcli/runs.py restore does
        opt.load_state_dict(saved.state_dict())
    again = make_scheduler(fresh.optimizers, schedule)
    again.load_state_dict(state)
    again.step(), scheduler.step()
    assert again.state_dict() == scheduler.state_dict() and lrs(fresh) == lrs(method)


def test_masks_get_the_networks_weight_decay():
    method = build_method("dmg", MethodConfig(backbone="convnet", num_classes=10, num_domains=3, lr=1e-4, mask_lr=1e-4,
                                              weight_decay=1e-5))
    network, masks = method.optimizers
    assert network.defaults["weight_decay"] == masks.defaults["weight_decay"] == 1e-5
    assert {id(p) for p in masks.param_groups[0]["params"]} == {id(p) for p in method.masks.parameters()}


def test_validation_modes_follow_the_reference():
    assert MultiHead.validation_mode == "known_domain"  # each source scored with its own head
    assert DMG.validation_mode == "hard"  # own-domain mask thresholded at 0.5
    assert TrainParams().schedules["domainnet"].decay_masks and not TrainParams().schedules["pacs"].decay_masks
