"""Atomic file writes, and one writer per output.

Atomic: write to a temporary file beside the target (`.<name>.<random>.tmp`), then rename.
A crash or Ctrl-C mid-write leaves the previous file (or none), never half a file.

One writer: `run_lock` takes an exclusive lock on an output (a run folder, an HDF5 file, a
raw dataset folder) for as long as a stage writes it. The lock is `flock` on a lock file, so
it dies with its process: kill -9 leaves no stale lock. Holding it, the stage may delete the
temporary files an earlier, killed run of the same output left behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import DmgError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DmgError(f"cannot write {shorten(path, 200)}: {exc.strerror or exc}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise DmgError(f"cannot write {shorten(path, 200)}: a folder of that name is in the way") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_dirs(folder: str | Path) -> Path:
    """mkdir -p with a one-line error when the place is a file or not writable."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DmgError(f"cannot create folder {shorten(folder, 200)}: a file of that name (or above it) is in "
                       f"the way") from None
    except OSError as exc:
        raise DmgError(f"cannot create folder {shorten(folder, 200)}: {exc.strerror or exc}") from None
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def read_record(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object written by dmg, with its `required` keys; a corrupt file is a DmgError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DmgError(f"{path} is unreadable ({shorten(str(exc))}); delete it and re-run the stage that "
                       f"wrote it") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if not isinstance(data, dict) or missing:
        raise DmgError(f"{path} is not a complete dmg record (missing {', '.join(missing) or 'an object'}); "
                       f"delete it and re-run the stage that wrote it")
    return data


def shorten(text: str, limit: int = 80) -> str:
    """One line of at most `limit` characters, for quoting user input or library messages."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- one writer per output

LOCK_NAME = ".dmg.lock"


def lock_file_of(target: Path, folder: bool) -> Path:
    """A folder is locked by a file inside it, a file by a hidden file beside it."""
    return target / LOCK_NAME if folder else target.parent / f".{target.name}.lock"


def debris_of(target: Path, folder: bool) -> list[Path]:
    """Temporary files and folders that a killed writer of `target` left behind.

    A folder: every `.*.tmp` (atomic writes, download staging) and `.*.old.*` (a folder
    being replaced) at its top level. A file `name.ext`: `.name.*.tmp` beside it (the file
    and its companions, e.g. `pacs.h5` and `pacs.report.json`).
    """
    if folder:
        return sorted({*target.glob(".*.tmp"), *target.glob(".*.old.*")})
    stem = target.name.split(".")[0]
    return sorted(target.parent.glob(f".{stem}.*.tmp"))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_lock(target: str | Path, folder: bool = True, enabled: bool = True) -> Iterator[None]:
    """Hold the only write access to output `target` (a folder, or a file with folder=False).

    A second writer is refused with one line naming the holder (pid, command, start time).
    Once the lock is held, debris of an earlier killed writer is deleted. The lock file is
    removed on exit; a folder this call created is removed again if it is left empty.
    enabled=False (a torchrun process other than rank 0, which writes nothing) does nothing.
    """
    if not enabled:
        yield
        return
    target = Path(target)
    place = target if folder else target.parent
    created = not place.exists()
    make_dirs(place)
    lock_path = lock_file_of(target, folder)
    fh = _acquire(lock_path, target)
    try:
        fh.truncate(0)
        fh.write(json.dumps({"pid": os.getpid(), "command": " ".join(["dmg", *sys.argv[1:]]),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        fh.flush()
        for path in debris_of(target, folder):
            remove(path)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # while still holding it: see _acquire for why this is safe
        fh.close()
        if created:
            with contextlib.suppress(OSError):
                place.rmdir()  # only succeeds when empty


def _acquire(lock_path: Path, target: Path):
    """Open and flock the lock file, retrying when its holder removed it meanwhile."""
    while True:
        try:
            fh = open(lock_path, "a+")
        except OSError as exc:
            raise DmgError(f"cannot write {target}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DmgError(f"cannot lock {target}: {exc.strerror or exc}") from None
            raise DmgError(f"{target} is being written by another dmg process ({holder(lock_path)}); "
                           f"wait for it to finish or write elsewhere") from None
        # The previous holder unlinks the file before releasing it: if ours is no longer the
        # file at lock_path, we locked an orphan and must try again.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()


def holder(lock_path: Path) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']}, `{shorten(info['command'])}`, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown, just started"
