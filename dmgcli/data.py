"""Batches from the HDF5 file: the shuffled union of source domains, and whole splits for evaluation.

Batches are (x, y, d): x uint8 [B, C, H, W] on the device (augmented there), y labels [B],
d source-domain index [B]. Two ways in:
  resident   the whole split decoded once and held on the device as uint8 [N, C, H, W]
             (PACS at 256 px: about 2 GB); an epoch is one index_select per batch, no loader.
             Chosen when the decoded split fits in RESIDENT_SHARE of the device's free memory
             (`resident="auto"`), or forced with "always" / "never".
  streamed   DataLoader workers read whole batches: raw pixels, or JPEG decoded in the
             workers (CPU), or on CUDA the encoded bytes of a batch (one flat pinned buffer)
             that the main process decodes on the GPU in one batched
             `torchvision.io.decode_jpeg(..., device="cuda")` call on a side stream. CPU
             decoding cannot feed a GPU at 10,000+ images per second (REFERENCE.md, section 3).
             The next batch is started before the current one is handed out, so its copy and
             decode overlap the training step. Workers open the file lazily (SplitReader),
             persist across epochs and prefetch batches.
Both give the same batches in the same order (tests/test_data.py), so the choice never
changes a result.

Under torchrun each process reads its own share (see `BatchStream.shuffled` and `.batches`).
"""
from __future__ import annotations

from typing import Iterator

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed
from .errors import DmgError
from .h5data import SplitReader, read_info
from .params import RESIDENT_MODES, TrainParams

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PREFETCH = 4  # batches each worker keeps ready
RESIDENT_SHARE = 0.5  # "auto": a decoded split may take at most this share of the device's free memory
FILL_BATCH = 256  # images per decode call while a split is made resident
MAX_DEFAULT_WORKERS = 8  # enough to read bytes for nvJPEG or decode PACS-sized JPEGs for a CPU step


def default_workers() -> int:
    """DataLoader workers when none are set: one per core, at most MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def available_memory(device: torch.device) -> int:
    """Bytes free for a resident split: free GPU memory on CUDA, available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_resident(mode: str, needed: int, device: torch.device) -> bool:
    """Whether a split of `needed` decoded bytes is held on the device (see the module docstring)."""
    if mode not in RESIDENT_MODES:
        raise DmgError(f"unknown resident mode {mode!r}; valid: {', '.join(RESIDENT_MODES)}")
    if mode != "auto":
        return mode == "always"
    return needed <= RESIDENT_SHARE * available_memory(device)


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

    @property
    def encoding(self) -> str:
        """"raw" or "jpeg" (the readers of one set come from one file)."""
        return self.readers[0].encoding if self.readers else "raw"

    def locate(self, index: int) -> tuple[SplitReader, int]:
        """The reader holding sample `index`, and the index within its split."""
        k = int(torch.searchsorted(self.starts, index, right=True)) - 1
        return self.readers[k], index - int(self.starts[k])

    def image(self, index: int) -> torch.Tensor:
        """Sample `index` decoded: uint8 [C, H, W]."""
        reader, i = self.locate(index)
        return reader.image(i)

    def encoded(self, index: int) -> np.ndarray:
        """The stored JPEG bytes of sample `index`: uint8 [n_bytes]."""
        reader, i = self.locate(index)
        return reader.encoded(i)

    def __getitem__(self, index: int):
        return self.image(index), self.labels[index], self.domains[index]

    def decoded_bytes(self) -> int:
        """Bytes of the whole set decoded as uint8 [N, C, H, W] (every image of a dmg file has one size)."""
        if not self.readers:
            return 0
        info = read_info(self.readers[0].path)
        return len(self) * info.channels * info.height * info.width


