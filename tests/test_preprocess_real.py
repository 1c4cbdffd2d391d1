"""`dmg preprocess` for the real datasets: real PACS end to end, the real DomainNet lists
(counts, classes, the reference tv_0.9 split) with stand-in images, and the image policy
(resize and crop, transparency, unreadable files, duplicates, re-runs)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.h5data import SplitReader, read_info
from dmgcli.params import DownloadParams, PreprocessParams
from stages.download import download
from stages.info import describe
from dmgcli.datasets import report_path
from dmgcli.datasets.base import read_list
from dmgcli.datasets.domainnet import domainnet_plan, reference_tv_split, seeded_split
from dmgcli.datasets.pacs import PACS_CLASSES
from stages.preprocess import preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")

PACS_COUNTS = {"art_painting": (1840, 208, 2048), "cartoon": (2107, 237, 2344), "photo": (1499, 171, 1670),
               "sketch": (3531, 398, 3929)}
PACS_LIST_NAMES = {"train": "train", "val": "crossval", "test": "test"}
DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_COUNTS = {  # tv_0.9 train / val / test, from ../shared/data/README.md (quickdraw train unknown)
    "clipart": (30172, 3353, 14604), "infograph": (32420, 3603, 15582), "painting": (45374, 5042, 21850),
    "quickdraw": (None, 12075, 51750), "real": (108815, 12091, 52041), "sketch": (43390, 4822, 20916),
}


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def params_file(folder: Path, **preprocess) -> Path:
    path = folder / "params.yaml"
    lines = [f"data_dir: {folder / 'data'}", "preprocess:"] + [f"  {k}: {v}" for k, v in preprocess.items()]
    path.write_text("\n".join(lines if preprocess else lines[:1]) + "\n")
    return path


# --------------------------------------------------------------------------- real PACS

@pytest.fixture(scope="module")
def real_pacs(tmp_path_factory):
    """`dmg download pacs --from PACS.zip && dmg preprocess pacs` into a temporary data dir."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    folder = tmp_path_factory.mktemp("real_pacs")
    params = params_file(folder)
    run_cli("download", "pacs", "--from", str(SHARED / "PACS.zip"), "--splits", str(SHARED / "pacs_splits"),
            "--params", str(params))
    output = run_cli("preprocess", "pacs", "--params", str(params))
    return folder, params, folder / "data" / "prepared" / "pacs.h5", output


@needs_shared
@pytest.mark.slow
def test_real_pacs_has_the_official_counts_and_labels(real_pacs):
    _, _, h5, output = real_pacs
    assert "19982 of 19982 listed images stored" in output
    info = read_info(h5)
    assert info.classes == tuple(PACS_CLASSES) and info.encoding == "jpeg" and (info.height, info.width) == (256, 256)
    for domain, counts in PACS_COUNTS.items():
        for split, count in zip(("train", "val", "test"), counts):
            rows = read_list(SHARED / "pacs_splits" / f"{domain}_{PACS_LIST_NAMES[split]}_kfold.txt")
            reader = SplitReader(h5, domain, split)
            assert len(reader) == count, (domain, split)
            assert reader.paths() == [rel for _, rel, _ in rows]
            assert reader.labels.tolist() == [label - 1 for _, _, label in rows]  # lists are 1-based


@needs_shared
@pytest.mark.slow
def test_real_pacs_images_decode_and_test_copies_train(real_pacs):
    _, _, h5, _ = real_pacs
    train, test = SplitReader(h5, "sketch", "train"), SplitReader(h5, "sketch", "test")
    image = train.image(0)
    assert image.shape == (3, 256, 256) and str(image.dtype) == "torch.uint8" and image.float().std() > 5
    where = test.paths().index(train.paths()[0])  # the whole domain is the test split
    assert bytes(test.encoded(where)) == bytes(train.encoded(0))


@needs_shared
@pytest.mark.slow
def test_real_pacs_rerun_does_nothing_and_info_shows_it(real_pacs):
    folder, params, h5, _ = real_pacs
    before = h5.stat().st_mtime_ns
    assert "up to date" in run_cli("preprocess", "pacs", "--params", str(params))
    assert "nothing to do" in run_cli("download", "pacs", "--from", str(SHARED / "PACS.zip"), "--params", str(params))
    assert h5.stat().st_mtime_ns == before
    text = describe(h5)
    assert re.search(r"^sketch +3531 \(7 cls\) +398 \(7 cls\) +3929 \(7 cls\)$", text, re.MULTILINE)
    manifest_sha = json.loads(text.split("provenance: ", 1)[1].split("\ntool version")[0])["source_manifest_sha256"]
    assert manifest_sha == hashlib.sha256((folder / "data/raw/pacs/MANIFEST.json").read_bytes()).hexdigest()
    report = json.loads(report_path(h5).read_text())
    assert report["unreadable"] == [] and report["stored"]["photo"] == {"train": 1499, "val": 171, "test": 1670}


