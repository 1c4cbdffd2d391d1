"""DomainNet (Peng et al. 2019): 6 domains, 345 classes, the official lists and the reference's tv_0.9 split."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DmgError
from ..fileio import temp_dir
from ..fetch import Manifest, download_url, find_files, is_url
from ..params import DownloadParams, PreprocessParams
from .base import DatasetInfo, ImagePlan, SplitPlan, check_entry, read_list
from .sources import (adopt_or_verify, discard_download, download_cap, install_file, install_folder, local_source, say,
                      unpack)

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_NUM_CLASSES = 345


DOMAINNET_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
DOMAINNET_ARCHIVES = {  # path of each domain's zip below DOMAINNET_URL (or a mirror with the same layout)
    "clipart": "groundtruth/clipart.zip", "infograph": "infograph.zip", "painting": "groundtruth/painting.zip",
    "quickdraw": "quickdraw.zip", "real": "real.zip", "sketch": "sketch.zip",
}
DOMAINNET_LISTS = "domainnet/txt/"  # official <domain>_{train,test}.txt below DOMAINNET_URL
MAX_LIST_BYTES = 100 * 10**6  # the largest official list (real_train.txt) is about 5 MB
TV_SPLITS = ("train", "val", "test")


def download_domainnet(out_dir: Path, params: DownloadParams) -> None:
    """The six domain archives and the official lists (plus the reference tv_0.9 lists when
    --splits holds them), each fetched only if missing."""
    manifest = Manifest(out_dir, "domainnet")
    domains = DOMAINNET_DOMAINS
    source = params.source
    folder = local_source(source) if source and not is_url(source) else None
    if folder is not None and not folder.is_dir():
        raise DmgError(f"--from {source}: for domainnet give the folder holding the domain zips (or the extracted "
                       f"domain folders) and lists, or a mirror URL")
    base = (source.rstrip("/") + "/") if source and is_url(source) else DOMAINNET_URL
    roots = [p for p in (Path(params.splits).expanduser() if params.splits else None, folder) if p is not None]
    official, tv = list_folders(roots, domains)
    fetched = 0
    for domain in domains:
        for split in ("train", "test"):
            fetched += fetch_official_list(f"{domain}_{split}.txt", official, folder, base, manifest, params)
        for split in TV_SPLITS:
            fetched += fetch_tv_list(f"{domain}_{split}.txt", tv, manifest)
    for domain in domains:
        fetched += fetch_domain(domain, folder, base, manifest, params)
    manifest.save()
    summary = f"{len(manifest.under('images/'))} images and {len(manifest.under('splits/'))} lists in {out_dir}"
    if fetched:
        say(f"domainnet: {summary}; {fetched} parts fetched, sha256 recorded in {manifest.path}")
    else:
        say(f"domainnet: {summary} present and verified against {Manifest.NAME}; nothing to do")


def list_folders(roots: list[Path], domains: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """Folders (roots and their sub-folders, two levels down) holding DomainNet lists.

    A folder with `<domain>_val.txt` files holds tv_0.9 lists (whose `_train` lists are the
    90% part); any other folder with `<domain>_{train,test}.txt` holds official lists.
    """
    official, tv = [], []
    for root in roots:
        level = [root]
        for _ in range(3):
            following = []
            for folder in level:
                names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
                if any(f"{d}_val.txt" in names for d in domains):
                    tv.append(folder)
                elif any(f"{d}_{s}.txt" in names for d in domains for s in ("train", "test")):
                    official.append(folder)
                following += [folder / n for n in sorted(names) if n not in domains and (folder / n).is_dir()]
            level = following
    return official, tv


def fetch_official_list(name: str, official: list[Path], folder: Path | None, base: str, manifest: Manifest,
                        params: DownloadParams) -> int:
    """One official list: present, found in a local folder, or downloaded. Returns 1 if fetched."""
    rel = f"splits/official/{name}"
    if adopt_or_verify(manifest, rel):
        return 0
    found = find_files(official, {name}, max_depth=0)
    if name in found:
        install_file(found[name], manifest, rel, str(found[name]))
        return 1
    if folder is not None:  # --from a folder: use what it has, download nothing
        raise DmgError(f"DomainNet list {name} not found in {folder}; put it there, or pass --splits FOLDER")
    url = base + DOMAINNET_LISTS + name
    hint = (f"fetch it by hand into {manifest.folder / 'splits' / 'official'}/ or pass --splits FOLDER "
            f"holding the official lists")
    with temp_dir(manifest.folder, "list") as stage:
        path = download_url(url, stage / name, params.retries, params.timeout, hint, max_bytes=MAX_LIST_BYTES)
        manifest.check_source(DOMAINNET_LISTS + name, path, url)
        install_file(path, manifest, rel, url)
    return 1


def fetch_tv_list(name: str, tv: list[Path], manifest: Manifest) -> int:
    """One reference tv_0.9 list, when a --splits folder holds it (they are optional)."""
    rel = f"splits/tv_0.9/{name}"
    if adopt_or_verify(manifest, rel):
        return 0
    found = find_files(tv, {name}, max_depth=0)
    if name not in found:
        return 0
    install_file(found[name], manifest, rel, str(found[name]))
    return 1


def fetch_domain(domain: str, folder: Path | None, base: str, manifest: Manifest, params: DownloadParams) -> int:
    """One domain's images: present and verified, or taken from --from, or downloaded."""
    prefix = f"images/{domain}/"
    if not manifest.verify(prefix):
        return 0
    out_dir = manifest.folder
    with temp_dir(out_dir, "fetch") as stage:
        if folder is not None:
            local = domain_source(folder, domain)
        else:
            local = out_dir / "downloads" / f"{domain}.zip"
            if not local.exists():
                url = base + DOMAINNET_ARCHIVES[domain]
                hint = (f"fetch it by hand and put it in {local.parent}/ or run `dmg download domainnet --from "
                        f"FOLDER` with FOLDER holding the six domain zips")
                local = download_url(url, local, params.retries, params.timeout, hint,
                                     max_bytes=download_cap("domainnet", params.allow_large))
        tree, hashes = unpack(local, stage, manifest, allow_large=params.allow_large)
        root = tree / domain if hashes is not None else tree
        if not root.is_dir():
            raise DmgError(f"{local} holds no {domain}/ folder")
        count = install_folder(root, hashes, tree, stage, manifest, prefix, str(local))
        manifest.save()  # an interruption later keeps this domain
    discard_download(local, out_dir)
    say(f"domainnet: {domain}: {count} files in {out_dir / 'images' / domain}")
    return 1


