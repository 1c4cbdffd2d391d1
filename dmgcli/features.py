"""Frozen-trunk features (`train.frozen_trunk`): what the frozen layers below the first mask point
make of each image, computed once per image and view and cached, so that an epoch runs only the
layers above them.

Views: each training image is seen through `views` fixed augmentations (the dataset's training
augmentation drawn with a seed of its own per image and view, the same for every run seed), and
an epoch shows each sample one of them, in turn; validation and test images through the
evaluation transform alone. A view is a function of (domain, split, image, view), so features
computed at every step (`train.trunk_cache: false`) are those the cache holds.

Cache file, <data_dir>/features/<dataset>/<backbone>.h5 (a DVC output of `dmg features`):
  attrs["key"]                  JSON of TrunkKey: everything the features are a function of
  /<domain>/<split>/features    float32 [V, N, *shape]: V = views for train, 1 for val and test
  /<domain>/<split>/labels      int64 [N]
A cache whose key differs from the run's (another backbone, cut, weights file, image size,
number of views, augmentation or dataset file) is rebuilt. It is written under a temporary
name and renamed when complete, so a killed build leaves nothing that a re-run would trust.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .augment import get_augmentation
from .backbones import build_backbone, frozen_depth, imagenet_weights_file, split_frozen
from .data import DomainImages, epoch_permutation
from .efficientnet import file_digest
from .errors import DmgError
from .fileio import atomic_path, run_lock
from .fingerprint import data_record
from .h5data import SplitReader, has_split, open_file, read_info

FORMAT = 1  # of the cache file; part of the key
VIEW_SEED = 20_200_823  # seeds every view; fixed, so the runs of all seeds share one cache
SPLITS = ("train", "val", "test")
BUILD_BATCH = 64
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrunkKey:
    """What cached features are a function of: a cache is used only under an equal key."""
    backbone: str
    cut: str  # the first layer above the frozen trunk
    weights: str  # sha256 of the ImageNet weights file
    image_size: int | None  # train.image_size (None: the augmentation's 224)
    views: int  # augmented views per training image
    augmentation: str
    dataset: str  # fingerprint of the HDF5 file (dmgcli/fingerprint.py)
    format: int = FORMAT


def unchanged(x: torch.Tensor) -> torch.Tensor:
    """The augmentation of a stream of features: they arrive ready."""
    return x


def cache_path(data_dir: str | Path, dataset: str, backbone: str) -> Path:
    return Path(data_dir) / "features" / dataset / f"{backbone}.h5"


def trunk_key(config, augmentation: str, h5: Path, image_size: int | None, views: int) -> TrunkKey:
    """The key of the features a run with MethodConfig `config` trains on."""
    if not config.pretrained:
        raise DmgError("train.frozen_trunk needs train.pretrained: true (a frozen trunk of random weights "
                       "computes nothing worth learning from)")
    backbone = build_backbone(config.backbone, config.num_classes, pretrained=True, load_weights=False)
    mask_points = config.mask_points or backbone.default_mask_points
    cut = backbone.names[frozen_depth(backbone, mask_points)]
    weights = file_digest(imagenet_weights_file(config.backbone, config.pretrained_path))
    return TrunkKey(config.backbone, cut, weights, image_size, views, augmentation, data_record(h5)["fingerprint"])


def view_seed(domain: str, split: str, index: int, view: int) -> int:
    return zlib.crc32(f"{VIEW_SEED}/{domain}/{split}/{index}/{view}".encode())


def augment_views(images: torch.Tensor, domain: list[str], split: str, index: list[int], view: list[int],
                  train_aug, eval_aug) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float [B, 3, S, S]: sample b through view[b] of its own.

    Training views draw their random crop, flip and jitter from a generator seeded by the
    sample and view alone, so a view never depends on which batch the sample is in."""
    if split != "train":
        return eval_aug(images)
    out = []
    for b in range(images.shape[0]):
        generator = torch.Generator(device=images.device).manual_seed(view_seed(domain[b], split, index[b], view[b]))
        out.append(train_aug(images[b:b + 1], generator=generator))
    return torch.cat(out)


class LiveFeatures:
    """Features computed at every step (train.trunk_cache: false): read, view, run the trunk."""

    def __init__(self, images: DomainImages, split: str, trunk: nn.Module, augmentations, device: torch.device):
        self.images, self.split, self.trunk, self.device = images, split, trunk, device
        self.train_aug, self.eval_aug = augmentations

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        located = [self.images.locate(int(i)) for i in indices]
        pixels = torch.stack([reader.image(i) for reader, i in located]).to(self.device)
        x = augment_views(pixels, [r.domain for r, _ in located], self.split, [i for _, i in located],
                          views.tolist(), self.train_aug, self.eval_aug)
        return self.trunk(x)


class FeatureStream:
    """Batches (features, label, domain index) with BatchStream's interface (dmgcli/data.py):
    `shuffled(seed, epoch)` for training (the same sample order as BatchStream, each sample in
    view (index + epoch) mod V), `batches()` in order for evaluation, under torchrun each
    process its share. `lookup(indices, views)` gives the features, cached or computed live."""

    def __init__(self, lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
                 domains: torch.Tensor, views: int, batch_size: int, device: torch.device):
        self.lookup, self.views, self.batch_size, self.device = lookup, views, batch_size, device
        self.labels, self.domains = labels.to(device), domains.to(device)
        self.shard = distributed.current()

    def __len__(self) -> int:
        n = len(self.labels) // self.shard.world
        return (n + self.batch_size - 1) // self.batch_size

    def shuffled(self, seed: int, epoch: int) -> Iterator[Batch]:
        perm = epoch_permutation(len(self.labels), seed, epoch)
        perm = perm[: len(perm) - len(perm) % self.shard.world][self.shard.rank::self.shard.world]
        return self._batches(perm, (perm + epoch) % self.views)

    def batches(self) -> Iterator[Batch]:
        order = torch.arange(len(self.labels))[self.shard.rank::self.shard.world]
        return self._batches(order, torch.zeros_like(order))

    def _batches(self, order: torch.Tensor, views: torch.Tensor) -> Iterator[Batch]:
        for start in range(0, len(order), self.batch_size):
            idx, view = order[start:start + self.batch_size], views[start:start + self.batch_size]
            dev_idx = idx.to(self.device)
            yield self.lookup(idx, view).to(self.device), self.labels[dev_idx], self.domains[dev_idx]


