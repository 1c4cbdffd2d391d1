"""One process of tests/test_ddp.py's two-node run (started by torchrun, one per "node"), or the
single-process run it is compared with (started by python).

argv: <data_dir> <out folder> <node name>. Writes <out>/epoch-<world>.pt on rank 0: the
parameters after one epoch of Aggregate at global batch GLOBAL_BATCH; then, under torchrun,
trains a whole `dmg train` run into <out>/run-<node> (only rank 0 may write it).
"""
import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

from dmgcli import augment, distributed, engine
from dmgcli.datasets import get_dataset, h5_path
from dmgcli.methods import MethodConfig, build_method
from dmgcli.params import load_params
from dmgcli.runs import source_stream
from stages.train import train

GLOBAL_BATCH = 32
SOURCES = ("rot0", "rot15", "rot30", "rot45", "rot60")  # 898 training images: even, so no process drops one


def without_batchnorm(module: nn.Module) -> None:
    """BatchNorm normalises with each process's own half batch under DDP (SyncBatchNorm needs a
    GPU), so the equality with one process holds only for a network without it."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)


def main(data_dir: str, out: str, node: str) -> None:
    torch.set_num_threads(1)
    out, cpu = Path(out), torch.device("cpu")
    with distributed.session(cpu) as (proc, device):
        torch.manual_seed(0)
        method = build_method("aggregate", MethodConfig(backbone="convnet", num_classes=10, num_domains=5, lr=1e-3,
                                                        mask_lr=1e-4, weight_decay=0.0))
        without_batchnorm(method)
        method = engine.place(method, device)
        stream = source_stream(h5_path(data_dir, "digits"), SOURCES, "train", GLOBAL_BATCH // proc.world, device, 0)
        objective = engine.training_objective(method, device)
        stats = engine.train_one_epoch(method, stream, augment.get_augmentation("none")[0], 0, 0,
                                       objective=objective, progress=False)
        if proc.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"params": {n: p.detach() for n, p in method.named_parameters()}, "loss": stats.loss,
                        "images": stats.images, "samples": len(stream.images)}, out / f"epoch-{proc.world}.pt")
        if proc.world > 1:  # the real stage: every node names its own folder, so a write by rank 1 would show
            params = dataclasses.replace(load_params(Path(data_dir).parent / "params.yaml").train, target="rot30",
                                         method="aggregate", epochs=1, device="cpu", batch_size=GLOBAL_BATCH)
            train(get_dataset("digits"), data_dir, params, out_dir=out / f"run-{node}", quiet=True)
            (out / f"rank-{node}").write_text(str(proc.rank))  # which node got which rank (test bookkeeping)


if __name__ == "__main__":
    main(*sys.argv[1:4])