def domain_source(folder: Path, domain: str) -> Path:
    """An extracted `<domain>/` folder or a `<domain>.zip` inside a --from folder."""
    if (folder / domain).is_dir():
        return folder / domain
    found = find_files([folder], {f"{domain}.zip"}, max_depth=2, skip=frozenset(DOMAINNET_DOMAINS))
    if f"{domain}.zip" not in found:
        raise DmgError(f"--from {folder}: neither a {domain}/ folder nor {domain}.zip found there")
    return found[f"{domain}.zip"]


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
    for domain in DOMAINNET_DOMAINS:
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

    domains = DOMAINNET_DOMAINS
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
    domains = DOMAINNET_DOMAINS
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
    classes = domainnet_classes(plan, DOMAINNET_NUM_CLASSES)
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


@dataclass(frozen=True)
class DomainNet(DatasetInfo):
    def download(self, out_dir: Path, params: DownloadParams) -> None:
        download_domainnet(out_dir, params)

    def plan(self, raw: Path, params: PreprocessParams) -> ImagePlan:
        classes, parts, notes = domainnet_plan(raw, params)
        settings = {"val_split": params.val_split}
        if params.val_split == "seeded":
            settings.update(seed=params.seed, val_fraction=params.val_fraction)
        return ImagePlan(classes, parts, {"train/val": notes, "test": "official test lists"}, settings)


DOMAINNET = DomainNet(
    name="domainnet", domains=DOMAINNET_DOMAINS, num_classes=DOMAINNET_NUM_CLASSES, augmentation="domainnet",
    description="DomainNet (Peng et al. 2019): about 586,000 images, 6 domains, 345 classes",
    # the reference stored whole images squashed to 224 x 224 (cv2, cubic) and resized them to 256 at
    # training time; dmg squashes once, straight to 256: squares of the whole image
    resize="squash",
)
