"""The HDF5 layout round-trips, atomic writes leave nothing half-written, digits are as documented."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dmgcli.errors import DmgError
from dmgcli.fileio import atomic_path, write_json
from dmgcli.h5data import FileInfo, SplitReader, read_info, write_split, writing


def info(encoding: str) -> FileInfo:
    return FileInfo(dataset="toy", encoding=encoding, height=8, width=8, channels=3, classes=("a", "b"),
                    domains=("d1",), provenance={"k": 1})


def test_raw_layout_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "toy.h5"
    with writing(path, info("raw")) as f:
        write_split(f, "d1", "train", images, [0, 1, 0, 1, 1], [f"p{i}" for i in range(5)])
    assert read_info(path) == info("raw")
    reader = SplitReader(path, "d1", "train")
    assert len(reader) == 5 and reader.labels.tolist() == [0, 1, 0, 1, 1]
    assert torch.equal(reader.image(3), torch.from_numpy(images[3]).permute(2, 0, 1))
    assert torch.equal(reader.all_images(), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert reader.paths() == [f"p{i}" for i in range(5)]


def test_jpeg_layout_round_trip(tmp_path):
    pixels = np.full((8, 8, 3), 200, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    blobs = [buf.getvalue()] * 3
    path = tmp_path / "toy.h5"
    with writing(path, info("jpeg")) as f:
        write_split(f, "d1", "test", blobs, [1, 0, 1], ["a", "b", "c"])
    reader = SplitReader(path, "d1", "test")
    assert reader.offsets.tolist() == [0, len(blobs[0]), 2 * len(blobs[0]), 3 * len(blobs[0])]
    assert bytes(reader.encoded(1)) == blobs[0]
    decoded = reader.image(2)
    assert decoded.shape == (3, 8, 8) and abs(decoded.float().mean().item() - 200) < 3


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "toy.h5"
    with pytest.raises(RuntimeError):
        with writing(path, info("raw")) as f:
            write_split(f, "d1", "train", np.zeros((1, 8, 8, 3), np.uint8), [0], ["x"])
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_previous_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text().strip() == '{\n  "v": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_not_a_dmg_file_is_refused(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(DmgError, match="not a readable HDF5"):
        read_info(tmp_path / "x.h5")


def test_digits_domains_are_disjoint_and_rotated(digits_dir):
    h5 = digits_dir / "data" / "prepared" / "digits.h5"
    file_info = read_info(h5)
    assert file_info.domains == ("rot0", "rot15", "rot30", "rot45", "rot60", "rot75")
    seen, total = set(), 0
    for domain in file_info.domains:
        for split in ("train", "val", "test"):
            paths = SplitReader(h5, domain, split).paths()
            seen.update(paths)
            total += len(paths)
    assert total == len(seen) == 1797  # every digit used once, in exactly one domain and split
    # rot0 digits are upright: rotating them changes pixels, so domains really differ
    rot0 = SplitReader(h5, "rot0", "train").all_images().float()
    rot75 = SplitReader(h5, "rot75", "train").all_images().float()
    assert rot0.shape[1:] == (1, 16, 16)
    assert (rot0.mean(0) - rot75.mean(0)).abs().mean() > 5
