"""`dmg download` for the real datasets: HTTP resume and retries against a local server,
the sha256 manifest, safe extraction, `--from` zips / folders / mirror URLs, and errors."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import http_server

from dmgcli import transfer
from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.fetch import Manifest, download_url, safe_extract
from dmgcli.params import DownloadParams
from stages.download import download

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


# --------------------------------------------------------------------------- a local HTTP server

class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-`; can cut a response short once."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and server.ranges:
            start = int(ranged.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut.pop(self.path, None)  # announce everything, send only `cut` bytes, hang up
        self.wfile.write(body[start:cut] if cut is not None else body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with http_server(RangeHandler, files={}, requests=[], cut={}, ranges=True) as httpd:
        yield httpd


def resumed_at(range_header: str) -> int:
    """`bytes=N-` -> N."""
    assert range_header.startswith("bytes=") and range_header.endswith("-")
    return int(range_header[6:-1])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- tiny archives

def tiny_pacs_zip(root: str = "kfold/", splits: bool = True, marker: bytes = b"") -> bytes:
    """A PACS-shaped zip: one fake image per domain and class, and the 12 kfold lists."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for domain in PACS_DOMAINS:
            rows = []
            for label, cls in enumerate(PACS_CLASSES, 1):
                rel = f"{domain}/{cls}/pic_{label}.jpg"
                zf.writestr(root + rel, f"{rel}{marker.decode()}".encode() + os.urandom(64))
                rows.append(f"{rel} {label}\n")
            if splits:
                for split in ("train", "crossval", "test"):
                    zf.writestr(f"splits/{domain}_{split}_kfold.txt", "".join(rows))
    return buffer.getvalue()


def evil_zip(member: str, link_target: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("kfold/ok.txt", b"fine")
        if link_target is None:
            zf.writestr(member, b"evil")
        else:
            info = zipfile.ZipInfo(member)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, link_target)
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTTP transfers

