"""The training engine: the JPEG input paths agree, shards cover each sample once, fused Adam
steps like plain Adam, a killed run resumes to the same result, Ctrl-C keeps the checkpoint,
and the CUDA paths (skipped without a GPU)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from dmgcli import engine
from dmgcli.data import BatchStream, DomainImages, decode_batch, epoch_permutation
from dmgcli.distributed import Dist
from dmgcli.h5data import FileInfo, SplitReader, write_split, writing
from dmgcli.methods import MethodConfig, build_method

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Photo-like test images: upsampled noise, uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 6, generator=g)
    return (torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic").clamp(0, 1) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def jpeg_file(tmp_path_factory):
    """A dmg file of JPEG images: 3 domains x 7 train images of 40 x 40 px."""
    from torchvision.io import encode_jpeg

    path = tmp_path_factory.mktemp("jpeg") / "tiny.h5"
    info = FileInfo(dataset="tiny", encoding="jpeg", height=40, width=40, channels=3, classes=("a", "b"),
                    domains=("d0", "d1", "d2"), provenance={})
    with writing(path, info) as f:
        for k, domain in enumerate(info.domains):
            images = smooth_images(7, 40, seed=k)
            write_split(f, domain, "train", [encode_jpeg(im, quality=90).numpy().tobytes() for im in images],
                        [i % 2 for i in range(7)], [f"{domain}/{i}.jpg" for i in range(7)])
    return path


def jpeg_set(path) -> DomainImages:
    return DomainImages([SplitReader(path, d, "train") for d in ("d0", "d1", "d2")], [0, 1, 2])


def test_batched_decode_equals_per_image_decode(jpeg_file):
    images = jpeg_set(jpeg_file)
    indices = [20, 3, 7, 0, 14]
    parts = [torch.from_numpy(images.encoded(i)) for i in indices]
    flat, sizes = torch.cat(parts), torch.tensor([len(p) for p in parts])
    batch = decode_batch(flat, sizes, torch.device("cpu"))
    assert batch.shape == (5, 3, 40, 40) and batch.dtype == torch.uint8
    assert torch.equal(batch, torch.stack([images.image(i) for i in indices]))


@pytest.mark.parametrize("workers", [0, 2])
def test_bytes_path_gives_the_pixels_of_the_worker_decode_path(jpeg_file, workers):
    """The GPU-style stream (encoded bytes from the workers, one batched decode) against the CPU one."""
    cpu = torch.device("cpu")
    gpu_style = BatchStream(jpeg_set(jpeg_file), 4, cpu, workers=workers, resident="never", decode_on_device=True)
    cpu_style = BatchStream(jpeg_set(jpeg_file), 4, cpu, workers=workers, resident="never", decode_on_device=False)
    for epoch in range(2):  # twice: the persistent workers serve the next epoch's order
        a, b = list(gpu_style.shuffled(3, epoch)), list(cpu_style.shuffled(3, epoch))
        assert len(a) == len(b) == 6
        for (xa, ya, da), (xb, yb, db) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(da, db)
    order = epoch_permutation(21, 3, 1)[:4].tolist()
    first = list(gpu_style.shuffled(3, 1))[0][0]
    assert torch.equal(first, torch.stack([gpu_style.images.image(i) for i in order]))


def test_training_shards_rebuild_the_single_process_batches(jpeg_file):
    images, cpu = jpeg_set(jpeg_file), torch.device("cpu")  # 21 samples
    world, batch = 4, 2
    single = BatchStream(images, batch * world, cpu, shard=Dist())
    shards = [BatchStream(images, batch, cpu, shard=Dist(r, world)) for r in range(world)]
    full = epoch_permutation(21, 5, 2)[:20]  # the single-process order, less the tail the shards leave out
    assert torch.equal(single.training_share(5, 2), epoch_permutation(21, 5, 2))
    parts = [s.training_share(5, 2) for s in shards]
    assert all(len(p) == 21 // world for p in parts) and all(len(s) == len(shards[0]) == 3 for s in shards)
    used = torch.cat(parts)
    assert len(set(used.tolist())) == len(used) == 20  # disjoint; the permutation's last 21 mod 4 left out
    for t in range(len(shards[0])):
        step = torch.cat([p[t * batch:(t + 1) * batch] for p in parts])
        assert set(step.tolist()) == set(full[t * batch * world:(t + 1) * batch * world].tolist())
    evaluation = torch.cat([s.evaluation_share() for s in shards])
    assert sorted(evaluation.tolist()) == list(range(21))  # every sample once, no padding


def test_shard_counts_add_up_to_the_whole_split(digits_dir):
    h5 = digits_dir / "data" / "prepared" / "digits.h5"
    images = DomainImages([SplitReader(h5, d, "val") for d in ("rot0", "rot30")], [0, 1])
    torch.manual_seed(0)
    method = build_method("aggregate", MethodConfig(backbone="convnet", num_classes=10, num_domains=2, lr=1e-4,
                                                    mask_lr=1e-4, weight_decay=0.0))
    ident = lambda x: x.float() / 255  # noqa: E731
    whole = engine.correct_counts(method, BatchStream(images, 16, torch.device("cpu"), shard=Dist()), ident,
                                  "average", 2)
    parts = [engine.correct_counts(method, BatchStream(images, 16, torch.device("cpu"), shard=Dist(r, 3)), ident,
                                   "average", 2) for r in range(3)]
    assert whole[1] == [len(images.readers[0]), len(images.readers[1])]
    assert [sum(p[0][k] for p in parts) for k in range(2)] == whole[0]
    assert [sum(p[1][k] for p in parts) for k in range(2)] == whole[1]


def test_fused_adam_steps_like_plain_adam():
    config = MethodConfig(backbone="convnet", num_classes=10, num_domains=3, lr=1e-2, mask_lr=1e-4, weight_decay=1e-4)
    x, y, d = torch.rand(8, 3, 16, 16), torch.arange(8) % 10, torch.arange(8) % 3
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        method = engine.place(build_method("dmg", config), torch.device("cpu"))  # deterministic CPU kernels
        if fused:
            engine.fuse_optimizers(method)
            assert all(o.defaults["fused"] for o in method.optimizers)
            assert [g["lr"] for o in method.optimizers for g in o.param_groups] == [1e-2, 1e-4]
        torch.manual_seed(1)
        for _ in range(2):
            method.update(x, y, d)
        results.append(method.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(value.float(), results[1][key].float(), atol=1e-6), key


def test_cpu_keeps_fp32_and_default_layout():
    method = engine.place(build_method("aggregate", MethodConfig(backbone="convnet", num_classes=10, num_domains=2,
                                                                 lr=1e-4, mask_lr=1e-4, weight_decay=0.0)),
                          torch.device("cpu"), "bf16")
    conv = next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and conv.weight.dtype == torch.float32
    with method.autocast():
        assert not torch.is_autocast_enabled()
    with pytest.raises(Exception, match="unknown precision 'fp16'"):
        engine.autocast_for(torch.device("cpu"), "fp16")


# --- killed and interrupted runs -------------------------------------------------------------

def train_command(params, out, epochs, *extra):
    return [sys.executable, "-m", "dmgcli.cli", "train", "--params", str(params), "--target", "rot30",
            "--method", "dmg", "--epochs", str(epochs), "--device", "cpu", "--out", str(out), *extra]


def run_until(cmd, cwd, log, rows: int, sig) -> subprocess.CompletedProcess:
    """Start a training process, send `sig` once its log has `rows` epochs, return how it ended."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def values(log) -> list[list[str]]:
    """log.csv without its timing columns."""
    return [row.split(",")[:6] for row in log.read_text().splitlines()]


