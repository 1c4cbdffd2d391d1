"""Operator calls in one training step, per method: what each step launches, counted on the CPU.

On a GPU each operator call is one or more kernel launches plus host work, so for the small,
launch-bound networks the count predicts the step's overhead; unlike a CPU timing it does not
depend on how busy the machine is. Counts every `aten::` call in one profiled step (forward,
backward, optimiser), after two warm-up steps.

    python benchmarks/count_step_ops.py --backbone resnet18 --domains 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dmgcli.backbones import build_backbone  # noqa: E402
from dmgcli.methods import MethodConfig, build_method  # noqa: E402
from dmgcli.benchmarking import STEP_SETTINGS  # noqa: E402


def count(step) -> int:
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="image side (the count does not depend on it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(4, 3, args.size, args.size)
    y, d = torch.randint(0, 7, (4,)), torch.arange(4) % args.domains
    counts = {}
    for name in ("aggregate", "multihead", "dmg"):
        method = build_method(name, MethodConfig(backbone=args.backbone, num_classes=7, num_domains=args.domains,
                                                 **STEP_SETTINGS))
        counts[name] = count(lambda: method.update(x, y, d))
    net = torch.nn.Sequential(*[m for _, m in build_backbone(args.backbone, 7).layers])
    opt = torch.optim.Adam(net.parameters())

    def plain():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counts["plain"] = count(plain)
    print(f"{args.backbone}, {args.domains} domains: aten calls per step  " +
          "  ".join(f"{k} {v}" for k, v in counts.items()) + f"  (dmg - aggregate: {counts['dmg'] - counts['aggregate']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
