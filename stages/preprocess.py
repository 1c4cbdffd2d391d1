"""Stage 2, preprocess: raw files -> one HDF5 file per dataset (layout in dmgcli.h5data).

Real datasets (PACS, DomainNet): the split lists name the images; each image is decoded,
turned RGB (transparent pixels over white), its shorter side resized to `image_size` and
the central square kept (PACS images are square already), then stored as JPEG bytes or raw
pixels. The work runs in a process pool over all cores; results come back in list order
with a bounded number of batches in flight and are appended to the file as they arrive,
so memory does not grow with the number of images. An image listed twice in one domain
(PACS: every test image is also a train or val image) is decoded once and copied.

Unreadable images are left out and listed in <dataset>.report.json beside the HDF5 file,
with every group of byte-identical source images (policy: kept where the lists put them).
The file's provenance holds a fingerprint of the inputs (the raw folder's MANIFEST.json)
and of the parameters; a re-run with the same fingerprint does nothing.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import warnings
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dmgcli import __version__
from dmgcli.datasets import DIGITS_ANGLES, get_dataset, h5_path, raw_dir
from dmgcli.errors import DmgError
from dmgcli.fetch import Manifest, sha256_file
from dmgcli.fileio import run_lock, write_json
from dmgcli.h5data import FORMAT, VERSION, FileInfo, SplitAppender, StoredSplit, read_info, write_split, writing
from dmgcli.params import PreprocessParams

DIGITS_SPLIT = (0.6, 0.2, 0.2)  # train / val / test share of each domain's images


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate float images [N, 1, H, W] about their centre (bilinear, zero fill)."""
    angle = torch.tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(())]), torch.stack([sin, cos, torch.zeros(())])])
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def preprocess_digits(raw: Path, out: Path, params: PreprocessParams) -> None:
    """Rotated-digits benchmark in the style of Rotated MNIST.

    The 1,797 8x8 digits (values 0-16) are shuffled with `params.seed` and dealt into six
    disjoint shares, one per domain; each share is upsampled to digits_size px, rotated by
    its domain's angle and split 60/20/20 into train / val / test.
    """
    source = raw / "digits.csv.gz"
    if not source.exists():
        raise DmgError(f"{source} not found: run `dmg download digits` first")
    table = np.loadtxt(source, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0, table[:, -1].astype(np.int64)
    order = np.random.default_rng(params.seed).permutation(len(labels))
    shares = np.array_split(order, len(DIGITS_ANGLES))
    size = params.digits_size
    info = get_dataset("digits")
    file_info = FileInfo(dataset="digits", encoding="raw", height=size, width=size, channels=1,
                         classes=tuple(str(c) for c in range(10)), domains=info.domains,
                         provenance={"source": "sklearn.datasets.load_digits", "seed": params.seed,
                                     "angles": list(DIGITS_ANGLES), "split": list(DIGITS_SPLIT), "size": size})
    counts: dict[str, dict[str, int]] = {}
    with writing(out, file_info) as f:
        for domain, angle, share in zip(info.domains, DIGITS_ANGLES, shares):
            images = F.interpolate(torch.from_numpy(pixels[share]), size=(size, size), mode="bilinear",
                                   align_corners=False)
            images = rotate(images, angle).clamp(0, 1).mul(255).round().to(torch.uint8)  # [n, 1, S, S]
            images = images.permute(0, 2, 3, 1).numpy()  # [n, S, S, 1], the layout's HWC order
            n_train, n_val = int(DIGITS_SPLIT[0] * len(share)), int(DIGITS_SPLIT[1] * len(share))
            bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(share))}
            for split, (a, b) in bounds.items():
                write_split(f, domain, split, images[a:b], labels[share[a:b]],
                            [f"digits/{i}" for i in share[a:b]])
                counts.setdefault(domain, {})[split] = b - a
        # the same report file as the real datasets, so the pipeline's outputs do not depend on the dataset
        write_json(report_path(out), {"dataset": "digits", "listed": counts, "stored": counts, "unreadable": [],
                                      "duplicates": {"policy": "not checked (generated images)", "groups": []}})



# --------------------------------------------------------------------------- split lists

@dataclass
class SplitPlan:
    """One /<domain>/<split> group to write: (path relative to images/, 0-based label) pairs."""
    domain: str
    split: str
    entries: list[tuple[str, int]]


