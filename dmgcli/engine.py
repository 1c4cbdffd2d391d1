"""The one training loop that drives every method, accuracy evaluation, and checkpoints.

On CUDA a method runs with bf16 autocast (or fp32), channels_last weights and inputs, fused
Adam, and optionally a compiled training step; on the CPU it runs exactly as written (fp32,
default layout), so CPU results do not depend on this module's GPU settings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .checkpoint_values import check_values
from .data import BatchStream
from .errors import DmgError
from .fileio import atomic_path, disk_full, shorten
from .methods import Method, MethodConfig
from .params import Schedule

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


def autocast_for(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA; plain fp32 on the CPU (bf16 there is slower and changes results)."""
    if precision not in PRECISIONS:
        raise DmgError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device.type == "cuda" and precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def place(method: Method, device: torch.device, precision: str = "bf16") -> Method:
    """Move a freshly built method to its device and set it up to run fast there.

    CUDA: bf16 autocast (unless fp32), channels_last weights (tensor-core convolutions want
    NHWC), fused Adam, cuDNN autotuning. CPU: deterministic kernels, otherwise as written.
    Call before the first step and before a scheduler is attached (the optimizers are rebuilt).
    """
    method.to(device)
    method.autocast = autocast_for(device, precision)
    # CPU: same seed, same weights. Its multi-threaded scatter-add (the backward of a mask
    # lookup by domain, probs[d]) sums in a varying order unless told not to. CUDA keeps the
    # fast kernels (a process-wide switch, so set either way).
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
                       mode: str = "default") -> Objective:
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
    raise DmgError(f"unknown lr_schedule {schedule.lr_schedule!r}; valid: exponential, inverse, constant")


class Schedulers:
    """One learning-rate schedule applied to several optimisers in step (network, and masks)."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> list[dict]:
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states) -> None:
        states = states if isinstance(states, list) else [states]  # checkpoints before masks were decayed
        if len(states) != len(self.schedulers):
            raise DmgError(f"checkpoint holds {len(states)} learning-rate schedules, this run has "
                           f"{len(self.schedulers)}; was it written by an older dmg?")
        for s, state in zip(self.schedulers, states):
            s.load_state_dict(state)


def make_scheduler(optimizers: list[torch.optim.Optimizer], schedule: Schedule) -> tuple[Schedulers, str]:
    """The reference schedules, and when they step: exponential per epoch (PACS) on the network's
    optimiser only; inverse decay per iteration (DomainNet) on every optimiser, the masks' included
    (`schedule.decay_masks`), as the reference code did."""
    decayed = optimizers if schedule.decay_masks else optimizers[:1]
    unit = "step" if schedule.lr_schedule == "inverse" else "epoch"
    return Schedulers([_lr_scheduler(opt, schedule) for opt in decayed]), unit


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    extra: dict

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


PROGRESS_EVERY = 20  # steps between progress-bar updates; each one waits for the GPU (.item())


def train_one_epoch(method: Method, stream: BatchStream, augment, seed: int, epoch: int,
                    scheduler=None, step_scheduler: bool = False, desc: str = "",
                    objective: Objective | None = None, progress: bool = True) -> EpochStats:
    """One pass over the shuffled sources. Returns the mean loss and the throughput, over all processes."""
    method.train()
    objective = objective or method.objective
    names: list[str] = []
    totals: torch.Tensor | None = None  # sample-weighted sums of the step statistics, [len(names)]
    images, start = 0, time.perf_counter()
    world = stream.shard.world
    bar = tqdm(total=len(stream), desc=desc, leave=False, dynamic_ncols=True, disable=None if progress else True)
    for step, (x, y, d) in enumerate(stream.shuffled(seed, epoch)):
        stats = method.update(model_input(augment(x)), y, d, objective)
        if step_scheduler:
            scheduler.step()
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


def save_checkpoint(path, payload: dict) -> None:
    """Atomic: a crash while saving keeps the previous checkpoint intact. Sealed with the
    sha256 of its bytes (`seal`), so any later change to them is refused on loading."""
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's writer says "[enforce fail at inline_container.cc] unexpected pos"
            if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
                raise
            free = shutil.disk_usage(Path(tmp).parent).free
            if free < 64 * 2**20:  # torch does not say why; with this little left, a full disk is why
                raise disk_full(path, "torch could not write the checkpoint") from None
            raise DmgError(f"cannot write checkpoint {shorten(path, 200)}: torch's writer failed "
                           f"({shorten(first_line(exc))}) with {free / 2**20:.0f} MB free there") from None
        seal(tmp)


EOCD = b"PK\x05\x06"  # a zip's end-of-central-directory record: 22 bytes, the last 2 the comment's length
SEAL_PREFIX = b"dmg-sha256:"
SEAL_LENGTH = len(SEAL_PREFIX) + 64


def seal(path: Path) -> None:
    """Record the sha256 of a checkpoint as torch wrote it in the zip's comment field (which
    torch.load, like any zip reader, skips): one file, so the digest cannot be separated from it."""
    digest = hashlib.sha256()
    with open(path, "r+b") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
        if end[:4] != EOCD or end[-2:] != b"\0\0":
            raise RuntimeError(f"torch.save wrote an unexpected archive ending to {path}")
        f.seek(-2, os.SEEK_END)
        f.write(SEAL_LENGTH.to_bytes(2, "little") + SEAL_PREFIX + digest.hexdigest().encode())


def seal_matches(path: Path) -> bool | None:
    """True: the checkpoint's bytes are those it was sealed with. False: they are not (or the
    seal itself is damaged). None: no seal (written by an older dmg, or not a dmg checkpoint)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - SEAL_LENGTH))
        tail = f.read()
    if len(tail) == 22 + SEAL_LENGTH and tail[:4] == EOCD:  # sealed, or meant to be
        if tail[20:22] != SEAL_LENGTH.to_bytes(2, "little") or not tail[22:].startswith(SEAL_PREFIX):
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            remaining = size - SEAL_LENGTH - 2
            while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
        digest.update(b"\0\0")  # the comment length torch wrote
        return digest.hexdigest().encode() == tail[22 + len(SEAL_PREFIX):]
    return None