# --------------------------------------------------------------------------- a small synthetic PACS

def jpeg(color, size=(40, 40), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def small_pacs(folder: Path) -> Path:
    """An extracted PACS-shaped copy: 3 images per domain and class; two bad files in photo."""
    source = folder / "pacs_copy"
    lists = {}
    for domain in PACS_COUNTS:
        rows = []
        for label, cls in enumerate(PACS_CLASSES, 1):
            for i in range(3):
                rel = f"{domain}/{cls}/img_{i}.{'png' if domain == 'sketch' else 'jpg'}"
                path = source / "kfold" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg((label * 30, i * 60, 100), fmt="PNG" if domain == "sketch" else "JPEG"))
                rows.append(f"{rel} {label}\n")
        lists[domain] = rows
    (source / "kfold/photo/dog/img_1.jpg").write_bytes(b"not an image at all")
    (source / "kfold/photo/dog/img_2.jpg").unlink()  # listed, missing
    for domain, rows in lists.items():
        (source / "splits").mkdir(exist_ok=True)
        (source / "splits" / f"{domain}_train_kfold.txt").write_text("".join(rows[0::3] + rows[1::3]))
        (source / "splits" / f"{domain}_crossval_kfold.txt").write_text("".join(rows[2::3]))
        (source / "splits" / f"{domain}_test_kfold.txt").write_text("".join(rows))
    return source


@pytest.fixture
def small_raw(tmp_path):
    download("pacs", tmp_path / "data", DownloadParams(source=str(small_pacs(tmp_path))))
    return tmp_path / "data"


def test_unreadable_images_are_reported_and_left_out(small_raw, capsys):
    h5 = preprocess("pacs", small_raw, PreprocessParams(image_size=32, workers=2))
    assert "2 unreadable images left out" in capsys.readouterr().out
    report = json.loads(report_path(h5).read_text())
    bad = {entry["path"]: entry for entry in report["unreadable"]}
    assert set(bad) == {"photo/dog/img_1.jpg", "photo/dog/img_2.jpg"}
    assert bad["photo/dog/img_1.jpg"]["splits"] == ["train", "test"]
    assert "FileNotFoundError" in bad["photo/dog/img_2.jpg"]["error"]
    assert report["listed"]["photo"] == {"train": 14, "val": 7, "test": 21}
    assert report["stored"]["photo"] == {"train": 13, "val": 6, "test": 19}
    test = SplitReader(h5, "photo", "test")
    assert "photo/dog/img_1.jpg" not in test.paths() and len(test) == 19
    assert SplitReader(h5, "cartoon", "val").labels.tolist() == list(range(7))  # 0-based


def test_raw_encoding_and_rebuild_when_parameters_change(small_raw, capsys):
    preprocess("pacs", small_raw, PreprocessParams(image_size=32, workers=1))
    h5 = preprocess("pacs", small_raw, PreprocessParams(image_size=24, workers=1, encoding="raw"))
    assert "up to date" not in capsys.readouterr().out
    info = read_info(h5)
    assert (info.encoding, info.height) == ("raw", 24)
    reader = SplitReader(h5, "sketch", "test")
    pixels = reader.all_images()
    assert pixels.shape == (21, 3, 24, 24)
    assert pixels[3].float().mean(dim=(1, 2)).round().tolist() == [60, 0, 100]  # sketch/elephant img_0
    preprocess("pacs", small_raw, PreprocessParams(image_size=24, workers=1, encoding="raw"))
    assert "up to date" in capsys.readouterr().out


def test_image_changed_after_download_stops_preprocess(small_raw):
    (small_raw / "raw/pacs/images/cartoon/horse/img_0.jpg").write_bytes(jpeg((1, 2, 3)))
    with pytest.raises(DmgError, match="cartoon/horse/img_0.jpg changed since download"):
        preprocess("pacs", small_raw, PreprocessParams(image_size=16, workers=2))
    assert not (small_raw / "prepared" / "pacs.h5").exists()
    assert not list((small_raw / "prepared").glob(".pacs.h5*"))  # the temporary file is gone too


def test_list_label_that_contradicts_its_folder_is_an_error(small_raw):
    lists = small_raw / "raw/pacs/splits/art_painting_crossval_kfold.txt"
    lists.write_text(lists.read_text().replace("art_painting/dog/img_2.jpg 1", "art_painting/dog/img_2.jpg 2"))
    with pytest.raises(DmgError, match=r"art_painting_crossval_kfold.txt:1: label 1 of art_painting/dog/img_2.jpg"):
        preprocess("pacs", small_raw, PreprocessParams(image_size=16))


