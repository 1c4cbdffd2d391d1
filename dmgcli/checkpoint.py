"""Checkpoints: atomic, sealed saving; loading that refuses anything but a complete dmg
checkpoint of tensors and plain data; every process's random state, for an exact resume."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .checkpoint_values import check_values
from .errors import DmgError
from .fileio import atomic_path, disk_full, shorten
from .methods import MethodConfig


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
        sealed = seal_matches(path)
        if sealed is False:
            raise DmgError(f"checkpoint {name} is damaged (its bytes differ from the sha256 it was saved with); "
                           f"{advice}")
        # a matching seal vouches for every byte, CRCs included: only unsealed files need reading again
        damaged = damaged_member(path) if sealed is None else None
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
    # Checkpoints from before average_over left the method's config hold that key; it is an
    # evaluation setting (evaluate.average_over), nothing the network was trained with: dropped.
    ckpt["config"].pop("average_over", None)
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
