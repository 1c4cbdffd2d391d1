"""Resident datasets: the whole split decoded once on the device gives exactly the batches of
the streamed path, so a run trains to the same result either way; the automatic choice
follows the free memory; the default worker count follows the machine."""
import json

import pytest
import torch
from typer.testing import CliRunner

from dmgcli import data
from dmgcli.cli import app
from dmgcli.data import BatchStream, DomainImages, choose_resident, default_workers, one_ahead
from dmgcli.h5data import FileInfo, SplitReader, write_split, writing
from dmgcli.params import TrainParams
from dmgcli.params_io import override


@pytest.fixture(scope="module")
def jpeg_file(tmp_path_factory):
    """A dmg file of JPEGs: 2 domains x 9 train images of 24 x 24 px, distinct labels."""
    from torchvision.io import encode_jpeg

    path = tmp_path_factory.mktemp("resident") / "tiny.h5"
    info = FileInfo(dataset="tiny", encoding="jpeg", height=24, width=24, channels=3, classes=("a", "b", "c"),
                    domains=("d0", "d1"), provenance={})
    g = torch.Generator().manual_seed(0)
    with writing(path, info) as f:
        for domain in info.domains:
            images = (torch.rand(9, 3, 24, 24, generator=g) * 255).to(torch.uint8)
            write_split(f, domain, "train", [encode_jpeg(im, quality=90).numpy().tobytes() for im in images],
                        [i % 3 for i in range(9)], [f"{domain}/{i}.jpg" for i in range(9)])
    return path


def image_set(path, split="train", domains=("d0", "d1")) -> DomainImages:
    return DomainImages([SplitReader(path, d, split) for d in domains], list(range(len(domains))))


def all_batches(stream: BatchStream, seed=3, epochs=2):
    return [b for e in range(epochs) for b in stream.shuffled(seed, e)] + list(stream.batches())


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya, da), (xb, yb, db) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.uint8
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(da, db)


@pytest.mark.parametrize("workers", [0, 2])
def test_resident_jpeg_split_gives_the_streamed_batches(jpeg_file, workers):
    cpu = torch.device("cpu")
    resident = BatchStream(image_set(jpeg_file), 4, cpu, workers, resident="always")
    streamed = BatchStream(image_set(jpeg_file), 4, cpu, workers, resident="never")
    assert resident.resident and resident.pixels.shape == (18, 3, 24, 24)
    assert not streamed.resident and streamed.pixels is None
    assert resident._loader is None  # the decode workers are gone once the split is held
    assert_same_batches(all_batches(resident), all_batches(streamed))


def test_resident_digits_give_the_streamed_batches(digits_dir):
    h5 = digits_dir / "data" / "prepared" / "digits.h5"
    cpu = torch.device("cpu")
    domains = ("rot0", "rot45", "rot75")
    resident = BatchStream(image_set(h5, "val", domains), 32, cpu, 0, resident="auto")
    streamed = BatchStream(image_set(h5, "val", domains), 32, cpu, 1, resident="never")
    assert resident.resident  # a few hundred KB: always fits
    assert_same_batches(all_batches(resident), all_batches(streamed))


def test_auto_follows_the_free_memory(jpeg_file, monkeypatch):
    cpu = torch.device("cpu")
    needed = image_set(jpeg_file).decoded_bytes()
    assert needed == 18 * 3 * 24 * 24
    monkeypatch.setattr(data, "available_memory", lambda device: 2 * needed)  # exactly RESIDENT_SHARE fits
    assert choose_resident("auto", needed, cpu) and BatchStream(image_set(jpeg_file), 4, cpu, 0).resident
    monkeypatch.setattr(data, "available_memory", lambda device: 2 * needed - 1)
    assert not choose_resident("auto", needed, cpu) and not BatchStream(image_set(jpeg_file), 4, cpu, 0).resident
    assert choose_resident("always", needed, cpu) and not choose_resident("never", 0, cpu)
    with pytest.raises(Exception, match="unknown resident mode 'sometimes'; valid: auto, always, never"):
        choose_resident("sometimes", needed, cpu)


def test_available_memory_on_the_cpu_is_positive_and_below_the_total():
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < data.available_memory(torch.device("cpu")) <= total


def test_params_type_resident_and_workers():
    params = override(TrainParams(), resident="never", workers=3)
    assert params.resident == "never" and params.workers == 3 and TrainParams().workers is None
    with pytest.raises(Exception, match="train.resident must be one of auto, always, never, got 'yes'"):
        override(TrainParams(), resident="yes")
    with pytest.raises(Exception, match="train.compile_mode must be one of"):
        override(TrainParams(), compile_mode="fastest")


def test_default_workers_follow_the_machine(monkeypatch):
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    assert default_workers() == 2
    monkeypatch.setattr(data.os, "cpu_count", lambda: 64)
    assert default_workers() == 8
    monkeypatch.setattr(data.os, "cpu_count", lambda: None)
    assert default_workers() == 1


def test_one_ahead_makes_the_next_item_before_handing_out_the_current():
    made = []

    def items():
        for i in range(3):
            made.append(i)
            yield i

    seen = []
    for i in one_ahead(items()):
        seen.append((i, list(made)))
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
    assert list(one_ahead(iter([]))) == []


def train_and_evaluate(digits_dir, out, resident):
    params = str(digits_dir / "params.yaml")
    common = ["--params", params, "--target", "rot15", "--method", "dmg", "--device", "cpu"]
    result = CliRunner().invoke(app, ["train", *common, "--epochs", "2", "--out", str(out), "--resident", resident,
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    metrics = out / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", *common, "--run", str(out), "--out", str(metrics)])
    assert result.exit_code == 0, result.output
    return json.loads(metrics.read_text())


def without_timing(log) -> list[list[str]]:
    return [row.split(",")[:6] for row in log.read_text().splitlines()]  # drop img/s and seconds


def test_resident_and_streamed_training_end_identical(digits_dir, tmp_path):
    resident = train_and_evaluate(digits_dir, tmp_path / "resident", "always")
    streamed = train_and_evaluate(digits_dir, tmp_path / "streamed", "never")
    assert without_timing(tmp_path / "resident" / "log.csv") == without_timing(tmp_path / "streamed" / "log.csv")
    assert resident == streamed
    a = torch.load(tmp_path / "resident" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "streamed" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
