"""Preprocess throughput and memory: real PACS, and DomainNet's scale with stand-in images.

    python benchmarks/preprocess_bench.py                     # everything (tens of minutes on 2 cores)
    python benchmarks/preprocess_bench.py --skip-domainnet    # PACS only
    python benchmarks/preprocess_bench.py --domainnet-limit 50000

PACS: `dmg download pacs --from ../shared/data/PACS.zip` into a temporary folder, then
`dmg preprocess pacs` with 1 worker and with every core (jpeg), and once with raw pixels;
then random-access reads of each file as a training loader would do them.
DomainNet: every entry of the real lists in ../shared/data/domainnet_splits (quickdraw's
train list is not there: its val list stands in for it), one tiny unique JPEG per listed
path, written to a temporary folder; then `dmg preprocess domainnet` with every core.

Each preprocess runs in a fresh child process, so its peak RSS (main process, and largest
worker) is its own. Figures go to stdout as a markdown table and, with --out, to JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- child: one preprocess run

def child(data_dir: str, dataset: str, workers: int, encoding: str, image_size: int) -> None:
    """Run one preprocess here and print its measurements as JSON (called in a fresh process)."""
    sys.path.insert(0, str(ROOT))
    from dmgcli.params import PreprocessParams
    from stages.preprocess import preprocess

    params = PreprocessParams(workers=workers, encoding=encoding, image_size=image_size)
    baseline = memory_kb(os.getpid())["Rss"]  # after the imports (torch alone is most of it)
    peak = {"main_rss": baseline, "worker_rss": 0, "worker_private": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=track_memory, args=(stop, peak), daemon=True)
    sampler.start()
    start, cpu = time.perf_counter(), os.times()
    out = preprocess(dataset, data_dir, params)
    wall, end = time.perf_counter() - start, os.times()
    stop.set()
    sampler.join()
    print(json.dumps({
        "wall_s": wall,
        "cpu_main_s": end.user - cpu.user + end.system - cpu.system,
        "cpu_workers_s": end.children_user - cpu.children_user + end.children_system - cpu.children_system,
        "main_rss_start_mb": baseline / 1024,
        "main_rss_peak_mb": max(peak["main_rss"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
        "worker_rss_peak_mb": peak["worker_rss"] / 1024,
        "worker_private_peak_mb": peak["worker_private"] / 1024,
        "file_mb": out.stat().st_size / 1e6,
    }))


def memory_kb(pid: int) -> dict:
    """Rss and private (not shared with the parent) memory of a process, from /proc, in kB."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0])
    except OSError:
        return {"Rss": 0, "Private": 0}
    return {"Rss": fields.get("Rss", 0), "Private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry))
    return pids


def track_memory(stop: threading.Event, peak: dict) -> None:
    """Every 0.2 s: the main process's RSS, and each worker's RSS and private memory; keeps the peaks."""
    me = os.getpid()
    while not stop.wait(0.2):
        peak["main_rss"] = max(peak["main_rss"], memory_kb(me)["Rss"])
        for pid in child_pids(me):
            usage = memory_kb(pid)
            peak["worker_rss"] = max(peak["worker_rss"], usage["Rss"])
            peak["worker_private"] = max(peak["worker_private"], usage["Private"])


def measure(data_dir: Path, dataset: str, workers: int, encoding: str = "jpeg", image_size: int = 256) -> dict:
    """A fresh output, then one child run; returns its measurements."""
    for path in (data_dir / "prepared").glob(f"{dataset}*"):
        path.unlink()
    command = [sys.executable, __file__, "--child", str(data_dir), dataset, str(workers), encoding, str(image_size)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"preprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- PACS

def bench_pacs(tmp: Path, workers: list[int]) -> dict:
    sys.path.insert(0, str(ROOT))
    from dmgcli.params import DownloadParams
    from stages.download import download

    data = tmp / "pacs_data"
    start = time.perf_counter()
    download("pacs", data, DownloadParams(source=str(SHARED / "PACS.zip"), splits=str(SHARED / "pacs_splits")))
    results = {"download_s": time.perf_counter() - start, "decoded": 9991, "entries": 19982, "runs": []}
    for n in workers:
        run = measure(data, "pacs", n)
        results["runs"].append({"workers": n, "encoding": "jpeg", **run})
        jpeg_reads = read_speed(data / "prepared" / "pacs.h5") if n == workers[-1] else None
    results["reads"] = {"jpeg": jpeg_reads}
    run = measure(data, "pacs", workers[-1], encoding="raw")
    results["runs"].append({"workers": workers[-1], "encoding": "raw", **run})
    results["reads"]["raw"] = read_speed(data / "prepared" / "pacs.h5")
    return results


def read_speed(h5: Path, n: int = 3000) -> dict:
    """Random-access reads of one split as a DataLoader worker does them, one thread: images/s
    as uint8 [C, H, W] tensors, and (jpeg) of the stored bytes alone."""
    import torch

    from dmgcli.h5data import SplitReader

    torch.set_num_threads(1)
    reader = SplitReader(h5, "sketch", "test")
    order = random.Random(0).sample(range(len(reader)), min(n, len(reader)))
    start = time.perf_counter()
    for i in order:
        reader.image(i)
    speeds = {"image_per_s": len(order) / (time.perf_counter() - start)}
    if reader.encoding == "jpeg":
        start = time.perf_counter()
        for i in order:
            reader.encoded(i)
        speeds["bytes_only_per_s"] = len(order) / (time.perf_counter() - start)
    return speeds


# --------------------------------------------------------------------------- DomainNet scale

def stand_in_templates() -> list[bytes]:
    """Small JPEGs of several shapes (non-square, as DomainNet's are)."""
    from PIL import Image

    templates = []
    for width, height in ((48, 32), (32, 48), (40, 40), (64, 36)):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (width * 3, height * 4, 128)).save(buffer, "JPEG", quality=90)
        templates.append(buffer.getvalue())
    return templates


def unique_jpeg(template: bytes, index: int) -> bytes:
    """The template with a COM segment holding `index`: a valid JPEG with its own sha256."""
    note = str(index).encode()
    return template[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + template[2:]


def domainnet_raw(raw: Path, limit: int | None) -> int:
    """The real lists (linked) and a stand-in JPEG per listed path; returns the number of entries."""
    lists = SHARED / "domainnet_splits"
    (raw / "splits" / "official").mkdir(parents=True)
    (raw / "splits" / "tv_0.9").mkdir()
    for path in (lists / "official").iterdir():
        os.symlink(path, raw / "splits" / "official" / path.name)
    for path in (lists / "tv_0.9_splits").iterdir():
        if not path.name.startswith("quickdraw"):  # quickdraw: no train list; its val list stands in below
            os.symlink(path, raw / "splits" / "tv_0.9" / path.name)
    os.symlink(lists / "tv_0.9_splits" / "quickdraw_val.txt", raw / "splits" / "official" / "quickdraw_train.txt")
    if limit:
        shorten_lists(raw / "splits", limit)
    paths = set()
    for path in sorted((raw / "splits").rglob("*.txt")):
        paths.update(line.rsplit(maxsplit=1)[0] for line in path.read_text().splitlines() if line.strip())
    templates = stand_in_templates()
    start = time.perf_counter()
    for index, rel in enumerate(sorted(paths)):
        target = raw / "images" / rel
        if index == 0 or not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(unique_jpeg(templates[index % len(templates)], index))
    print(f"wrote {len(paths)} stand-in images in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    (raw / "MANIFEST.json").write_text(json.dumps({"dataset": "domainnet", "sources": {}, "files": {}}))
    return len(paths)


def shorten_lists(splits: Path, limit: int) -> None:
    """Keep about `limit / 12` lines of every list, spread over it and with every class it names
    (short copies replace the links), for quick runs.

    Short tv_0.9 lists no longer partition a short official train list, so they are dropped
    where an official train list exists (the split is then regenerated).
    """
    for path in sorted(splits.rglob("*.txt")):
        lines = path.read_text().splitlines(keepends=True)
        path.unlink()
        domain = path.stem.rsplit("_", 1)[0]
        if path.parent.name == "tv_0.9" and (splits / "official" / f"{domain}_train.txt").exists():
            continue
        stride, seen, kept = max(1, len(lines) * 12 // limit), set(), []
        for i, line in enumerate(lines):
            label = line.rsplit(maxsplit=1)[-1]
            if i % stride == 0 or label not in seen:
                kept.append(line)
                seen.add(label)
        path.write_text("".join(kept))


def bench_domainnet(tmp: Path, workers: int, limit: int | None, image_size: int) -> dict:
    data = tmp / "domainnet_data"
    images = domainnet_raw(data / "raw" / "domainnet", limit)
    run = measure(data, "domainnet", workers, image_size=image_size)
    report = json.loads((data / "prepared" / "domainnet.report.json").read_text())
    listed = sum(n for splits in report["listed"].values() for n in splits.values())
    return {"images": images, "entries": listed, "image_size": image_size, "workers": workers, **run}


# --------------------------------------------------------------------------- report

def machine() -> dict:
    from PIL import __version__ as pil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "pillow": pil,
            "load_average_at_start": os.getloadavg()}


def table(results: dict) -> str:
    lines = [f"machine: {results['machine']}", ""]
    if "pacs" in results:
        pacs = results["pacs"]
        lines += [f"PACS download --from PACS.zip (extract + sha256 of 9,991 files): {pacs['download_s']:.1f} s", "",
                  "| workers | encoding | wall s | decoded img/s | per worker | img per CPU-s | entries/s | "
                  "main RSS start / peak MB | worker RSS / private peak MB | file MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in pacs["runs"]:
            rate = pacs["decoded"] / run["wall_s"]
            cpu = run["cpu_main_s"] + run["cpu_workers_s"]
            lines.append(f"| {run['workers']} | {run['encoding']} | {run['wall_s']:.1f} | {rate:.0f} | "
                         f"{rate / run['workers']:.0f} | {pacs['decoded'] / cpu:.0f} | "
                         f"{pacs['entries'] / run['wall_s']:.0f} | {memory(run)} | {run['file_mb']:.0f} |")
        lines += ["", "| file | images/s as uint8 tensors (1 thread) | stored bytes only/s |", "|---|---|---|"]
        for name, speed in pacs["reads"].items():
            lines.append(f"| {name} | {speed['image_per_s']:.0f} | {speed.get('bytes_only_per_s', float('nan')):.0f} |")
    if "domainnet" in results:
        dn = results["domainnet"]
        cpu = dn["cpu_main_s"] + dn["cpu_workers_s"]
        lines += ["", f"DomainNet scale: {dn['entries']} list entries, {dn['images']} stand-in images, "
                  f"{dn['workers']} workers, image_size {dn['image_size']}: {dn['wall_s']:.0f} s wall, "
                  f"{dn['entries'] / dn['wall_s']:.0f} entries/s, {dn['entries'] / cpu:.0f} per CPU-s, "
                  f"main RSS start / peak, worker RSS / private peak (MB): {memory(dn)}, file {dn['file_mb']:.0f} MB"]
    return "\n".join(lines)


def memory(run: dict) -> str:
    return (f"{run['main_rss_start_mb']:.0f} / {run['main_rss_peak_mb']:.0f} | "
            f"{run['worker_rss_peak_mb']:.0f} / {run['worker_private_peak_mb']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=None, help="comma-separated worker counts for PACS (default: 1,all cores)")
    parser.add_argument("--skip-pacs", action="store_true")
    parser.add_argument("--skip-domainnet", action="store_true")
    parser.add_argument("--domainnet-limit", type=int, default=None, help="use about this many list entries")
    parser.add_argument("--domainnet-size", type=int, default=256, help="image_size of the DomainNet-scale run")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--child", nargs=5, metavar=("DATA_DIR", "DATASET", "WORKERS", "ENCODING", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data_dir, dataset, workers, encoding, size = args.child
        return child(data_dir, dataset, int(workers), encoding, int(size))
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the benchmark needs the real PACS zip and DomainNet lists")
    cores = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    results = {"machine": machine(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="dmg-bench-") as tmp:
        if not args.skip_pacs:
            results["pacs"] = bench_pacs(Path(tmp), workers)
        if not args.skip_domainnet:
            results["domainnet"] = bench_domainnet(Path(tmp), cores, args.domainnet_limit, args.domainnet_size)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
