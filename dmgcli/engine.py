"""The one training loop that drives every method, accuracy evaluation, and checkpoints."""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .data import BatchStream
from .errors import DmgError
from .fileio import atomic_path
from .methods import Method
from .params import Schedule


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


def autocast_for(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA; plain fp32 on the CPU (bf16 there is slower and changes results)."""
    if device.type == "cuda" and precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule):
    """The reference schedules: exponential per epoch (PACS), inverse per iteration (DomainNet)."""
    if schedule.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=schedule.gamma), "epoch"
    if schedule.lr_schedule == "inverse":
        fn = lambda t: (1 + schedule.gamma * t) ** (-schedule.power)  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn), "step"
    if schedule.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0), "epoch"
    raise DmgError(f"unknown lr_schedule {schedule.lr_schedule!r}; valid: exponential, inverse, constant")


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    extra: dict

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(method: Method, stream: BatchStream, augment, seed: int, epoch: int,
                    scheduler=None, step_scheduler: bool = False, desc: str = "") -> EpochStats:
    """One pass over the shuffled sources. Returns the mean loss and the throughput."""
    method.train()
    totals: dict[str, torch.Tensor] = {}
    images, start = 0, time.perf_counter()
    bar = tqdm(stream.shuffled(seed, epoch), total=len(stream), desc=desc, leave=False, dynamic_ncols=True,
               disable=None)
    for x, y, d in bar:
        stats = method.update(augment(x), y, d)
        if step_scheduler:
            scheduler.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v * len(y)
        images += len(y)
        if bar.n % 10 == 0:
            bar.set_postfix(loss=f"{stats['loss'].item():.3f}", img_s=f"{images / (time.perf_counter() - start):.0f}")
    means = {k: float(v) / max(images, 1) for k, v in totals.items()}
    loss = means.pop("loss", math.nan)
    if not math.isfinite(loss):
        raise DmgError(f"training diverged at epoch {epoch + 1} (loss {loss}); try a lower learning rate")
    return EpochStats(loss, images, time.perf_counter() - start, means)


@torch.no_grad()
def accuracy(method: Method, stream: BatchStream, augment, mode: str) -> float:
    """Top-1 accuracy in percent over a whole split, in prediction `mode`."""
    method.eval()
    correct, total = 0, 0
    for x, y, d in stream.batches():
        with method.autocast():
            scores = method.predict(augment(x), mode=mode, domains=d)
        correct += int((scores.argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def save_checkpoint(path, payload: dict) -> None:
    """Atomic: a crash while saving keeps the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path) -> dict:
    """weights_only=True: a checkpoint file can hold tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DmgError(f"checkpoint {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors of many kinds
        raise DmgError(f"checkpoint {path} could not be read: {exc}") from None


def load_model_state(module: torch.nn.Module, state: dict, path) -> None:
    """Load weights, refusing a checkpoint whose shapes do not fit the network built now."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise DmgError(f"checkpoint {path} does not fit this network ({detail}); was it trained with other "
                       f"settings or an older dmg?") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
