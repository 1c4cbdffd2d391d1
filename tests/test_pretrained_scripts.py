"""The scripts of the pretrained PACS study: paired differences against hand-computed values,
and the GPU script's every step on the CPU (tiny PACS-shaped zip, one epoch per run)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import paired_differences  # noqa: E402

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def headline(folder: Path, method: str, target: str, seed: int, ood: float, ind: float = 50.0) -> None:
    path = folder / "pacs" / "bb" / method / target / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"out_of_domain": ood, "in_domain": ind, "in_domain_known_domain": ind,
                                "best_epoch": 1}))


def test_paired_differences_match_hand_computed_values(tmp_path):
    for seed, (dmg, agg, mh) in enumerate([(60.0, 55.0, 50.0), (62.0, 58.0, 61.0), (58.0, 55.0, 52.0)]):
        headline(tmp_path, "dmg", "sketch", seed, dmg)
        headline(tmp_path, "aggregate", "sketch", seed, agg)
        headline(tmp_path, "multihead", "sketch", seed, mh)
    headline(tmp_path, "dmg", "photo", 0, 90.0)
    headline(tmp_path, "aggregate", "photo", 0, 91.0)
    diffs = paired_differences.paired(tmp_path, "pacs", "bb", "aggregate", "out_of_domain")
    assert diffs == {"photo": [-1.0], "sketch": [5.0, 4.0, 3.0]}
    mean, se = paired_differences.mean_se([5.0, 4.0, 3.0])
    assert mean == 4.0 and se == pytest.approx(math.sqrt(1.0 / 3))  # sample variance 1, n 3
    text = paired_differences.table(tmp_path, "pacs", "bb")
    assert "| sketch | 3 | +4.00 ± 0.58 | +5.67 ± 2.60 |" in text  # DMG - MH: 10, 1, 6
    assert "| photo | 1 | -1.00 | - |" in text
    assert "| all targets | 4 pairs | +2.75 ± 1.31 |" in text  # 5, 4, 3, -1


def tiny_pacs(carry: Path, size: int = 40) -> None:
    """PACS's layout (kfold/<domain>/<class>/<file>, 1-based split lists) with two real JPEGs per class."""
    rng = np.random.default_rng(0)
    (carry / "pacs_splits").mkdir(parents=True)
    with zipfile.ZipFile(carry / "pacs_small.zip", "w") as zf:
        for d, domain in enumerate(DOMAINS):
            lists = {"train": [], "crossval": [], "test": []}
            for label, cls in enumerate(CLASSES, 1):
                for i in range(2):
                    pixels = np.clip(rng.normal(30 * label + 20 * d, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG")
                    rel = f"{domain}/{cls}/pic_{i}.jpg"
                    zf.writestr(f"kfold/{rel}", buf.getvalue())
                    lists["train" if i == 0 else "crossval"].append(f"{rel} {label}\n")
                    lists["test"].append(f"{rel} {label}\n")
            for split, rows in lists.items():
                (carry / "pacs_splits" / f"{domain}_{split}_kfold.txt").write_text("".join(rows))


@pytest.mark.slow
def test_gpu_pretrained_script_runs_every_step_on_the_cpu(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    tiny_pacs(carry)
    env = {**os.environ, "CARRY": str(carry), "OUT": str(out), "WORK": str(tmp_path / "work"), "DEVICE": "cpu",
           "JOBS": "2", "EPOCHS_DMG": "1", "EPOCHS_BASE": "1", "IMAGE_SIZE": "32", "TARGETS": "sketch",
           "STUDY_SECONDS": "3000",  # a limit for the GPU's 10-minute call, not for a busy CPU
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_pretrained.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (out / "dmg_minus_baselines.md").read_text()
    for target in ("sketch",):
        assert f"| {target} | 1 |" in table, table
    metrics = json.loads((out / "metrics/pacs/efficientnet_lite0/dmg/sketch/seed0.json").read_text())
    assert 0 <= metrics["out_of_domain"] <= 100
    assert "DMG" in (out / "report.md").read_text()