class BatchReader(Dataset):
    """A DomainImages set read a whole batch per item, in DataLoader workers.

    Item: a list of sample indices. Returns (x uint8 [B, C, H, W], y, d), or with `encoded`
    (JPEG files on CUDA) (flat uint8 [total bytes], sizes [B], y, d) for `decode_batch`.
    """

    def __init__(self, images: DomainImages, encoded: bool):
        self.images, self.encoded = images, encoded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]):
        y, d = self.images.labels[indices], self.images.domains[indices]
        if not self.encoded:
            return torch.stack([self.images.image(i) for i in indices]), y, d
        parts = [self.images.encoded(i) for i in indices]
        sizes = torch.tensor([len(p) for p in parts])
        return torch.from_numpy(np.concatenate(parts)), sizes, y, d


def decode_batch(flat: torch.Tensor, sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of JPEG files, back to back in `flat` (uint8 [total], CPU), decoded in one call.

    device "cuda": nvJPEG decodes the whole batch on the GPU; "cpu": libjpeg, one after the
    other (the same call, used by the tests). Returns uint8 [B, 3, H, W] on `device`;
    every image of a dmg file has the same size, so the batch stacks.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    parts = list(torch.split(flat, sizes.tolist()))  # views, no copy
    images = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) > 1:  # a stored JPEG of another size whose checksum matches: stack would fail with a traceback
        raise DmgError(f"a batch holds images of sizes {', '.join('x'.join(map(str, s[1:])) for s in shapes[:3])}; "
                       f"the dataset file is damaged: find the image with `dmg info --verify` and run "
                       f"`dmg preprocess` again")
    return torch.stack(images)


