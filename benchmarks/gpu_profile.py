"""Per-kernel profile of one training step on CUDA: DMG, Aggregate and the plain step of the same network.

Random tensors already on the device (no input path), bf16 autocast, channels_last, fused
Adam, as `dmg bench` step 3/4. For each: GPU time and host time per step from torch.profiler,
the step's kernel count, and the top kernels by GPU time, so what DMG adds over Aggregate and
Aggregate over the plain step can be read kernel by kernel. Writes JSON to --out.

    python benchmarks/gpu_profile.py --backbone resnet18 --out benchmarks/results/profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dmgcli.benchmarking import plain_network  # noqa: E402
from dmgcli.engine import model_input, place, training_objective  # noqa: E402
from dmgcli.methods import MethodConfig, build_method  # noqa: E402
from dmgcli.benchmarking import STEP_SETTINGS  # noqa: E402


def profiled(step, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    return {"gpu_ms_per_step": gpu_us / steps / 1e3,
            "kernels_per_step": sum(e.count for e in kernels) / steps,
            "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
            "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1e3,
                             "calls_per_step": e.count / steps} for e in top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--classes", type=int, default=345)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    x = model_input(torch.rand(args.batch_size, 3, 224, 224, device=device))
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    d = torch.randint(0, args.domains, (args.batch_size,), device=device)
    results = {"backbone": args.backbone, "batch_size": args.batch_size, "torch": torch.__version__,
               "device_name": torch.cuda.get_device_name()}
    for name in ("dmg", "aggregate"):
        method = place(build_method(name, MethodConfig(backbone=args.backbone, num_classes=args.classes,
                                                       num_domains=args.domains, **STEP_SETTINGS)), device)
        objective = training_objective(method, device)
        method.train()
        results[name] = profiled(lambda: method.update(x, y, d, objective), args.steps, args.warmup)
        del method
    net = plain_network(args.backbone, args.classes, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)

    def plain_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    results["plain"] = profiled(plain_step, args.steps, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for name in ("plain", "aggregate", "dmg"):
        r = results[name]
        print(f"{args.backbone} {name:9s} GPU {r['gpu_ms_per_step']:7.3f} ms/step  host {r['host_ms_per_step']:7.3f} "
              f"ms/step  {r['kernels_per_step']:6.0f} kernels/step")
    for name in ("dmg", "aggregate"):
        print(f"top kernels, {name}:")
        for k in results[name]["top_kernels"][:8]:
            print(f"  {k['ms_per_step']:7.3f} ms  x{k['calls_per_step']:4.0f}  {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
