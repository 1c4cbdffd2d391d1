"""Stage 2, preprocess: raw files -> one HDF5 file per dataset (layout in dmgcli.h5layout).

The dataset's adapter (dmgcli/datasets/) lists the images: (path, label) per domain and
split. Everything here is the same for every dataset: each image is decoded, turned RGB
(transparent pixels over white; 16-bit images scaled to 8 bits), made a square of
`image_size` as the adapter says (`center_crop`: shorter side resized, central square kept;
`squash`: the whole image resized, aspect not kept), then stored as JPEG bytes or raw
pixels (dmgcli/image_encoding.py). The work runs in a process pool over all cores
(dmgcli/parallel.py); results come back in list order with a bounded number of batches in
flight and are appended to the file as they arrive, so memory does not grow with the
number of images. An image listed twice in one domain
(PACS: every test image is also a train or val image) is decoded once and copied.

A dataset with an empty split (none listed, or none readable) is refused: training or testing
on no images would report 0.00% instead of failing. A disk too full for the file is refused
before the first write.

Unreadable images are left out and listed in <dataset>.report.json beside the HDF5 file,
with every group of byte-identical source images (policy: kept where the lists put them).
The file's provenance holds a fingerprint of the inputs (the raw folder's MANIFEST.json)
and of the parameters; a re-run with the same fingerprint does nothing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from dmgcli import __version__
from dmgcli.datasets import DatasetInfo, ImagePlan, SplitPlan, get_dataset, h5_path, raw_dir, report_path
from dmgcli.errors import DmgError, disk_full
from dmgcli.fetch import Manifest, sha256_file
from dmgcli.fileio import run_lock, write_json
from dmgcli.h5data import FORMAT, VERSION, FileInfo, SplitAppender, StoredSplit, check_room, read_info, writing
from dmgcli.image_encoding import RESIZE_NOTES, ImageEncoder
from dmgcli.parallel import make_pool, ordered_map, worker_count
from dmgcli.params import PreprocessParams

# --------------------------------------------------------------------------- settings

def image_settings(params: PreprocessParams) -> dict:
    if params.encoding not in ("jpeg", "raw"):
        raise DmgError(f"unknown preprocess.encoding {params.encoding!r}; valid: jpeg, raw")
    if params.image_size < 1 or not 1 <= params.jpeg_quality <= 100:
        raise DmgError("preprocess.image_size must be positive and jpeg_quality in 1..100")
    settings = {"image_size": params.image_size, "encoding": params.encoding}
    if params.encoding == "jpeg":
        settings["jpeg_quality"] = params.jpeg_quality
    return settings


# --------------------------------------------------------------------------- conversion

def fingerprint(dataset: str, manifest_sha: str, settings: dict) -> str:
    """Everything the output depends on, hashed: inputs (the manifest), parameters, tool and format version."""
    blob = json.dumps({"dataset": dataset, "source_manifest_sha256": manifest_sha, "settings": settings,
                       "tool_version": __version__, "format": [FORMAT, VERSION]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(out: Path, expected: str) -> bool:
    """Whether `out` and its report exist and were made from the same fingerprint."""
    if not out.exists() or not report_path(out).exists():
        return False
    try:
        return read_info(out).provenance.get("fingerprint") == expected
    except DmgError:
        return False


def convert_real(info: DatasetInfo, raw: Path, out: Path, params: PreprocessParams, plan: ImagePlan) -> None:
    """Write a dataset's HDF5 file and its report from its image plan, unless an identical one exists."""
    dataset = info.name
    manifest_path = raw / Manifest.NAME
    if not manifest_path.exists():
        raise DmgError(f"{manifest_path} not found: run `dmg download {dataset}` first")
    size = plan.image_size or params.image_size
    settings = {**image_settings(params), "image_size": size, "resize": info.resize, **plan.settings}
    manifest_sha = sha256_file(manifest_path)
    expected = fingerprint(dataset, manifest_sha, settings)
    if up_to_date(out, expected):
        print(f"{dataset}: {out} is up to date (same inputs and parameters); nothing to do", flush=True)
        return
    for line in plan.skipped:
        print(f"{dataset}: {line}", flush=True)
    recorded = Manifest(raw, dataset).files
    domains = tuple(dict.fromkeys(part.domain for part in plan.parts))
    file_info = FileInfo(dataset=dataset, encoding=params.encoding, height=size, width=size, channels=3,
                         classes=plan.classes, domains=domains, provenance={})
    encoder = ImageEncoder(size, params.encoding, params.jpeg_quality, info.resize)
    listed = sum(len(part.entries) for part in plan.parts)
    check_room(out, listed, size * size * 3 * (1 if params.encoding == "raw" else MIN_JPEG_SHARE))
    workers = worker_count(params.workers)
    pool = make_pool(workers)
    try:
        with writing(out, file_info) as f:
            result = write_images(f, raw / "images", plan.parts, encoder, pool, workers, recorded)
            check_not_empty(plan.parts, "readable", result.counts)  # all unreadable: nothing is written
            report = make_report(dataset, plan.parts, result)
            report["skipped"] = plan.skipped
            provenance = {
                "source_manifest_sha256": manifest_sha, "fingerprint": expected, "params": settings,
                "tool_version": __version__, "splits": plan.split_notes,
                "resize": RESIZE_NOTES[info.resize] + "; transparency over white, 16-bit scaled to 8",
                "images": {"listed": total(report["listed"]), "stored": total(report["stored"]),
                           "unreadable": len(report["unreadable"])},
                "duplicate_groups": len(report["duplicates"]["groups"]), "report": report_path(out).name,
            }
            f.attrs["provenance"] = json.dumps(provenance)
            write_json(report_path(out), report)
    finally:
        if pool is not None:
            pool.terminate()
    print_summary(dataset, out, report, workers)


