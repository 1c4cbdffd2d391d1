"""Folder datasets: one's own images laid out <root>/<domain>/<class>/<image>.

Declared in params.yaml's `datasets:` section (dmgcli.params.FolderDatasetParams). Any file
Pillow can open by its extension is an image; other files (and hidden ones, `__MACOSX`) are
ignored. Classes are the sorted union of the class folders over all domains, so a label
means the same class in every domain; a class missing from a domain is allowed (`dmg info`
shows it). The named benchmarks (dmgcli.datasets.benchmarks) are folder datasets with
built-in sources.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DmgError
from ..fileio import temp_dir
from ..fetch import Manifest, is_url, replace_dir
from ..params import DownloadParams, FolderDatasetParams, PreprocessParams
from .base import RESIZE_MODES, DatasetInfo, ImagePlan, SplitPlan, kfold_plan
from .pacs import find_kfold_lists, kfold_names
from .sources import (adopt_or_verify, discard_download, download_cap, download_path, fetch_archive, install_file,
                      local_source, say, stage_folder, unpack)

LAYOUT = "<root>/<domain>/<class>/<image>"
SPLIT_RULES = ("fractions", "holdout", "lists")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def image_suffixes() -> frozenset[str]:
    """File name endings of every format Pillow can open (.jpg, .png, .tif, .webp, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def ignored(path: Path) -> bool:
    return path.name.startswith((".", "__MACOSX"))


def folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not ignored(p))


def unwrap(tree: Path) -> Path:
    """The folder holding the domain folders: an archive's single top folder (`mydata/`) is
    stepped into, unless the images already lie at <domain>/<class>/<image> depth."""
    suffixes = image_suffixes()
    root = tree
    for _ in range(3):
        inside = folders(root)
        files = [p for p in root.iterdir() if p.is_file() and not ignored(p)]
        in_layout = any(p.suffix.lower() in suffixes for p in root.glob("*/*/*"))
        if len(inside) != 1 or files or in_layout:
            break
        root = inside[0]
    return root


def scan(root: Path, where: str, domains: tuple[str, ...] | None = None) -> tuple[dict, list[str]]:
    """domain -> class -> sorted image paths relative to root, and the skips to report.

    A root not in the layout (images at the wrong depth, no domain folders, a domain without
    images, fewer than two domains or classes) is a one-line error naming what is wrong.
    """
    suffixes = image_suffixes()

    def is_image(p: Path) -> bool:
        return p.is_file() and not ignored(p) and p.suffix.lower() in suffixes

    if not root.is_dir():
        raise DmgError(f"{where}: not a folder")
    stray = sorted(p.name for p in root.iterdir() if is_image(p))
    if stray:
        raise DmgError(f"{where}: image {stray[0]} lies in the root folder; expected the layout {LAYOUT}")
    found = {p.name: p for p in folders(root)}
    if domains:
        absent = [d for d in domains if d not in found]
        if absent:
            raise DmgError(f"{where}: no domain folder {absent[0]!r}; found: {', '.join(found) or 'none'}")
        found = {d: found[d] for d in domains}
    if not found:
        raise DmgError(f"{where}: no domain folders; expected the layout {LAYOUT}")
    layout, skips = {}, []
    for domain, folder in found.items():
        stray = sorted(p.name for p in folder.iterdir() if is_image(p))
        if stray:
            raise DmgError(f"{where}: image {domain}/{stray[0]} lies directly in a domain folder, not in a class "
                           f"folder; expected the layout {LAYOUT}")
        classes = {}
        for class_folder in folders(folder):
            images = sorted(p.relative_to(root).as_posix() for p in class_folder.rglob("*") if is_image(p))
            if images:
                classes[class_folder.name] = images
            else:
                skips.append(f"class folder {domain}/{class_folder.name} holds no images: left out")
        if not classes:
            raise DmgError(f"{where}: domain {domain} holds no images (layout {LAYOUT}); remove the folder or "
                           f"add images")
        if len(classes) == 1:
            skips.append(f"domain {domain} has one class only ({next(iter(classes))})")
        layout[domain] = classes
    if len(layout) < 2:
        raise DmgError(f"{where}: one domain folder ({next(iter(layout))}); domain generalization needs at least "
                       f"two (one is held out as the target)")
    if len({c for classes in layout.values() for c in classes}) < 2:
        raise DmgError(f"{where}: one class only; a classifier needs at least two")
    return layout, skips


def salt(text: str) -> int:
    """A stable per-domain/class number for seeding (Python's hash() changes between runs)."""
    return zlib.crc32(text.encode())


