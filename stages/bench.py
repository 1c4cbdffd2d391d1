"""`dmg bench`: training throughput from an HDF5 file of JPEGs against the model's own ceiling.

In one run, on one device:
  1. writes a synthetic dmg file of JPEGs at 256 px (smooth random colour images, quality 90,
     about the bytes of real 256 px photos) to a temporary folder;
  2. end to end: trains `steps` steps of the method from that file through the training
     input path (data.BatchStream: GPU decode on CUDA, worker decode on the CPU; the
     dataset's batched augmentation; Method.update), streamed and then resident (the file
     decoded once onto the device; an epoch is index + crop + jitter there; the decode is timed too);
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

import math
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dmgcli import augment as aug
from dmgcli.benchmarking import (IMAGE_SIZE, MAX_IMAGES, STEP_SETTINGS, BenchSettings, bench_stream, endless,
                                 environment, plain_network, random_batch, settings_for, synchronize, timed,
                                 write_synthetic_file)
from dmgcli.engine import Objective, autocast_for, model_input, place, resolve_device, seed_everything
from dmgcli.engine import training_objective
from dmgcli.fileio import write_json
from dmgcli.methods import Method, MethodConfig, build_method
from stages.bench_concurrent import concurrent_figure


def bench(settings: BenchSettings, device: torch.device, out_dir: str | Path,
          progress: Callable[[str], None] = print) -> dict:
    """Measure the figures of steps 2-5 above (six: end to end streamed and resident, the method's
    step, the plain step, the method's and the plain network's evaluation), and step 6's with
    settings.concurrent; writes and returns the results."""
    seed_everything(settings.seed)
    results: dict = {"settings": asdict(settings), **environment(device)}
    with tempfile.TemporaryDirectory(prefix="dmg-bench-") as tmp:
        h5 = Path(tmp) / "bench.h5"
        n = synthetic_images(settings)
        progress(f"writing {n} synthetic JPEGs at {IMAGE_SIZE} px ...")
        results["jpeg_mean_bytes"] = write_synthetic_file(h5, n, settings.domains, settings.classes, settings.seed)
        config = MethodConfig(backbone=settings.backbone, num_classes=settings.classes, num_domains=settings.domains,
                              **STEP_SETTINGS)
        method = place(build_method(settings.method, config), device, settings.precision)
        objective = training_objective(method, device, settings.compile, settings.compile_mode)
        timings = measure_end_to_end(method, objective, h5, settings, device, progress, results)
        timings.update(measure_steps_and_evaluation(method, objective, settings, device, progress))
        if settings.concurrent:
            del method, objective  # this process's models leave the device to the workers
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["concurrent"] = concurrent_figure(settings, device, h5, progress)

    results.update(summarize(**timings))
    results["resident_vs_plain"] = results["resident_img_s"] / results["plain_step_img_s"]
    path = Path(out_dir) / result_name(settings, device)
    write_json(path, results)
    results["path"] = str(path)
    return results


def synthetic_images(settings: BenchSettings) -> int:
    """How many JPEGs the file holds: enough for warm-up and timed steps (at most MAX_IMAGES),
    whole batches per epoch, at least one per domain."""
    needed = (settings.warmup + settings.steps) * settings.batch_size
    n = math.ceil(min(needed, MAX_IMAGES) / settings.batch_size) * settings.batch_size
    return max(n, settings.domains)


def end_to_end(method: Method, objective: Objective, stream, settings: BenchSettings,
               device: torch.device) -> tuple[float, int, float]:
    """(seconds, images, seconds spent waiting for batches) of settings.steps training steps from
    the file through the training input path, after settings.warmup untimed ones."""
    train_aug = aug.get_augmentation(settings.augmentation)[0]
    batches, waited = endless(stream, settings.seed), [0.0]

    def step() -> int:
        start = time.perf_counter()
        x, y, d = next(batches)
        waited[0] += time.perf_counter() - start
        method.update(model_input(train_aug(x)), y, d, objective)
        return len(y)

    for _ in range(settings.warmup):
        step()
    waited[0] = 0.0
    seconds, images = timed(step, 0, settings.steps, device)
    return seconds, images, waited[0]


def measure_end_to_end(method: Method, objective: Objective, h5: Path, settings: BenchSettings,
                       device: torch.device, progress: Callable[[str], None], results: dict) -> dict:
    """Step 2: training from the file, streamed, then resident (its decode timed; both figures
    of the resident stream go into results). Returns the streamed timings for summarize."""
    method.train()
    progress(f"end to end: {settings.method} {settings.backbone}, batch {settings.batch_size}, "
             f"{settings.steps} steps ...")
    e2e_s, e2e_n, waited_s = end_to_end(method, objective, bench_stream(h5, settings, device, "never"), settings,
                                        device)  # the stream and its workers end with the call
    progress("end to end, resident dataset ...")
    synchronize(device)
    start = time.perf_counter()
    stream = bench_stream(h5, settings, device, "always")
    synchronize(device)
    results["resident_decode_seconds"] = time.perf_counter() - start
    resident_s, resident_n, _ = end_to_end(method, objective, stream, settings, device)
    results["resident_img_s"] = resident_n / resident_s
    return {"e2e_s": e2e_s, "e2e_n": e2e_n, "waited_s": waited_s}


def measure_steps_and_evaluation(method: Method, objective: Objective, settings: BenchSettings,
                                 device: torch.device, progress: Callable[[str], None]) -> dict:
    """Steps 3-5 on random tensors already on the device: the method's training step, the plain
    network's (the ceiling), and the evaluation of both."""
    x, y, d = random_batch(settings.batch_size, settings, device)

    def method_step() -> int:
        method.update(x, y, d, objective)
        return len(y)

    progress("method step on device tensors ...")
    method_s, method_n = timed(method_step, settings.warmup, settings.steps, device)
    plain = plain_network(settings.backbone, settings.classes, device)
    progress("plain step (the ceiling) ...")
    plain_s, plain_n = timed(plain_step(plain, x, y, settings, device), settings.warmup, settings.steps, device)

    xe, _, _ = random_batch(settings.eval_batch_size, settings, device)
    method.eval()
    plain.eval()
    progress("evaluation ...")
    autocast = autocast_for(device, settings.precision)
    eval_warm = min(settings.warmup, 5)
    eval_s, eval_n = timed(prediction(lambda v: method.predict(v, "average"), xe, autocast), eval_warm,
                           settings.eval_steps, device)
    plain_eval_s, plain_eval_n = timed(prediction(plain, xe, autocast), eval_warm, settings.eval_steps, device)
    return {"method_s": method_s, "method_n": method_n, "plain_s": plain_s, "plain_n": plain_n, "eval_s": eval_s,
            "eval_n": eval_n, "plain_eval_s": plain_eval_s, "plain_eval_n": plain_eval_n}


def plain_step(plain: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: BenchSettings,
               device: torch.device) -> Callable[[], int]:
    """One training step of the plain network as ../shared/bench/ceiling.py takes it: Adam, one head."""
    autocast = autocast_for(device, settings.precision)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)

    def step() -> int:
        with autocast():
            loss = F.cross_entropy(plain(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(y)
    return step


def prediction(predict: Callable, xe: torch.Tensor, autocast) -> Callable[[], int]:
    """One evaluation step: `predict` on the batch xe, without gradients."""
    @torch.no_grad()
    def step() -> int:
        with autocast():
            predict(xe)
        return len(xe)
    return step


def summarize(e2e_s, e2e_n, waited_s, method_s, method_n, plain_s, plain_n, eval_s, eval_n, plain_eval_s,
              plain_eval_n) -> dict:
    """Images per second of each measurement, and their ratios."""
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


def run(device_name: str, method: str, out_dir: str | Path, progress: Callable[[str], None] = print,
        **overrides) -> dict:
    """`dmg bench`: resolve the device and its defaults, then measure."""
    device = resolve_device(device_name)
    return bench(settings_for(device, method, **overrides), device, out_dir, progress)