MIN_JPEG_SHARE = 0.02  # a JPEG takes at least this share of its pixels' bytes (white sketches ~0.03, photos ~0.15)


@dataclass
class WriteResult:
    counts: dict  # (domain, split) -> images stored
    failures: dict  # (domain, path) -> error
    failed_in: dict  # (domain, path) -> splits listing it
    digests: np.ndarray  # uint64 [N, 2], the first 16 bytes of each decoded source file's sha256
    decoded: np.ndarray  # bool [N], whether the entry's digest is set (repeats are not decoded)


def write_images(f, images_root: Path, plan: list[SplitPlan], encoder: ImageEncoder, pool, workers: int,
                 recorded: dict[str, str]) -> WriteResult:
    """Stream every planned entry through the encoder into the file, split after split."""
    total = sum(len(p.entries) for p in plan)
    out = WriteResult({}, {}, {}, np.zeros((total, 2), dtype=np.uint64), np.zeros(total, dtype=bool))
    results = ordered_map(encoder, job_paths(images_root, plan), pool, workers)
    position = 0
    stored: dict[str, tuple[str, int]] = {}  # path -> (split, index) within the current domain
    finished: dict[str, StoredSplit] = {}  # the current domain's splits written so far
    # leave=False: the summary line replaces the bar, and a failure shows its one error line alone
    with tqdm(total=total, desc=f"preprocess {f.attrs['dataset']}", unit="img", dynamic_ncols=True,
              leave=False) as bar:
        for part in plan:
            if part.split == plan_first_split(plan, part.domain):
                stored.clear()
                finished.clear()
            writer = SplitAppender(f, part.domain, part.split, capacity=len(part.entries))
            for (rel, label), result in zip(part.entries, results):
                key = (part.domain, rel)
                if result is None:  # listed in an earlier split of this domain: copy what was stored
                    if rel in stored:
                        split, index = stored[rel]
                        writer.append(finished[split][index], label, rel)
                    else:
                        out.failed_in[key].append(part.split)
                else:
                    payload, digest, error = result
                    if digest is not None:
                        check_recorded(recorded, rel, digest, images_root)
                        out.digests[position] = np.frombuffer(digest[:16], dtype=np.uint64)
                        out.decoded[position] = True
                    if error is None:
                        stored.setdefault(rel, (part.split, len(writer)))
                        writer.append(payload, label, rel)
                    else:
                        out.failures[key] = error
                        out.failed_in.setdefault(key, []).append(part.split)
                position += 1
                bar.update()
            writer.close()
            finished[part.split] = StoredSplit(f, part.domain, part.split)
            out.counts[part.domain, part.split] = len(writer)
    return out


def plan_first_split(plan: list[SplitPlan], domain: str) -> str:
    return next(p.split for p in plan if p.domain == domain)


def job_paths(images_root: Path, plan: list[SplitPlan]) -> Iterator[str | None]:
    """Per entry the file to decode, or None where an earlier split of the domain listed it."""
    first_split: dict[str, str] = {}
    for part in plan:
        if part.split == plan_first_split(plan, part.domain):
            first_split.clear()
        for rel, _ in part.entries:
            if first_split.setdefault(rel, part.split) != part.split:
                yield None
            else:
                yield str(images_root / rel)


