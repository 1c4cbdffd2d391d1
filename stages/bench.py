"""`dmg bench`: training throughput from an HDF5 file of JPEGs against the model's own ceiling.

In one run, on one device:
  1. writes a synthetic dmg file of JPEGs at 256 px (smooth random colour images, quality 90,
     about the bytes of real 256 px photos) to a temporary folder;
  2. end to end: trains `steps` steps of the method from that file through the training
     input path (data.BatchStream: GPU decode on CUDA, worker decode on the CPU; the
     dataset's batched augmentation; Method.update), streamed and then resident (the file
     decoded once onto the device; an epoch is index + crop + jitter there);
  3. the method's step alone, on random tensors already on the device;
  4. the plain step of the same network (the ceiling, as ../shared/bench/ceiling.py measures
     it: random tensors on the device, bf16 autocast on CUDA, channels_last, Adam, one head);
  5. evaluation: the method's test-time prediction ("average": DMG runs the trunk once and
     its masked part once per source domain) and the plain network's forward;
  6. with --concurrent 1 2 4: the summed img/s of that many processes training at once
     (stages/bench_concurrent.py), what `dmg study --jobs N` gains on one device.
It prints images per second for each, the end-to-end / plain ratio, the input path's share
of step time, and writes everything to JSON under benchmarks/results/.

Shares, both of the end-to-end step time:
  data_share         1 - (method step alone) / (end-to-end step): all the input path adds
  loader_wait_share  time the loop waited for the next batch (workers behind, or the decode)
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dmgcli import augment as aug
from dmgcli.backbones import build_backbone
from dmgcli.data import Batch, BatchStream, DomainImages, default_workers
from dmgcli.engine import autocast_for, model_input, place, resolve_device, seed_everything, training_objective
from dmgcli.errors import DmgError
from dmgcli.fileio import write_json
from dmgcli.h5data import FileInfo, SplitReader, write_split, writing
from dmgcli.methods import METHODS, MethodConfig, build_method
from dmgcli.params import DEFAULT_SCHEDULES, TrainParams

IMAGE_SIZE, CROP = 256, aug.CROP
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
    precision: str = "bf16"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode (with compile)
    seed: int = 0
    concurrent: tuple[int, ...] = ()  # process counts for the concurrent-runs figure; () skips it


# CPU: ResNet-18 at 224 px trains a few images per second on 2 cores; these finish in about a minute.
DEFAULTS = {
    "cpu": dict(backbone="resnet18", batch_size=8, steps=6, warmup=1, eval_batch_size=16, eval_steps=2, workers=2),
    "cuda": dict(backbone="resnet50", batch_size=64, steps=100, warmup=20, eval_batch_size=256, eval_steps=20,
                 workers=default_workers()),
}


def settings_for(device: torch.device, method: str = "dmg", **overrides) -> BenchSettings:
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
    if min(settings.batch_size, settings.steps, settings.eval_batch_size, settings.eval_steps) < 1 or settings.warmup < 0:
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


def bench(settings: BenchSettings, device: torch.device, out_dir: str | Path = "benchmarks/results",
          progress: Callable[[str], None] = print) -> dict:
    """Run the five measurements; writes and returns the results."""
    seed_everything(settings.seed)
    needed = (settings.warmup + settings.steps) * settings.batch_size
    n = math.ceil(min(needed, MAX_IMAGES) / settings.batch_size) * settings.batch_size  # whole batches per epoch
    n = max(n, settings.domains)
    autocast = autocast_for(device, settings.precision)
    results: dict = {"settings": asdict(settings), **environment(device)}

    with tempfile.TemporaryDirectory(prefix="dmg-bench-") as tmp:
        progress(f"writing {n} synthetic JPEGs at {IMAGE_SIZE} px ...")
        results["jpeg_mean_bytes"] = write_synthetic_file(Path(tmp) / "bench.h5", n, settings.domains, settings.classes,
                                                          settings.seed)
        config = MethodConfig(backbone=settings.backbone, num_classes=settings.classes, num_domains=settings.domains,
                              **DEFAULT_SCHEDULES["domainnet"].optimizer_settings())  # sized as DomainNet
        method = place(build_method(settings.method, config), device, settings.precision)
        objective = training_objective(method, device, settings.compile, settings.compile_mode)
        train_aug = aug.get_augmentation(settings.augmentation)[0]

        # 2. End to end from the file, streamed.
        stream = bench_stream(Path(tmp) / "bench.h5", settings, device, "never")
        batches, waited = endless(stream, settings.seed), [0.0]

        def end_to_end_step() -> int:
            start = time.perf_counter()
            x, y, d = next(batches)
            waited[0] += time.perf_counter() - start
            method.update(model_input(train_aug(x)), y, d, objective)
            return len(y)

        method.train()
        progress(f"end to end: {settings.method} {settings.backbone}, batch {settings.batch_size}, "
                 f"{settings.steps} steps ...")
        for _ in range(settings.warmup):
            end_to_end_step()
        waited[0] = 0.0
        e2e_seconds, e2e_images = timed(end_to_end_step, 0, settings.steps, device)
        del batches, stream  # stops the workers

        # 2b. End to end, resident: decoded once (timed), then index + augmentation on the device.
        progress("end to end, resident dataset ...")
        synchronize(device)
        start = time.perf_counter()
        stream = bench_stream(Path(tmp) / "bench.h5", settings, device, "always")
        synchronize(device)
        results["resident_decode_seconds"] = time.perf_counter() - start
        batches = endless(stream, settings.seed)
        waited[0] = 0.0
        resident_seconds, resident_images = timed(end_to_end_step, settings.warmup, settings.steps, device)
        results["resident_img_s"] = resident_images / resident_seconds
        del batches, stream

        # 3. The method's step alone.
        x, y, d = random_batch(settings.batch_size, settings, device)

        def method_step() -> int:
            method.update(x, y, d, objective)
            return len(y)

        progress("method step on device tensors ...")
        method_seconds, method_images = timed(method_step, settings.warmup, settings.steps, device)

        # 4. The plain step of the same network.
        plain = plain_network(settings.backbone, settings.classes, device)
        opt = torch.optim.Adam(plain.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)

        def plain_step() -> int:
            with autocast():
                loss = F.cross_entropy(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return len(y)

        progress("plain step (the ceiling) ...")
        plain_seconds, plain_images = timed(plain_step, settings.warmup, settings.steps, device)

        # 5. Evaluation.
        xe, _, _ = random_batch(settings.eval_batch_size, settings, device)
        method.eval()
        plain.eval()

        def evaluation(model_predict) -> Callable[[], int]:
            @torch.no_grad()
            def step() -> int:
                with autocast():
                    model_predict(xe)
                return len(xe)
            return step

        progress("evaluation ...")
        eval_warm = min(settings.warmup, 5)
        eval_seconds, eval_images = timed(evaluation(lambda v: method.predict(v, "average")), eval_warm,
                                          settings.eval_steps, device)
        plain_eval_seconds, plain_eval_images = timed(evaluation(plain), eval_warm, settings.eval_steps, device)

        # 6. Several training processes at once.
        if settings.concurrent:
            del method, plain, opt, x, y, d, xe  # this process's models leave the device to the workers
            if device.type == "cuda":
                torch.cuda.empty_cache()
            from stages.bench_concurrent import concurrent_figure
            results["concurrent"] = concurrent_figure(settings, device, Path(tmp) / "bench.h5", progress)

    results.update(summarize(e2e_seconds, e2e_images, waited[0], method_seconds, method_images, plain_seconds,
                             plain_images, eval_seconds, eval_images, plain_eval_seconds, plain_eval_images))
    results["resident_vs_plain"] = results["resident_img_s"] / results["plain_step_img_s"]
    path = Path(out_dir) / result_name(settings, device)
    write_json(path, results)
    results["path"] = str(path)
    return results


def summarize(e2e_s, e2e_n, waited_s, method_s, method_n, plain_s, plain_n, eval_s, eval_n, plain_eval_s,
              plain_eval_n) -> dict:
    e2e, method, plain = e2e_n / e2e_s, method_n / method_s, plain_n / plain_s
    return {
        "end_to_end_img_s": e2e,  # streamed from the file
        "method_step_img_s": method,
        "plain_step_img_s": plain,
        "end_to_end_vs_plain": e2e / plain,
        "method_vs_plain": method / plain,
        "data_share": max(0.0, 1 - e2e / method),  # 1 - (method time per image) / (end-to-end time per image)
        "loader_wait_share": waited_s / e2e_s,
        "eval_img_s": eval_n / eval_s,
        "plain_eval_img_s": plain_eval_n / plain_eval_s,
    }


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


def result_name(settings: BenchSettings, device: torch.device) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"bench-{settings.method}-{settings.backbone}-b{settings.batch_size}-{device.type}-{stamp}.json"


def report(results: dict) -> str:
    """The figures as a few lines of text."""
    s = results["settings"]
    lines = [
        f"{s['method']} {s['backbone']}, batch {s['batch_size']}, {s['steps']} steps, {results['device_name']} "
        f"(torch {results['torch']}, torchvision {results['torchvision']}, {results['cpu_count']} CPUs)",
        f"  end to end from HDF5 JPEGs  {results['end_to_end_img_s']:10.1f} img/s  (streamed)",
        f"  end to end, resident        {results['resident_img_s']:10.1f} img/s  (decoded once in "
        f"{results['resident_decode_seconds']:.1f} s)",
        f"  method step, device tensors {results['method_step_img_s']:10.1f} img/s",
        f"  plain step (ceiling)        {results['plain_step_img_s']:10.1f} img/s",
        f"  end to end / plain          {results['end_to_end_vs_plain']:10.2f}  (resident: "
        f"{results['resident_vs_plain']:.2f})",
        f"  method / plain              {results['method_vs_plain']:10.2f}",
        f"  data-loading share of step  {results['data_share']:10.1%}  (waiting for batches: "
        f"{results['loader_wait_share']:.1%})",
        f"  evaluation ({s['method']}, average over {s['domains']} masks/heads, batch {s['eval_batch_size']})"
        f"  {results['eval_img_s']:.1f} img/s; plain network {results['plain_eval_img_s']:.1f} img/s",
    ]
    for count, figure in results.get("concurrent", {}).items():
        lines.append(f"  {count} concurrent runs (resident)   {figure['img_s']:10.1f} img/s together "
                     f"({', '.join(f'{v:.0f}' for v in figure['per_run_img_s'])} each)")
    if "path" in results:
        lines.append(f"wrote {results['path']}")
    return "\n".join(lines)


def run(device_name: str = "auto", method: str = "dmg", out_dir: str | Path = "benchmarks/results",
        progress: Callable[[str], None] = print, **overrides) -> dict:
    """`dmg bench`: resolve the device and its defaults, then measure."""
    device = resolve_device(device_name)
    return bench(settings_for(device, method, **overrides), device, out_dir, progress)

