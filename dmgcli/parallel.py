"""A process pool that maps a function over a long list in input order, with bounded memory
(`dmg preprocess` decodes images with it)."""
from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from collections import deque
from itertools import islice
from typing import Callable, Iterable, Iterator


def worker_count(requested: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if requested <= 0 else requested


def make_pool(workers: int):
    """A process pool, or None for one worker (then everything runs in this process).

    Fork on Linux (workers start at once and need nothing re-imported); it is created before
    the HDF5 file is opened, so no open file handle is inherited.
    """
    if workers <= 1:
        return None
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    gc.freeze()  # the children's GC leaves the parent's objects (lists, manifest) alone, so they stay shared
    pool = multiprocessing.get_context(method).Pool(workers)
    gc.unfreeze()
    return pool


def _run_batch(fn: Callable, items: list) -> list:
    return [fn(item) for item in items]


def ordered_map(fn: Callable, items: Iterable, pool, workers: int, batch: int = 32) -> Iterator:
    """fn over items, results in input order; at most 2 batches per worker in flight, so
    memory stays bounded however long `items` is."""
    items = iter(items)
    if pool is None:
        yield from map(fn, items)
        return
    depth = 2 * workers + 1
    pending: deque = deque()
    while chunk := list(islice(items, batch)):
        pending.append(pool.apply_async(_run_batch, (fn, chunk)))
        if len(pending) >= depth:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()