def read_list(path: Path) -> list[tuple[int, str, int]]:
    """Lines `relative/path.jpg label` -> (line number, path, label); blank lines skipped."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                rows.append((lineno, parts[0], int(parts[1])))
            except (IndexError, ValueError):
                raise DmgError(f"{path}:{lineno}: expected `path label`, got {line.strip()!r}") from None
    return rows


def check_entry(list_path: Path, lineno: int, rel: str, label: int, domain: str, classes: list[str] | None) -> None:
    """A list line must name an image of its domain, under its class's folder."""
    parts = rel.split("/")
    if len(parts) < 3 or parts[0] != domain:
        raise DmgError(f"{list_path}:{lineno}: {rel} is not an image path of domain {domain}")
    if classes is not None and not (0 <= label < len(classes) and parts[1] == classes[label]):
        raise DmgError(f"{list_path}:{lineno}: label {label} of {rel} does not match its class folder {parts[1]!r}")


# --------------------------------------------------------------------------- PACS

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]  # label order (alphabetical)
PACS_LISTS = {"train": "train", "val": "crossval", "test": "test"}  # our split -> official kfold list


def pacs_plan(raw: Path) -> list[SplitPlan]:
    """The official kfold lists: train, crossval as val, test (the whole domain); labels 1-based there."""
    plan = []
    for domain in get_dataset("pacs").domains:
        for split, name in PACS_LISTS.items():
            path = raw / "splits" / f"{domain}_{name}_kfold.txt"
            if not path.exists():
                raise DmgError(f"{path} not found: run `dmg download pacs` (with --splits FOLDER if needed)")
            entries = []
            for lineno, rel, label in read_list(path):
                check_entry(path, lineno, rel, label - 1, domain, PACS_CLASSES)
                entries.append((rel, label - 1))
            plan.append(SplitPlan(domain, split, entries))
    return plan


def preprocess_pacs(raw: Path, out: Path, params: PreprocessParams) -> None:
    settings = image_settings(params)
    convert_real("pacs", raw, out, params, settings, tuple(PACS_CLASSES), pacs_plan(raw),
                 {"train": "official train_kfold", "val": "official crossval_kfold", "test": "official test_kfold"})


# --------------------------------------------------------------------------- DomainNet

DOMAINNET_TRAIN_COUNTS = {  # lengths of the official train lists (the reference shuffled them in this order)
    "clipart": 33525, "infograph": 36023, "painting": 50416, "quickdraw": 120750, "real": 120906, "sketch": 48212,
}
TV_SEED = 1234  # the reference implementation's random.seed for its tv_0.9 split
TV_TRAIN_SHARE = 0.9


def reference_tv_split(train_lists: dict[str, list | None]) -> dict[str, tuple[list, list]]:
    """The DMG reference's `tv_0.9` split, regenerated exactly from the official train lists.

    The reference seeded Python's `random` with 1234 once, then for each domain in DomainNet
    order shuffled its official train list (in file order) and kept the first int(0.9 n) as
    train, the rest as val (checked against its published lists: identical). The shuffles
    draw from one generator, so a domain whose list is missing is stood in for by a shuffle
    of its official length, which keeps the later domains exact.
    """
    rng = random.Random(TV_SEED)
    splits = {}
    for domain in get_dataset("domainnet").domains:
        items = train_lists.get(domain)
        if items is None:
            rng.shuffle([None] * DOMAINNET_TRAIN_COUNTS[domain])
            continue
        items = list(items)
        rng.shuffle(items)
        cut = int(TV_TRAIN_SHARE * len(items))
        splits[domain] = (items[:cut], items[cut:])
    return splits


def seeded_split(items: list, seed: int, fraction: float, salt: int) -> tuple[list, list]:
    """A random `fraction` of items as val (seeded per domain by `salt`); both parts keep list order."""
    rng = np.random.default_rng([seed, salt])
    in_val = np.zeros(len(items), dtype=bool)
    in_val[rng.permutation(len(items))[:int(round(fraction * len(items)))]] = True
    return [x for x, v in zip(items, in_val) if not v], [x for x, v in zip(items, in_val) if v]


def domainnet_lists(raw: Path) -> tuple[dict, dict]:
    """Read what the raw folder holds: official train and test lists, reference tv_0.9 lists.

    Each maps (domain, split) to (list file, [(line number, path, label)]), or None if absent.
    """
    def load(folder: str, name: str):
        path = raw / "splits" / folder / name
        return (path, read_list(path)) if path.exists() else None

    domains = get_dataset("domainnet").domains
    official = {(d, s): load("official", f"{d}_{s}.txt") for d in domains for s in ("train", "test")}
    tv = {(d, s): load("tv_0.9", f"{d}_{s}.txt") for d in domains for s in ("train", "val", "test")}
    return official, tv


