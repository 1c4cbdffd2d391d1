"""Why does the GPU decode differ from the CPU decode? Chroma upsampling or a stream race.

Issue 8, part 3: on an H200 the GPU and CPU decodes of the same 40 px JPEGs differed by a
mean 6.75 grey levels. Two explanations predict different things:

  chroma upsampling  libjpeg(-turbo) rebuilds 4:2:0 chroma with "fancy" (triangle) upsampling,
                     nvJPEG's hardware decoder may replicate it. Then the difference vanishes
                     (IDCT rounding only, < 1 level) for 4:4:4 files and for grey content, is
                     the same on every repetition, and is largest where colour changes.
  a race             nvJPEG writing memory still in use. Then repeated decodes of the same batch
                     under load differ from each other, whatever the subsampling.

This script measures both and writes JSON (stdout and --out). It needs a CUDA device:
    python benchmarks/gpu_decode_check.py --out benchmarks/gpu_decode_check.json
tests/test_gpu_decode.py asserts the same facts (pytest -m gpu).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def smooth_images(n: int, size: int, seed: int = 0, grey: bool = False) -> np.ndarray:
    """Photo-like images (upsampled noise), uint8 [n, size, size, 3]; grey: R = G = B."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1 if grey else 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic").clamp(0, 1)
    x = x.expand(-1, 3, -1, -1) if grey else x
    return (x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def encode(images: np.ndarray, subsampling: int, quality: int = 90) -> list[bytes]:
    """JPEG files from PIL; subsampling 0 = 4:4:4, 2 = 4:2:0 (PIL's default at quality 90)."""
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=quality, subsampling=subsampling)
        out.append(buf.getvalue())
    return out


def flat_batch(files: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    return torch.cat(parts), torch.tensor([len(p) for p in parts])


def cpu_gpu_difference(files: list[bytes]) -> dict:
    """Mean and max absolute difference (grey levels) between libjpeg and nvJPEG decodes."""
    from dmgcli.data import CudaDecoder, decode_batch

    flat, sizes = flat_batch(files)
    cpu = decode_batch(flat, sizes, torch.device("cpu")).int()
    decoder = CudaDecoder(torch.device("cuda"))
    gpu = decoder.ready(decoder(flat, sizes)).cpu().int()
    diff = (gpu - cpu).abs().float()
    return {"mean": diff.mean().item(), "max": diff.max().item(), "p99": diff.flatten().quantile(0.99).item()}


def repeatability_under_load(files: list[bytes], repeats: int = 200) -> dict:
    """Decode one batch `repeats` times through dmg's CudaDecoder while the training stream is
    busy with kernels that allocate and free memory and read every decoded batch; count decodes
    that differ from the first by even one byte."""
    from dmgcli.data import CudaDecoder

    device = torch.device("cuda")
    decoder = CudaDecoder(device)
    flat, sizes = flat_batch(files)
    first = decoder.ready(decoder(flat, sizes)).clone()
    differing, sink = 0, torch.zeros((), device=device)
    load = torch.randn(2048, 2048, device=device)
    for _ in range(repeats):
        busy = load @ load  # queued work on the training stream, freed right after: blocks get recycled
        x = decoder.ready(decoder(flat, sizes))  # the training stream waits for the decode, as in training
        sink += x.float().mean() + busy[0, 0] * 0
        differing += int(not torch.equal(x, first))
        del busy, x
    torch.cuda.synchronize()
    return {"repeats": repeats, "differing": differing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--n", type=int, default=21)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode_check: needs a CUDA device")
    import torchvision

    colour, grey = smooth_images(args.n, args.size), smooth_images(args.n, args.size, grey=True)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "image_size": args.size, "images": args.n,
        "difference_420_colour": cpu_gpu_difference(encode(colour, 2)),
        "difference_444_colour": cpu_gpu_difference(encode(colour, 0)),
        "difference_420_grey": cpu_gpu_difference(encode(grey, 2)),
        "repeatability_420_colour": repeatability_under_load(encode(colour, 2)),
    }
    small = result["difference_444_colour"]["mean"] < 1.0 and result["difference_420_grey"]["mean"] < 1.0
    race = result["repeatability_420_colour"]["differing"] > 0
    result["verdict"] = ("race: repeated decodes differ" if race else
                         "chroma upsampling: only 4:2:0 colour differs, repeat decodes identical" if small else
                         "neither explains it: repeat decodes identical but 4:4:4 / grey differ too")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
