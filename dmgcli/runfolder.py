"""A run folder's files, and replacing a run without losing it on the way.

A run folder holds best.pt, last.pt, log.csv and run.json (written last: a folder without it
holds an unfinished run). `dmg train --force` (replace) and `--resume` (continue) change a
run that exists; until the new process has written a checkpoint of its own, the run it
replaces is kept aside in `.previous-run.~dmg-<pid>-<host>-<random>.old/` inside the folder
(moved there for --force, hard-linked for --resume, whose last.pt it continues), then:

  - the new process wrote a last.pt of its own: the kept-aside run is deleted;
  - it did not (refused, interrupted, crashed before its first epoch ended): the folder's run
    files become exactly the kept-aside ones again, so nothing of the old run is lost.

The same decision is taken for a kept-aside folder whose writer was killed (kill -9, power
loss) by the next `dmg train` of that folder, under its lock (`recover`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import DmgError
from .fileio import dead_writers_files, remove, temp_name

RUN_FILES = ("run.json", "best.pt", "last.pt", "log.csv")
ASIDE = "previous-run"


def run_files(out: Path) -> list[str]:
    """The run files present in a folder."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_folder(out: Path, resume: bool, force: bool) -> None:
    """Refuse to replace or restart a run unless asked (a finished one may be a pipeline output,
    an unfinished one holds progress), and refuse --resume without a last.pt to continue."""
    if resume:
        if not (out / "last.pt").exists():
            what = "a finished run without last.pt" if (out / "run.json").exists() else "no run to continue"
            raise DmgError(f"--resume: {out} holds {what} (no last.pt); drop --resume to train a new run there"
                           + (" (with --force)" if run_files(out) else ""))
        return
    if force:
        return
    if (out / "run.json").exists():
        raise DmgError(f"{out} holds a finished run (run.json); --resume continues it, --force replaces it, "
                       f"--out FOLDER trains elsewhere")
    if run_files(out):
        raise DmgError(f"{out} holds an unfinished run ({', '.join(run_files(out))}; stopped or still training); "
                       f"--resume continues it, --force replaces it, --out FOLDER trains elsewhere")


def _has_own_checkpoint(out: Path, aside: Path) -> bool:
    """Whether last.pt in `out` was written after the run was set aside (not the kept one)."""
    last, kept = out / "last.pt", aside / "last.pt"
    if not last.exists():
        return False
    if not kept.exists():
        return True
    a, b = last.stat(), kept.stat()  # a hard link, or a copy (copy2 keeps the time; a new write does not)
    return not (os.path.samestat(a, b) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns))


def settle(out: Path, aside: Path) -> None:
    """Drop the kept-aside run when the new one has a checkpoint of its own; else put it back."""
    if not _has_own_checkpoint(out, aside):
        # Until then the new run writes none of the run files (last.pt comes first in an
        # epoch), so putting the kept ones back restores the old run exactly. last.pt goes back
        # last: a kill on the way leaves it kept, and the next `recover` goes on restoring.
        for name in sorted(RUN_FILES, key=lambda n: n == "last.pt"):
            if (aside / name).exists():
                os.replace(aside / name, out / name)
    remove(aside)


def recover(out: Path) -> None:
    """Settle what a killed --force or --resume of this folder kept aside (call holding its lock)."""
    for aside in dead_writers_files(out, kind="old", names=(ASIDE,)):
        settle(out, aside)


@contextlib.contextmanager
def replacing(out: Path, link: bool, enabled: bool = True) -> Iterator[None]:
    """Keep the folder's run aside while the block trains (see the module docstring).
    link: hard-link the checkpoints (--resume reads last.pt) and move only run.json."""
    present = run_files(out) if enabled else []
    if not present:
        yield
        return
    aside = temp_name(out / ASIDE, kind="old")
    aside.mkdir()
    for name in sorted(present, key=lambda n: n != "last.pt"):  # last.pt first: while it is still
        # here and not kept, settle takes it for the new run's own and drops the aside
        if link and name != "run.json":
            try:
                os.link(out / name, aside / name)
            except OSError:  # a filesystem without hard links: a copy keeps the old bytes as well
                shutil.copy2(out / name, aside / name)
        else:
            os.replace(out / name, aside / name)
    try:
        yield
    finally:
        settle(out, aside)
