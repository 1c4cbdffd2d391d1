"""What `dmg bench` and the benchmarks share: the settings of a throughput measurement, a
synthetic file of JPEGs to train from, and the timers (stages/bench.py measures with them;
stages/bench_concurrent.py's workers and benchmarks/*.py reuse them)."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import augment as aug
from .backbones import build_backbone
from .data import Batch, BatchStream, DomainImages, default_workers
from .engine import autocast_for, model_input
from .errors import DmgError
from .h5data import FileInfo, SplitReader, write_split, writing
from .methods import METHODS
from .params import DEFAULT_SCHEDULES, TrainParams

IMAGE_SIZE, CROP = 256, aug.CROP
# The optimisers of every benchmarked step: DomainNet's (lr 1e-4, no weight decay), which the
# benchmarks are sized after and were measured with.
STEP_SETTINGS = DEFAULT_SCHEDULES["domainnet"].optimizer_settings()
MAX_IMAGES = 1024  # distinct JPEGs in the file; longer runs cycle through them (encoding them takes a while)


@dataclass(frozen=True)
class BenchSettings:
    backbone: str
    method: str
    batch_size: int
    steps: int  # timed training steps, end to end and each synthetic step
    warmup: int  # untimed steps before each timing (cuDNN autotuning, worker start, compile)
    eval_batch_size: int
    eval_steps: int
    workers: int  # DataLoader workers reading the file
    domains: int = 5  # source domains (DomainNet leave-one-out has 5)
    classes: int = 345  # DomainNet's
    augmentation: str = "pacs"  # the heaviest: random resized crop + flip + colour jitter
    precision: str = TrainParams.precision
    compile: bool = False
    compile_mode: str = TrainParams.compile_mode  # torch.compile's mode (with compile)
    seed: int = 0
    concurrent: tuple[int, ...] = ()  # process counts for the concurrent-runs figure; () skips it


# CPU: ResNet-18 at 224 px trains a few images per second on 2 cores; these finish in about a minute.
DEFAULTS = {
    "cpu": dict(backbone="resnet18", batch_size=8, steps=6, warmup=1, eval_batch_size=16, eval_steps=2, workers=2),
    "cuda": dict(backbone="resnet50", batch_size=64, steps=100, warmup=20, eval_batch_size=256, eval_steps=20,
                 workers=default_workers()),
}


def settings_for(device: torch.device, method: str, **overrides) -> BenchSettings:
    """The device's defaults with the given (non-None) values on top."""
    values = {**DEFAULTS["cuda" if device.type == "cuda" else "cpu"], "method": method}
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = BenchSettings(**values)
    # Counts first: --domains 0 would wait forever for a batch, --classes 0 build an empty classifier.
    if settings.domains < 1 or settings.classes < 2 or settings.workers < 0:
        raise DmgError(f"bench: --domains must be at least 1, --classes at least 2 and --workers at least 0, got "
                       f"{settings.domains}, {settings.classes} and {settings.workers}")
    # Unknown names fail here, before minutes of encoding images.
    build_backbone(settings.backbone, settings.classes)
    if settings.method not in METHODS:
        raise DmgError(f"unknown method {settings.method!r}; valid: {', '.join(METHODS)}")
    aug.get_augmentation(settings.augmentation)
    autocast_for(device, settings.precision)
    counts = (settings.batch_size, settings.steps, settings.eval_batch_size, settings.eval_steps)
    if min(counts) < 1 or settings.warmup < 0:
        raise DmgError("bench: batch sizes and step counts must be positive (warmup may be 0)")
    if any(n < 1 for n in settings.concurrent):
        raise DmgError(f"bench: --concurrent counts must be positive, got {list(settings.concurrent)}")
    TrainParams(compile_mode=settings.compile_mode)  # the same check as train.compile_mode
    return settings


def synthetic_jpegs(n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """n smooth random colour images at 256 px as JPEG bytes (about 14 KB each, like real photos).

    Each is 16 x 16 uniform noise upsampled bicubically, as in ../shared/bench/ceiling.py.
    """
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 64):
        base = torch.rand(min(64, n - start), 3, 16, 16, generator=g)
        images = (F.interpolate(base, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic").clamp(0, 1) * 255).to(torch.uint8)
        out += [encode_jpeg(im.contiguous(), quality=quality).numpy().tobytes() for im in images]
    return out


def write_synthetic_file(path: Path, n: int, domains: int, classes: int, seed: int = 0) -> float:
    """A dmg file of n synthetic JPEGs, "train" split of domains d0..d{domains-1}; returns mean bytes per image."""
    jpegs = synthetic_jpegs(n, seed)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    info = FileInfo(dataset="bench", encoding="jpeg", height=IMAGE_SIZE, width=IMAGE_SIZE, channels=3,
                    classes=tuple(str(c) for c in range(classes)), domains=tuple(f"d{k}" for k in range(domains)),
                    provenance={"source": "synthetic (dmg bench)", "seed": seed})
    with writing(path, info) as f:
        for k, domain in enumerate(info.domains):
            part = slice(k * n // domains, (k + 1) * n // domains)
            write_split(f, domain, "train", jpegs[part], labels[part], [f"{domain}/{i}.jpg" for i in range(n)][part])
    return sum(len(b) for b in jpegs) / n


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) of `steps` calls of `step` (each returns its batch size) after `warmup` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step()
    synchronize(device)
    return time.perf_counter() - start, images


def endless(stream: BatchStream, seed: int) -> Iterator[Batch]:
    """Training batches epoch after epoch."""
    epoch = 0
    while True:
        yield from stream.shuffled(seed, epoch)
        epoch += 1


def bench_stream(h5: Path, settings: BenchSettings, device: torch.device, resident: str) -> BatchStream:
    """The training stream over the synthetic file's domains, streamed ("never") or resident ("always")."""
    readers = [SplitReader(h5, f"d{k}", "train") for k in range(settings.domains)]
    return BatchStream(DomainImages(readers, list(range(settings.domains))), settings.batch_size, device,
                       settings.workers, resident)


def plain_network(backbone: str, classes: int, device: torch.device) -> nn.Module:
    """The backbone as one network with one head: what ceiling.py trains (torchvision's model, same layers)."""
    net = nn.Sequential(*[m for _, m in build_backbone(backbone, classes).layers]).to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def random_batch(batch: int, settings: BenchSettings, device: torch.device):
    """Images in [0, 1] already on the device in the model's layout, labels, domain indices."""
    x = model_input(torch.rand(batch, 3, CROP, CROP, device=device))
    y = torch.randint(0, settings.classes, (batch,), device=device)
    d = torch.randint(0, settings.domains, (batch,), device=device)
    return x, y, d


def environment(device: torch.device) -> dict:
    """What the figures were measured on."""
    import torchvision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