def model_of(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_killed_run_resumes_to_the_uninterrupted_result(digits_dir, tmp_path):
    from typer.testing import CliRunner

    from dmgcli.cli import app

    params, epochs = digits_dir / "params.yaml", 3
    part = tmp_path / "part"
    killed = run_until(train_command(params, part, epochs), REPO, part / "log.csv", rows=1, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(torch.load(part / "last.pt", weights_only=True)["log"])
    assert 1 <= done < epochs
    for out, extra in ((part, ["--resume"]), (tmp_path / "full", [])):
        result = CliRunner().invoke(app, train_command(params, out, epochs, *extra)[3:])
        assert result.exit_code == 0, result.output
    assert values(part / "log.csv") == values(tmp_path / "full" / "log.csv")
    for name in ("last.pt", "best.pt"):
        a, b = model_of(part / name), model_of(tmp_path / "full" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_keeps_the_last_completed_checkpoint(digits_dir, tmp_path):
    out = tmp_path / "run"
    ended = run_until(train_command(digits_dir / "params.yaml", out, 40), REPO, out / "log.csv", rows=1,
                      sig=signal.SIGINT)
    assert ended.returncode == 130, ended.stderr
    lines = [l for l in ended.stderr.splitlines() if l.strip() and not l.startswith("epoch ")]
    assert lines == ["dmg: error: interrupted; completed checkpoints and files are intact"], ended.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == len(ckpt["log"]) >= 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_out_of_memory_is_one_line_with_advice(digits_dir, monkeypatch):
    from typer.testing import CliRunner

    import stages.train
    from dmgcli.cli import app

    def run_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stages.train, "train", run_out_of_memory)
    result = CliRunner().invoke(app, ["train", "--params", str(digits_dir / "params.yaml"), "--target", "rot0"])
    assert result.exit_code == 1
    assert result.output.strip() == ("dmg: error: out of GPU memory; try a smaller --batch-size "
                                     "(or --precision bf16 if it was fp32)")


# --- CUDA ------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_gpu_stream_decodes_the_images_and_labels_of_the_cpu_stream(jpeg_file):
    stream = BatchStream(jpeg_set(jpeg_file), 8, torch.device("cuda"), workers=2, resident="never")
    assert stream.decode_on_device
    reference = BatchStream(jpeg_set(jpeg_file), 8, torch.device("cpu"), workers=0)
    for (xg, yg, _), (xc, yc, _) in zip(stream.batches(), reference.batches()):
        assert xg.is_cuda and xg.dtype == torch.uint8 and torch.equal(yg.cpu(), yc)
        # 4:2:0 colour JPEGs: nvJPEG and libjpeg upsample chroma differently (tests/test_gpu_decode.py
        # pins the exact comparison on 4:4:4 files); this bound only catches wrong or shuffled images.
        assert (xg.cpu().int() - xc.int()).abs().float().mean() < 12.0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_step_bf16_channels_last_fused(precision):
    device = torch.device("cuda")
    method = engine.place(build_method("dmg", MethodConfig(backbone="resnet18", num_classes=7, num_domains=3, lr=1e-4,
                                                           mask_lr=1e-4, weight_decay=0.0)),
                          device, precision)
    conv = next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(o.defaults["fused"] for o in method.optimizers)
    x = engine.model_input(torch.rand(8, 3, 64, 64, device=device))
    stats = method.update(x, torch.arange(8, device=device) % 7,
                              torch.arange(8, device=device) % 3)
    assert torch.isfinite(stats["loss"])
    with torch.no_grad(), method.autocast():
        scores = method.predict(x, "average")
    assert scores.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


class OneWeight:
    """A method for fit to drive: one weight, SGD at lr 1, a constant loss."""

    def __init__(self):
        self.weight = torch.zeros(1, requires_grad=True)
        self.optimizers = [torch.optim.SGD([self.weight], lr=1.0)]

    def train(self):
        return self

    def objective(self, x, y, d):
        raise AssertionError("update is what fit calls")

    def update(self, x, y, d, objective):
        self.weight.grad = torch.zeros(1)
        self.optimizers[0].step()
        return {"loss": torch.tensor(1.0)}


class ThreeBatches:
    """Three batches of two samples per epoch."""
    shard = Dist()

    def __len__(self):
        return 3

    def shuffled(self, seed, epoch):
        return iter([(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))] * 3)


@pytest.mark.parametrize("lr_schedule,logged", [
    ("exponential", [1.0, 0.5]),  # per epoch: the epoch's own rate is logged, then the schedule steps
    ("inverse", [1 / (1 + 3), 1 / (1 + 6)]),  # per step: the rate after the epoch's 3 steps
])
def test_fit_steps_each_schedule_in_its_own_unit(lr_schedule, logged):
    from dmgcli.params import Schedule

    method = OneWeight()
    scheduler = engine.make_scheduler(method.optimizers, Schedule(epochs=2, baseline_epochs=2, lr=1.0, mask_lr=1.0,
                                                                  weight_decay=0.0, lr_schedule=lr_schedule,
                                                                  gamma=0.5 if lr_schedule == "exponential" else 1.0,
                                                                  power=1.0))
    seen = []
    engine.fit(method, ThreeBatches(), lambda x: x, 0, 2, scheduler,
               lambda epoch, stats: seen.append((epoch, stats.lr, stats.images)), progress=False)
    assert seen == [(0, pytest.approx(logged[0]), 6), (1, pytest.approx(logged[1]), 6)]
    assert scheduler.unit == ("epoch" if lr_schedule == "exponential" else "step")
    final = 0.25 if lr_schedule == "exponential" else 1 / 7
    assert method.optimizers[0].param_groups[0]["lr"] == pytest.approx(final)