CHECKPOINT_KEYS = ("identity", "config", "model", "epoch")  # best.pt and last.pt
LAST_CHECKPOINT_KEYS = CHECKPOINT_KEYS + ("best", "log", "settings", "optimizers", "scheduler", "rng")  # last.pt


def load_checkpoint(path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """weights_only=True: a checkpoint file can hold tensors and plain data, never code.

    Anything that is not a complete dmg checkpoint (empty, truncated, foreign, a pickle that
    would run code, or missing one of `keys`) is one DmgError line naming the file.
    """
    import pickle

    path = Path(path)
    name = shorten(path, 200)  # as error messages quote it
    advice = "delete it, or train again (--resume continues from last.pt)"
    try:
        if path.stat().st_size == 0:
            raise DmgError(f"checkpoint {name} could not be read: empty file; {advice}")
        if seal_matches(path) is False:
            raise DmgError(f"checkpoint {name} is damaged (its bytes differ from the sha256 it was saved with); "
                           f"{advice}")
        damaged = damaged_member(path)
        if damaged:
            record = damaged.split("/", 1)[-1]  # torch names the archive's top folder after the file
            raise DmgError(f"checkpoint {name} is damaged (its record {shorten(record, 60)} fails its CRC check); "
                           f"{advice}")
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise beside the one-line error
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DmgError(f"checkpoint {name} not found") from None
    except DmgError:
        raise
    except pickle.UnpicklingError as exc:  # torch's message runs to 8 lines of advice about trusting the file
        refused = re.search(r"unsupported GLOBAL (\S+)", str(exc))
        if refused:
            raise DmgError(f"checkpoint {name} was refused: it would load {shorten(refused.group(1), 60)}, not just "
                           f"tensors and plain data (dmg never runs code from a checkpoint)") from None
        raise DmgError(f"checkpoint {name} could not be read: not a PyTorch checkpoint (corrupt or another "
                       f"format); {advice}") from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign formats and other unpickling errors
        raise DmgError(f"checkpoint {name} could not be read: {shorten(first_line(exc))}; {advice}") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    malformed = not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("model", "config"))
    if missing or malformed:
        what = f"lacks {', '.join(missing)}" if missing else "has a malformed model or config"
        raise DmgError(f"checkpoint {name} is not a complete dmg checkpoint (it {what}); {advice}")
    unknown = sorted(set(ckpt["config"]) - {f.name for f in dataclasses.fields(MethodConfig)})
    if unknown:
        keys_text = shorten(", ".join(map(str, unknown)))
        raise DmgError(f"checkpoint {name} has config keys this dmg does not know ({keys_text}); "
                       f"was it written by another version?")
    if "best" in keys and not (isinstance(ckpt["best"], dict) and "epoch" in ckpt["best"]):
        raise DmgError(f"checkpoint {name} is not a complete dmg checkpoint (malformed best); {advice}")
    check_values(ckpt, name, keys, advice)
    return ckpt


def damaged_member(path: Path) -> str | None:
    """The first record of a checkpoint (a zip archive) whose bytes fail their CRC, if any.

    torch.load does not check them, so a flipped byte in the weights would load silently.
    Files that are not zips are left to torch.load to judge."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
        return None
    except zlib.error:
        return "a record"


def first_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return lines[0] if lines else type(exc).__name__


def load_model_state(module: torch.nn.Module, state: dict, path) -> None:
    """Load weights, refusing a checkpoint whose shapes do not fit the network built now."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise DmgError(f"checkpoint {path} does not fit this network ({detail}); was it trained with other "
                       f"settings or an older dmg?") from None


def rng_state() -> dict:
    """This process's random generators (python, numpy, torch, CUDA), as tensors and plain data
    (what a weights_only checkpoint can hold)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": key.tolist(), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state.get("numpy_pos", 0),
                         has_gauss, gauss))
    if state.get("python") is not None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
