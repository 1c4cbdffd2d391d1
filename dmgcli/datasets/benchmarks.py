"""VLCS, Office-Home and TerraIncognita: folder datasets with built-in sources (DomainBed's).

Sources are those of DomainBed's domainbed/scripts/download.py (Gulrajani & Lopez-Paz 2021);
splits follow DomainBed's protocol: per domain a seeded random 20% (holdout_fraction 0.2) is
validation, the rest training; the target domain is tested whole. Each domain is stored
under a lower-case name (`Real World` -> `real_world`), so targets are easy to type.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..archives import unsafe_reason
from ..errors import DmgError
from ..fetch import Manifest, find_files, find_folder, is_url
from ..params import DownloadParams, FolderDatasetParams
from .folder import FolderDataset
from .sources import (archive_or_folder, discard_download, download_cap, download_path, fetch_archive, local_source,
                      unpack)

DOMAINBED_SPLIT = FolderDatasetParams(split="holdout", holdout=0.2, seed=0, augmentation="pacs", resize="squash",
                                      schedule="default")


@dataclass(frozen=True)
class Benchmark(FolderDataset):
    """A named benchmark: its domain folders in the source, the classes it may hold, its archive."""
    folder_names: tuple[str, ...] = ()  # per domain, the folder's name in the source
    known_classes: tuple[str, ...] = ()
    archive: tuple[str, str] = ("", "")  # (file name, public URL)

    def fetch_tree(self, out_dir: Path, stage: Path, manifest: Manifest, params: DownloadParams):
        name, url = self.archive
        local = archive_or_folder(out_dir, params.source, url, name, self.name, params)
        tree, hashes = unpack(local, stage, manifest, allow_large=params.allow_large)
        return local, tree, hashes

    def find_root(self, tree: Path, where: str) -> Path:
        root = find_folder(tree, set(self.folder_names))
        if root is None:
            raise DmgError(f"{where} holds no folder with the {self.name} domain folders "
                           f"{', '.join(repr(f) for f in self.folder_names)}")
        return root

    def domain_folders(self, layout: dict, where: str) -> dict[str, str]:
        for folder, classes in layout.items():
            unknown = sorted(set(classes) - set(self.known_classes))
            if unknown:
                raise DmgError(f"{where}: {folder}/{unknown[0]} is not a {self.name} class folder "
                               f"({len(self.known_classes)} classes: {', '.join(self.known_classes[:5])}, ...)")
        return dict(zip(self.domains, self.folder_names))

    def source_folders(self) -> tuple[str, ...]:
        return self.folder_names

    def stored_domains(self) -> tuple[str, ...]:
        return self.domains


VLCS = Benchmark(
    name="vlcs", domains=("caltech101", "labelme", "sun09", "voc2007"), num_classes=5, augmentation="pacs",
    description="VLCS (Fang et al. 2013): 10,729 photos, 4 domains (datasets), 5 classes; DomainBed's copy",
    in_domain_split="val", schedule="default", resize="squash", spec=DOMAINBED_SPLIT,
    folder_names=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    known_classes=("bird", "car", "chair", "dog", "person"),
    archive=("VLCS.tar.gz", "https://drive.google.com/uc?id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),
)

OFFICE_HOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone",
    "ToothBrush", "Toys", "Trash_Can", "Webcam",
)

OFFICE_HOME = Benchmark(
    name="office_home", domains=("art", "clipart", "product", "real_world"), num_classes=65, augmentation="pacs",
    description="Office-Home (Venkateswara et al. 2017): 15,588 images, 4 domains, 65 classes; DomainBed's copy",
    in_domain_split="val", schedule="default", resize="squash", spec=DOMAINBED_SPLIT,
    folder_names=("Art", "Clipart", "Product", "Real World"), known_classes=OFFICE_HOME_CLASSES,
    archive=("office_home.zip", "https://drive.google.com/uc?id=1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"),
)

TERRA_LOCATIONS = ("100", "38", "43", "46")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
TERRA_URL = "https://lilablobssc.blob.core.windows.net/caltechcameratraps/"
TERRA_IMAGES = "eccv_18_all_images_sm.tar.gz"  # flat folder eccv_18_all_images_sm/<file_name>
TERRA_LABELS = "labels/caltech_camera_traps.json.zip"  # COCO-style json: images (location), annotations, categories


@dataclass(frozen=True)
class TerraIncognita(Benchmark):
    """Caltech Camera Traps images sorted as DomainBed does: location_<L>/<category>/<file> for 4 locations."""

    def fetch_tree(self, out_dir: Path, stage: Path, manifest: Manifest, params: DownloadParams):
        source = params.source
        folder = local_source(source) if source and not is_url(source) else None
        if folder is not None and (not folder.is_dir() or find_folder(folder, set(self.folder_names))):
            return super().fetch_tree(out_dir, stage, manifest, params)  # an archive or an already sorted copy
        base = (source.rstrip("/") + "/") if source and is_url(source) else TERRA_URL
        images, labels = (self.terra_part(out_dir, folder, base, rel, params) for rel in (TERRA_IMAGES, TERRA_LABELS))
        image_tree, _ = unpack(images, stage, manifest, "images", params.allow_large)
        label_tree, _ = unpack(labels, stage, manifest, "labels", params.allow_large)
        sort_by_location(image_tree, label_tree, stage / "sorted", str(images))
        return images, stage / "sorted", None

    def terra_part(self, out_dir: Path, folder: Path | None, base: str, rel: str, params: DownloadParams) -> Path:
        name = Path(rel).name
        if folder is not None:
            found = find_files([folder], {name}, max_depth=2)
            if name not in found:
                raise DmgError(f"--from {folder}: {name} not found there (nor the sorted location_* folders)")
            return found[name]
        url = base + rel
        hint = (f"fetch it by hand and run `dmg download terra_incognita --from FOLDER` with FOLDER holding "
                f"{Path(TERRA_IMAGES).name} and {Path(TERRA_LABELS).name}")
        return fetch_archive(url, download_path(out_dir, url, name), params.retries, params.timeout, hint,
                             download_cap(self.name, params.allow_large))

    def download(self, out_dir: Path, params: DownloadParams) -> None:
        super().download(out_dir, params)
        labels = out_dir / "downloads" / Path(TERRA_LABELS).name
        if labels.exists():  # the second archive we fetched (super() discards the first)
            discard_download(labels, out_dir)


def sort_by_location(image_tree: Path, label_tree: Path, into: Path, where: str) -> None:
    """DomainBed's sorting: each annotated image of the 4 locations is copied to location_<L>/<category>/."""
    found = sorted(label_tree.rglob("*.json"))
    if not found:
        raise DmgError(f"{where}: no annotation .json file in {Path(TERRA_LABELS).name}")
    try:
        data = json.loads(found[0].read_text())
        category = {c["id"]: c["name"] for c in data["categories"]}
        by_image: dict = {}
        for note in data["annotations"]:
            by_image.setdefault(note["image_id"], []).append(category[note["category_id"]])
        images = [(str(im["location"]), im["id"], im["file_name"]) for im in data["images"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DmgError(f"{found[0].name}: not a Caltech Camera Traps annotation file ({type(exc).__name__}: {exc})") \
            from None
    source = next((p for p in [image_tree, *image_tree.rglob("*")] if p.is_dir()
                   and p.name == "eccv_18_all_images_sm"), image_tree)
    for location, image_id, file_name in images:
        if location not in TERRA_LOCATIONS:
            continue
        if reason := unsafe_reason(str(file_name)):  # as a split list's line: never read a file outside the images
            raise DmgError(f"{found[0].name}: image file_name {str(file_name)[:120]!r} leaves the image folder "
                           f"({reason})")
        for name in by_image.get(image_id, []):
            if name in TERRA_CATEGORIES and (source / file_name).is_file():
                target = into / f"location_{location}" / name / Path(file_name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / file_name, target)


TERRA_INCOGNITA = TerraIncognita(
    name="terra_incognita", domains=tuple(f"location_{loc}" for loc in TERRA_LOCATIONS), num_classes=10,
    augmentation="pacs", in_domain_split="val", schedule="default", resize="squash", spec=DOMAINBED_SPLIT,
    description="TerraIncognita (Beery et al. 2018): camera-trap photos of 4 locations, 10 classes; DomainBed's "
                "selection from Caltech Camera Traps",
    folder_names=tuple(f"location_{loc}" for loc in TERRA_LOCATIONS), known_classes=TERRA_CATEGORIES,
    archive=("terra_incognita.zip", ""),
)
