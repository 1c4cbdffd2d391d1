"""DDP on the CPU with 2 gloo processes: gradients (mask logits included) averaged over
processes, files written by rank 0 only, and evaluation that counts every sample once."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, folder: str, data_dir: str) -> None:
    """One of two processes: DDP epoch at the engine level, then a whole `train`, then evaluation."""
    from pathlib import Path

    from dmgcli import augment, engine
    from dmgcli.data import BatchStream, DomainImages
    from dmgcli.datasets import get_dataset, h5_path
    from dmgcli.distributed import Dist
    from dmgcli.h5data import SplitReader
    from dmgcli.methods import MethodConfig, build_method
    from dmgcli.params import load_params
    from dmgcli.runs import source_stream
    from stages.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    folder, h5 = Path(folder), h5_path(data_dir, "digits")
    sources = ("rot0", "rot15", "rot45", "rot60", "rot75")
    identity = augment.get_augmentation("none")[0]

    # 1. One epoch through the DDP objective; each process sees its own half of the samples.
    torch.manual_seed(0)
    method = engine.place(build_method("dmg", MethodConfig(backbone="convnet", num_classes=10, num_domains=5,
                                                             lr=1e-3, mask_lr=1e-2, weight_decay=0.0)),
                          torch.device("cpu"))
    initial = [p.detach().clone() for p in method.masks.logits]
    torch.manual_seed(rank)  # different crops/mask samples per process, as in `train`
    stream = source_stream(h5, sources, "train", 16, torch.device("cpu"), 0)
    stats = engine.train_one_epoch(method, stream, identity, 0, 0,
                                   objective=engine.training_objective(method, torch.device("cpu")), progress=False)
    torch.save({"params": {n: p.detach() for n, p in method.named_parameters()}, "initial_masks": initial,
                "images": stats.images, "loss": stats.loss, "share": stream.training_share(0, 0)},
               folder / f"engine{rank}.pt")

    # 2. A whole training run: every process gets its own --out, so a file written by rank 1 would show.
    params = dataclasses.replace(load_params(Path(data_dir).parent / "params.yaml").train, target="rot30",
                                 method="dmg", epochs=2, device="cpu", batch_size=32)
    train(get_dataset("digits"), data_dir, params, out_dir=folder / f"run{rank}", quiet=True)

    # 3. Evaluation of the trained model: sharded and summed against one process scoring everything.
    dist.barrier()
    ckpt = torch.load(folder / "run0" / "best.pt", weights_only=True)
    method = build_method("dmg", MethodConfig(**ckpt["config"]))
    method.load_state_dict(ckpt["model"])
    images = DomainImages([SplitReader(h5, d, "test") for d in sources], list(range(5)))
    cpu = torch.device("cpu")
    sharded = engine.correct_counts(method, BatchStream(images, 64, cpu), identity, "hard", 5)
    whole = engine.correct_counts(method, BatchStream(images, 64, cpu, shard=Dist()), identity, "hard", 5)
    sizes = [len(r) for r in images.readers]
    (folder / f"eval{rank}.json").write_text(json.dumps({"sharded": sharded, "whole": whole, "sizes": sizes}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(digits_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(folder), str(digits_dir / "data")), nprocs=WORLD, join=True)
    return folder


def test_ddp_averages_gradients_of_network_and_masks(ddp_run):
    ranks = [torch.load(ddp_run / f"engine{r}.pt", weights_only=True) for r in range(WORLD)]
    a, b = ranks[0]["params"], ranks[1]["params"]
    assert all(torch.equal(a[n], b[n]) for n in a), "processes ended with different parameters"
    masks = [n for n in a if n.startswith("masks.")]
    assert len(masks) == 3 and all(not torch.equal(a[n], ranks[0]["initial_masks"][i]) for i, n in enumerate(masks))
    assert set(ranks[0]["share"].tolist()).isdisjoint(ranks[1]["share"].tolist())
    assert ranks[0]["images"] == ranks[1]["images"] == WORLD * len(ranks[0]["share"])
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the epoch's loss is averaged over processes


def test_ddp_train_writes_only_on_rank_0(ddp_run):
    assert sorted(p.name for p in (ddp_run / "run0").iterdir()) == ["best.pt", "last.pt", "log.csv", "run.json"]
    assert not (ddp_run / "run1").exists()
    run = json.loads((ddp_run / "run0" / "run.json").read_text())
    assert run["processes"] == WORLD and run["batch_size"] == 32
    ckpt = torch.load(ddp_run / "run0" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == WORLD  # both processes' random streams, for an exact resume
    assert len((ddp_run / "run0" / "log.csv").read_text().splitlines()) == 3


def test_ddp_evaluation_counts_every_sample_once(ddp_run):
    for r in range(WORLD):
        result = json.loads((ddp_run / f"eval{r}.json").read_text())
        assert result["sharded"] == result["whole"]
        assert result["sharded"][1] == result["sizes"]


@pytest.mark.slow
def test_torchrun_train_and_evaluate_match_a_single_process(digits_dir, tmp_path):
    """The documented command: torchrun --nproc_per_node 2 -m dmgcli.cli train/evaluate."""
    common = ["--params", str(digits_dir / "params.yaml"), "--target", "rot45", "--method", "multihead",
              "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "-m", "dmgcli.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(cmd):
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    folder = tmp_path / "run"
    out = run(torchrun + ["train", *common, "--epochs", "1", "--out", str(folder)])
    assert out.count("trained multihead") == 1  # printed by rank 0 only
    run(torchrun + ["evaluate", *common, "--run-dir", str(folder), "--out", str(tmp_path / "ddp.json")])
    run([sys.executable, "-m", "dmgcli.cli", "evaluate", *common, "--run", str(folder),
         "--out", str(tmp_path / "single.json")])
    for suffix in (".json", ".details.json"):  # the headline and the details
        ddp, single = (json.loads((tmp_path / f"{n}{suffix}").read_text()) for n in ("ddp", "single"))
        assert ddp == single
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.details.json", "ddp.json", "run", "single.details.json",
                                                          "single.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "log.csv", "run.json"]


def test_two_nodes_through_torchrun_rendezvous_equal_one_process_of_the_same_global_batch(digits_dir, tmp_path):
    """Two torchrun launchers (--nnodes 2, c10d rendezvous), one gloo process each, stand for two
    nodes: one epoch ends with the parameters of one process at the same global batch, and of the
    whole `dmg train` only rank 0's node writes anything (each node names its own folder)."""
    worker = REPO / "tests" / "ddp_node_worker.py"
    data_dir = str(digits_dir / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dmgtest",
                               str(worker), data_dir, str(tmp_path / "nodes"), name],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("a", "b")]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)
    single = subprocess.run([sys.executable, str(worker), data_dir, str(tmp_path / "single"), "x"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr

    two = torch.load(tmp_path / "nodes" / "epoch-2.pt", weights_only=True)
    one = torch.load(tmp_path / "single" / "epoch-1.pt", weights_only=True)
    assert one["samples"] % 2 == 0 and two["images"] == one["images"] == one["samples"]  # the same samples
    assert two["params"].keys() == one["params"].keys()
    for name in one["params"]:
        torch.testing.assert_close(two["params"][name], one["params"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert abs(two["loss"] - one["loss"]) < 1e-5

    ranks = {name: (tmp_path / "nodes" / f"rank-{name}").read_text() for name in ("a", "b")}
    assert sorted(ranks.values()) == ["0", "1"]
    main, other = sorted(ranks, key=ranks.get)
    assert sorted(p.name for p in (tmp_path / "nodes" / f"run-{main}").iterdir()) == ["best.pt", "last.pt", "log.csv",
                                                                                     "run.json"]
    assert not (tmp_path / "nodes" / f"run-{other}").exists()
    assert json.loads((tmp_path / "nodes" / f"run-{main}" / "run.json").read_text())["processes"] == 2
