"""VLCS, Office-Home and TerraIncognita from small stand-in archives in their real layouts
(nothing can be downloaded here), PACS read as a plain folder dataset, and the resize modes."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, write_params
from dmgcli.augment import get_augmentation
from dmgcli.datasets import get_dataset
from dmgcli.datasets.benchmarks import TERRA_CATEGORIES
from dmgcli.errors import DmgError
from dmgcli.fetch import safe_extract_tar
from dmgcli.h5data import SplitReader, read_info
from test_cli import dmg, one_line_error


def jpeg(seed: int, size=(24, 18)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def params(folder: Path) -> Path:
    return write_params(folder, preprocess={"image_size": 16, "encoding": "raw", "workers": 1})


def check_holdout(h5: Path, domain: str, n: int) -> None:
    """DomainBed's protocol: int(0.2 n) val, the rest train, the whole domain as test."""
    counts = [len(SplitReader(h5, domain, s)) for s in ("train", "val", "test")]
    assert counts == [n - int(0.2 * n), int(0.2 * n), n], (domain, counts)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_download_help_lists_the_benchmarks():
    text = dmg("download", "--help").output
    for name in ("vlcs", "office_home", "terra_incognita"):
        assert name in text


def test_vlcs_from_its_tar_gz(project):
    archive = project / "VLCS.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for d, folder in enumerate(("Caltech101", "LabelMe", "SUN09", "VOC2007")):
            for c, cls in enumerate(("bird", "car", "chair", "dog", "person")):
                for i in range(5 + d):
                    add(tf, f"VLCS/{folder}/{cls}/{i:03d}.jpg", jpeg(100 * d + 10 * c + i))
    p = params(project)
    dmg("download", "vlcs", "--from", archive, "--params", p)
    assert (project / "data/raw/vlcs/images/labelme/dog/000.jpg").is_file()
    sources = json.loads((project / "data/raw/vlcs/MANIFEST.json").read_text())["sources"]
    assert list(sources) == ["VLCS.tar.gz"] and len(sources["VLCS.tar.gz"]["sha256"]) == 64
    dmg("preprocess", "vlcs", "--params", p)
    h5 = project / "data/prepared/vlcs.h5"
    info = read_info(h5)
    assert info.domains == ("caltech101", "labelme", "sun09", "voc2007")
    assert info.classes == ("bird", "car", "chair", "dog", "person")
    check_holdout(h5, "sun09", 5 * 7)
    assert get_dataset("vlcs").in_domain_split == "val"
    assert "nothing to do" in dmg("download", "vlcs", "--from", archive, "--params", p).output


def test_office_home_from_its_zip_with_a_space_in_a_domain_name(project):
    archive = project / "office_home.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("OfficeHomeDataset_10072016/ImageInfo.csv", "not an image\n")
        for d, folder in enumerate(("Art", "Clipart", "Product", "Real World")):
            for c, cls in enumerate(("Alarm_Clock", "TV", "Table")):
                for i in range(4):
                    zf.writestr(f"OfficeHomeDataset_10072016/{folder}/{cls}/{i:05d}.jpg", jpeg(d * 50 + c * 5 + i))
    p = params(project)
    dmg("download", "office_home", "--from", archive, "--params", p)
    dmg("preprocess", "office_home", "--params", p)
    h5 = project / "data/prepared/office_home.h5"
    info = read_info(h5)
    assert info.domains == ("art", "clipart", "product", "real_world")
    assert info.classes == ("Alarm_Clock", "TV", "Table")  # sorted as DomainBed's ImageFolder sorts them
    check_holdout(h5, "real_world", 12)
    assert SplitReader(h5, "real_world", "test").paths()[0] == "real_world/Alarm_Clock/00000.jpg"


def test_office_home_with_a_foreign_class_folder_is_refused(project):
    archive = project / "office_home.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder in ("Art", "Clipart", "Product", "Real World"):
            zf.writestr(f"OfficeHomeDataset_10072016/{folder}/Mug/0.jpg", jpeg(0))
            zf.writestr(f"OfficeHomeDataset_10072016/{folder}/Unicorn/0.jpg", jpeg(1))
    one_line_error(dmg("download", "office_home", "--from", archive, "--params", params(project), ok=False),
                   "Art/Unicorn is not a office_home class folder")
    assert not (project / "data/raw/office_home/images").exists()


def terra_sources(folder: Path) -> None:
    """The two files DomainBed downloads: the flat image tar and the zipped COCO-style annotations."""
    folder.mkdir()
    categories = [{"id": i, "name": n} for i, n in enumerate((*TERRA_CATEGORIES, "car"))]
    images, notes = [], []
    with tarfile.open(folder / "eccv_18_all_images_sm.tar.gz", "w:gz") as tf:
        for k in range(60):
            location = ("38", "43", "46", "100", "99")[k % 5]  # 99 is not one of the four
            category = (0, 1, 5, 10)[k % 4]  # bird, bobcat, empty, car (not a TerraIncognita class)
            name = f"img{k:03d}.jpg"
            add(tf, f"eccv_18_all_images_sm/{name}", jpeg(k))
            images.append({"id": f"id{k}", "file_name": name, "location": location})
            notes.append({"id": f"a{k}", "image_id": f"id{k}", "category_id": category})
    with zipfile.ZipFile(folder / "caltech_camera_traps.json.zip", "w") as zf:
        zf.writestr("caltech_images_20210113.json",
                    json.dumps({"images": images, "annotations": notes, "categories": categories}))