def fraction_split(paths: list[str], fractions: tuple[float, ...], seed: int, key: str) -> dict[str, list[str]]:
    """One class of one domain split into train/val/test by the shares (rounded; train gets the rest)."""
    n = len(paths)
    order = np.random.default_rng([seed, salt(key)]).permutation(n)
    n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
    n_train = max(n - n_val - n_test, 0)
    cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: sorted(paths[i] for i in index) for split, index in cut.items()}


def holdout_split(paths: list[str], holdout: float, seed: int, key: str) -> tuple[list[str], list[str]]:
    """DomainBed's split of one domain: a random int(holdout * n) images are val, the rest train."""
    order = np.random.default_rng([seed, salt(key)]).permutation(len(paths))
    n_val = int(holdout * len(paths))
    return sorted(paths[i] for i in order[n_val:]), sorted(paths[i] for i in order[:n_val])


def check_spec(name: str, spec: FolderDatasetParams) -> None:
    """A declaration's values, checked with its name in the message."""
    key = f"params: datasets.{name}"
    if not NAME_PATTERN.fullmatch(name):
        raise DmgError(f"{key}: a dataset name is letters, digits, '_', '-' or '.', got {name!r}")
    if spec.split not in SPLIT_RULES:
        raise DmgError(f"{key}.split must be one of {', '.join(SPLIT_RULES)}, got {spec.split!r}")
    f = spec.fractions
    if len(f) != 3 or min(f) < 0 or f[0] <= 0 or abs(sum(f) - 1) > 1e-6:
        raise DmgError(f"{key}.fractions must be three shares (train > 0, val, test) summing to 1, got {list(f)}")
    if not 0 < spec.holdout < 1:
        raise DmgError(f"{key}.holdout must be between 0 and 1, got {spec.holdout!r}")
    if spec.resize not in RESIZE_MODES:
        raise DmgError(f"{key}.resize must be one of {', '.join(RESIZE_MODES)}, got {spec.resize!r}")
    if spec.image_size is not None and spec.image_size < 1:
        raise DmgError(f"{key}.image_size must be positive, got {spec.image_size!r}")