def check_recorded(recorded: dict[str, str], rel: str, digest: bytes, images_root: Path) -> None:
    """The bytes decoded must be those `dmg download` recorded."""
    expected = recorded.get(f"images/{rel}")
    if expected is not None and expected != digest.hex():
        raise DmgError(f"{images_root / rel} changed since download (sha256 differs from {Manifest.NAME}); "
                       f"run `dmg download` to check the raw folder")


DUPLICATE_POLICY = ("kept: every listed image stays in the split its list puts it in (the lists define the "
                    "benchmark); each group of byte-identical source files is listed here, with the splits it "
                    "spans, so leakage between train/val and test can be judged")


def make_report(dataset: str, plan: list[SplitPlan], result: WriteResult) -> dict:
    """Counts, unreadable images and exact-duplicate groups, for <dataset>.report.json."""
    where = [(p.domain, p.split, rel) for p in plan for rel, _ in p.entries]
    groups = []
    for members in duplicate_groups(result.digests, result.decoded):
        group = [{"domain": where[i][0], "split": where[i][1], "path": where[i][2]} for i in members]
        splits = {m["split"] for m in group}
        groups.append({"images": group, "spans_test": "test" in splits and len(splits) > 1})
    listed = {}
    for p in plan:
        listed.setdefault(p.domain, {})[p.split] = len(p.entries)
    stored = {}
    for (domain, split), n in result.counts.items():
        stored.setdefault(domain, {})[split] = n
    unreadable = [{"domain": d, "path": rel, "splits": result.failed_in[d, rel], "error": error}
                  for (d, rel), error in sorted(result.failures.items())]
    return {"dataset": dataset, "listed": listed, "stored": stored, "unreadable": unreadable,
            "duplicates": {"policy": DUPLICATE_POLICY, "groups": groups}}


def duplicate_groups(digests: np.ndarray, decoded: np.ndarray) -> list[list[int]]:
    """Indices of decoded entries sharing a digest, group by group (sorting, not a dict: flat memory)."""
    index = np.flatnonzero(decoded)
    keys = digests[index]
    order = index[np.lexsort((keys[:, 1], keys[:, 0]))]
    sorted_keys = digests[order]
    same = np.all(sorted_keys[1:] == sorted_keys[:-1], axis=1)
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or not same[i - 1]:
            if i - start > 1:
                groups.append(sorted(order[start:i].tolist()))
            start = i
    return groups


def total(counts: dict) -> int:
    """Sum of a {domain: {split: n}} table."""
    return sum(n for splits in counts.values() for n in splits.values())


def print_summary(dataset: str, out: Path, report: dict, workers: int) -> None:
    stored, listed = total(report["stored"]), total(report["listed"])
    groups = report["duplicates"]["groups"]
    print(f"{dataset}: {stored} of {listed} listed images stored in {out} ({workers} workers)", flush=True)
    if report["unreadable"]:
        print(f"{dataset}: {len(report['unreadable'])} unreadable images left out, listed in "
              f"{report_path(out)}", flush=True)
    if groups:
        spanning = sum(g["spans_test"] for g in groups)
        print(f"{dataset}: {len(groups)} groups of byte-identical images ({spanning} across train/val and test), "
              f"kept; listed in {report_path(out)}", flush=True)


# --------------------------------------------------------------------------- entry point

def preprocess(dataset: str, data_dir: str | Path, params: PreprocessParams) -> Path:
    """Build data_dir/prepared/<dataset>.h5 from data_dir/raw/<dataset>; returns its path."""
    info = get_dataset(dataset)
    out, raw = h5_path(data_dir, info.name), raw_dir(data_dir, info.name)
    try:
        with run_lock(out, folder=False):  # one writer per HDF5 file; clears a killed run's temp files
            if info.generated:
                info.generate(raw, out, params)
            else:
                image_settings(params)  # a bad setting is reported before the images are listed
                plan = info.plan(raw, params)
                check_not_empty(plan.parts, "listed")
                convert_real(info, raw, out, params, plan)
    except OSError as exc:
        if disk_full(exc):  # h5py raises it without a file name; the temporary file is already gone
            raise DmgError(f"disk full while writing {out} (ENOSPC); free some space and run `dmg preprocess "
                           f"{info.name}` again (the previous file, if any, is unchanged)") from None
        raise
    return out


def check_not_empty(parts: list[SplitPlan], what: str, counts: dict | None = None) -> None:
    """Refuse a dataset with an empty split: training on no images, model selection on no val
    images or a test of no images would run and report 0.00% (or "diverged") instead of failing."""
    for part in parts:
        n = len(part.entries) if counts is None else counts.get((part.domain, part.split), 0)
        if n == 0:
            raise DmgError(f"domain {part.domain}: split {part.split} has no {what} images; every split of every "
                           f"domain needs at least one (check the split lists or the split fractions)")
