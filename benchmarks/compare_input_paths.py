"""Our input path against the usual research one, side by side on the same real PACS images.

    python benchmarks/compare_input_paths.py --backbone resnet18 --device cuda            # GPU machine
    python benchmarks/compare_input_paths.py --backbone resnet18 --device cpu --images 512 \\
        --batch-size 16 --steps 3 --warmup 1 --loader-batches 12                          # 2-core CPU

research  torchvision ImageFolder over the extracted PACS files; PIL RandomResizedCrop(224,
          scale 0.8-1) + RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4, 0.4) + ToTensor in a
          DataLoader with every core as a worker (the reference implementation's way).
ours      the same images as `dmg preprocess` stores them (shorter side 256, JPEG q90) in a dmg
          HDF5 file; dmgcli.data.BatchStream (CUDA: workers read bytes, one batched nvJPEG decode;
          CPU: workers decode) and the batched PACS augmentation of dmgcli.augment on the device.
Both feed the same method (default DMG) through the same training step (Method.update);
the images are a seeded sample of all four domains, each sample keeping its domain index.
Measured per path: the loader alone (batches ready on the device, augmented) and training end
to end, in images per second. Skips (exit 0) when PACS.zip is not there.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmgcli import augment as aug  # noqa: E402
from dmgcli.benchmarking import endless, environment, timed  # noqa: E402
from dmgcli.data import BatchStream, DomainImages  # noqa: E402
from dmgcli.engine import model_input, place, resolve_device, seed_everything, training_objective  # noqa: E402
from dmgcli.fileio import write_json  # noqa: E402
from dmgcli.h5data import FileInfo, SplitReader, write_split, writing  # noqa: E402
from dmgcli.methods import MethodConfig, build_method  # noqa: E402
from dmgcli.benchmarking import STEP_SETTINGS  # noqa: E402

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def extract_sample(zip_path: Path, root: Path, n: int, seed: int) -> list[tuple[Path, int, int]]:
    """Extract a seeded sample of n PACS images as root/<class>/<domain>__<file>; (path, label, domain index)."""
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(m for m in z.namelist() if m.startswith("kfold/") and m.lower().endswith((".jpg", ".png")))
        picked = random.Random(seed).sample(names, min(n, len(names)))
        items = []
        for name in sorted(picked):
            _, domain, cls, file = name.split("/")
            path = root / cls / f"{domain}__{file}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(z.read(name))
            items.append((path, CLASSES.index(cls), DOMAINS.index(domain)))
    return items


def write_ours(items: list[tuple[Path, int, int]], path: Path) -> None:
    """The sample as `dmg preprocess pacs` stores images (its own encoder), one "train" split per domain."""
    from stages.preprocess import ImageEncoder

    encoder = ImageEncoder(256, "jpeg", 90)
    info = FileInfo(dataset="pacs-sample", encoding="jpeg", height=256, width=256, channels=3, classes=CLASSES,
                    domains=DOMAINS, provenance={"source": "PACS.zip sample (compare_input_paths.py)"})
    with writing(path, info) as f:
        for k, domain in enumerate(DOMAINS):
            mine = [(p, y) for p, y, d in items if d == k]
            encoded = [encoder(str(p)) for p, _ in mine]
            bad = [str(p) for (p, _), (_, _, err) in zip(mine, encoded) if err]
            if bad:
                raise SystemExit(f"unreadable images: {bad[:3]}")
            write_split(f, domain, "train", [e[0] for e in encoded], [y for _, y in mine], [p.name for p, _ in mine])


def research_loader(root: Path, batch_size: int, workers: int, device: torch.device):
    """ImageFolder + PIL augmentation + DataLoader; batches (x float [B,3,224,224], y, domain index)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.8, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4), transforms.ToTensor()])

    class WithDomain(datasets.ImageFolder):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return x, y, DOMAINS.index(Path(self.samples[index][0]).name.split("__")[0])

    return torch.utils.data.DataLoader(WithDomain(str(root), transform=transform), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                                       drop_last=True, persistent_workers=workers > 0)


