"""`dmg bench` on the CPU: the synthetic file, the figures and the JSON they are written to."""
import json

import pytest
import torch
from typer.testing import CliRunner

from dmgcli.cli import app
from dmgcli.h5data import SplitReader, read_info
from dmgcli.benchmarking import write_synthetic_file


def test_synthetic_file_holds_realistic_jpegs(tmp_path):
    mean_bytes = write_synthetic_file(tmp_path / "b.h5", n=12, domains=3, classes=7)
    info = read_info(tmp_path / "b.h5")
    assert info.encoding == "jpeg" and (info.height, info.width) == (256, 256) and info.domains == ("d0", "d1", "d2")
    readers = [SplitReader(tmp_path / "b.h5", d, "train") for d in info.domains]
    assert [len(r) for r in readers] == [4, 4, 4]
    image = readers[1].image(2)
    assert image.shape == (3, 256, 256) and image.float().std() > 10  # not a flat colour
    assert 5_000 < mean_bytes < 40_000  # real 256 px photos at q90: about 14 KB


def run_bench(*args):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def only_json(folder):
    files = list(folder.glob("bench-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_bench_on_the_cpu_reports_every_figure(tmp_path):
    result = run_bench("--backbone", "convnet", "--method", "dmg", "--batch-size", 4, "--steps", 2, "--warmup", 1,
                       "--eval-batch-size", 4, "--eval-steps", 1, "--domains", 3, "--classes", 7, "--workers", 1,
                       "--out", tmp_path)
    data = only_json(tmp_path)
    assert data["settings"]["backbone"] == "convnet" and data["settings"]["steps"] == 2
    assert data["device"] == "cpu" and data["torch"] == torch.__version__ and data["cpu_count"] >= 1
    for key in ("end_to_end_img_s", "resident_img_s", "method_step_img_s", "plain_step_img_s", "eval_img_s",
                "plain_eval_img_s", "resident_decode_seconds"):
        assert data[key] > 0, key
    assert data["end_to_end_vs_plain"] == pytest.approx(data["end_to_end_img_s"] / data["plain_step_img_s"])
    assert data["resident_vs_plain"] == pytest.approx(data["resident_img_s"] / data["plain_step_img_s"])
    assert 0 <= data["data_share"] < 1 and 0 <= data["loader_wait_share"] < 1
    assert "end to end / plain" in result.stdout and "resident" in result.stdout and "img/s" in result.stdout
    assert "concurrent" not in data  # only when asked


def test_bench_concurrent_runs_figure(tmp_path):
    result = run_bench("--backbone", "convnet", "--method", "aggregate", "--batch-size", 4, "--steps", 2,
                       "--warmup", 1, "--eval-batch-size", 4, "--eval-steps", 1, "--domains", 2, "--classes", 3,
                       "--workers", 0, "--augmentation", "domainnet", "--concurrent", 2, "--out", tmp_path)
    figure = only_json(tmp_path)["concurrent"]
    assert list(figure) == ["2"] and len(figure["2"]["per_run_img_s"]) == 2
    # Together over the span from the first start to the last end: at most the sum of the runs' own rates.
    assert 0 < figure["2"]["img_s"] <= sum(figure["2"]["per_run_img_s"]) * (1 + 1e-9)
    assert "2 concurrent runs" in result.stdout


def test_bench_rejects_bad_settings(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--steps", "0", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "must be positive" in result.output
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--backbone", "vgg", "--steps", "1",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1 and "unknown backbone 'vgg'" in result.output
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--concurrent", "0", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--concurrent counts must be positive" in result.output
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--compile-mode", "fast", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "train.compile_mode must be one of" in result.output
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_bench_defaults_run_on_the_cpu(tmp_path):
    """The defaults finish on a CPU (their duration is a benchmark figure, not a test: CI machines are shared)."""
    run_bench("--out", tmp_path)
    data = only_json(tmp_path)
    assert data["settings"]["backbone"] == "resnet18" and data["settings"]["batch_size"] == 8
