"""The one training loop that drives every method (`fit`, an epoch at a time), and accuracy evaluation.

On CUDA a method runs with bf16 autocast (or fp32), channels_last weights and inputs, fused
Adam, and optionally a compiled training step; on the CPU it runs exactly as written (fp32,
default layout), so CPU results do not depend on this module's GPU settings.
Checkpoints and random states: dmgcli/checkpoint.py.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .data import BatchStream
from .errors import DmgError
from .methods import Method
from .params import LR_SCHEDULES, Schedule, TrainParams

PRECISIONS = ("bf16", "fp32")
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DmgError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DmgError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str = TrainParams.precision):
    """bf16 autocast on CUDA; plain fp32 on the CPU (bf16 there is slower and changes results)."""
    if precision not in PRECISIONS:
        raise DmgError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device.type == "cuda" and precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def place(method: Method, device: torch.device, precision: str = TrainParams.precision) -> Method:
    """Move a freshly built method to its device and set it up to run fast there.

    CUDA: bf16 autocast (unless fp32), channels_last weights (tensor-core convolutions want
    NHWC), fused Adam, cuDNN autotuning. CPU: deterministic kernels for training, otherwise as written.
    Call before the first step and before a scheduler is attached (the optimizers are rebuilt).
    """
    method.to(device)
    method.autocast = autocast_for(device, precision)
    # CPU: same seed, same weights. Its multi-threaded scatter-add (the backward of a mask
    # lookup by domain, probs[d]) sums in a varying order unless told not to. CUDA keeps the
    # fast kernels (a process-wide switch, so set either way). Only training runs backward: a
    # method built for evaluation (no optimizers) skips the switch, whose first call imports
    # torch._inductor (seconds of CPU in every evaluate process).
    if method.optimizers:
        torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        method.to(memory_format=torch.channels_last)  # 4-d conv weights only; the rest is unchanged
        fuse_optimizers(method)
    return method


def fuse_optimizers(method: Method) -> None:
    """Rebuild each Adam/AdamW with fused=True (one kernel per step for all parameters), same settings."""
    fused = []
    for opt in method.optimizers:
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and not opt.state:
            groups = [{**g, "fused": True, "foreach": None} for g in opt.param_groups]
            opt = type(opt)(groups, **{**opt.defaults, "fused": True, "foreach": None})
        fused.append(opt)
    method.optimizers = fused


def training_objective(method: Method, device: torch.device, compile: bool = False,
                       mode: str = TrainParams.compile_mode) -> Objective:
    """What the training step calls for the loss: the method's objective, wrapped in DDP under
    torchrun (gradients averaged over processes), and compiled when asked.

    mode: torch.compile's; "reduce-overhead" replays the step's kernels as CUDA graphs (the
    launch-bound small networks), "max-autotune-no-cudagraphs" searches kernels (slow to start).
    benchmarks/gpu_session.sh measures which pays on the GPU.
    """
    objective: Objective = method.objective
    if distributed.current().world > 1:
        objective = distributed.data_parallel(method, device)
    if compile:
        objective = torch.compile(objective, mode=None if mode == "default" else mode)
    return objective


def model_input(x: torch.Tensor) -> torch.Tensor:
    """Augmented images in the layout the model runs fastest with: channels_last on CUDA."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.dim() == 4 else x


def _lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule):
    if schedule.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=schedule.gamma)
    if schedule.lr_schedule == "inverse":
        fn = lambda t: (1 + schedule.gamma * t) ** (-schedule.power)  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    if schedule.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    raise DmgError(f"unknown lr_schedule {schedule.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")


class Schedulers:
    """One learning-rate schedule applied to several optimisers in step (network, and masks),
    and its unit: it steps after every training step ("step") or after every epoch ("epoch")."""

    def __init__(self, schedulers: list, unit: str):
        self.schedulers = schedulers
        self.unit = unit

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def after_training_step(self) -> None:
        if self.unit == "step":
            self.step()

    def after_epoch(self) -> None:
        if self.unit == "epoch":
            self.step()

    def state_dict(self) -> list[dict]:
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states) -> None:
        states = states if isinstance(states, list) else [states]  # checkpoints before masks were decayed
        if len(states) != len(self.schedulers):
            raise DmgError(f"checkpoint holds {len(states)} learning-rate schedules, this run has "
                           f"{len(self.schedulers)}; was it written by an older dmg?")
        for s, state in zip(self.schedulers, states):
            s.load_state_dict(state)


