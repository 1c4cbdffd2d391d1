"""Fetching raw dataset files safely.

- `download_url`: HTTP(S) with a progress bar, resume of a partial `<name>.part` file through
  an HTTP Range request, and a bounded number of retries.
- `download_gdrive`: Google Drive files through the maintained `gdown` library (Drive's
  confirmation pages and cookies are its business, not ours).
- `Manifest`: `MANIFEST.json` of a raw dataset folder. It records the sha256 of every
  archive and list fetched and of every file placed in the folder the first time they are
  seen (trust on first use) and compares them on every later run; a difference is an error
  that names the file.
- `safe_extract` / `copy_tree`: build a folder under a temporary name and rename it when
  complete, so a truncated or corrupt archive leaves nothing behind. No zip member may
  leave the target folder: absolute paths, `..` components and links pointing outside are
  refused before anything is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from .errors import DmgError
from .fileio import write_json

CHUNK = 1 << 20  # bytes per read/write while hashing and copying
NET_CHUNK = 1 << 16  # bytes per network read: what arrived before a cut-off is kept for the resume
DEAD_LINK_STATUS = (401, 403, 404, 410)  # retrying will not help


def is_url(text: str) -> bool:
    return urlparse(str(text)).scheme in ("http", "https")


def url_basename(url: str) -> str:
    """The file name a URL points at (`.../PACS.zip?dl=1` -> `PACS.zip`)."""
    return unquote(PurePosixPath(urlparse(url).path).name) or "download"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: list[Path], desc: str = "verify") -> list[str]:
    """sha256 of many files; threads overlap the reads (hashlib releases the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_hash_or_none, paths, chunksize=64)
        return list(tqdm(results, total=len(paths), desc=desc, unit="file", disable=True if len(paths) < 1000 else None,
                         leave=False))


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- manifest

class Manifest:
    """MANIFEST.json of one raw dataset folder.

    sources: archives and lists as fetched: name -> {"sha256", "size", "origin"}
    files:   every file placed under the folder: path relative to it -> sha256
    """

    NAME = "MANIFEST.json"

    def __init__(self, folder: str | Path, dataset: str):
        self.folder, self.dataset = Path(folder), dataset
        self.path = self.folder / self.NAME
        data = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise DmgError(f"{self.path} is unreadable ({exc}); delete it to record the files afresh") from None
        self.sources: dict[str, dict] = data.get("sources", {})
        self.files: dict[str, str] = data.get("files", {})

    def under(self, prefix: str) -> dict[str, str]:
        """Recorded files whose relative path starts with `prefix` (a folder, with trailing /)."""
        return {rel: sha for rel, sha in self.files.items() if rel.startswith(prefix)}

    def verify(self, prefix: str) -> list[str]:
        """Re-hash the recorded files under `prefix`; return those missing, raise on a changed one.

        An empty list means everything recorded under prefix is present and unchanged; with
        nothing recorded at all, the prefix counts as missing.
        """
        recorded = self.under(prefix)
        if not recorded:
            return [prefix]
        names = sorted(recorded)
        hashes = hash_files([self.folder / rel for rel in names], desc=f"verify {prefix}")
        missing = []
        for rel, sha in zip(names, hashes):
            if sha is None:
                missing.append(rel)
            elif sha != recorded[rel]:
                raise DmgError(f"{self.folder / rel} changed since it was fetched (sha256 {sha[:16]}..., "
                               f"{self.NAME} has {recorded[rel][:16]}...): delete it and run "
                               f"`dmg download {self.dataset}` again to restore it")
        return missing

    def check_source(self, name: str, path: Path, origin: str) -> str:
        """Hash a fetched archive or list; record it the first time, compare it afterwards."""
        sha = sha256_file(path)
        recorded = self.sources.get(name)
        if recorded and recorded["sha256"] != sha:
            raise DmgError(f"{path}: sha256 {sha} differs from {recorded['sha256']} recorded in {self.path} "
                           f"when {name} was first fetched; it is corrupt or another release: delete it to "
                           f"fetch it again, or delete {self.path} to trust the new file")
        self.sources[name] = {"sha256": sha, "size": path.stat().st_size, "origin": origin}
        return sha

    def check_files(self, prefix: str, hashes: dict[str, str], origin: str) -> None:
        """Compare a freshly placed folder (`hashes`: path under prefix -> sha256) with the record.

        Nothing recorded under prefix: record it (trust on first use). Otherwise the new copy
        must hold exactly the recorded files with the recorded contents.
        """
        new = {prefix + rel: sha for rel, sha in hashes.items()}
        recorded = self.under(prefix)
        if recorded:
            for rel, sha in sorted(new.items()):
                if rel not in recorded:
                    raise DmgError(f"{origin}: {rel} is not in {self.path}; delete the manifest to trust this copy")
                if recorded[rel] != sha:
                    raise DmgError(f"{origin}: {rel} has sha256 {sha[:16]}..., {self.path} recorded "
                                   f"{recorded[rel][:16]}...; delete the manifest to trust this copy")
            absent = sorted(set(recorded) - set(new))
            if absent:
                raise DmgError(f"{origin} lacks {absent[0]} (and {len(absent) - 1} more) recorded in {self.path}")
        self.files.update(new)

    def check_file(self, rel: str, sha: str, origin: str) -> None:
        """Record one file's sha256 the first time; afterwards it must match."""
        recorded = self.files.get(rel)
        if recorded and recorded != sha:
            raise DmgError(f"{origin}: sha256 {sha[:16]}... differs from {recorded[:16]}... recorded for {rel} in "
                           f"{self.path}; delete the manifest to trust this copy")
        self.files[rel] = sha

    def save(self) -> None:
        write_json(self.path, {"dataset": self.dataset, "sources": self.sources,
                               "files": dict(sorted(self.files.items()))})


