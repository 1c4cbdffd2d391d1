"""Extracting zip and tar archives so that nothing can land outside the target folder.

Safe by construction rather than by filter: every member is checked before anything is
written, and dmg writes the members itself instead of handing the archive to zipfile's or
tarfile's extractall. A tar may hold only regular files and folders (no symlinks, hardlinks,
devices or fifos), so no path component inside the staging folder is ever a link and no
write can be redirected, whatever the Python version (tarfile's `data` filter was bypassed
through symlinks and PATH_MAX truncation: CVE-2025-4517). A zip may hold links only to
files of the archive; they are created after every file was written.

Both kinds get the same checks: no absolute path or `..` component, no two members that
name the same path once `a//b` and `./a` are normalised, no file that is also a folder, an
expansion plausible for image files (sparse tar members count by their real size), and
enough free space. Extraction goes to a temporary sibling folder renamed when complete, so a
corrupt archive or a full disk leaves nothing behind.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO

from tqdm import tqdm

from .errors import DmgError, disk_full
from .fileio import temp_dir, temp_name

CHUNK = 1 << 20  # bytes per read/write while hashing and copying
MAX_EXPANSION = 20  # images barely compress: a real dataset zip expands by ~1x, a zip bomb by 100x and more
SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
OVERRIDE = "; pass --allow-large if this archive is really what you want"


# --------------------------------------------------------------------------- folders

def replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final`, replacing an older (incomplete) one, by renames."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = temp_name(final, kind="old")  # marked: a kill before the rmtree leaves debris dmg clears
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def write_new_file(src: IO[bytes], target: Path) -> str:
    """Stream `src` into a new file `target` (never an existing file or a link: mode "x"),
    hashing on the way; returns its sha256. A full disk is a DmgError saying so."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with open(target, "xb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except OSError as exc:
        if disk_full(exc):
            raise DmgError(f"disk full while writing {target.parent} (ENOSPC); free some space and run again; "
                           f"the partial copy was removed") from None
        raise
    return digest.hexdigest()


# --------------------------------------------------------------------------- member checks (zip and tar)

def unsafe_reason(name: str) -> str | None:
    """Why a member name could land outside the target folder, or None if it cannot."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' component"
    if "\0" in name:
        return "NUL byte in the name"
    return None


def normal_name(name: str) -> str:
    """The path a member is written to: `photo//dog/./x.jpg/` -> `photo/dog/x.jpg`."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def refuse(archive: Path, member: str, reason: str) -> DmgError:
    return DmgError(f"{archive}: refusing to extract member {member[:120]!r} ({reason}); nothing was extracted")


def check_paths(archive: Path, members: list[tuple[str, bool]]) -> None:
    """members: (name, is a folder). Refuse a name that leaves the folder, names nothing, or
    lands where another member does once normalised; refuse a file that is also a folder."""
    seen: dict[str, bool] = {}
    for name, is_dir in members:
        reason = unsafe_reason(name)
        path = normal_name(name)
        if reason is None and not path and not is_dir:
            reason = "empty file name"
        if reason is None and path in seen and not (is_dir and seen[path]):
            reason = "a second member of the same name" + ("" if name == path else f" once normalised ({path!r})")
        if reason:
            raise refuse(archive, name, reason)
        seen[path] = is_dir
    files = {path for path, is_dir in seen.items() if not is_dir}
    for path in sorted(files):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        while parent:
            if parent in files:
                raise refuse(archive, path, f"its folder {parent!r} is also a file of the archive")
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""


def check_size(archive: Path, total: int, max_bytes: int | None, allow_large: bool) -> None:
    """Refuse an implausible expansion (an archive bomb) and one the disk cannot hold, before
    anything is written. max_bytes: the most the dataset's files can take; None: no such limit."""
    size = max(archive.stat().st_size, 1)
    if not allow_large and total > MAX_EXPANSION * size:
        raise DmgError(f"{archive}: {size / 1e6:.1f} MB would expand to {total / 1e9:.2f} GB ({total // size}x), "
                       f"implausible for image files{OVERRIDE}")
    if not allow_large and max_bytes is not None and total > max_bytes:
        raise DmgError(f"{archive} would expand to {total / 1e9:.2f} GB, more than the dataset's "
                       f"{max_bytes / 1e9:.0f} GB{OVERRIDE}")