def test_terra_incognita_sorted_from_the_camera_trap_archives(project):
    terra_sources(project / "mirror")
    p = params(project)
    dmg("download", "terra_incognita", "--from", project / "mirror", "--params", p)
    raw = project / "data/raw/terra_incognita/images"
    assert sorted(q.name for q in raw.iterdir()) == ["location_100", "location_38", "location_43", "location_46"]
    assert not list(raw.glob("*/car")) and (raw / "location_38/bird/img000.jpg").is_file()
    dmg("preprocess", "terra_incognita", "--params", p)
    h5 = project / "data/prepared/terra_incognita.h5"
    assert read_info(h5).classes == ("bird", "bobcat", "empty")
    # location 38 holds images k = 0, 5, ..., 55: categories k % 4 -> 9 of 12 are TerraIncognita classes
    check_holdout(h5, "location_38", 9)
    out = dmg("train", "--target", "location_43", "--epochs", "1", "--backbone", "convnet", "--method", "aggregate",
              "--params", p).output
    assert "on terra_incognita" in out  # the target names the dataset


def test_a_benchmark_archive_without_its_domain_folders_is_one_line(project):
    archive = project / "VLCS.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        add(tf, "VLCS/Caltech101/bird/0.jpg", jpeg(0))
    one_line_error(dmg("download", "vlcs", "--from", archive, "--params", params(project), ok=False),
                   "holds no folder with the vlcs domain folders")


def test_tar_members_leaving_the_folder_are_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        add(tf, "fine/a.jpg", b"x")
        add(tf, "../escape.txt", b"y")
    with pytest.raises(DmgError, match="refusing to extract member '../escape.txt'"):
        safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()
    truncated = tmp_path / "cut.tar.gz"
    with tarfile.open(truncated, "w:gz") as tf:
        add(tf, "a.bin", np.random.default_rng(0).bytes(100_000))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(DmgError, match="corrupt|not a readable"):
        safe_extract_tar(truncated, tmp_path / "cut")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz", "evil.tar"]


def test_squash_keeps_the_whole_image_and_domainnet_evaluates_it_whole(tmp_path):
    from stages.preprocess import ImageEncoder

    thirds = Image.new("RGB", (90, 30), (255, 0, 0))
    thirds.paste((0, 255, 0), (30, 0, 60, 30))
    thirds.paste((0, 0, 255), (60, 0, 90, 30))
    thirds.save(tmp_path / "thirds.png")
    squashed, _, _ = ImageEncoder(size=16, encoding="raw", quality=90, resize="squash")(str(tmp_path / "thirds.png"))
    cropped, _, _ = ImageEncoder(size=16, encoding="raw", quality=90, resize="center_crop")(str(tmp_path / "thirds.png"))
    assert squashed[:, 0].tolist() == [[255, 0, 0]] * 16 and squashed[:, -1].tolist() == [[0, 0, 255]] * 16
    assert np.abs(cropped[:, 1:-1].astype(int) - [0, 255, 0]).max() <= 2
    assert get_dataset("domainnet").resize == "squash" and get_dataset("pacs").resize == "center_crop"
    _, evaluate = get_augmentation("domainnet")
    image = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    image[..., :16] = 255  # a white band at the left edge: a centre crop of 224 would lose it
    out = evaluate(image)
    assert out.shape == (1, 3, 224, 224) and out[0, :, 100, 0].min() > 0.99


PACS_ZIP = SHARED_DATA / "PACS.zip"


@pytest.mark.skipif(not PACS_ZIP.exists(), reason=f"{PACS_ZIP} is absent")
def test_pacs_read_as_a_folder_dataset_matches_the_pacs_adapter(project):
    """A subset of the real PACS (4 domains, 2 classes, 4 images each: 3 of the train list and 1 of
    crossval, so that no split is empty) through both adapters."""
    wanted = []
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        for split, count in (("train", 3), ("crossval", 1)):
            listed = [line.rsplit(maxsplit=1)[0] for line in
                      (SHARED_DATA / "pacs_splits" / f"{domain}_{split}_kfold.txt").read_text().splitlines()]
            for cls in ("dog", "elephant"):
                wanted += [rel for rel in listed if rel.split("/")[1] == cls][:count]
    with zipfile.ZipFile(PACS_ZIP) as zf:
        keep = {rel: zf.read(f"kfold/{rel}") for rel in wanted}
    subset = project / "pacs_subset.zip"
    with zipfile.ZipFile(subset, "w") as zf:
        for rel, data in keep.items():
            zf.writestr(f"kfold/{rel}", data)
    splits = project / "splits"
    splits.mkdir()
    for path in sorted((SHARED_DATA / "pacs_splits").glob("*_kfold.txt")):
        lines = [line for line in path.read_text().splitlines() if line.rsplit(maxsplit=1)[0] in keep]
        (splits / path.name).write_text("\n".join(lines) + "\n")
    p = write_params(project, datasets={"pacs_folder": {"split": "lists", "resize": "center_crop"}},
                     preprocess={"image_size": 64, "workers": 1})
    for name in ("pacs", "pacs_folder"):
        dmg("download", name, "--from", subset, "--splits", splits, "--params", p)
        dmg("preprocess", name, "--params", p)
    ours, theirs = project / "data/prepared/pacs_folder.h5", project / "data/prepared/pacs.h5"
    assert read_info(ours).domains == read_info(theirs).domains
    assert read_info(ours).classes == ("dog", "elephant") == read_info(theirs).classes[:2]
    compared = 0
    for domain in read_info(theirs).domains:
        for split in ("train", "val", "test"):
            a, b = SplitReader(ours, domain, split), SplitReader(theirs, domain, split)
            assert a.paths() == b.paths() and a.labels.tolist() == b.labels.tolist()
            assert all(torch.equal(a.image(i), b.image(i)) for i in range(len(a)))
            compared += len(a)
    assert compared > 30