# --------------------------------------------------------------------------- downloads

class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived."""


def download_url(url: str, dest: Path, retries: int = 3, timeout: float = 60.0, hint: str = "",
                 backoff: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` and retrying up to `retries` times.

    Returns dest. A complete transfer is renamed from `<dest>.part` to dest, so a file at
    dest is always whole. Failure raises one DmgError line ending with `hint`.
    """
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    reason = ""
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout)
            os.replace(part, dest)
            return dest
        except _DeadLink as exc:
            reason = str(exc)
            break
        except (requests.RequestException, _Incomplete, OSError) as exc:
            reason = short_reason(exc)
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    tries = "" if reason.startswith("HTTP") else f" after {retries + 1} tries"
    raise DmgError(f"could not download {url}{tries} ({reason}); {hint}".rstrip("; "))


class _DeadLink(Exception):
    pass


NETWORK_REASONS = (  # fragments of requests/urllib3 messages -> what they mean, in a few words
    ("Failed to resolve", "host not found: offline?"), ("Name or service not known", "host not found: offline?"),
    ("Connection refused", "connection refused"), ("timed out", "timed out"),
    ("Network is unreachable", "network unreachable: offline?"),
)


def short_reason(exc: BaseException) -> str:
    """A network error in a few words (requests' own messages run to several hundred characters)."""
    text = str(exc)
    for fragment, reason in NETWORK_REASONS:
        if fragment in text:
            return reason
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}".rstrip(": ")


def _transfer(url: str, part: Path, timeout: float) -> None:
    """One attempt: continue `part` from its current size (Range) or start it afresh."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    # identity: a compressed transfer would not match Content-Length or byte ranges
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # nothing after `have`: complete if the server's length says so
            total = _range_total(response.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise _Incomplete(f"server refused to resume at byte {have}")
        if response.status_code in DEAD_LINK_STATUS:
            raise _DeadLink(f"HTTP {response.status_code}")
        response.raise_for_status()
        if response.status_code == 206 and _range_start(response.headers.get("Content-Range", "")) == have:
            mode = "ab"
        else:  # the server ignored the Range header: start over
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=part.name[:-5], leave=False) as bar:
            for chunk in response.iter_content(NET_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"got {size} of {total} bytes")


def _range_start(content_range: str) -> int | None:
    """`bytes 100-199/200` -> 100."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _range_total(content_range: str) -> int | None:
    """`bytes */200` or `bytes 100-199/200` -> 200."""
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def host_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def is_gdrive(text: str) -> bool:
    return is_url(text) and urlparse(text).netloc in ("drive.google.com", "docs.google.com")