def check_space(archive: Path, total: int, folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if total > free:
        raise DmgError(f"disk full: {archive} needs {total / 1e9:.1f} GB to extract, {folder} has "
                       f"{free / 1e9:.1f} GB free")


def write_failure(archive: Path, member: str, exc: BaseException) -> DmgError:
    """What went wrong while writing a member, in the user's terms: only a read error is corruption."""
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return refuse(archive, member, "its name is too long for this filesystem")
    return DmgError(f"{archive}: member {member[:120]!r} is corrupt ({str(exc)[:120]}); delete the archive "
                    f"and fetch it again")


# --------------------------------------------------------------------------- zip

def is_zip_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def check_zip_members(zf: zipfile.ZipFile, archive: Path) -> None:
    """Refuse the whole archive if any member could be written outside the target folder,
    or could not be extracted as a plain file: encrypted, an unsupported compression (deflate64),
    a link to a folder or to nothing, a name given twice."""
    infos = zf.infolist()
    check_paths(archive, [(i.filename, i.is_dir()) for i in infos])
    files = {normal_name(i.filename) for i in infos if not i.is_dir() and not is_zip_link(i)}
    for info in infos:
        reason = None
        if info.flag_bits & 0x1:
            reason = "encrypted"
        elif info.compress_type not in SUPPORTED_COMPRESSION:
            reason = f"compression method {info.compress_type} is not supported (re-zip it with deflate)"
        elif is_zip_link(info):
            target = zf.read(info).decode("utf-8", "replace")
            inside = os.path.normpath(os.path.join(os.path.dirname(normal_name(info.filename)), target))
            if unsafe_reason(target) == "absolute path" or inside == ".." or inside.startswith("../"):
                reason = f"link to {target[:80]!r} outside the archive"
            elif inside not in files:
                reason = f"link to {target[:80]!r}, which is no file of the archive"
        if reason:
            raise refuse(archive, info.filename, reason)


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
    with zf, temp_dir(into.parent, into.name) as tmp:
        check_zip_members(zf, archive)
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        check_size(archive, total, max_bytes, allow_large)
        check_space(archive, total, into.parent)
        hashes, links = {}, []
        member = ""
        try:
            for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", leave=False, disable=None):
                member, path = info.filename, normal_name(info.filename)
                if info.is_dir():
                    (tmp / path).mkdir(parents=True, exist_ok=True)
                elif is_zip_link(info):
                    links.append(info)  # created after the regular files, so no write goes through a link
                else:
                    with zf.open(info) as src:  # zipfile checks the CRC when the member is read to its end
                        hashes[path] = write_new_file(src, tmp / path)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise write_failure(archive, member, exc) from None
        for info in links:  # each points at a file of the archive (check_zip_members): hash that file's
            path, target = normal_name(info.filename), zf.read(info).decode()
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, tmp / path)
            hashes[path] = hashes[os.path.normpath(os.path.join(os.path.dirname(path), target))]
        os.rename(tmp, into)
    return hashes


# --------------------------------------------------------------------------- tar

def tar_kind(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not a regular file or folder, or None."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return f"symbolic link to {member.linkname[:80]!r}: links are not extracted from tars"
    if member.islnk():
        return f"hard link to {member.linkname[:80]!r}: links are not extracted from tars"
    return "a device, fifo or other special file"


def safe_extract_tar(archive: Path, into: Path, max_bytes: int | None = None,
                     allow_large: bool = False) -> dict[str, str]:
    """Extract a tar (.tar, .tar.gz, ...) into folder `into` (must not exist); returns member path -> sha256.

    Like `safe_extract`: every member is checked first (regular files and folders only, names
    inside the folder, a plausible total size, sparse members by their real size), extraction
    goes to a temporary sibling renamed to `into` only when the whole archive was read.
    """
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DmgError(f"{archive} is not a readable tar archive ({exc}): truncated or corrupt; "
                       f"delete it and fetch it again") from None
    with tf, temp_dir(into.parent, into.name) as tmp:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise DmgError(f"{archive} is corrupt ({exc}); delete the archive and fetch it again") from None
        for member in members:
            reason = tar_kind(member)
            if reason:
                raise refuse(archive, member.name, reason)
        check_paths(archive, [(m.name, m.isdir()) for m in members])
        total = sum(m.size for m in members if m.isreg())  # a sparse member's size is its real size
        check_size(archive, total, max_bytes, allow_large)
        check_space(archive, total, into.parent)
        hashes = {}
        member = None
        try:
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file", leave=False, disable=None):
                path = normal_name(member.name)
                if member.isdir():
                    (tmp / path).mkdir(parents=True, exist_ok=True)
                else:
                    with tf.extractfile(member) as src:
                        hashes[path] = write_new_file(src, tmp / path)
                    if (tmp / path).stat().st_size != member.size:
                        raise EOFError(f"{(tmp / path).stat().st_size} of {member.size} bytes")
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise write_failure(archive, member.name if member else "", exc) from None
        os.rename(tmp, into)
    return hashes