def cached_lookup(features: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """features [V, N, ...] -> lookup(indices [B], views [B]) = features[views, indices]."""
    return lambda indices, views: features[views, indices]


def read_cache(path: Path, domains: tuple[str, ...], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached features [V, N, ...], labels [N] and domain indices [N] of `split` of `domains`
    (indices 0..len(domains)-1, in order)."""
    feats, labels, ids = [], [], []
    with h5py.File(path, "r") as f:
        for k, domain in enumerate(domains):
            group = f[f"{domain}/{split}"]
            feats.append(torch.from_numpy(group["features"][:]))
            labels.append(torch.from_numpy(group["labels"][:]))
            ids.append(torch.full((len(labels[-1]),), k, dtype=torch.long))
    if not labels or not sum(len(l) for l in labels):
        raise DmgError(f"{path}: split {split} of {', '.join(domains)} is empty; nothing to train or evaluate on")
    return torch.cat(feats, dim=1), torch.cat(labels), torch.cat(ids)


def stored_key(path: Path) -> dict | None:
    """The key a cache file was built under; None if there is no readable, complete cache."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["key"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def build_trunk(config) -> nn.Module:
    """The frozen trunk with its ImageNet weights, in eval mode."""
    backbone = build_backbone(config.backbone, config.num_classes, pretrained=True,
                              pretrained_path=config.pretrained_path)
    trunk = split_frozen(backbone, config.mask_points or backbone.default_mask_points)
    return trunk.eval()


def ensure_cache(path: Path, key: TrunkKey, h5: Path, config, device: torch.device, quiet: bool = False) -> Path:
    """The cache at `path` for `key`, built (or rebuilt, if its key differs) when needed."""
    wanted = dataclasses.asdict(key)
    if stored_key(path) == wanted:
        return path
    with run_lock(path, folder=False):
        if stored_key(path) == wanted:  # built by another process meanwhile
            return path
        if path.exists() and not quiet:
            print(f"{path}: built for other settings; rebuilding", flush=True)
        build_cache(path, key, h5, build_trunk(config).to(device), device, quiet)
    return path


@torch.no_grad()
def build_cache(path: Path, key: TrunkKey, h5: Path, trunk: nn.Module, device: torch.device, quiet: bool) -> None:
    """Every split of every domain through the trunk: train in `key.views` views, val and test in
    the evaluation view. Written under a temporary name, renamed when complete."""
    info = read_info(h5)
    augmentations = get_augmentation(key.augmentation, key.image_size)
    readers = []
    with open_file(h5) as f:
        readers = [SplitReader(h5, d, s) for d in info.domains for s in SPLITS if has_split(f, d, s)]
    total = sum(len(r) * (key.views if r.split == "train" else 1) for r in readers)
    bar = tqdm(total=total, desc=f"trunk features {path.name}", unit="img", dynamic_ncols=True,
               disable=True if quiet else None)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        for reader in readers:
            views = key.views if reader.split == "train" else 1
            live = LiveFeatures(DomainImages([reader], [0]), reader.split, trunk, augmentations, device)
            group = out.create_group(f"{reader.domain}/{reader.split}")
            group.create_dataset("labels", data=reader.labels)
            data = None
            for view in range(views):
                for start in range(0, len(reader), BUILD_BATCH):
                    idx = torch.arange(start, min(start + BUILD_BATCH, len(reader)))
                    feats = live(idx, torch.full_like(idx, view)).float().cpu().numpy()
                    if data is None:
                        data = group.create_dataset("features", shape=(views, len(reader), *feats.shape[1:]),
                                                    dtype="float32")
                    data[view, start:start + len(idx)] = feats
                    bar.update(len(idx))
            if data is None:  # an empty split: nothing to train on, but the layout stays complete
                group.create_dataset("features", shape=(views, 0), dtype="float32")
        out.attrs["key"] = json.dumps(dataclasses.asdict(key))  # last: a file without it is incomplete
    bar.close()


def feature_streams(key: TrunkKey, path: Path | None, h5: Path, method, sources: tuple[str, ...],
                    splits: tuple[str, ...], batch_sizes: tuple[int, ...], device: torch.device,
                    augmentation: str) -> list[FeatureStream]:
    """One FeatureStream per split of `sources`: from the cache at `path` (already ensured), or,
    with path None, computed at every step by the method's own frozen trunk."""
    streams = []
    for split, batch_size in zip(splits, batch_sizes):
        views = key.views if split == "train" else 1
        if path is not None:
            feats, labels, ids = read_cache(path, sources, split)
            lookup = cached_lookup(feats.to(device))
        else:
            images = DomainImages([SplitReader(h5, d, split) for d in sources], list(range(len(sources))))
            if not len(images):
                raise DmgError(f"{h5}: split {split} of {', '.join(sources)} is empty; nothing to train or "
                               f"evaluate on")
            lookup = LiveFeatures(images, split, method.frozen, get_augmentation(augmentation, key.image_size),
                                  device)
            labels, ids = images.labels, images.domains
        streams.append(FeatureStream(lookup, labels, ids, views, batch_size, device))
    return streams
