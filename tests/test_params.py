"""Hyperparameters declared once: dmgcli/params.py's dataclasses (and DEFAULT_SCHEDULES) are the
table; params.yaml writes out exactly those values, MethodConfig keeps no copies of its own; and
`train.mask_init: constant` starts every mask logit at `train.mask_init_value`."""
import dataclasses
import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO, write_params
from dmgcli.checkpoint_values import check_config
from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.methods import MethodConfig, build_method
from dmgcli.params import DEFAULT_SCHEDULES, Params, TrainParams, load_params
from dmgcli.params_io import from_dict


def differences(written: dict, declared: Params) -> list[str]:
    """Where a params.yaml mapping differs from the declared params: keys it leaves out or that
    are not declared, and values that differ (each train.schedules entry compared whole)."""
    return _differences(written, from_dict(Params, written), declared, "")


def _differences(written: dict, loaded, declared, prefix: str) -> list[str]:
    names = [f.name for f in dataclasses.fields(declared)]
    found = [f"unknown {prefix}{key}" for key in written if key not in names]
    for name in names:
        key, value, read = f"{prefix}{name}", getattr(declared, name), getattr(loaded, name)
        if name not in written:
            found.append(f"missing {key}")
        elif dataclasses.is_dataclass(value):
            found += _differences(written[name], read, value, f"{key}.")
        elif isinstance(value, dict) and value:  # train.schedules: every entry, each compared whole
            found += [f"missing {key}.{entry}" for entry in value if entry not in read]
            found += [f"unknown {key}.{entry}" for entry in read if entry not in value]
            found += [f"differs {key}.{entry}" for entry in value if entry in read and read[entry] != value[entry]]
        elif read != value:
            found.append(f"differs {key}")
    return found


def repo_params_yaml() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_params_yaml_writes_every_declared_default_exactly():
    assert differences(repo_params_yaml(), Params()) == []
    assert set(repo_params_yaml()["train"]["schedules"]) == set(DEFAULT_SCHEDULES)


def test_a_value_changed_on_either_side_is_found():
    written = repo_params_yaml()
    written["train"]["schedules"]["digits"]["mask_lr"] = 1e-3
    written["train"]["overlap_lambda"] = 0.2
    del written["report"]["sweep"]["epochs"]
    assert differences(written, Params()) == ["differs train.overlap_lambda", "differs train.schedules.digits",
                                              "missing report.sweep.epochs"]
    declared = Params(train=dataclasses.replace(TrainParams(), batch_size=32))
    assert differences(repo_params_yaml(), declared) == ["differs train.batch_size"]
    schedules = {**DEFAULT_SCHEDULES, "pacs": dataclasses.replace(DEFAULT_SCHEDULES["pacs"], weight_decay=0.0)}
    declared = Params(train=dataclasses.replace(TrainParams(), schedules=schedules))
    assert differences(repo_params_yaml(), declared) == ["differs train.schedules.pacs"]


def test_method_config_keeps_no_hyperparameters_of_its_own():
    with pytest.raises(TypeError, match="lr.*mask_lr.*weight_decay"):
        MethodConfig(backbone="convnet", num_classes=2, num_domains=2)
    # not copies: mask_init_value (None: uniform init, or a config from before the field) and
    # trunk_views (1 unless the trunk is frozen)
    shared = ("pretrained", "pretrained_path", "mask_points", "mask_init", "overlap_lambda", "frozen_trunk", "image_size")
    defaults = {f.name: f.default for f in dataclasses.fields(MethodConfig)}
    for name in shared:
        assert defaults[name] == getattr(TrainParams(), name), name


def test_mask_init_value_needs_mask_init_constant(tmp_path):
    write_params(tmp_path, train={"mask_init": "uniform", "mask_init_value": 2.0})
    with pytest.raises(DmgError, match="train.mask_init_value 2.0 takes effect only with train.mask_init: constant"):
        load_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("dmg: error: params: train.mask_init_value 2.0 takes effect only with"), lines[0]
    write_params(tmp_path, train={"mask_init": "constant", "mask_init_value": "open"})
    with pytest.raises(DmgError, match="train.mask_init_value must be a number"):
        load_params(tmp_path / "params.yaml")


def test_constant_mask_init_starts_every_mask_at_its_value(digits_dir, tmp_path):
    """params.yaml -> dmg train -> the run's config -> DomainMasks: keep-probability sigmoid(2.0)
    everywhere at step 0 (and after an epoch at a mask lr of 1e-12, still)."""
    params = write_params(tmp_path, train={"mask_init": "constant", "mask_init_value": 2.0})
    (tmp_path / "data").symlink_to(digits_dir / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--target", "rot30", "--method", "dmg",
                                      "--epochs", "1", "--mask-lr", "1e-12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["mask_init"] == "constant" and config["mask_init_value"] == 2.0
    start = build_method("dmg", MethodConfig(**config)).masks.all_probs()
    assert torch.equal(start, torch.full_like(start, torch.sigmoid(torch.tensor(2.0)).item()))
    trained = torch.load(out / "best.pt", weights_only=True)["model"]
    logits = [v for k, v in trained.items() if k.startswith("masks.logits.")]
    assert logits and all(torch.allclose(v, torch.full_like(v, 2.0), atol=1e-6) for v in logits)
    # part of the run's settings, as mask_init is: a resume with another value is refused
    params = write_params(tmp_path, train={"mask_init": "constant", "mask_init_value": 3.0})
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--target", "rot30", "--method", "dmg",
                                      "--epochs", "2", "--mask-lr", "1e-12", "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "config.mask_init_value=2.0, not 3.0" in result.output, result.output


def test_a_config_written_before_mask_init_value_still_loads():
    old = {k: v for k, v in dataclasses.asdict(MethodConfig(backbone="convnet", num_classes=10, num_domains=3,
                                                            **DEFAULT_SCHEDULES["digits"].optimizer_settings())).items()
           if k != "mask_init_value"}
    check_config(old, "old.pt", "")  # a checkpoint's config is checked before anything is built from it
    assert build_method("dmg", MethodConfig(**old)).config.mask_init_value is None
    constant = build_method("dmg", MethodConfig(**{**old, "mask_init": "constant"}))  # it meant logit 0
    assert all(math.isclose(p, 0.5) for p in constant.masks.all_probs().flatten().tolist())