def download_gdrive(source: str, dest: Path, retries: int = 3, timeout: float = 60.0, hint: str = "") -> Path:
    """Download a Google Drive file (an id or a Drive URL) with gdown, which resumes and retries itself."""
    import gdown

    dest.parent.mkdir(parents=True, exist_ok=True)
    where = {"url": source} if is_url(source) else {"id": source}
    # Offline (the host does not resolve), retrying cannot help and gdown's retry lines would
    # bury the one line below that says what to do: one quiet attempt instead.
    offline = not host_resolves(urlparse(source).netloc if is_url(source) else "drive.google.com")
    try:
        out = gdown.download(**where, output=str(dest), quiet=offline, resume=True, retries=0 if offline else retries,
                             timeout=timeout)
    except Exception as exc:  # gdown raises its own, requests' and OS errors alike
        raise DmgError(f"could not download {dest.name} from Google Drive ({source}: {short_reason(exc)}); "
                       f"{hint}".rstrip("; ")) from None
    if not out or not dest.exists():
        raise DmgError(f"could not download {dest.name} from Google Drive ({source}); {hint}".rstrip("; "))
    return dest


# --------------------------------------------------------------------------- extraction

@contextlib.contextmanager
def staging(parent: Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder inside `parent` (same filesystem, so renames are atomic),
    removed with whatever is left in it when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final`, replacing an older (incomplete) one, by renames."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _unsafe_reason(name: str) -> str | None:
    """Why a member name could land outside the target folder, or None if it cannot."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' component"
    return None


SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
MAX_EXPANSION = 20  # images barely compress: a real dataset zip expands by ~1x, a zip bomb by 100x and more


def check_zip_members(zf: zipfile.ZipFile, archive: Path) -> None:
    """Refuse the whole archive if any member could be written outside the target folder,
    or could not be extracted as a plain file: encrypted, an unsupported compression (deflate64),
    a link to a folder or to nothing, a name given twice."""
    infos = zf.infolist()
    files = {i.filename for i in infos if not i.is_dir() and not _is_link(i)}
    seen: set[str] = set()
    for info in infos:
        name = info.filename.rstrip("/")
        reason = _unsafe_reason(info.filename)
        if reason is None and name in seen:
            reason = "a second member of the same name"
        if reason is None and info.flag_bits & 0x1:
            reason = "encrypted"
        if reason is None and info.compress_type not in SUPPORTED_COMPRESSION:
            reason = f"compression method {info.compress_type} is not supported (re-zip it with deflate)"
        if reason is None and _is_link(info):
            target = zf.read(info).decode("utf-8", "replace")
            inside = os.path.normpath(os.path.join(os.path.dirname(info.filename), target))
            if _unsafe_reason(target) == "absolute path" or inside == ".." or inside.startswith("../"):
                reason = f"link to {target[:80]!r} outside the archive"
            elif inside not in files:
                reason = f"link to {target[:80]!r}, which is no file of the archive"
        seen.add(name)
        if reason:
            raise DmgError(f"{archive}: refusing to extract member {info.filename[:120]!r} ({reason}); "
                           f"nothing was extracted")


def check_zip_size(zf: zipfile.ZipFile, archive: Path, max_bytes: int | None) -> None:
    """Refuse an archive whose directory announces an implausible expansion (a zip bomb), before
    anything is written. max_bytes: the most the dataset's files can take; None: no such limit."""
    total = sum(i.file_size for i in zf.infolist())
    size = max(archive.stat().st_size, 1)
    override = "; pass --allow-large if this archive is really what you want"
    if total > MAX_EXPANSION * size:
        raise DmgError(f"{archive}: {size / 1e6:.1f} MB would expand to {total / 1e9:.2f} GB ({total // size}x), "
                       f"implausible for image files{override}")
    if max_bytes is not None and total > max_bytes:
        raise DmgError(f"{archive} would expand to {total / 1e9:.2f} GB, more than the dataset's "
                       f"{max_bytes / 1e9:.0f} GB{override}")


def safe_extract(archive: Path, into: Path, max_bytes: int | None = None, allow_large: bool = False) -> dict[str, str]:
    """Extract a zip into folder `into` (must not exist); returns member path -> sha256.

    Every member is checked before anything is written (and the total size, unless
    allow_large); extraction goes to a temporary sibling folder renamed to `into` only after
    the last member passed its CRC check.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise DmgError(f"{archive} is not a readable zip archive ({exc}): truncated or corrupt; "
                       f"delete it and fetch it again") from None
    with zf, staging(into.parent, into.name) as tmp:
        check_zip_members(zf, archive)
        if not allow_large:
            check_zip_size(zf, archive, max_bytes)
        infos = zf.infolist()
        needed, free = sum(i.file_size for i in infos), shutil.disk_usage(into.parent).free
        if needed > free:
            raise DmgError(f"{archive} needs {needed / 1e9:.1f} GB to extract, {into.parent} has {free / 1e9:.1f} GB free")
        hashes, links = {}, []
        member = ""
        try:
            for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", leave=False, disable=None):
                member = info.filename
                if info.is_dir():
                    (tmp / member).mkdir(parents=True, exist_ok=True)
                elif _is_link(info):
                    links.append(info)  # created after the regular files, so no write goes through a link
                else:
                    hashes[member] = _extract_member(zf, info, tmp / member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise DmgError(f"{archive}: member {member[:120]!r} is corrupt ({str(exc)[:120]}); delete the archive "
                           f"and fetch it again") from None
        for info in links:
            (tmp / info.filename).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(zf.read(info).decode(), tmp / info.filename)
            hashes[info.filename] = sha256_file(tmp / info.filename)
        os.rename(tmp, into)
    return hashes


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> str:
    """Stream one member to `target`, hashing it on the way; zipfile checks its CRC at the end."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with zf.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


def copy_tree(src: Path, into: Path) -> dict[str, str]:
    """Copy a folder (links followed) to `into` through a temporary sibling; path -> sha256."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    hashes = {}
    with staging(into.parent, into.name) as tmp:
        for path in tqdm(files, desc=f"copy {src.name}", unit="file", leave=False, disable=None):
            rel = path.relative_to(src).as_posix()
            hashes[rel] = _copy_file(path, tmp / rel)
        os.rename(tmp, into)
    return hashes


def _copy_file(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def copy_file(src: Path, dst: Path) -> str:
    """Copy one file atomically (temporary name, then rename); returns its sha256."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        sha = _copy_file(src, tmp)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return sha


def find_files(roots: Iterable[Path], names: set[str], max_depth: int = 3,
               skip: frozenset[str] = frozenset()) -> dict[str, Path]:
    """First file found for each wanted name, searching each root breadth-first to max_depth.

    Folders named in `skip` (image folders holding thousands of files) are not entered.
    """
    found: dict[str, Path] = {}
    for root in roots:
        level = [root] if root.is_dir() else []
        for _ in range(max_depth + 1):
            following = []
            for folder in level:
                try:
                    children = sorted(folder.iterdir())
                except OSError:
                    continue
                for child in children:
                    if child.name in names and child.name not in found and child.is_file():
                        found[child.name] = child
                    elif child.name not in skip and child.is_dir():
                        following.append(child)
            level = following
    return found


def find_folder(root: Path, children: set[str], max_depth: int = 3) -> Path | None:
    """The shallowest folder under root (root included) that holds every name in `children`
    as a sub-folder, e.g. the folder holding PACS's four domain folders."""
    level = [root]
    for _ in range(max_depth + 1):
        following = []
        for folder in level:
            if all((folder / name).is_dir() for name in children):
                return folder
            try:
                following += sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in children)
            except OSError:
                continue
        level = following
    return None


def subtree(hashes: dict[str, str], root: Path, base: Path) -> dict[str, str]:
    """The entries of `hashes` (paths relative to base) under folder root, made relative to root."""
    prefix = root.relative_to(base).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    return {rel[len(prefix):]: sha for rel, sha in hashes.items() if rel.startswith(prefix)}


def safe_extract_tar(archive: Path, into: Path) -> dict[str, str]:
    """Extract a tar (.tar, .tar.gz, ...) into folder `into` (must not exist); returns member path -> sha256.

    Like `safe_extract`: every member is checked first (Python's `data` filter: no absolute
    paths, no `..`, no links leaving the folder, no devices), extraction goes to a temporary
    sibling renamed to `into` only when the whole archive was read.
    """
    import tarfile

    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DmgError(f"{archive} is not a readable tar archive ({exc}): truncated or corrupt; "
                       f"delete it and fetch it again") from None
    with tf, staging(into.parent, into.name) as tmp:
        try:
            members = tf.getmembers()
            for member in members:
                try:
                    tarfile.data_filter(member, str(tmp))
                except tarfile.FilterError as exc:
                    raise DmgError(f"{archive}: refusing to extract member {member.name!r} ({exc}); "
                                   f"nothing was extracted") from None
            tf.extractall(tmp, filter="data")
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise DmgError(f"{archive} is corrupt ({exc}); delete the archive and fetch it again") from None
        hashes = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        os.rename(tmp, into)
    return hashes
