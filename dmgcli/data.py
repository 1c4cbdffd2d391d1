"""Batches from the HDF5 file: the shuffled union of source domains, and whole splits for evaluation.

Batches are (x, y, d): x uint8 [B, C, H, W] on the device (augmented there), y labels [B],
d source-domain index [B]. Raw-pixel files are held in memory; encoded files are decoded in
DataLoader workers that open the file lazily.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .h5data import SplitReader

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class DomainImages(Dataset):
    """Several splits viewed as one indexable set of (image uint8 [C,H,W], label, domain index)."""

    def __init__(self, readers: list[SplitReader], domain_ids: list[int]):
        self.readers, self.domain_ids = readers, domain_ids
        sizes = torch.tensor([len(r) for r in readers])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.labels = torch.cat([torch.from_numpy(r.labels) for r in readers]) if readers else torch.empty(0)
        self.domains = torch.cat([torch.full((len(r),), d) for r, d in zip(readers, domain_ids)]) if readers else torch.empty(0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        k = int(torch.searchsorted(self.starts, index, right=True)) - 1
        return self.readers[k].image(index - int(self.starts[k])), self.labels[index], self.domains[index]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class BatchStream:
    """Iterates batches of a DomainImages set, shuffled per epoch or in order."""

    def __init__(self, images: DomainImages, batch_size: int, device: torch.device, workers: int = 0,
                 in_memory: bool | None = None):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.workers = workers
        raw = all(r.encoding == "raw" for r in images.readers)
        self.in_memory = raw if in_memory is None else in_memory
        self.pixels: torch.Tensor | None = None
        if self.in_memory and len(images):
            self.pixels = torch.cat([r.all_images() for r in images.readers]).to(device)
            self.labels, self.domains = images.labels.to(device), images.domains.to(device)

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def batches(self, order: torch.Tensor | None = None) -> Iterator[Batch]:
        order = torch.arange(len(self.images)) if order is None else order
        if self.pixels is not None:
            order = order.to(self.device)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                yield self.pixels[idx], self.labels[idx], self.domains[idx]
            return
        chunks = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        loader = DataLoader(self.images, batch_sampler=chunks, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        for x, y, d in loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   d.to(self.device, non_blocking=True))

    def shuffled(self, seed: int, epoch: int) -> Iterator[Batch]:
        return self.batches(epoch_permutation(len(self.images), seed, epoch))