def test_transfer_cut_halfway_resumes_with_range(server, tmp_path):
    body = os.urandom(300_000)
    server.files["/data.bin"] = body
    server.cut["/data.bin"] = 150_000
    dest = download_url(f"{server.url}/data.bin", tmp_path / "data.bin", retries=2, backoff=0)
    assert sha(dest.read_bytes()) == sha(body)
    (_, first), (_, second) = server.requests
    assert first is None and 0 < resumed_at(second) <= 150_000  # what had arrived was kept
    assert not (tmp_path / "data.bin.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    body = os.urandom(200_000)
    server.files["/data.bin"] = body
    server.cut["/data.bin"] = 80_000
    with pytest.raises(DmgError, match="could not download .*data.bin after 1 tries"):
        download_url(f"{server.url}/data.bin", tmp_path / "data.bin", retries=0, backoff=0)
    kept = (tmp_path / "data.bin.part").stat().st_size
    assert 0 < kept <= 80_000
    assert not (tmp_path / "data.bin").exists()
    download_url(f"{server.url}/data.bin", tmp_path / "data.bin", retries=0)
    assert server.requests[-1] == ("/data.bin", f"bytes={kept}-")
    assert sha((tmp_path / "data.bin").read_bytes()) == sha(body)


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    body = os.urandom(100_000)
    server.files["/data.bin"], server.ranges = body, False
    (tmp_path / "data.bin.part").write_bytes(body[:30_000] + b"stale")
    download_url(f"{server.url}/data.bin", tmp_path / "data.bin", retries=0)
    assert (tmp_path / "data.bin").read_bytes() == body


def test_dead_link_fails_at_once_with_a_hint(server, tmp_path):
    with pytest.raises(DmgError) as err:
        download_url(f"{server.url}/gone.zip", tmp_path / "gone.zip", retries=3, backoff=0, hint="use --from X")
    assert "HTTP 404" in str(err.value) and str(err.value).endswith("use --from X")
    assert len(server.requests) == 1  # a 404 is not retried


def test_offline_is_one_clear_error(tmp_path):
    params = DownloadParams(source="http://127.0.0.1:9/PACS.zip", retries=1)  # port 9: nothing listens
    with pytest.raises(DmgError) as err:
        download("pacs", tmp_path, params)
    message = str(err.value)
    assert "\n" not in message
    assert "could not download http://127.0.0.1:9/PACS.zip after 2 tries (connection refused)" in message
    assert "dmg download pacs --from PATH/PACS.zip" in message


def test_google_drive_failure_says_what_to_fetch(tmp_path, monkeypatch):
    import gdown

    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(DmgError) as err:
        download("pacs", tmp_path, DownloadParams(retries=0))
    message = str(err.value)
    assert "\n" not in message and "host not found: offline?" in message
    assert "fetch https://drive.google.com/uc?id=" in message and "--from PATH/pacs.zip" in message
    assert str(tmp_path / "raw" / "pacs" / "downloads" / "pacs.zip") in message


def test_offline_drive_download_is_one_quiet_try_and_leaves_no_folders(tmp_path, monkeypatch):
    import gdown

    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", offline)
    monkeypatch.setattr(transfer, "host_resolves", lambda host: False)
    with pytest.raises(DmgError, match="host not found: offline?"):
        download("pacs", tmp_path / "data", DownloadParams(retries=3))
    assert [(c["quiet"], c["retries"]) for c in calls] == [(True, 0)]  # no retry lines before the error
    assert not (tmp_path / "data").exists()  # not even an empty data/raw/pacs


def test_drive_links_go_through_gdown(tmp_path, monkeypatch):
    import gdown

    calls = []

    def fake(**kwargs):  # gdown stands in for Drive: it writes the archive where it was asked to
        calls.append(kwargs)
        Path(kwargs["output"]).write_bytes(tiny_pacs_zip())
        return kwargs["output"]

    monkeypatch.setattr(gdown, "download", fake)
    monkeypatch.setattr(transfer, "host_resolves", lambda host: True)  # online, as far as the retries go
    link = "https://drive.google.com/uc?id=MIRROR_ID"
    raw = download("pacs", tmp_path, DownloadParams(source=link, retries=2))
    assert calls[0]["url"] == link and calls[0]["resume"] and calls[0]["retries"] == 2
    assert (raw / "images" / "photo" / "dog" / "pic_1.jpg").exists()
    assert "pacs.zip" in json.loads((raw / "MANIFEST.json").read_text())["sources"]


# --------------------------------------------------------------------------- PACS from a mirror URL

def test_mirror_download_records_verifies_and_is_idempotent(server, tmp_path, capsys):
    server.files["/PACS.zip"] = tiny_pacs_zip()
    params = DownloadParams(source=f"{server.url}/PACS.zip", retries=0)
    raw = download("pacs", tmp_path, params)
    manifest = json.loads((raw / "MANIFEST.json").read_text())
    assert manifest["sources"]["PACS.zip"]["sha256"] == sha(server.files["/PACS.zip"])
    assert len([k for k in manifest["files"] if k.startswith("images/")]) == 28
    assert len([k for k in manifest["files"] if k.startswith("splits/")]) == 12
    assert (raw / "images" / "sketch" / "person" / "pic_7.jpg").exists()
    assert not (raw / "downloads").exists()  # our own download is dropped once extracted

    requests = len(server.requests)
    capsys.readouterr()
    download("pacs", tmp_path, params)
    assert "present and verified" in capsys.readouterr().out
    assert len(server.requests) == requests  # nothing fetched


def test_wrong_checksum_is_refused(server, tmp_path):
    server.files["/PACS.zip"] = tiny_pacs_zip()
    params = DownloadParams(source=f"{server.url}/PACS.zip", retries=0)
    raw = download("pacs", tmp_path, params)
    # the images get lost; meanwhile the mirror serves another file under the same name
    import shutil
    shutil.rmtree(raw / "images")
    server.files["/PACS.zip"] = tiny_pacs_zip(marker=b"tampered")
    with pytest.raises(DmgError, match=r"PACS.zip: sha256 .* differs from .* recorded in .*MANIFEST.json"):
        download("pacs", tmp_path, params)
    assert not (raw / "images").exists()
    assert not any(p.name.startswith(".") for p in raw.iterdir())  # no staging folder left behind


def test_changed_file_is_named(server, tmp_path):
    server.files["/PACS.zip"] = tiny_pacs_zip()
    params = DownloadParams(source=f"{server.url}/PACS.zip", retries=0)
    raw = download("pacs", tmp_path, params)
    victim = raw / "images" / "photo" / "dog" / "pic_1.jpg"
    victim.write_bytes(b"bit rot")
    with pytest.raises(DmgError, match=f"{victim} changed since it was fetched"):
        download("pacs", tmp_path, params)


def test_missing_file_is_restored_from_the_archive(server, tmp_path):
    server.files["/PACS.zip"] = tiny_pacs_zip()
    params = DownloadParams(source=f"{server.url}/PACS.zip", retries=0)
    raw = download("pacs", tmp_path, params)
    victim = raw / "images" / "cartoon" / "horse" / "pic_5.jpg"
    original = victim.read_bytes()
    victim.unlink()
    download("pacs", tmp_path, params)
    assert victim.read_bytes() == original


# --------------------------------------------------------------------------- safe extraction

@pytest.mark.parametrize("member,link", [
    ("../evil.txt", None),
    ("kfold/../../evil.txt", None),
    ("ABSOLUTE", None),
    ("kfold/link", "../../evil.txt"),
    ("kfold/abslink", "ABSOLUTE"),
])
def test_malicious_zip_is_refused_and_nothing_written(tmp_path, member, link):
    absolute = str(tmp_path / "outside" / "evil.txt")
    member = member.replace("ABSOLUTE", absolute)
    link = link.replace("ABSOLUTE", absolute) if link else None
    archive = tmp_path / "evil.zip"
    archive.write_bytes(evil_zip(member, link))
    target = tmp_path / "work" / "target"
    target.parent.mkdir()
    with pytest.raises(DmgError, match="refusing to extract member"):
        safe_extract(archive, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no staging folder left
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()
    assert not Path(absolute).exists()


def test_malicious_zip_through_download_leaves_raw_folder_empty(tmp_path):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(evil_zip("../../evil.txt"))
    with pytest.raises(DmgError, match="refusing to extract"):
        download("pacs", tmp_path / "data", DownloadParams(source=str(archive)))
    raw = tmp_path / "data" / "raw" / "pacs"
    assert not (raw / "images").exists() and not (raw / "MANIFEST.json").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


def test_link_inside_the_archive_is_allowed(tmp_path):
    archive = tmp_path / "ok.zip"
    archive.write_bytes(evil_zip("kfold/alias.txt", "ok.txt"))
    hashes = safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "kfold" / "alias.txt").read_bytes() == b"fine"
    assert hashes["kfold/alias.txt"] == sha(b"fine")


def test_truncated_archive_is_an_error_not_a_half_folder(tmp_path):
    data = tiny_pacs_zip()
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DmgError, match="not a readable zip archive"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_is_an_error_not_a_half_folder(tmp_path):
    buffer = io.BytesIO()
    payload = os.urandom(50_000)
    with zipfile.ZipFile(buffer, "w") as zf:  # stored, so the payload sits in the file as is
        zf.writestr("a/first.bin", b"fine")
        zf.writestr("a/second.bin", payload)
    data = bytearray(buffer.getvalue())
    at = bytes(data).index(payload[:64]) + 25_000
    data[at:at + 8] = bytes(8 - i for i in range(8))  # flip bytes inside the second member: CRC fails
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DmgError, match="member 'a/second.bin' is corrupt"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [archive]


# --------------------------------------------------------------------------- --from and --splits

def test_from_extracted_folder_with_splits_option(tmp_path):
    source = tmp_path / "copy"
    with zipfile.ZipFile(io.BytesIO(tiny_pacs_zip())) as zf:
        zf.extractall(source)
    lists = tmp_path / "lists"
    (source / "splits").rename(lists)
    params = DownloadParams(source=str(source / "kfold"), splits=str(lists))
    raw = download("pacs", tmp_path / "data", params)
    assert (raw / "splits" / "sketch_crossval_kfold.txt").read_text().startswith("sketch/dog/pic_1.jpg 1")
    assert (source / "kfold" / "photo" / "dog" / "pic_1.jpg").exists()  # the user's copy is left alone
    assert Manifest(raw, "pacs").verify("images/") == []


def test_missing_split_lists_name_the_files_and_the_option(tmp_path):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(tiny_pacs_zip(splits=False))
    with pytest.raises(DmgError) as err:
        download("pacs", tmp_path / "data", DownloadParams(source=str(archive)))
    assert "art_painting_train_kfold.txt" in str(err.value) and "--splits FOLDER" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "pacs" / "images").exists()


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(f"data_dir: {tmp_path / 'data'}\n")
    result = CliRunner().invoke(app, ["download", "pacs", "--from", str(tmp_path / "nowhere.zip"),
                                      "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"dmg: error: --from {tmp_path / 'nowhere.zip'}: no such file or folder"]


# --------------------------------------------------------------------------- DomainNet

DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def tiny_domainnet(folder: Path, extracted: tuple[str, ...] = ()) -> None:
    """Per domain a zip (or an extracted folder) with two images, official lists, tv_0.9 lists."""
    (folder / "txt").mkdir(parents=True)
    (folder / "tv").mkdir()
    for label, domain in enumerate(DOMAINNET):
        rels = [f"{domain}/cls{label}/{domain}_{i}.jpg" for i in range(2)]
        if domain in extracted:
            for rel in rels:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(rel.encode())
        else:
            with zipfile.ZipFile(folder / f"{domain}.zip", "w") as zf:
                for rel in rels:
                    zf.writestr(rel, rel.encode())
        (folder / "txt" / f"{domain}_train.txt").write_text(f"{rels[0]} {label}\n")
        (folder / "txt" / f"{domain}_test.txt").write_text(f"{rels[1]} {label}\n")
        (folder / "tv" / f"{domain}_val.txt").write_text(f"{rels[0]} {label}\n")


def test_domainnet_from_folder_then_nothing_to_do(tmp_path, capsys):
    source = tmp_path / "mirror"
    tiny_domainnet(source, extracted=("real",))
    params = DownloadParams(source=str(source), splits=str(source / "tv"))
    raw = download("domainnet", tmp_path / "data", params)
    for domain in DOMAINNET:
        assert (raw / "images" / domain / f"cls{DOMAINNET.index(domain)}" / f"{domain}_1.jpg").exists()
        assert (raw / "splits" / "official" / f"{domain}_test.txt").exists()
        assert (raw / "splits" / "tv_0.9" / f"{domain}_val.txt").exists()
    assert len(Manifest(raw, "domainnet").under("images/")) == 12
    capsys.readouterr()
    download("domainnet", tmp_path / "data", params)
    assert "nothing to do" in capsys.readouterr().out


def test_domainnet_mirror_url_fetches_lists_and_zips(server, tmp_path):
    source = tmp_path / "mirror"
    tiny_domainnet(source)
    from dmgcli.datasets.domainnet import DOMAINNET_ARCHIVES, DOMAINNET_LISTS
    for domain, rel in DOMAINNET_ARCHIVES.items():
        server.files[f"/mirror/{rel}"] = (source / f"{domain}.zip").read_bytes()
        for split in ("train", "test"):
            server.files[f"/mirror/{DOMAINNET_LISTS}{domain}_{split}.txt"] = \
                (source / "txt" / f"{domain}_{split}.txt").read_bytes()
    raw = download("domainnet", tmp_path / "data", DownloadParams(source=f"{server.url}/mirror/", retries=0))
    assert len(Manifest(raw, "domainnet").under("images/")) == 12
    assert len(Manifest(raw, "domainnet").sources) == 18  # 6 zips + 12 lists, each with its sha256
    assert not (raw / "downloads").exists()
