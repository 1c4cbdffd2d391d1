"""Folder datasets (<root>/<domain>/<class>/<image>) declared in params.yaml, through the CLI:
download -> preprocess -> train -> evaluate -> report; splits; every kind of bad input."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_params
from dmgcli.datasets import get_dataset
from dmgcli.datasets.folder import fraction_split, holdout_split
from dmgcli.h5data import SplitReader, read_info
from stages.info import describe
from test_cli import dmg, one_line_error

DOMAINS = ("hospital_a", "hospital_b", "hospital_c")
CLASSES = ("cat", "dog", "fox")
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


def make_images(root: Path, domains=DOMAINS, classes=CLASSES, per_class: int = 30, size: int = 16) -> Path:
    """Noisy class colours, a brightness shift per domain: learnable, and each domain looks different."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(domains):
        for cls in classes:
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0, 25, (size, size, 3))
                pixels = np.clip(np.array(COLOURS.get(cls, (120, 120, 120))) + 40 * d + noise, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
    (root / "README.txt").write_text("not an image: ignored")
    (root / domains[0] / classes[0] / "notes.csv").write_text("a,b\n")
    return root


def folder_params(folder: Path, root: Path | None = None, **spec) -> Path:
    spec = {"image_size": 16, "augmentation": "none", **spec}
    if root is not None:
        spec["root"] = str(root)
    return write_params(folder, datasets={"mydata": spec}, matrix={"targets": list(DOMAINS[:1])},
                        preprocess={"encoding": "raw", "workers": 1})


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_folder_dataset_runs_download_to_report_through_the_cli(project):
    root = make_images(project / "mydata")
    params = folder_params(project, root)
    assert "271 files of 3 domains" in dmg("download", "mydata", "--params", params).output
    assert "270 of 270 listed images stored" in dmg("preprocess", "mydata", "--params", params).output
    h5 = project / "data/prepared/mydata.h5"
    info = read_info(h5)
    assert info.domains == DOMAINS and info.classes == CLASSES and (info.height, info.channels) == (16, 3)
    for method in ("aggregate", "dmg"):  # the target names a domain of mydata only: no --dataset needed
        dmg("train", "--target", "hospital_a", "--method", method, "--epochs", "1", "--lr", "0.01",
            "--params", params)
        out = dmg("evaluate", "--target", "hospital_a", "--method", method, "--params", params).output
        assert "mydata convnet" in out and "out-of-domain" in out
    metrics = json.loads((project / "metrics/mydata/convnet/dmg/hospital_a/seed0.details.json").read_text())
    assert metrics["in_domain_split"] == "test" and 0 <= metrics["out_of_domain"]["accuracy"] <= 100
    table = dmg("report", "--dataset", "mydata", "--no-figures", "--params", params).output
    assert "Aggregate" in table and "DMG" in table and "hospital_a" in table
    assert (project / "reports/mydata/tables.md").exists()
    # a second run of each preparing stage does nothing
    assert "nothing to do" in dmg("download", "mydata", "--params", params).output
    assert "up to date" in dmg("preprocess", "mydata", "--params", params).output


def test_zip_with_a_top_folder_gives_the_same_files_as_the_folder(project):
    root = make_images(project / "src" / "mydata", per_class=3)
    archive = project / "mydata.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root.parent).as_posix())
    params = folder_params(project)
    dmg("download", "mydata", "--from", archive, "--params", params)
    from_zip = json.loads((project / "data/raw/mydata/MANIFEST.json").read_text())["files"]
    other = project / "other"
    other.mkdir()
    dmg("download", "mydata", "--from", root, "--params", folder_params(other))
    from_folder = json.loads((other / "data/raw/mydata/MANIFEST.json").read_text())["files"]
    assert from_zip == from_folder and len(from_zip) == 3 * 3 * 3 + 1  # + notes.csv, kept but never listed


def test_fraction_split_is_seeded_and_stratified():
    paths = [f"d/c/{i}.png" for i in range(50)]
    split = fraction_split(paths, (0.6, 0.2, 0.2), seed=0, key="d/c")
    assert [len(split[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(paths)
    assert split == fraction_split(paths, (0.6, 0.2, 0.2), seed=0, key="d/c")
    assert split["val"] != fraction_split(paths, (0.6, 0.2, 0.2), seed=1, key="d/c")["val"]
    assert fraction_split(paths[:1], (0.6, 0.2, 0.2), 0, "x")["train"] == paths[:1]  # one image: it trains
    train, val = holdout_split(paths, 0.2, seed=0, key="d")
    assert len(val) == 10 and sorted(train + val) == sorted(paths) and (train, val) == holdout_split(paths, 0.2, 0, "d")


def test_preprocessed_splits_are_stratified_per_domain_and_class(project):
    root = make_images(project / "mydata", per_class=10)
    params = folder_params(project, root, fractions=[0.5, 0.3, 0.2], seed=3)
    dmg("download", "mydata", "--params", params)
    dmg("preprocess", "mydata", "--params", params)
    h5 = project / "data/prepared/mydata.h5"
    for domain in DOMAINS:
        seen = []
        for split, share in (("train", 5), ("val", 3), ("test", 2)):
            reader = SplitReader(h5, domain, split)
            assert np.bincount(reader.labels, minlength=3).tolist() == [share] * 3, (domain, split)
            seen += reader.paths()
        assert sorted(seen) == sorted(f"{domain}/{c}/img{i}.png" for c in CLASSES for i in range(10))


def test_holdout_split_tests_the_whole_domain_and_validates_in_domain_on_val(project):
    root = make_images(project / "mydata", per_class=10)
    params = folder_params(project, root, split="holdout", holdout=0.2)
    dmg("download", "mydata", "--params", params)
    dmg("preprocess", "mydata", "--params", params)
    h5 = project / "data/prepared/mydata.h5"
    assert [len(SplitReader(h5, "hospital_b", s)) for s in ("train", "val", "test")] == [24, 6, 30]
    assert get_dataset("mydata").in_domain_split == "val"


def test_non_rgb_and_16_bit_images_are_converted(project):
    root = make_images(project / "mydata", per_class=3)  # 3: every split of every domain gets an image
    odd = root / "hospital_a" / "cat"
    Image.new("L", (16, 16), 100).save(odd / "grey.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(odd / "clear.png")  # transparent: over white
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(odd / "palette.gif")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(odd / "cmyk.tif")  # CMYK red
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(odd / "deep.png")  # 16-bit grey 32896 = 128 * 257
    params = folder_params(project, root)
    dmg("download", "mydata", "--params", params)
    dmg("preprocess", "mydata", "--params", params)
    readers = [SplitReader(project / "data/prepared/mydata.h5", "hospital_a", s) for s in ("train", "val", "test")]

    def pixel(name):
        rel = f"hospital_a/cat/{name}"
        for reader in readers:
            if rel in reader.paths():
                return reader.image(reader.paths().index(rel))[:, 8, 8].tolist()
        raise AssertionError(f"{rel} not stored")

    assert pixel("grey.png") == [100, 100, 100]
    assert pixel("clear.png") == [255, 255, 255]
    assert pixel("palette.gif") == [10, 200, 30]
    assert pixel("cmyk.tif") == [255, 0, 0]
    assert pixel("deep.png") == [128, 128, 128]  # not 255: 16-bit values are scaled, not clipped


def test_duplicate_file_names_across_domains_are_different_images(project):
    root = make_images(project / "mydata", per_class=3)
    params = folder_params(project, root)
    dmg("download", "mydata", "--params", params)
    dmg("preprocess", "mydata", "--params", params)
    h5 = project / "data/prepared/mydata.h5"
    means = {}
    for domain in DOMAINS:
        for split in ("train", "val", "test"):
            reader = SplitReader(h5, domain, split)
            for i, path in enumerate(reader.paths()):
                if path.endswith("cat/img0.png"):
                    means[domain] = reader.image(i).float().mean().item()
    assert len(means) == 3 and means["hospital_a"] < means["hospital_b"] < means["hospital_c"]


def test_unreadable_images_and_one_class_domains_are_reported_not_fatal(project):
    root = make_images(project / "mydata", per_class=3)
    for i in range(3):  # every image of hospital_b/fox is broken
        (root / "hospital_b" / "fox" / f"img{i}.png").write_bytes(b"not a png")
    (root / "hospital_c" / "empty_class").mkdir()  # a class folder without images
    (root / "hospital_c" / "empty_class" / "readme.md").write_text("nothing")
    lonely = project / "mydata" / "hospital_d" / "cat"
    lonely.mkdir(parents=True)
    for i in range(3):  # 3: one image per split (an empty split is refused)
        Image.new("RGB", (16, 16), (200, 30 + i, 30)).save(lonely / f"only{i}.png")
    params = folder_params(project, root)
    dmg("download", "mydata", "--params", params)
    out = dmg("preprocess", "mydata", "--params", params).output
    assert "3 unreadable images left out" in out
    assert "class folder hospital_c/empty_class holds no images: left out" in out
    assert "domain hospital_d has one class only (cat)" in out
    h5 = project / "data/prepared/mydata.h5"
    text = describe(h5)
    assert "hospital_b: fox" in text and "hospital_d: dog, fox" in text  # classes absent from a domain
    report = json.loads((project / "data/prepared/mydata.report.json").read_text())
    assert {u["path"] for u in report["unreadable"]} == {f"hospital_b/fox/img{i}.png" for i in range(3)}
    assert "0x" not in json.dumps(report)  # no object addresses: identical inputs, identical report
    other = project / "again"
    other.mkdir()
    params2 = folder_params(other, root)
    dmg("download", "mydata", "--params", params2)
    dmg("preprocess", "mydata", "--params", params2)
    assert (other / "data/prepared/mydata.report.json").read_bytes() == \
        (project / "data/prepared/mydata.report.json").read_bytes()


@pytest.mark.parametrize("breakage, message", [
    ("empty_domain", "domain hospital_c holds no images"),
    ("flat_domain", "image hospital_a/flat.png lies directly in a domain folder"),
    ("image_in_root", "image stray.png lies in the root folder"),
    ("one_domain", "one domain folder (hospital_a)"),
    ("one_class", "one class only"),
])
def test_a_root_not_in_the_layout_is_one_line_and_writes_nothing(project, breakage, message):
    root = project / "mydata"
    if breakage == "one_domain":
        make_images(root, domains=DOMAINS[:1], per_class=2)
        (root / "README.txt").unlink()  # a root holding one folder only: not mistaken for a wrapper
    elif breakage == "one_class":
        make_images(root, classes=CLASSES[:1], per_class=2)
    else:
        make_images(root, per_class=2)
    if breakage == "empty_domain":
        for path in sorted((root / "hospital_c").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    if breakage == "flat_domain":
        Image.new("RGB", (8, 8)).save(root / "hospital_a" / "flat.png")
    if breakage == "image_in_root":
        Image.new("RGB", (8, 8)).save(root / "stray.png")
    params = folder_params(project, root)
    one_line_error(dmg("download", "mydata", "--params", params, ok=False), message)
    raw = project / "data/raw/mydata"
    assert not (raw / "images").exists() and not (raw / "MANIFEST.json").exists()
    assert [p.name for p in raw.iterdir()] == [] if raw.exists() else True


def test_declaration_errors_name_the_key(project):
    make_images(project / "mydata", per_class=1)
    bad = folder_params(project, project / "mydata", split="random")
    one_line_error(dmg("download", "mydata", "--params", bad, ok=False), "datasets.mydata.split must be one of")
    bad = folder_params(project, project / "mydata", fractions=[0.5, 0.5, 0.5])
    one_line_error(dmg("download", "mydata", "--params", bad, ok=False), "datasets.mydata.fractions")
    bad = folder_params(project, project / "mydata", colour="red")
    one_line_error(dmg("download", "mydata", "--params", bad, ok=False), "unknown key 'datasets.mydata.colour'")
    bad = write_params(project, datasets={"pacs": {"root": "x"}})
    one_line_error(dmg("download", "pacs", "--params", bad, ok=False), "pacs is a built-in dataset")
    nothing = write_params(project, datasets={"mydata": {}})
    one_line_error(dmg("download", "mydata", "--params", nothing, ok=False), "nothing to copy: pass --from")
    one_line_error(dmg("train", "--dataset", "mydata", "--target", "x", "--params", nothing, ok=False),
                   "mydata has no domains yet")
