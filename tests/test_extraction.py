"""The input side, safe by construction: archives that cannot write outside their folder
(CVE-2025-4517 included) or expand without bound, transfers that stall or never end, split
lists and URLs that are malformed, a full disk, HDF5 images of the wrong size, empty splits.

Every case through the CLI ends with exit 1, one `dmg: error:` line and nothing left behind.
"""
from __future__ import annotations

import errno
import hashlib
import http.server
import io
import os
import re
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import http_server, write_params
from dmgcli import archives, transfer
from dmgcli.archives import safe_extract, safe_extract_tar
from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.transfer import download_url

runner = CliRunner()
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and link under folder: relative path -> (size, mtime in ns)."""
    return {p.relative_to(folder).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def fails_cleanly(folder: Path, *args, pattern: str = "", kept: str = "") -> str:
    """Run dmg in `folder`: exit 1, one `dmg: error:` line holding pattern, no file added or changed
    (but for a finished download under `kept`, kept so that a re-run does not fetch it again)."""
    before = tree(folder)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    shown = re.sub(r"[^\n]*\r", "", result.stderr)  # what a terminal shows: progress bars overwritten by \r
    lines = [line for line in shown.splitlines() if line.strip()]
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("dmg: error: "), result.stderr[:2000]
    assert pattern in lines[0], lines[0]
    after = {rel: stamp for rel, stamp in tree(folder).items() if not (kept and rel.startswith(kept))}
    assert after == before, "files changed or left behind"
    return lines[0]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder (params.yaml, data/ inside) as the current folder."""
    (tmp_path / "project").mkdir()
    write_params(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


# --------------------------------------------------------------------------- a local HTTP server

class Handler(http.server.BaseHTTPRequestHandler):
    """server.files: path -> bytes (sent with Content-Length), or a callable writing the body itself."""
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if callable(body):
            body(self)
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with http_server(Handler, files={}, requests=[]) as httpd:
        yield httpd


def trickle(handler):
    """Announce a megabyte, then send one byte every 20 ms for as long as the client listens."""
    handler.send_header("Content-Length", str(10**6))
    handler.end_headers()
    try:
        for _ in range(10**6):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.02)
    except OSError:
        pass


def endless(handler):
    """No Content-Length: 64 KiB blocks until the client hangs up."""
    handler.end_headers()
    block = b"\0" * (64 << 10)
    try:
        while True:
            handler.wfile.write(block)
    except OSError:
        pass


# --------------------------------------------------------------------------- archives

def add(tf: tarfile.TarFile, name: str, data: bytes = b"x", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def pacs_members(tf: tarfile.TarFile) -> None:
    for domain in PACS_DOMAINS:
        add(tf, f"pacs/{domain}/dog/1.jpg", b"\xff\xd8 not really a jpeg")


def cve_2025_4517(tf: tarfile.TarFile, name: str = "evil.txt") -> None:
    """The published bypass of tarfile's `data` filter: links whose expansion passes PATH_MAX stop
    os.path.realpath early, so `escape` looks inside but resolves to the folder above the target."""
    comp, steps, folder = "d" * 247, "abcdefghijklmnop", ""
    for step in steps:
        add(tf, os.path.join(folder, comp), type=tarfile.DIRTYPE)
        add(tf, os.path.join(folder, step), type=tarfile.SYMTYPE, linkname=comp)
        folder = os.path.join(folder, comp)
    link = os.path.join(*steps, "l" * 254)
    add(tf, link, type=tarfile.SYMTYPE, linkname="../" * len(steps))
    add(tf, "escape", type=tarfile.SYMTYPE, linkname=link + "/..")
    add(tf, f"escape/{name}", b"written outside")


def sparse(tf: tarfile.TarFile, name: str, real_size: int) -> None:
    """A GNU sparse member (PAX 0.1) of `real_size` bytes, all hole: a few hundred bytes in the tar."""
    info = tarfile.TarInfo(name)
    info.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(real_size), "GNU.sparse.name": name}
    tf.addfile(info, io.BytesIO(b""))