def research_batches(loader, device: torch.device):
    while True:
        for x, y, d in loader:
            yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                   d.to(device, non_blocking=True))


def measure(batches, prepare, method, objective, args, device) -> dict:
    """Loader alone, then training end to end, in img/s. prepare: batch images -> model input."""
    def load_only() -> int:
        x, y, d = next(batches)
        prepare(x)
        return len(y)

    def train() -> int:
        x, y, d = next(batches)
        method.update(prepare(x), y, d, objective)
        return len(y)

    seconds, images = timed(load_only, args.warmup, args.loader_batches, device)
    loader = images / seconds
    method.train()
    seconds, images = timed(train, args.warmup, args.steps, device)
    return {"loader_img_s": loader, "end_to_end_img_s": images / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pacs", type=Path, default=REPO.parent / "shared" / "data" / "PACS.zip")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--method", default="dmg")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per path")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--loader-batches", type=int, default=50, help="timed batches of the loader alone")
    parser.add_argument("--images", type=int, default=9991, help="PACS images to use (all: 9991)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="research path workers (default: all cores)")
    parser.add_argument("--our-workers", type=int, default=None, help="our path's workers (default: as --workers)")
    parser.add_argument("--resident", default="auto", choices=["auto", "always", "never"],
                        help="our path: hold the decoded images on the device (train.resident; auto: if they fit)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not args.pacs.exists():
        print(f"skipped: {args.pacs} not found", file=sys.stderr)
        return 0
    device = resolve_device(args.device)
    seed_everything(0)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               **environment(device)}
    with tempfile.TemporaryDirectory(prefix="dmg-compare-") as tmp:
        start = time.perf_counter()
        items = extract_sample(args.pacs, Path(tmp) / "imagefolder", args.images, seed=0)
        write_ours(items, Path(tmp) / "ours.h5")
        print(f"{len(items)} PACS images extracted and stored ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        config = MethodConfig(backbone=args.backbone, num_classes=len(CLASSES), num_domains=len(DOMAINS),
                              **STEP_SETTINGS)

        def fresh_method():
            seed_everything(0)
            method = place(build_method(args.method, config), device)
            return method, training_objective(method, device)

        method, objective = fresh_method()
        loader = research_loader(Path(tmp) / "imagefolder", args.batch_size, args.workers, device)
        results["research"] = measure(research_batches(loader, device), model_input, method, objective, args, device)
        del loader
        print(f"research: {results['research']}", file=sys.stderr)

        method, objective = fresh_method()
        readers = [SplitReader(Path(tmp) / "ours.h5", d, "train") for d in DOMAINS]
        start = time.perf_counter()
        stream = BatchStream(DomainImages(readers, list(range(len(DOMAINS)))), args.batch_size, device,
                             args.our_workers if args.our_workers is not None else args.workers, args.resident)
        results["ours_resident"], results["ours_decode_once_seconds"] = stream.resident, time.perf_counter() - start
        train_aug = aug.get_augmentation("pacs")[0]
        results["ours"] = measure(endless(stream, 0), lambda x: model_input(train_aug(x)), method, objective, args,
                                  device)
        print(f"ours: {results['ours']}", file=sys.stderr)
    results["speedup_end_to_end"] = results["ours"]["end_to_end_img_s"] / results["research"]["end_to_end_img_s"]
    results["speedup_loader"] = results["ours"]["loader_img_s"] / results["research"]["loader_img_s"]
    path = args.out / f"compare-input-paths-{args.method}-{args.backbone}-b{args.batch_size}-{device.type}-" \
                      f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    write_json(path, results)
    print(f"{args.method} {args.backbone} batch {args.batch_size} on {results['device_name']}:\n"
          f"  loader alone   research {results['research']['loader_img_s']:9.1f} img/s   ours "
          f"{results['ours']['loader_img_s']:9.1f} img/s   x{results['speedup_loader']:.2f}\n"
          f"  end to end     research {results['research']['end_to_end_img_s']:9.1f} img/s   ours "
          f"{results['ours']['end_to_end_img_s']:9.1f} img/s   x{results['speedup_end_to_end']:.2f}\n"
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