def test_resize_keeps_the_central_square_and_paints_transparency_white(tmp_path):
    from stages.preprocess import ImageEncoder

    wide = Image.new("RGB", (90, 30), (0, 0, 255))
    wide.paste((0, 255, 0), (30, 0, 60, 30))  # blue | green | blue: only green survives the crop
    clear = Image.new("RGBA", (20, 40), (255, 0, 0, 0))
    for name, image in (("wide.png", wide), ("clear.png", clear)):
        image.save(tmp_path / name)
    encoder = ImageEncoder(size=16, encoding="raw", quality=90)
    pixels, _, error = encoder(str(tmp_path / "wide.png"))
    assert error is None and pixels.shape == (16, 16, 3)
    # resize-then-crop: the outer columns blend with the neighbours, the inside is the green third
    assert np.abs(pixels[:, 1:-1].astype(int) - [0, 255, 0]).max() <= 2
    assert pixels[:, [0, -1], 2].min() > 0
    pixels, _, _ = encoder(str(tmp_path / "clear.png"))
    assert pixels.min() >= 253  # fully transparent red -> white


# --------------------------------------------------------------------------- DomainNet lists

def domainnet_list(kind: str, domain: str, split: str) -> list[tuple[str, int]]:
    folder = {"official": "official", "tv": "tv_0.9_splits"}[kind]
    return [(rel, label) for _, rel, label in read_list(SHARED / "domainnet_splits" / folder / f"{domain}_{split}.txt")]


@needs_shared
def test_reference_tv_split_is_regenerated_exactly():
    official = {d: domainnet_list("official", d, "train") for d in ("clipart", "infograph", "painting", "sketch")}
    regenerated = reference_tv_split(official)  # quickdraw and real lists absent: stood in for by their lengths
    assert set(regenerated) == set(official)
    for domain, (train, val) in regenerated.items():
        assert train == domainnet_list("tv", domain, "train"), domain
        assert val == domainnet_list("tv", domain, "val"), domain


def link_real_lists(raw: Path) -> None:
    """A raw folder whose splits/ point at the real lists (links, nothing copied)."""
    (raw / "splits").mkdir(parents=True)
    (raw / "splits" / "official").mkdir()
    os.symlink(SHARED / "domainnet_splits" / "tv_0.9_splits", raw / "splits" / "tv_0.9")
    for path in (SHARED / "domainnet_splits" / "official").iterdir():
        os.symlink(path, raw / "splits" / "official" / path.name)


@needs_shared
def test_real_domainnet_lists_give_the_published_counts_and_345_classes(tmp_path):
    raw = tmp_path / "raw"
    link_real_lists(raw)
    with pytest.raises(DmgError, match="quickdraw_train.txt not found"):  # neither list exists for quickdraw
        domainnet_plan(raw, PreprocessParams())
    # stand-in: quickdraw's official train list = its reference val list (the real one could not be obtained)
    os.unlink(raw / "splits" / "tv_0.9")
    (raw / "splits" / "tv_0.9").mkdir()
    for path in (SHARED / "domainnet_splits" / "tv_0.9_splits").iterdir():
        if not path.name.startswith("quickdraw"):
            os.symlink(path, raw / "splits" / "tv_0.9" / path.name)
    os.symlink(SHARED / "domainnet_splits/tv_0.9_splits/quickdraw_val.txt", raw / "splits/official/quickdraw_train.txt")
    classes, plan, notes = domainnet_plan(raw, PreprocessParams())
    assert len(classes) == 345 and classes[0] == "aircraft_carrier" and len(set(classes)) == 345
    counts = {(p.domain, p.split): len(p.entries) for p in plan}
    for domain, expected in DOMAINNET_COUNTS.items():
        if domain != "quickdraw":
            assert tuple(counts[domain, s] for s in ("train", "val", "test")) == expected, domain
    assert counts["quickdraw", "test"] == 51750
    assert notes["clipart"] == "tv_0.9 lists" and notes["quickdraw"].startswith("tv_0.9 regenerated")
    assert sum(counts.values()) == 477_900  # every listed entry that exists in ../shared/data


def test_seeded_split_is_deterministic_and_disjoint():
    items = [(f"clipart/c/{i}.jpg", i % 3) for i in range(1000)]
    train, val = seeded_split(items, seed=0, fraction=0.1, salt=0)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    assert train == sorted(train, key=items.index)  # list order kept
    assert (train, val) == seeded_split(items, seed=0, fraction=0.1, salt=0)
    assert val != seeded_split(items, seed=1, fraction=0.1, salt=0)[1]