def make_tar(path: Path, *extras, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        pacs_members(tf)
        for extra in extras:
            extra(tf)
    return path


def test_cve_2025_4517_is_refused_through_every_tar_path(project, server):
    """`dmg download pacs --from x.tar`, a folder dataset's `root:` tar, the VLCS mirror path:
    refused at the first link, nothing written inside or outside the project."""
    outside = project.parent
    archive = make_tar(outside / "x.tar", cve_2025_4517)
    fails_cleanly(project, "download", "pacs", "--from", archive, pattern="links are not extracted from tars")
    write_params(project, datasets={"mydata": {"root": str(archive)}})
    fails_cleanly(project, "download", "mydata", pattern="links are not extracted from tars")
    server.files["/VLCS.tar.gz"] = make_tar(outside / "VLCS.tar.gz", cve_2025_4517, mode="w:gz").read_bytes()
    fails_cleanly(project, "download", "vlcs", "--from", f"{server.url}/VLCS.tar.gz",
                  pattern="links are not extracted from tars", kept="data/raw/vlcs/downloads/VLCS.tar.gz")
    assert not (outside / "evil.txt").exists() and not (project / "data" / "raw" / "pacs").exists()
    assert [p.name for p in (project / "data" / "raw" / "vlcs").iterdir()] == ["downloads"]
    assert sorted(p.name for p in outside.iterdir()) == ["VLCS.tar.gz", "project", "x.tar"]


@pytest.mark.parametrize("extra, pattern", [
    (lambda tf: add(tf, "pacs/photo/dog/2.jpg", type=tarfile.SYMTYPE, linkname="1.jpg"), "symbolic link"),
    (lambda tf: add(tf, "pacs/photo/dog/2.jpg", type=tarfile.LNKTYPE, linkname="pacs/photo/dog/1.jpg"), "hard link"),
    (lambda tf: add(tf, "pacs/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    (lambda tf: add(tf, "pacs/fifo", type=tarfile.FIFOTYPE), "device, fifo"),
    (lambda tf: add(tf, "pacs/./photo//dog/1.jpg", b"second"), "same name once normalised"),
    (lambda tf: add(tf, "pacs/photo/dog", b"a file named like a folder"), "is also a file"),
    (lambda tf: add(tf, "pacs/x/" + "n" * 300 + ".jpg"), "name is too long"),
], ids=["symlink", "hardlink", "device", "fifo", "normalised duplicate", "file and folder", "long name"])
def test_tar_members_that_are_not_plain_files_are_refused(project, extra, pattern):
    archive = make_tar(project.parent / "x.tar", extra)
    fails_cleanly(project, "download", "pacs", "--from", archive, pattern=pattern)
    assert not (project / "data" / "raw").exists()


def test_a_sparse_terabyte_is_refused_at_once(tmp_path):
    """A 1 TB sparse member counts by its real size: refused before anything is written (the
    `data` filter extracted it and dmg then hashed a terabyte of zeros)."""
    archive = make_tar(tmp_path / "bomb.tar.gz", lambda tf: sparse(tf, "pacs/photo/dog/big.jpg", 10**12),
                       mode="w:gz")
    assert archive.stat().st_size < 2000
    start = time.monotonic()
    with pytest.raises(DmgError, match=r"would expand to 1000.00 GB .*--allow-large"):
        safe_extract_tar(archive, tmp_path / "out")
    with pytest.raises(DmgError, match="disk full: .* needs 1000000000.0 GB"):  # no disk holds an exabyte
        big = make_tar(tmp_path / "huge.tar", lambda tf: sparse(tf, "big.bin", 10**18))
        safe_extract_tar(big, tmp_path / "out", allow_large=True)
    assert time.monotonic() - start < 30  # nothing hashed: a second at most on any machine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz", "huge.tar"]


def test_a_sparse_member_of_plausible_size_is_extracted_with_its_holes(tmp_path):
    archive = make_tar(tmp_path / "ok.tar", lambda tf: sparse(tf, "pacs/hole.bin", 4096))
    hashes = safe_extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "pacs" / "hole.bin").read_bytes() == b"\0" * 4096
    assert hashes["pacs/hole.bin"] == hashlib.sha256(b"\0" * 4096).hexdigest()


def test_a_tar_bomb_is_refused_like_a_zip_bomb(project):
    archive = make_tar(project.parent / "x.tar.gz", lambda tf: add(tf, "pacs/big.bin", b"\0" * (30 << 20)),
                       mode="w:gz")
    fails_cleanly(project, "download", "pacs", "--from", archive, pattern="--allow-large")


def test_tar_names_are_normalised_and_the_manifest_uses_them(tmp_path):
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w") as tf:
        add(tf, "./top//a.jpg", b"a")
        add(tf, "top/", type=tarfile.DIRTYPE)
    assert safe_extract_tar(archive, tmp_path / "out") == {"top/a.jpg": hashlib.sha256(b"a").hexdigest()}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("first, second, pattern", [
    ("photo/dog/x.jpg", "photo//dog/x.jpg", "same name once normalised"),
    ("photo/dog/x.jpg", "./photo/dog/x.jpg", "same name once normalised"),
    ("photo/dog", "photo/dog/x.jpg", "is also a file"),
])
def test_zip_names_that_land_on_one_path_are_refused(tmp_path, first, second, pattern):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(first, b"first")
        zf.writestr(second, b"second overwrites first")
    with pytest.raises(DmgError, match=pattern):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zip"]


# --------------------------------------------------------------------------- downloads

def test_a_transfer_without_progress_fails_after_the_timeout(server, tmp_path):
    """One byte every 20 ms never trips a per-read timeout; the progress deadline does."""
    server.files["/slow.zip"] = trickle
    start = time.monotonic()
    with pytest.raises(DmgError, match=r"could not download .*slow.zip after 1 tries \(stalled: \d+ bytes in \d+ s"):
        download_url(f"{server.url}/slow.zip", tmp_path / "slow.zip", retries=0, timeout=1.0)
    assert time.monotonic() - start < 20
    assert not (tmp_path / "slow.zip").exists()


def test_a_stream_without_length_is_capped_and_its_part_removed(server, tmp_path):
    server.files["/endless.zip"] = endless
    with pytest.raises(DmgError, match="larger than the 0.001 GB a download may take .*announced no length"):
        download_url(f"{server.url}/endless.zip", tmp_path / "endless.zip", retries=3, backoff=0,
                     max_bytes=10**6)
    assert list(tmp_path.iterdir()) == [] and server.requests == ["/endless.zip"]  # not retried


def test_an_announced_length_over_the_cap_is_refused_before_any_byte(server, tmp_path):
    server.files["/big.zip"] = b"\0" * 3000
    with pytest.raises(DmgError, match=r"larger than the 1e-06 GB .*: 0.0 GB"):
        download_url(f"{server.url}/big.zip", tmp_path / "big.zip", retries=2, backoff=0, max_bytes=1000)
    assert list(tmp_path.iterdir()) == [] and len(server.requests) == 1


def test_the_dataset_cap_applies_through_dmg_download(project, server, monkeypatch):
    monkeypatch.setitem(__import__("dmgcli.datasets.sources").datasets.sources.MAX_EXTRACTED, "vlcs", 10**5)
    server.files["/VLCS.tar.gz"] = endless
    fails_cleanly(project, "download", "vlcs", "--from", f"{server.url}/VLCS.tar.gz", pattern="announced no length")
    assert not (project / "data" / "raw").exists()


@pytest.mark.parametrize("url", ["http://[::1/x.zip", "http://[::1]:99999/x.zip", "https://ex[ample.org/a.zip"])
def test_a_malformed_url_is_one_line(project, url):
    fails_cleanly(project, "download", "pacs", "--from", url, pattern="not a valid URL")


def test_a_typo_in_root_names_the_params_key(project):
    write_params(project, datasets={"mydata": {"root": str(project / "no_such_folder")}})
    line = fails_cleanly(project, "download", "mydata", pattern="params: datasets.mydata.root:")
    assert "--from" not in line and "no such file or folder" in line


# --------------------------------------------------------------------------- a full disk

class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes were written (a disk filling up)."""

    def __init__(self, real, room: list[int]):
        self.real, self.room = real, room

    def write(self, data) -> int:
        if len(data) > self.room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def fill_disk(monkeypatch, module, room: int) -> None:
    """Every file `module` opens for writing shares `room` bytes of free space."""
    left = [room]

    def opener(path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        return FullDisk(real, left) if any(c in mode for c in "wax") else real

    monkeypatch.setattr(module, "open", opener, raising=False)


def pacs_files() -> dict[str, bytes]:
    """A PACS copy: one 50 KB image per domain and the 12 kfold lists."""
    files = {}
    for domain in PACS_DOMAINS:
        files[f"pacs/{domain}/dog/1.jpg"] = os.urandom(50_000)
        for split in ("train", "crossval", "test"):
            files[f"pacs/{domain}_{split}_kfold.txt"] = f"{domain}/dog/1.jpg 1\n".encode()
    return files


def pacs_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in pacs_files().items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar", "folder"])
def test_disk_full_while_extracting_or_copying_says_so(project, monkeypatch, kind):
    source = project.parent / "src"
    if kind == "zip":
        source = pacs_zip(project.parent / "PACS.zip")
    elif kind == "tar":
        source = make_tar(project.parent / "PACS.tar", lambda tf: add(tf, "pacs/big.bin", os.urandom(100_000)))
    else:
        for name, data in pacs_files().items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    fill_disk(monkeypatch, archives, 60_000)
    line = fails_cleanly(project, "download", "pacs", "--from", source, pattern="disk full")
    assert "corrupt" not in line and "ENOSPC" in line
    assert not (project / "data" / "raw").exists()


def test_disk_full_while_downloading_removes_the_part_and_does_not_retry(server, tmp_path, monkeypatch):
    server.files["/x.zip"] = os.urandom(300_000)
    fill_disk(monkeypatch, transfer, 100_000)
    with pytest.raises(DmgError, match=r"^disk full while downloading .*x.zip .*\(ENOSPC\)"):
        download_url(f"{server.url}/x.zip", tmp_path / "x.zip", retries=3, backoff=0)
    assert list(tmp_path.iterdir()) == [] and server.requests == ["/x.zip"]


def test_disk_full_in_a_write_no_step_names_is_still_disk_full(project, monkeypatch):
    """The manifest (written through fileio, not archives) on a full disk: OSError without a file name."""
    from dmgcli import fetch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fetch, "write_json", full)
    archive = pacs_zip(project.parent / "PACS.zip")
    # the images and lists were in place, whole, when the manifest failed: the next run checks them again
    fails_cleanly(project, "download", "pacs", "--from", archive, pattern="disk full while writing",
                  kept="data/raw/pacs/")
    assert not (project / "data" / "raw" / "pacs" / "MANIFEST.json").exists()


def test_disk_full_while_preprocessing_keeps_the_previous_file(workdir, monkeypatch):
    """h5py reports ENOSPC as an OSError with errno 28 and no file name (measured on a 1 MB tmpfs)."""
    from dmgcli import h5data
    from dmgcli.datasets.digits import digits_source

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Driver write request failed (file write failed: errno = 28, error message = "
                                    "'No space left on device')")

    raw = workdir / "data" / "raw" / "digits"
    raw.mkdir(parents=True)
    shutil.copyfile(digits_source(), raw / "digits.csv.gz")
    monkeypatch.setattr(h5data, "write_split", full)
    line = fails_cleanly(workdir, "preprocess", "digits", pattern="the disk is full")
    assert "digits.h5" in line and "No space left on device" in line  # and the earlier digits.h5 is unchanged


# --------------------------------------------------------------------------- dataset inputs

@pytest.fixture
def pacs_raw(project):
    """data/raw/pacs from a tiny copy (one undecodable 'image' per domain), downloaded through the CLI."""
    result = runner.invoke(app, ["download", "pacs", "--from", str(pacs_zip(project.parent / "PACS.zip"))])
    assert result.exit_code == 0, result.output
    return project / "data" / "raw" / "pacs"


@pytest.mark.parametrize("line, pattern", [
    (b"photo/dog/../../../../../../../etc/passwd 1\n", "leaves the dataset's images folder"),
    (b"/etc/passwd 1\n", "leaves the dataset's images folder"),
    (b"photo/dog/caf\xe9.jpg 1\n", "not UTF-8 text (byte 0xe9 at column 14)"),
], ids=["dot-dot", "absolute", "latin-1"])
def test_a_bad_split_list_line_is_named_by_file_and_line(project, pacs_raw, line, pattern):
    listed = pacs_raw / "splits" / "photo_train_kfold.txt"
    listed.write_bytes(listed.read_bytes() + line)
    fails_cleanly(project, "preprocess", "pacs", pattern=f"{listed}:2: ")
    fails_cleanly(project, "preprocess", "pacs", pattern=pattern)
    assert not (project / "data" / "prepared").exists()


def test_an_empty_split_is_refused_before_anything_is_written(project, pacs_raw):
    (pacs_raw / "splits" / "sketch_crossval_kfold.txt").write_text("\n")
    fails_cleanly(project, "preprocess", "pacs", pattern="domain sketch: split val has no listed images")
    assert not (project / "data" / "prepared").exists()


def test_a_split_of_only_unreadable_images_is_refused(project, pacs_raw):
    """The images of this copy are random bytes: every split would be stored empty (and train to 0.00%)."""
    fails_cleanly(project, "preprocess", "pacs", pattern="domain art_painting: split train has no readable images")
    assert not (project / "data" / "prepared").exists() or not any((project / "data" / "prepared").iterdir())


def test_empty_fraction_splits_of_a_folder_dataset_are_refused(project):
    root = project.parent / "mydata"
    for domain in ("a", "b"):
        for cls in ("x", "y"):
            (root / domain / cls).mkdir(parents=True)
            for i in range(3):
                from PIL import Image
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / domain / cls / f"{i}.png")
    write_params(project, datasets={"mydata": {"root": str(root), "fractions": [0.8, 0.2, 0.0], "image_size": 8}},
                 preprocess={"workers": 1})
    assert runner.invoke(app, ["download", "mydata"]).exit_code == 0
    fails_cleanly(project, "preprocess", "mydata", pattern="domain a: split test has no listed images")


def test_a_same_size_corruption_of_digits_is_found(workdir):
    from dmgcli.datasets.digits import digits_source

    raw = workdir / "data" / "raw" / "digits"
    raw.mkdir(parents=True)
    data = bytearray(digits_source().read_bytes())
    data[len(data) // 2] ^= 0xFF
    (raw / "digits.csv.gz").write_bytes(bytes(data))
    fails_cleanly(workdir, "preprocess", "digits", pattern="digits.csv.gz differs from scikit-learn's copy")
    result = runner.invoke(app, ["download", "digits"])
    assert result.exit_code == 0 and "replaced" in result.output
    assert (raw / "digits.csv.gz").read_bytes() == digits_source().read_bytes()


# --------------------------------------------------------------------------- HDF5 images of the wrong size

def test_a_jpeg_of_another_size_with_a_matching_crc_is_refused(tmp_path):
    """write_split computes the crc of what it is given, so the odd image passes its checksum."""
    from torchvision.io import encode_jpeg
    import torch

    from dmgcli.h5data import CorruptImage, FileInfo, SplitReader, write_split, writing

    path = tmp_path / "odd.h5"
    info = FileInfo(dataset="odd", encoding="jpeg", height=8, width=8, channels=3, classes=("a", "b"),
                    domains=("d0",), provenance={})
    images = [torch.full((3, 8, 8), 100, dtype=torch.uint8)] * 3 + [torch.full((3, 16, 12), 100, dtype=torch.uint8)]
    with writing(path, info) as f:
        write_split(f, "d0", "train", [encode_jpeg(im).numpy().tobytes() for im in images], [0, 1, 0, 1],
                    [f"d0/{i}.jpg" for i in range(4)])
    reader = SplitReader(path, "d0", "train")
    assert reader.image(0).shape == (3, 8, 8)
    with pytest.raises(CorruptImage, match=r"d0/train/d0/3.jpg decodes to 16x12x3, not the file's 8x8x3"):
        reader.image(3)
    line = fails_cleanly(tmp_path, "info", path, "--verify", pattern="1 of 4 images are damaged")
    assert "d0/3.jpg" in line
    from dmgcli.data import BatchStream, DomainImages, decode_batch
    parts = [reader.encoded(i) for i in (0, 3)]
    with pytest.raises(DmgError, match="a batch holds images of sizes 8x8, 16x12"):
        decode_batch(torch.from_numpy(np.concatenate(parts)), torch.tensor([len(p) for p in parts]),
                     torch.device("cpu"))
    # the batched decode (nvJPEG's path, run on the CPU here) of a batch whose images all have the odd size
    stream = BatchStream(DomainImages([reader], [0]), 1, torch.device("cpu"), 0, resident="never",
                         decode_on_device=True)
    with pytest.raises(DmgError, match=r"stored images decode to \(3, 16, 12\), not the file's \(3, 8, 8\)"):
        for _ in stream.batches(torch.tensor([0, 3])):
            pass


def test_preprocess_refuses_to_start_a_file_the_disk_cannot_hold(workdir, monkeypatch):
    """HDF5 on a really full disk prints its own tracebacks and crashes at exit (measured on a
    tmpfs): a disk already too full is refused before the first write."""
    import collections

    from dmgcli import h5write
    from dmgcli.datasets.digits import digits_source

    raw = workdir / "data" / "raw" / "digits"
    raw.mkdir(parents=True)
    shutil.copyfile(digits_source(), raw / "digits.csv.gz")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(h5write.shutil, "disk_usage", lambda path: usage(10**6, 9 * 10**5, 10**5))
    fails_cleanly(workdir, "preprocess", "digits", pattern="disk full: ")


def test_a_write_error_hdf5_could_only_print_fails_the_file(tmp_path):
    """h5py reports a failed metadata flush while freeing an object as "Exception ignored": on a full
    disk the file would be renamed into place incomplete. It is an error instead, and nothing is kept."""
    from dmgcli.h5data import FileInfo, writing

    class FlushFails:
        def __del__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    info = FileInfo(dataset="x", encoding="raw", height=1, width=1, channels=1, classes=("a",), domains=("d",),
                    provenance={})
    with pytest.raises(DmgError, match="the disk is full"):  # atomic_path says it in one line
        with writing(tmp_path / "x.h5", info):
            FlushFails()  # freed at once: its error goes to sys.unraisablehook
    assert list(tmp_path.iterdir()) == []


def test_an_annotation_naming_a_file_outside_the_images_is_refused(tmp_path):
    """TerraIncognita's annotations name the image files: like a split list, they may not leave the folder."""
    import json

    from dmgcli.datasets.benchmarks import sort_by_location

    (tmp_path / "secret.txt").write_text("not an image")
    images, labels = tmp_path / "images" / "eccv_18_all_images_sm", tmp_path / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    (labels / "a.json").write_text(json.dumps({
        "categories": [{"id": 1, "name": "cat"}], "annotations": [{"image_id": "x", "category_id": 1}],
        "images": [{"id": "x", "location": 38, "file_name": "../../secret.txt"}]}))
    with pytest.raises(DmgError, match="a.json: image file_name '../../secret.txt' leaves the image folder"):
        sort_by_location(tmp_path / "images", labels, tmp_path / "sorted", "terra")
    assert not (tmp_path / "sorted").exists()
