"""Atomic file writes, and one writer per output.

Atomic: write to a temporary file beside the target, then rename. A crash or Ctrl-C
mid-write leaves the previous file (or none), never half a file. Only a regular file (or
nothing) is ever replaced: a folder, a symlink or a device node at the target is refused.

Temporary names carry a marker only dmg writes and who wrote them:
`.<name>.~dmg-<pid>-<host>-<random>.tmp` (host: a short hash of the host name). So dmg can
prove a leftover is its own, and that its writer is dead (same host, pid gone), before
deleting it; nothing else is ever deleted. `.old` instead of `.tmp` marks something kept
aside to be restored (stages/train.py: the run a --force or --resume replaces).

One writer: `run_lock` takes an exclusive lock on an output (a run folder, an HDF5 file, a
raw dataset folder) for as long as a stage writes it. The lock is `flock` on a lock file, so
it dies with its process: kill -9 leaves no stale lock. Holding it, the stage deletes the
temporary files of dead dmg writers of the same output.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from . import errors
from .errors import DmgError

MARKER = "~dmg"
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.{MARKER}-(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})-[0-9a-f]{{8}}\.(?P<kind>tmp|old)")


def temp_name(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh marked name beside `path` for a temporary (kind tmp) or kept-aside (old) copy."""
    path = Path(path)
    return path.parent / f".{path.name}.{MARKER}-{os.getpid()}-{HOST}-{secrets.token_hex(4)}.{kind}"


def writer_alive(pid: int, host: str) -> bool:
    """Whether the writer of a marked name may still run: True unless provably dead (this
    host, and no process of that pid). Another host's files are never judged."""
    if host != HOST:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def dead_writers_files(folder: Path, kind: str = "tmp", names: tuple[str, ...] | None = None) -> list[Path]:
    """Marked entries of `kind` at the top of `folder` whose writer is dead; `names`: only those
    temporaries of these target names, or of names starting with one of them plus a dot."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = TEMP_NAME.fullmatch(entry.name)
            if not match or match["kind"] != kind or writer_alive(int(match["pid"]), match["host"]):
                continue
            if names is not None and not any(match["name"] == n or match["name"].startswith(n + ".") for n in names):
                continue
            found.append(Path(folder) / entry.name)
    return sorted(found)


def what_is(path: Path) -> str | None:
    """None when `path` is absent or a regular file; else what it is, in words."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a device or other special file"


def check_replaceable(path: str | Path) -> None:
    """Refuse an output path that holds anything but a regular file: dmg replaces files only."""
    if not Path(path).name or Path(path).name == "..":
        raise DmgError(f"cannot write {shorten(path, 200) or 'an empty path'}: not a file name (an empty --out?)")
    what = what_is(Path(path))
    if what:
        if what == "a folder":
            raise DmgError(f"cannot write {shorten(path, 200)}: a folder of that name is in the way")
        raise DmgError(f"cannot write {shorten(path, 200)}: it is {what}, and dmg replaces only regular files; "
                       f"write elsewhere or remove it")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success.

    The target must be absent or a regular file, checked before and again just before the rename.
    """
    path = Path(path)
    check_replaceable(path)
    make_dirs(path.parent)
    while True:
        tmp = temp_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise DmgError(f"cannot write {shorten(path, 200)}: {exc.strerror or exc}") from None
    try:
        yield tmp
        check_replaceable(path)
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise DmgError(f"cannot write {shorten(path, 200)}: a folder of that name is in the way") from None
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if errors.disk_full(exc):
            raise disk_full(path, exc.strerror) from None
        raise


def disk_full(path: str | Path, reason: str | None = None) -> DmgError:
    """The one line for a write that ran out of space, with what is free there now."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MB free there now"
    except OSError:
        free = "free space unknown"
    return DmgError(f"cannot write {shorten(path, 200)}: the disk is full ({reason or 'no space left'}; {free}); "
                    f"free some space and run the command again")


@contextlib.contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A fresh marked folder inside `parent` (same filesystem, so renames are atomic),
    removed with whatever is left in it when the block ends (for download staging)."""
    parent = make_dirs(parent)
    while True:
        tmp = temp_name(parent / name)
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        remove(tmp)


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
    """Temporary files and folders that dead dmg writers of `target` left behind.

    Only marked names (see the module docstring) whose writer is provably dead. A folder:
    those at its top level. A file `name.ext`: those of `name.ext` and of its companions
    `name.*` beside it (e.g. `pacs.h5` and `pacs.report.json`).
    """
    if folder:
        return dead_writers_files(target)
    return dead_writers_files(target.parent, names=(target.name, Path(target.name).stem))


def remove(path: Path) -> None:
    """Delete a file or a folder dmg made (a marked temporary)."""
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
    removed on exit; the folders this call created are removed again if left empty.
    enabled=False (a torchrun process other than rank 0, which writes nothing) does nothing.
    """
    if not enabled:
        yield
        return
    target = Path(target)
    place = target if folder else target.parent
    created = []  # the folders this call makes, deepest first: removed again if left empty
    for above in (place, *place.parents):
        if above.exists() or above.is_symlink():
            break
        created.append(above)
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
        for made in created:
            try:
                made.rmdir()  # only succeeds when empty
            except OSError:
                break


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