def entries(found) -> list[tuple[str, int]] | None:
    """(path, label) pairs of a list read by domainnet_lists, None if it was absent."""
    return [(rel, label) for _, rel, label in found[1]] if found else None


def domainnet_plan(raw: Path, params: PreprocessParams) -> tuple[tuple[str, ...], list[SplitPlan], dict]:
    """Test: the official test list. Train/val: the tv_0.9 lists where supplied, else the
    reference split regenerated (val_split tv_0.9) or a seeded split (val_split seeded)."""
    if params.val_split not in ("tv_0.9", "seeded"):
        raise DmgError(f"unknown preprocess.val_split {params.val_split!r}; valid: tv_0.9, seeded")
    domains = get_dataset("domainnet").domains
    official, tv = domainnet_lists(raw)
    for (domain, _), found in [*official.items(), *tv.items()]:
        for lineno, rel, label in (found[1] if found else []):
            check_entry(found[0], lineno, rel, label, domain, None)
    official_train = {d: entries(official[d, "train"]) for d in domains}
    regenerated = reference_tv_split(official_train) if params.val_split == "tv_0.9" else {}
    plan, notes = [], {}
    for index, domain in enumerate(domains):
        train, val, notes[domain] = train_val(domain, index, official_train[domain], entries(tv[domain, "train"]),
                                              entries(tv[domain, "val"]), regenerated, params)
        test = entries(official[domain, "test"]) or entries(tv[domain, "test"])
        if test is None:
            raise DmgError(f"{raw / 'splits' / 'official' / f'{domain}_test.txt'} not found: run `dmg download domainnet`")
        plan += [SplitPlan(domain, "train", train), SplitPlan(domain, "val", val), SplitPlan(domain, "test", test)]
    classes = domainnet_classes(plan, get_dataset("domainnet").num_classes)
    return classes, plan, notes


def train_val(domain: str, index: int, official: list | None, tv_train: list | None, tv_val: list | None,
              regenerated: dict, params: PreprocessParams) -> tuple[list, list, str]:
    """One domain's train and val entries, and a note saying where they came from."""
    missing = f"splits/official/{domain}_train.txt not found: run `dmg download domainnet`"
    if params.val_split == "seeded":
        both = tv_train is not None and tv_val is not None
        base = official if official is not None else (tv_train + tv_val if both else None)
        if base is None:
            raise DmgError(missing)
        train, val = seeded_split(base, params.seed, params.val_fraction, index)
        return train, val, f"seeded split (seed {params.seed}, val_fraction {params.val_fraction})"
    if tv_train is not None and tv_val is not None:
        if official is not None and sorted(official) != sorted(tv_train + tv_val):
            raise DmgError(f"splits/tv_0.9/{domain}_{{train,val}}.txt do not partition the official train list")
        return tv_train, tv_val, "tv_0.9 lists"
    if domain in regenerated:
        train, val = regenerated[domain]
        return train, val, f"tv_0.9 regenerated (random.seed({TV_SEED}) shuffle of the official train list, 90/10)"
    raise DmgError(missing)


def domainnet_classes(plan: list[SplitPlan], num_classes: int) -> tuple[str, ...]:
    """Class names in label order, read from the lists' class folders (which must agree)."""
    names: dict[int, str] = {}
    for part in plan:
        for rel, label in part.entries:
            folder = rel.split("/")[1]
            if names.setdefault(label, folder) != folder:
                raise DmgError(f"label {label} names both {names[label]!r} and {folder!r} in the DomainNet lists")
    absent = [i for i in range(num_classes) if i not in names]
    if absent or len(names) != num_classes:
        raise DmgError(f"the DomainNet lists cover {len(names)} labels, not 0..{num_classes - 1} "
                       f"(missing {absent[:5]})")
    return tuple(names[i] for i in range(num_classes))


def preprocess_domainnet(raw: Path, out: Path, params: PreprocessParams) -> None:
    settings = image_settings(params)
    settings["val_split"] = params.val_split
    if params.val_split == "seeded":
        settings.update(seed=params.seed, val_fraction=params.val_fraction)
    classes, plan, notes = domainnet_plan(raw, params)
    convert_real("domainnet", raw, out, params, settings, classes, plan,
                 {"train/val": notes, "test": "official test lists"})


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageEncoder:
    """Source file -> stored image; runs in the worker processes."""
    size: int
    encoding: str
    quality: int

    def __call__(self, path: str | None):
        """(payload, sha256 of the source file, error): payload is JPEG bytes or uint8 [S, S, 3]."""
        if path is None:  # a repeat of an image already stored: the main process copies it
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return None, None, f"{type(exc).__name__}: {exc.strerror or exc}"
        digest = hashlib.sha256(data).digest()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF/palette chatter, once per image otherwise
                image = fit_square(load_rgb(data, self.size), self.size)
        except Exception as exc:  # any decoder failure means "unreadable image", never a crash midway
            return None, digest, f"{type(exc).__name__}: {exc}"
        return self.encode(image), digest, None

    def encode(self, image):
        if self.encoding == "raw":
            return np.asarray(image, dtype=np.uint8)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=self.quality)
        return buffer.getvalue()