def make_scheduler(optimizers: list[torch.optim.Optimizer], schedule: Schedule) -> Schedulers:
    """The reference schedules, and when they step: exponential per epoch (PACS) on the network's
    optimiser only; inverse decay per iteration (DomainNet) on every optimiser, the masks' included
    (`schedule.decay_masks`), as the reference code did."""
    decayed = optimizers if schedule.decay_masks else optimizers[:1]
    unit = "step" if schedule.lr_schedule == "inverse" else "epoch"
    return Schedulers([_lr_scheduler(opt, schedule) for opt in decayed], unit)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    extra: dict  # the method's other step statistics, e.g. DMG's ce and overlap
    lr: float = math.nan  # the network's learning rate at the end of the epoch (fit: before the epoch's scheduler step)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


PROGRESS_EVERY = 20  # steps between progress-bar updates; each one waits for the GPU (.item())


def fit(method: Method, stream: BatchStream, augment, seed: int, epochs: int, scheduler: Schedulers,
        end_of_epoch: Callable[[int, EpochStats], None], start_epoch: int = 0, objective: Objective | None = None,
        progress: bool = True) -> None:
    """Train epochs start_epoch..epochs-1, each a pass over the shuffled sources; after each, the
    scheduler's per-epoch step (if its unit is the epoch), then end_of_epoch(epoch, stats) (0-based
    epoch): the caller's validation, selection, logging and checkpoints."""
    for epoch in range(start_epoch, epochs):
        stats = train_one_epoch(method, stream, augment, seed, epoch, scheduler, desc=f"epoch {epoch + 1}/{epochs}",
                                objective=objective, progress=progress)
        stats.lr = method.optimizers[0].param_groups[0]["lr"]  # the rate this epoch ended with, logged
        scheduler.after_epoch()
        end_of_epoch(epoch, stats)


def train_one_epoch(method: Method, stream: BatchStream, augment, seed: int, epoch: int,
                    scheduler: Schedulers | None = None, desc: str = "",
                    objective: Objective | None = None, progress: bool = True) -> EpochStats:
    """One pass over the shuffled sources (the scheduler steps after each step if its unit is
    the step). Returns the mean loss and the throughput, over all processes."""
    method.train()
    objective = objective or method.objective
    names: list[str] = []
    totals: torch.Tensor | None = None  # sample-weighted sums of the step statistics, [len(names)]
    images, start = 0, time.perf_counter()
    world = stream.shard.world
    bar = tqdm(total=len(stream), desc=desc, leave=False, dynamic_ncols=True, disable=None if progress else True)
    for step, (x, y, d) in enumerate(stream.shuffled(seed, epoch)):
        stats = method.update(model_input(augment(x)), y, d, objective)
        if scheduler is not None:
            scheduler.after_training_step()
        # One stack and one add per step, on the device: no wait for the GPU, no kernel per statistic.
        names = names or sorted(stats)
        values = torch.stack([stats[k].float() for k in names])
        totals = values * len(y) if totals is None else totals.add_(values, alpha=len(y))
        images += len(y) * world
        bar.update()
        if not bar.disable and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{stats['loss'].item():.3f}", img_s=f"{images / (time.perf_counter() - start):.0f}")
    bar.close()
    sums = distributed.all_sum(totals) if totals is not None else torch.zeros(0)
    means = {k: float(v) / max(images, 1) for k, v in zip(names, sums.tolist())}  # waits for the last step
    seconds = time.perf_counter() - start
    loss = means.pop("loss", math.nan)
    if not math.isfinite(loss):
        raise DmgError(f"training diverged at epoch {epoch + 1} (loss {loss}); try a lower learning rate")
    return EpochStats(loss, images, seconds, means)


@torch.no_grad()
def correct_counts(method: Method, stream: BatchStream, augment, mode: str, groups: int) -> tuple[list, list]:
    """Correct predictions and samples per domain index over a whole split, in prediction `mode`.

    Each process scores its share of the split; the counts are summed over processes, so every
    sample counts exactly once. groups: number of domain indices in the stream.
    """
    method.eval()
    correct = torch.zeros(groups, dtype=torch.long, device=stream.device)
    total = torch.zeros(groups, dtype=torch.long, device=stream.device)
    for x, y, d in stream.batches():
        with method.autocast():
            scores = method.predict(model_input(augment(x)), mode=mode, domains=d)
        correct.index_add_(0, d, (scores.argmax(-1) == y).long())
        total.index_add_(0, d, torch.ones_like(d))
    if stream.shard.world > 1:
        correct, total = distributed.all_sum(correct), distributed.all_sum(total)
    return correct.tolist(), total.tolist()