# --------------------------------------------------------------------------- DomainNet with stand-in images

def stand_in(index: int) -> bytes:
    """A tiny, non-square JPEG whose bytes are unique to `index` (a COM segment holds it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (24 + index % 3 * 8, 16), (index % 251, 80, 160)).save(buffer, "JPEG")
    data, note = buffer.getvalue(), str(index).encode()
    return data[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[2:]


def domainnet_subset(folder: Path) -> dict:
    """Real list entries with stand-in images: every class once per domain in test, classes 0-1 in train/val."""
    keep = lambda rows: [r for r in rows if r[1] in (0, 1)]  # noqa: E731
    lists = {}
    for domain in DOMAINNET:
        first = {}
        for rel, label in domainnet_list("official", domain, "test"):
            first.setdefault(label, (rel, label))
        lists["official", domain, "test"] = sorted(first.values(), key=lambda r: r[1])
        if domain in ("clipart", "infograph", "painting", "sketch"):
            lists["official", domain, "train"] = keep(domainnet_list("official", domain, "train"))
        if domain == "quickdraw":  # stand-in official train list (the real one is not in ../shared/data)
            lists["official", domain, "train"] = keep(domainnet_list("tv", domain, "val"))
        else:
            lists["tv", domain, "train"] = keep(domainnet_list("tv", domain, "train"))
            lists["tv", domain, "val"] = keep(domainnet_list("tv", domain, "val"))
        if domain == "real":  # stand-in official train list: the union of the reference's train and val
            lists["official", domain, "train"] = lists["tv", domain, "train"] + lists["tv", domain, "val"]
    for (kind, domain, split), rows in lists.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        (folder / kind / f"{domain}_{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    paths = sorted({rel for rows in lists.values() for rel, _ in rows})
    for index, rel in enumerate(paths):
        (folder / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "images" / rel).write_bytes(stand_in(index))
    return lists


@needs_shared
@pytest.mark.slow
def test_domainnet_stand_ins_counts_classes_tv_split_duplicates(tmp_path, capsys):
    source = tmp_path / "source"
    lists = domainnet_subset(source)
    train_copy = lists["official", "clipart", "train"][0][0]
    test_copy = lists["official", "clipart", "test"][3][0]
    (source / "images" / test_copy).write_bytes((source / "images" / train_copy).read_bytes())
    broken = lists["official", "painting", "test"][5][0]
    (source / "images" / broken).write_bytes(b"\xff\xd8 truncated")
    download("domainnet", tmp_path / "data", DownloadParams(source=str(source / "images"), splits=str(source)))
    h5 = preprocess("domainnet", tmp_path / "data", PreprocessParams(image_size=16))
    info = read_info(h5)
    assert len(info.classes) == 345 and info.classes[1] == "airplane"

    val = SplitReader(h5, "clipart", "val")
    assert list(zip(val.paths(), val.labels.tolist())) == lists["tv", "clipart", "val"]  # tv_0.9 reproduced
    for domain in DOMAINNET:
        test = SplitReader(h5, domain, "test")
        listed = lists["official", domain, "test"]  # one image per class the test list has (painting lacks one)
        assert len(test) == len(listed) - (domain == "painting") and len(listed) >= 344
        assert len(np.unique(test.labels)) == len(test)
    quickdraw = [len(SplitReader(h5, "quickdraw", s)) for s in ("train", "val")]
    assert sum(quickdraw) == len(lists["official", "quickdraw", "train"]) and quickdraw[1] == sum(quickdraw) - int(0.9 * sum(quickdraw))

    report = json.loads(report_path(h5).read_text())
    assert [u["path"] for u in report["unreadable"]] == [broken]
    groups = report["duplicates"]["groups"]
    assert [sorted(m["path"] for m in g["images"]) for g in groups] == [sorted([train_copy, test_copy])]
    assert groups[0]["spans_test"] and report["duplicates"]["policy"].startswith("kept")
    out = capsys.readouterr().out
    assert "1 groups of byte-identical images (1 across train/val and test), kept" in out


def test_digits_writes_a_report_too(tmp_path):
    """Every dataset leaves <dataset>.report.json beside its HDF5 file (one DVC output list for all)."""
    download("digits", tmp_path, DownloadParams())
    h5 = preprocess("digits", tmp_path, PreprocessParams())
    report = json.loads(report_path(h5).read_text())
    assert sum(n for splits in report["stored"].values() for n in splits.values()) == 1797
    assert report["stored"]["rot45"] == {"train": 179, "val": 59, "test": 61}