def load_rgb(data: bytes, size: int):
    """Decode to RGB; transparent pixels are put over white (the usual clipart background)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale still >= size (fast for big photos)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_square(image, size: int):
    """Shorter side resized to `size`, central square kept: one resize of the central box."""
    from PIL import Image

    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def image_settings(params: PreprocessParams) -> dict:
    if params.encoding not in ("jpeg", "raw"):
        raise DmgError(f"unknown preprocess.encoding {params.encoding!r}; valid: jpeg, raw")
    if params.image_size < 1 or not 1 <= params.jpeg_quality <= 100:
        raise DmgError("preprocess.image_size must be positive and jpeg_quality in 1..100")
    settings = {"image_size": params.image_size, "encoding": params.encoding}
    if params.encoding == "jpeg":
        settings["jpeg_quality"] = params.jpeg_quality
    return settings


# --------------------------------------------------------------------------- parallel, in order, bounded

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


# --------------------------------------------------------------------------- conversion

def fingerprint(dataset: str, manifest_sha: str, settings: dict) -> str:
    """Everything the output depends on, hashed: inputs (the manifest), parameters, tool and format version."""
    blob = json.dumps({"dataset": dataset, "source_manifest_sha256": manifest_sha, "settings": settings,
                       "tool_version": __version__, "format": [FORMAT, VERSION]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def report_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".h5") + ".report.json")


def up_to_date(out: Path, expected: str) -> bool:
    """Whether `out` and its report exist and were made from the same fingerprint."""
    if not out.exists() or not report_path(out).exists():
        return False
    try:
        return read_info(out).provenance.get("fingerprint") == expected
    except DmgError:
        return False


def convert_real(dataset: str, raw: Path, out: Path, params: PreprocessParams, settings: dict,
                 classes: tuple[str, ...], plan: list[SplitPlan], split_notes: dict) -> None:
    """Write a real dataset's HDF5 file and its report, unless an identical one exists."""
    manifest_path = raw / Manifest.NAME
    if not manifest_path.exists():
        raise DmgError(f"{manifest_path} not found: run `dmg download {dataset}` first")
    manifest_sha = sha256_file(manifest_path)
    expected = fingerprint(dataset, manifest_sha, settings)
    if up_to_date(out, expected):
        print(f"{dataset}: {out} is up to date (same inputs and parameters); nothing to do", flush=True)
        return
    recorded = Manifest(raw, dataset).files
    info = FileInfo(dataset=dataset, encoding=params.encoding, height=params.image_size, width=params.image_size,
                    channels=3, classes=classes, domains=get_dataset(dataset).domains, provenance={})
    encoder = ImageEncoder(params.image_size, params.encoding, params.jpeg_quality)
    workers = worker_count(params.workers)
    pool = make_pool(workers)
    try:
        with writing(out, info) as f:
            result = write_images(f, raw / "images", plan, encoder, pool, workers, recorded)
            report = make_report(dataset, plan, result)
            provenance = {
                "source_manifest_sha256": manifest_sha, "fingerprint": expected, "params": settings,
                "tool_version": __version__, "splits": split_notes,
                "resize": "shorter side to image_size (bilinear), central square kept; transparency over white",
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
    with tqdm(total=total, desc=f"preprocess {f.attrs['dataset']}", unit="img", dynamic_ncols=True) as bar:
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

PREPROCESSORS = {"digits": preprocess_digits, "pacs": preprocess_pacs, "domainnet": preprocess_domainnet}


def preprocess(dataset: str, data_dir: str | Path, params: PreprocessParams) -> Path:
    """Build data_dir/prepared/<dataset>.h5 from data_dir/raw/<dataset>; returns its path."""
    info = get_dataset(dataset)
    if info.name not in PREPROCESSORS:
        raise DmgError(f"preprocessing {info.name} is not available; valid: {', '.join(PREPROCESSORS)}")
    out = h5_path(data_dir, info.name)
    with run_lock(out, folder=False):  # one writer per HDF5 file; clears a killed run's temp files
        PREPROCESSORS[info.name](raw_dir(data_dir, info.name), out, params)
    return out
