"""PACS (Li et al. 2017): 4 domains, 7 classes, the official kfold split lists."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DmgError
from ..fileio import temp_dir
from ..fetch import Manifest, find_files, find_folder, replace_dir, sha256_file
from ..params import DownloadParams, PreprocessParams
from .base import DatasetInfo, ImagePlan, kfold_plan
from .sources import adopt_or_verify, archive_or_folder, discard_download, install_file, say, stage_folder, unpack

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")  # label order (alphabetical)
PACS_DRIVE_ID = "1m4X4fROCCXMO0lRLrr6Zz9Vb3974NWhE"  # Dassl's pacs.zip: images/ and splits/*_kfold.txt
PACS_ARCHIVE = "pacs.zip"
PACS_SPLITS = ("train", "crossval", "test")


def kfold_names(domains) -> list[str]:
    return [f"{d}_{s}_kfold.txt" for d in domains for s in PACS_SPLITS]


def find_kfold_lists(splits: str | None, tree: Path, local: Path, names: set[str],
                     domains: frozenset[str]) -> dict[str, Path]:
    """The kfold lists: in --splits if given; else inside the copy, or beside it (one level down)."""
    if splits:
        return find_files([Path(splits).expanduser()], names, skip=domains)
    beside = find_files([local.parent], names, max_depth=1, skip=domains)
    return {**beside, **find_files([tree], names, skip=domains)}


@dataclass(frozen=True)
class Pacs(DatasetInfo):
    def download(self, out_dir: Path, params: DownloadParams) -> None:
        """PACS images (any copy whose tree holds the four domain folders) and the official kfold lists."""
        manifest = Manifest(out_dir, "pacs")
        names = kfold_names(self.domains)
        if not manifest.verify("images/") and all(adopt_or_verify(manifest, f"splits/{n}") for n in names):
            manifest.save()
            say(f"pacs: {len(manifest.under('images/'))} images and {len(names)} split lists in {out_dir} "
                f"present and verified against {Manifest.NAME}; nothing to do")
            return
        with temp_dir(out_dir, "fetch") as stage:
            local = archive_or_folder(out_dir, params.source, f"https://drive.google.com/uc?id={PACS_DRIVE_ID}",
                                      PACS_ARCHIVE, "pacs", params)
            tree, hashes = unpack(local, stage, manifest, allow_large=params.allow_large)
            domains = set(self.domains)
            root = find_folder(tree, domains)
            if root is None:
                raise DmgError(f"{local} holds no folder with the PACS domain folders {', '.join(sorted(domains))}")
            lists = find_kfold_lists(params.splits, tree, local, set(names), frozenset(domains))
            missing = [n for n in names if n not in lists]
            if missing:
                where = params.splits or f"{local} or next to it"
                raise DmgError(f"PACS split lists not found in {where}: {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(names)}); pass "
                               f"--splits FOLDER holding the official <domain>_{{train,crossval,test}}_kfold.txt lists")
            for name in names:  # checked before anything is put in place
                manifest.check_file(f"splits/{name}", sha256_file(lists[name]), str(lists[name]))
            # the images are staged first (a user's folder copied: the step a full disk stops), then the
            # lists are installed before the images are renamed into place: lists inside the image folder move with it
            images, hashes = stage_folder(root, hashes, tree, stage, manifest, "images/", str(local))
            for name in names:
                install_file(lists[name], manifest, f"splits/{name}", str(lists[name]))
            replace_dir(images, out_dir / "images")
            manifest.save()
        discard_download(local, out_dir)
        say(f"pacs: {len(hashes)} files in {out_dir / 'images'} and {len(names)} split lists in {out_dir / 'splits'}, "
            f"sha256 recorded in {manifest.path}")

    def plan(self, raw: Path, params: PreprocessParams) -> ImagePlan:
        """The official kfold lists: train, crossval as val, test (the whole domain); labels 1-based there."""
        parts = kfold_plan(raw, "pacs", self.domains, PACS_CLASSES,
                           "run `dmg download pacs` (with --splits FOLDER if needed)")
        return ImagePlan(PACS_CLASSES, parts, {"train": "official train_kfold", "val": "official crossval_kfold",
                                               "test": "official test_kfold"})


PACS = Pacs(
    name="pacs", domains=("art_painting", "cartoon", "photo", "sketch"), num_classes=7, augmentation="pacs",
    description="PACS (Li et al. 2017): 9,991 images, 4 domains, 7 classes", in_domain_split="val",
    resize="center_crop",  # the images are 227 x 227: a square either way
)