class CudaDecoder:
    """`decode_batch` on CUDA, on a side stream, ordered so nvJPEG never writes memory still in use.

    torchvision's CUDA decoder allocates its outputs on the caller's stream but writes them
    from a private stream that does not wait for the caller's queued work (pytorch/vision
    PR 9606: a block just freed by a still-queued training kernel can be overwritten). So the
    decode runs on a stream of its own whose queue is drained (host wait, only for that
    small stream, never the training one) before each decode. The previous batch's bytes are
    kept until that drain, in case nvJPEG still reads them. `ready` makes the training stream
    wait for a decoded batch when it is handed out, not when its decode starts, so the decode
    of batch k+1 overlaps step k; the batch's memory is not reused until that stream is done.
    """

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.in_flight: torch.Tensor | None = None

    def __call__(self, flat: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            x = decode_batch(flat, sizes, self.device)
        self.in_flight = flat
        return x

    def ready(self, x: torch.Tensor) -> torch.Tensor:
        """x, ordered after its decode on the current (training) stream."""
        training = torch.cuda.current_stream(self.device)
        training.wait_stream(self.stream)
        x.record_stream(training)
        return x


class _BatchOrder(Sampler):
    """The batches (lists of sample indices) of the current pass, replaced before each pass,
    so one DataLoader with persistent workers serves every epoch."""

    def __init__(self):
        self.chunks: list[list[int]] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def one_ahead(batches: Iterator) -> Iterator:
    """Yield each item only once the next one has been made: on CUDA the next batch's copy and
    decode are queued before the caller's step on the current one, so they overlap it."""
    previous = None
    for item in batches:
        if previous is not None:
            yield previous
        previous = item
    if previous is not None:
        yield previous


class BatchStream:
    """Iterates batches of a DomainImages set: shuffled per epoch for training, in order for evaluation.

    batch_size: per process. resident: "auto", "always" or "never" (module docstring).
    workers: DataLoader workers for the streamed path and for decoding a JPEG split once
    (None: `default_workers()`). shard: this process's place among the processes that share
    the set (default: the torchrun process group, if any). decode_on_device: decode JPEG
    batches with `decode_batch` on the device instead of in the workers (default: on CUDA only).
    """

    def __init__(self, images: DomainImages, batch_size: int, device: torch.device, workers: int | None = None,
                 resident: str = TrainParams.resident, shard: distributed.Dist | None = None,
                 decode_on_device: bool | None = None):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.workers = default_workers() if workers is None else workers
        self.shard = shard or distributed.current()
        raw = images.encoding == "raw"
        if decode_on_device is None:
            decode_on_device = device.type == "cuda"
        self.decode_on_device = decode_on_device and not raw
        self._order = _BatchOrder()
        self._loader: DataLoader | None = None
        self._decoder = CudaDecoder(device) if self.decode_on_device and device.type == "cuda" else None
        self.pixels: torch.Tensor | None = None
        self.resident = choose_resident(resident, images.decoded_bytes(), device) and len(images) > 0
        if self.resident:
            self.pixels = self._decode_all()
            self.labels, self.domains = images.labels.to(device), images.domains.to(device)

    def _decode_all(self) -> torch.Tensor:
        """The whole set decoded onto the device, uint8 [N, C, H, W]: raw pixels in one read, JPEG
        files through the streamed path (workers / GPU decode) in FILL_BATCH chunks."""
        if self.images.encoding == "raw":
            return torch.cat([r.all_images() for r in self.images.readers]).to(self.device)
        info = read_info(self.images.readers[0].path)
        pixels = torch.empty(len(self.images), info.channels, info.height, info.width, dtype=torch.uint8,
                             device=self.device)
        start = 0
        for x, _, _ in self._streamed(torch.arange(len(self.images)), FILL_BATCH):
            pixels[start:start + len(x)] = x
            start += len(x)
        self._loader = None  # its workers exit: a resident set never reads the file again
        return pixels

    def training_share(self, seed: int, epoch: int) -> torch.Tensor:
        """This process's samples of an epoch, in order: every world-th entry of the epoch's permutation.

        So the processes' t-th batches together are exactly the single-process t-th batch of
        batch_size * world samples. The last (n mod world) entries are left out, so that every
        process runs the same number of steps (DDP needs that).
        """
        perm = epoch_permutation(len(self.images), seed, epoch)
        world = self.shard.world
        perm = perm[: len(perm) - len(perm) % world]
        return perm[self.shard.rank::world]

    def evaluation_share(self) -> torch.Tensor:
        """This process's samples for evaluation: every sample of the set exactly once over all processes."""
        return torch.arange(len(self.images))[self.shard.rank::self.shard.world]

    def __len__(self) -> int:
        """Training batches per epoch of this process."""
        n = len(self.images) // self.shard.world
        return (n + self.batch_size - 1) // self.batch_size

    def shuffled(self, seed: int, epoch: int) -> Iterator[Batch]:
        return self.batches(self.training_share(seed, epoch))

    def batches(self, order: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of the samples in `order` (default: this process's evaluation share)."""
        order = self.evaluation_share() if order is None else order
        if self.pixels is None:
            yield from self._streamed(order, self.batch_size)
            return
        order = order.to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.pixels[idx], self.labels[idx], self.domains[idx]

    def _streamed(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """Batches read by the workers (and decoded on the device for JPEG on CUDA), one batch ahead."""
        self._order.chunks = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        for x, y, d in one_ahead(self._started(self.loader())):
            yield (self._decoder.ready(x) if self._decoder else x), y, d

    def _started(self, items) -> Iterator[Batch]:
        """The loader's items with their copy to the device (and GPU decode) queued."""
        for item in items:
            if self.decode_on_device:
                flat, sizes, y, d = item
                x = self._decoder(flat, sizes) if self._decoder else decode_batch(flat, sizes, self.device)
                if tuple(x.shape[1:]) != self.images.readers[0].shape:  # the CPU path checks each image
                    raise DmgError(f"{self.images.readers[0].path}: stored images decode to {tuple(x.shape[1:])}, "
                                   f"not the file's {self.images.readers[0].shape}; run `dmg preprocess` again")
            else:
                x, y, d = item
                x = x.to(self.device, non_blocking=True)
            yield x, y.to(self.device, non_blocking=True), d.to(self.device, non_blocking=True)

    def loader(self) -> DataLoader:
        """The DataLoader of this stream, made once: its workers live as long as the stream."""
        if self._loader is None:
            # Its own generator: a DataLoader draws its workers' base seed from the global one at
            # every pass, which would shift the mask samples and make streamed runs differ from resident ones.
            self._loader = DataLoader(BatchReader(self.images, encoded=self.decode_on_device), batch_size=None,
                                      sampler=self._order, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                                      prefetch_factor=PREFETCH if self.workers else None,
                                      generator=torch.Generator().manual_seed(0))
        return self._loader


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