@dataclass(frozen=True)
class FolderDataset(DatasetInfo):
    spec: FolderDatasetParams = field(default_factory=FolderDatasetParams)

    # --- download

    def download(self, out_dir: Path, params: DownloadParams) -> None:
        """Copy (a folder) or extract (an archive) the images into images/<domain>/, checked against the manifest."""
        manifest = Manifest(out_dir, self.name)
        lists = kfold_names(self.list_domains(out_dir)) if self.spec.split == "lists" else []
        if not manifest.verify("images/") and all(adopt_or_verify(manifest, f"splits/{n}") for n in lists):
            manifest.save()
            say(f"{self.name}: {len(manifest.under('images/'))} files in {out_dir} present and verified against "
                f"{Manifest.NAME}; nothing to do (delete {out_dir} to take a new copy)")
            return
        with temp_dir(out_dir, "fetch") as stage:
            local, tree, hashes = self.fetch_tree(out_dir, stage, manifest, params)
            root = self.find_root(tree, str(local))
            layout, _ = scan(root, str(local), self.source_folders())
            folders_by_domain = self.domain_folders(layout, str(local))
            lists = self.find_lists(params, tree, local, folders_by_domain) if self.spec.split == "lists" else {}
            staged = {domain: stage_folder(root / folder, hashes, tree, stage, manifest, f"images/{domain}/",
                                           str(local)) for domain, folder in folders_by_domain.items()}
            for domain, (folder, _) in staged.items():  # every copy made (a full disk stops it) before any rename
                replace_dir(folder, out_dir / "images" / domain)
            count = sum(len(files) for _, files in staged.values())
            for name, path in lists.items():
                install_file(path, manifest, f"splits/{name}", str(path))
            manifest.save()
        discard_download(local, out_dir)
        say(f"{self.name}: {count} files of {len(folders_by_domain)} domains in {out_dir / 'images'}, "
            f"sha256 recorded in {manifest.path}")

    def fetch_tree(self, out_dir: Path, stage: Path, manifest: Manifest, params: DownloadParams):
        """(the source, the folder it gives, its files' sha256 or None for a user's folder)."""
        source = params.source or self.spec.root
        if not source:
            raise DmgError(f"{self.name}: nothing to copy: pass --from FOLDER or ARCHIVE, or set "
                           f"datasets.{self.name}.root in params.yaml")
        if params.source:
            local = self.fetch_source(out_dir, source, params)
        else:  # a bad root is params.yaml's to fix: the message names the key, not --from
            try:
                local = self.fetch_source(out_dir, source, params)
            except DmgError as exc:
                raise DmgError(f"params: datasets.{self.name}.root: {str(exc).removeprefix('--from ')}") from None
        tree, hashes = unpack(local, stage, manifest, allow_large=params.allow_large)
        return local, tree, hashes

    def fetch_source(self, out_dir: Path, source: str, params: DownloadParams) -> Path:
        """The local folder or archive `source` names, downloading it first if it is a URL."""
        if not is_url(source):
            return local_source(source)
        dest = download_path(out_dir, source, f"{self.name}.zip")
        return fetch_archive(source, dest, params.retries, params.timeout,
                             f"fetch {source} by hand and run `dmg download {self.name} --from FILE`",
                             download_cap(self.name, params.allow_large))

    def find_root(self, tree: Path, where: str) -> Path:
        return unwrap(tree)

    def source_folders(self) -> tuple[str, ...] | None:
        """The domain folders to take from the source; None: all."""
        return self.spec.domains

    def stored_domains(self) -> tuple[str, ...] | None:
        """The domain folders of raw/images to preprocess; None: all."""
        return self.spec.domains

    def domain_folders(self, layout: dict, where: str) -> dict[str, str]:
        """domain name -> its folder in the source (the same for a user's folders)."""
        return {domain: domain for domain in layout}

    def list_domains(self, out_dir: Path) -> tuple[str, ...]:
        images = out_dir / "images"
        return self.spec.domains or (tuple(p.name for p in folders(images)) if images.is_dir() else ())

    def find_lists(self, params: DownloadParams, tree: Path, local: Path, domain_folders: dict) -> dict[str, Path]:
        """The PACS-format lists (split: lists): in --splits, inside the copy, or beside it."""
        names = kfold_names(domain_folders)
        found = find_kfold_lists(params.splits, tree, local, set(names), frozenset(domain_folders.values()))
        missing = [n for n in names if n not in found]
        if missing:
            raise DmgError(f"{self.name}: split lists not found: {missing[0]} ({len(missing)} of {len(names)}); pass "
                           f"--splits FOLDER holding <domain>_{{train,crossval,test}}_kfold.txt (split: lists)")
        return {n: found[n] for n in names}

    # --- listing

    def plan(self, raw: Path, params: PreprocessParams) -> ImagePlan:
        images = raw / "images"
        if not (raw / Manifest.NAME).exists() or not images.is_dir():
            raise DmgError(f"{images} not found: run `dmg download {self.name} --from FOLDER|ARCHIVE` first")
        layout, skips = scan(images, str(images), self.stored_domains())
        classes = tuple(sorted({c for per_class in layout.values() for c in per_class}))
        label = {c: i for i, c in enumerate(classes)}
        spec = self.spec
        settings = {"split": spec.split}
        if spec.split == "lists":
            parts = kfold_plan(raw, self.name, tuple(layout), classes,
                               f"run `dmg download {self.name} --splits FOLDER` (split: lists)")
            notes = {"train": "train_kfold list", "val": "crossval_kfold list", "test": "test_kfold list"}
        elif spec.split == "holdout":
            parts = []
            for domain, per_class in layout.items():
                every = sorted(p for paths in per_class.values() for p in paths)
                train, val = holdout_split(every, spec.holdout, spec.seed, domain)
                for split, paths in (("train", train), ("val", val), ("test", every)):
                    parts.append(SplitPlan(domain, split, [(p, label[p.split("/")[1]]) for p in paths]))
            settings.update(holdout=spec.holdout, seed=spec.seed)
            notes = {"train/val": f"seeded random split of each domain (seed {spec.seed}): {spec.holdout} val, "
                                  f"the rest train (DomainBed's holdout_fraction)", "test": "the whole domain"}
        else:
            parts = []
            for domain, per_class in layout.items():
                chosen = {"train": [], "val": [], "test": []}
                for cls, paths in per_class.items():
                    for split, picked in fraction_split(paths, spec.fractions, spec.seed, f"{domain}/{cls}").items():
                        chosen[split] += [(p, label[cls]) for p in picked]
                parts += [SplitPlan(domain, split, entries) for split, entries in chosen.items()]
            settings.update(fractions=list(spec.fractions), seed=spec.seed)
            notes = {"train/val/test": f"seeded split of each domain and class (seed {spec.seed}): shares "
                                       f"{list(spec.fractions)}"}
        return ImagePlan(classes, parts, notes, settings, image_size=spec.image_size, skipped=skips)
