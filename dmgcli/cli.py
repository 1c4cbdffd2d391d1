"""The `dmg` command line: one command per pipeline stage.

Each command reads params.yaml (--params), applies its flags on top, and calls the stage's
plain function in stages/. Errors a user can fix print one line on stderr and exit 1.
Arguments are checked before a stage module (and with it torch) is imported, so a bad flag
fails at once; this module and dmgcli/params.py import no torch.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .datasets import BUILT_IN, declare, get_dataset, resolve_dataset
from .errors import DmgError
from .fileio import shorten
from .help import ParamsHelp, PipelineOrder
from .params import Params, load_params, override

app = typer.Typer(help="DMG (ECCV 2020) and its baselines: download -> preprocess -> train -> evaluate -> report.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, cls=PipelineOrder)  # plain click help: no "<bool>" labels, long defaults wrap


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"dmg {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                              help="Print dmg's version and exit.")):
    """DMG (ECCV 2020) and its baselines: download -> preprocess -> train -> evaluate -> report."""


DEFAULTS = "defaults"  # --params defaults: the built-in defaults, no file
PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params",
                             help=f"Parameters file; flags override its values. `--params {DEFAULTS}`: the built-in "
                                  "defaults (outputs then land in the current folder).")


def project_params(path: Path) -> Params:
    """The params file, which must exist: without one, the outputs would land in whatever folder
    the command ran in. `--params defaults` asks for the built-in defaults explicitly."""
    if str(path) == DEFAULTS:
        return Params()
    if not path.exists():
        raise DmgError(f"params file {path} not found in {Path.cwd()}: run dmg in the project folder (the one with "
                       f"params.yaml), pass --params FILE, or --params {DEFAULTS} for the built-in defaults")
    return load_params(path)


MAX_MESSAGE = 400  # characters; a message quoting a huge path or value is cut


def fail(message: str, code: int = 1):
    typer.echo(f"dmg: error: {shorten(message, MAX_MESSAGE)}", err=True)
    raise typer.Exit(code)


def one_line(exc: DmgError) -> str:
    """The message of a DmgError. One raised in a DataLoader worker arrives re-raised with the
    worker's traceback inside its message; its last line is the original message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def handle_errors(fn):
    """Turn user-facing errors into one line on stderr and a non-zero exit, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DmgError as exc:
            fail(one_line(exc))
        except KeyboardInterrupt:
            fail("interrupted; completed checkpoints and files are intact", 130)
        except OSError as exc:
            if exc.filename is None or exc.strerror is None:
                raise  # not about a file the user named: a bug to see in full
            # a folder that is a file, a read-only place, a full disk: the user's to fix
            fail(f"{shorten(exc.filename, 200)}: {exc.strerror}")
        except Exception as exc:
            # torch.OutOfMemoryError, or a RuntimeError from a library that ran out (cuDNN, nvJPEG)
            if type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                                             and "out of memory" in str(exc).lower()):
                fail("out of GPU memory; try a smaller --batch-size (or --precision bf16 if it was fp32)")
            raise
    return wrapper


def load(params_file: Path) -> Params:
    """The project's params file (project_params), with its folder datasets (`datasets:`) put
    into the dataset registry."""
    params = project_params(params_file)
    declare(params)
    return params


DATASET_NAMES = ", ".join(BUILT_IN)


def cpu_threads_for(train_params) -> None:
    """The digits' convnet and the layers above a frozen trunk compute with one CPU thread
    (unless OMP_NUM_THREADS says otherwise).

    Their tensors are too small to share out: a second thread only waits, and on a busy
    machine the threads spin while waiting for each other (measured on 2 shared cores at load
    3-5: 6 DMG epochs took 26-34 s with 2 threads, 7-8 s with 1). Set before torch loads."""
    if train_params.backbone == "convnet" or train_params.frozen_trunk:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if "torch" in sys.modules and os.environ["OMP_NUM_THREADS"] == "1":
            sys.modules["torch"].set_num_threads(1)  # loaded already (dmg called in-process): same arithmetic


def params_with_train_flags(params_file: Path, **flags):
    """Load params, apply train-section flags, and resolve the dataset from --dataset/--target."""
    params = load(params_file)
    dataset = flags.pop("dataset")
    train = override(params.train, **flags)
    info = resolve_dataset(train.target, dataset, params.dataset)
    return params, train, info


@app.command(cls=ParamsHelp, short_help="Fetch a dataset's raw files into <data_dir>/raw/.")
@handle_errors
def download(
    dataset: str = typer.Argument("digits", help=f"Dataset to fetch: {DATASET_NAMES} (VLCS, Office-Home, TerraIncognita from DomainBed's sources), or a folder dataset declared in params.yaml's datasets: section."),
    source: Optional[str] = typer.Option(None, "--from", help="Local zip or tar, extracted folder or mirror URL to use instead of the public download (folder datasets: <root>/<domain>/<class>/<image>)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Folder holding the split lists (PACS and folder datasets with split: lists: <domain>_{train,crossval,test}_kfold.txt; DomainNet: official/ and tv_0.9_splits/); default: look beside the images."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Extract an archive even if it expands far beyond the dataset's size (refused by default: a zip bomb)."),
    params_file: Path = PARAMS_OPTION,
):
    """Fetch a dataset's raw files into <data_dir>/raw/<dataset>, verified against its MANIFEST.json."""
    params = load(params_file)
    settings = override(params.download, source=source, splits=splits, allow_large=allow_large or None)
    from stages.download import download as run

    out = run(dataset, params.data_dir, settings)
    typer.echo(f"{dataset}: raw files in {out}")


@app.command(cls=ParamsHelp, short_help='Convert raw files into <data_dir>/prepared/<dataset>.h5.')
@handle_errors
def preprocess(
    dataset: str = typer.Argument("digits", help=f"Dataset to convert: {DATASET_NAMES} or a declared folder dataset."),
    image_size: Optional[int] = typer.Option(None, help="Side length of stored images (real datasets)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes; 0 = all cores."),
    encoding: Optional[str] = typer.Option(None, help="Stored images: jpeg (encoded bytes + offsets) or raw (uint8 pixels)."),
    params_file: Path = PARAMS_OPTION,
):
    """Convert raw files into one HDF5 file, <data_dir>/prepared/<dataset>.h5 (unchanged inputs: nothing to do)."""
    params = load(params_file)
    settings = override(params.preprocess, image_size=image_size, workers=workers, encoding=encoding)
    from stages.preprocess import preprocess as run

    out = run(dataset, params.data_dir, settings)
    typer.echo(f"{dataset}: {out}")


@app.command(cls=ParamsHelp, short_help='Train one leave-one-domain-out run.')
@handle_errors
def train(
    target: Optional[str] = typer.Option(None, help="Held-out target domain; all other domains are sources."),
    source: Optional[list[str]] = typer.Option(None, "--source", help="A source domain (repeat the flag); default: every domain but the target."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; may be left out when the target names a domain of one dataset only."),
    backbone: Optional[str] = typer.Option(None, help="alexnet, resnet18, resnet50 or convnet."),
    method: Optional[str] = typer.Option(None, help="aggregate, multihead or dmg."),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same metrics on the CPU)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs; default from the dataset's schedule."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate of the network; default from the dataset's schedule."),
    mask_lr: Optional[float] = typer.Option(None, help="Adam learning rate of the mask logits; default from the schedule."),
    overlap_lambda: Optional[float] = typer.Option(None, help="Weight lambda_O of the soft-IoU overlap loss (DMG)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--scratch", help="Start from ImageNet weights or from scratch."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (under torchrun: each process its own GPU)."),
    precision: Optional[str] = typer.Option(None, help="CUDA arithmetic: bf16 (autocast) or fp32; the CPU always uses fp32."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step (CUDA)."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, max-autotune."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers reading JPEG files; default min(8, cores)."),
    resident: Optional[str] = typer.Option(None, help="Decode each split once and hold it on the device: auto (if it fits in half the free memory), always or never."),
    image_size: Optional[int] = typer.Option(None, help="Side of the images the network sees (pacs/domainnet augmentations); default 224."),
    frozen_trunk: Optional[bool] = typer.Option(None, "--frozen-trunk/--whole-network", help="Freeze the pretrained layers below the first mask point and train only those above (cached features: dmg features)."),
    trunk_views: Optional[int] = typer.Option(None, help="Frozen trunk: fixed augmented views of each training image."),
    trunk_cache: Optional[bool] = typer.Option(None, "--trunk-cache/--no-trunk-cache", help="Frozen trunk: read its output from the feature cache (built if missing) or compute it at every step."),
    validation_mode: Optional[str] = typer.Option(None, help="Model selection on source validation: hard (DMG's reference rule), known_domain (own soft mask / own head) or average; default: the method's reference rule."),
    schedule: Optional[str] = typer.Option(None, help="Entry of train.schedules to train with; default: the dataset's."),
    out: Optional[Path] = typer.Option(None, help="Run folder; default data/runs/<dataset>/<backbone>/<method>/<target>/seed<seed>."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last.pt (a finished run too)."),
    force: bool = typer.Option(False, "--force", help="Replace a finished run in the run folder (refused without it)."),
    params_file: Path = PARAMS_OPTION,
):
    """Train one leave-one-domain-out run; keeps the best source-validation checkpoint and the last.

    A run folder holding a finished run (run.json) is not replaced without --force; --resume
    continues it. Several GPUs: torchrun --nproc_per_node N -m dmgcli.cli train ...
    (--batch-size is the global batch).
    """
    params, train_params, info = params_with_train_flags(
        params_file, dataset=dataset, target=target, sources=tuple(source) if source else None, backbone=backbone,
        method=method, seed=seed, epochs=epochs,
        batch_size=batch_size, lr=lr, mask_lr=mask_lr, overlap_lambda=overlap_lambda, pretrained=pretrained, device=device,
        precision=precision, compile=compile, compile_mode=compile_mode, workers=workers, resident=resident,
        image_size=image_size, frozen_trunk=frozen_trunk, trunk_views=trunk_views, trunk_cache=trunk_cache,
        validation_mode=validation_mode, schedule=schedule)
    cpu_threads_for(train_params)
    from stages.train import train as run  # torch: only after the arguments are known to be good

    from .distributed import is_main_process

    folder = run(info, params.data_dir, train_params, out_dir=out, resume=resume, force=force)
    if is_main_process():
        typer.echo(f"trained {train_params.method} on {info.name} (target {train_params.target}, "
                   f"params {params_file}): {folder}")
        warn_if_still_learning(folder)


def warn_if_still_learning(folder: Path) -> None:
    """One line when the run's best epoch came in the last tenth with validation still rising (run.json)."""
    run = json.loads((folder / "run.json").read_text())
    if run["protocol"].get("still_learning"):
        typer.echo(f"warning: may not have finished learning: best epoch {run['best']['epoch']} of {run['epochs']}, "
                   f"source validation still rising; train longer (--epochs N --resume continues this run)", err=True)


@app.command(cls=ParamsHelp, short_help="Cache a frozen trunk's features: <data_dir>/features/<dataset>/.")
@handle_errors
def features(
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    backbone: Optional[list[str]] = typer.Option(None, "--backbone", help="Backbone (repeat the flag); default: the matrix's backbones."),
    image_size: Optional[int] = typer.Option(None, help="Side of the images the trunk sees; default train.image_size."),
    trunk_views: Optional[int] = typer.Option(None, help="Augmented views of each training image; default train.trunk_views."),
    params_file: Path = PARAMS_OPTION,
):
    """With train.frozen_trunk: the frozen trunk's output for every image and view, computed once,
    in <data_dir>/features/<dataset>/<backbone>.h5 (rebuilt when the backbone, weights, image
    size, views or dataset file change). Without it: only index.json, saying nothing is cached.
    """
    params = load(params_file)
    train_params = override(params.train, image_size=image_size, trunk_views=trunk_views)
    info = get_dataset(dataset or params.dataset)
    from stages.features import features as run

    index = run(info, params.data_dir, train_params, tuple(backbone) if backbone else params.matrix.backbones)
    typer.echo(f"{info.name}: {index}")


@app.command(cls=ParamsHelp, short_help='Score a run in and out of domain: its metrics files.')
@handle_errors
def evaluate(
    target: Optional[str] = typer.Option(None, help="Target domain of the run to evaluate."),
    source: Optional[list[str]] = typer.Option(None, "--source", help="A source domain (repeat the flag); as given to train."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; may be left out when the target names a domain of one dataset only."),
    backbone: Optional[str] = typer.Option(None, help="Backbone of the run."),
    method: Optional[str] = typer.Option(None, help="Method of the run."),
    seed: Optional[int] = typer.Option(None, help="Seed of the run."),
    run_folder: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="Run folder; default from the flags above (under torchrun write --run-dir: torchrun reads --run as its own --run-path)."),
    out: Optional[Path] = typer.Option(None, help="Metrics JSON; default metrics/<dataset>/<backbone>/<method>/<target>/seed<seed>.json."),
    average_over: Optional[str] = typer.Option(None, help="Average per-domain outputs over logits (reference) or probs."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    allow_unfinished: bool = typer.Option(False, "--allow-unfinished", help="Evaluate a run that has no run.json (stopped or still training); the report marks it."),
    params_file: Path = PARAMS_OPTION,
):
    """Out-of-domain (target test) and in-domain (source tests) accuracy of a run's best checkpoint.

    Writes the headline (<out>, what `dvc metrics show` prints) and every detail beside it
    (<out stem>.details.json). Under torchrun each process scores a share of every split; the
    counts are summed, rank 0 writes.
    """
    params, train_params, info = params_with_train_flags(
        params_file, dataset=dataset, target=target, sources=tuple(source) if source else None, backbone=backbone,
        method=method, seed=seed)
    eval_params = override(params.evaluate, average_over=average_over, device=device)
    cpu_threads_for(train_params)
    from stages.evaluate import evaluate as run  # torch: only after the arguments are known to be good

    from .distributed import is_main_process

    metrics = run(info, params.data_dir, train_params, eval_params, run=run_folder, out=out,
                  allow_unfinished=allow_unfinished)
    in_domain = metrics["in_domain"]["average"]["mean"]
    if is_main_process():
        typer.echo(f"{info.name} {train_params.backbone} {train_params.method} target {train_params.target}: "
                   f"out-of-domain {metrics['out_of_domain']['accuracy']:.2f}%  in-domain {in_domain:.2f}%"
                   + ("" if metrics["finished"] else "  (unfinished run)"))


@app.command(short_help='Training and evaluation img/s on one device.')
@handle_errors
def bench(
    backbone: Optional[str] = typer.Option(None, help="alexnet, resnet18, resnet50 or convnet; default resnet50 on CUDA, resnet18 on the CPU."),
    method: str = typer.Option("dmg", help="aggregate, multihead or dmg."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch; default 64 on CUDA, 8 on the CPU."),
    steps: Optional[int] = typer.Option(None, help="Timed steps of each kind; default 100 on CUDA, 6 on the CPU."),
    warmup: Optional[int] = typer.Option(None, help="Untimed steps first; default 20 on CUDA, 1 on the CPU."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Evaluation batch; default 256 on CUDA, 16 on the CPU."),
    eval_steps: Optional[int] = typer.Option(None, help="Timed evaluation batches; default 20 on CUDA, 2 on the CPU."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers reading the file; default min(8, cores) on CUDA, 2 on the CPU."),
    domains: Optional[int] = typer.Option(None, help="Source domains (masks or heads); default 5, as DomainNet."),
    classes: Optional[int] = typer.Option(None, help="Classes; default 345, as DomainNet."),
    augmentation: Optional[str] = typer.Option(None, help="pacs (crop, flip, colour jitter; default), domainnet or none."),
    precision: Optional[str] = typer.Option(None, help="CUDA arithmetic: bf16 (default) or fp32."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the method's training step."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, max-autotune."),
    concurrent: Optional[list[int]] = typer.Option(None, "--concurrent", help="Also the img/s of this many training processes at once (repeat: --concurrent 1 --concurrent 2 --concurrent 4)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("benchmarks/results/local"), help="Folder for the results JSON (the default is git-ignored; copy a result up to benchmarks/results/ to commit it)."),
):
    """Training img/s end to end from HDF5 JPEGs (streamed and resident) against the same model's plain step (the ceiling).

    Also the input path's share of step time and evaluation img/s, in one run on one device. Writes <out>/bench-<method>-<backbone>-b<batch>-<device>-<time>.json.
    """
    from stages.bench import report as describe
    from stages.bench import run

    results = run(device, method, out, progress=lambda line: typer.echo(line, err=True), backbone=backbone,
                  batch_size=batch_size, steps=steps, warmup=warmup, eval_batch_size=eval_batch_size,
                  eval_steps=eval_steps, workers=workers, domains=domains, classes=classes,
                  augmentation=augmentation, precision=precision, compile=compile, compile_mode=compile_mode,
                  concurrent=tuple(concurrent) if concurrent else None)
    typer.echo(describe(results))


@app.command(cls=ParamsHelp, short_help="Tables beside the paper's, figures, index.md.")
@handle_errors
def report(
    table: Optional[int] = typer.Option(None, "--table", help="Print the paper's Table 1 (DomainNet, out-of-domain), 2 (PACS, out-of-domain) or 3 (DomainNet, in-domain) with our runs beside it."),
    dataset: Optional[str] = typer.Option(None, help="Dataset whose runs to report (without --table); default params.yaml's."),
    fmt: Optional[str] = typer.Option(None, "--format", help="text, markdown, csv, latex or json; default params.yaml report.format."),
    out: Optional[Path] = typer.Option(None, help="Write the table(s) to this file instead of printing them."),
    metrics_dir: Path = typer.Option(Path("metrics"), help="Folder of metrics files written by evaluate."),
    out_dir: Path = typer.Option(Path("reports"), help="Where the report (without --table) is written: <out-dir>/<dataset>/."),
    figures: Optional[bool] = typer.Option(None, "--figures/--no-figures", help="Draw training curves, mask plots and the sweep figure."),
    params_file: Path = PARAMS_OPTION,
):
    """Our accuracies beside the paper's, mean +- std over seeds; "-" and a command where a run is missing.

    Without --table, the report stage: writes tables, figures and index.md to <out-dir>/<dataset>/.
    """
    from stages.report import FORMATS, paper_document, paper_table, render  # torch-free (dmgcli/results.py)
    from stages.report import report as run

    from .fileio import check_replaceable, write_text

    params = load(params_file)
    if out:
        check_replaceable(out)  # before the report folder is written
    settings = override(params.report, format=fmt, figures=figures)
    if settings.format not in FORMATS:
        raise DmgError(f"unknown report format {settings.format!r}; valid: {', '.join(FORMATS)}")
    if table is not None:
        if dataset and get_dataset(dataset).name != paper_table(table).dataset:
            raise DmgError(f"table {table} is {paper_table(table).dataset}; drop --dataset {dataset}")
        doc = paper_document(table, metrics_dir, params.matrix.seeds)
    else:
        name = get_dataset(dataset or params.dataset).name
        doc = run(name, params.matrix, metrics_dir, out_dir, params.data_dir, settings.figures)
        typer.echo(f"wrote {out_dir / name}/ (params {params_file}); start with {out_dir / name / 'index.md'}", err=True)
    for line in doc.skipped:
        typer.echo(f"warning: skipped {line}", err=True)
    for path in doc.missing:
        typer.echo(f"warning: missing {path}", err=True)
    text = render(doc, settings.format)
    if out:
        write_text(out, text)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command(cls=ParamsHelp, short_help='The lambda_O sweep: DMG per lambda_O x target x seed.')
@handle_errors
def sweep(
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    lambdas: Optional[list[float]] = typer.Option(None, "--lambda", help="A lambda_O value; repeat for several. Default: params.yaml report.sweep.lambdas."),
    targets: Optional[list[str]] = typer.Option(None, "--target", help="A target domain; repeat for several. Default: report.sweep.targets."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="A seed; repeat for several. Default: report.sweep.seeds."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run; default report.sweep.epochs."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    params_file: Path = PARAMS_OPTION,
):
    """Train and evaluate DMG per lambda_O x target x seed into <data_dir>/sweeps/<dataset>/.

    Writes sweep.json and lambda_sweep.png/.svg: accuracies and mean pairwise mask IoU against lambda_O.
    """
    from .results import summary_markdown, summary_path

    params = load(params_file)
    info = get_dataset(dataset or params.dataset)
    settings = override(params.report.sweep, lambdas=tuple(lambdas) if lambdas else None,
                        targets=tuple(targets) if targets else None, seeds=tuple(seeds) if seeds else None,
                        epochs=epochs)
    train_params = override(params.train, device=device)
    cpu_threads_for(train_params)
    from stages.sweep import sweep as run  # torch: only after the arguments are known to be good

    summary = run(info, params.data_dir, train_params, override(params.evaluate, device=device), settings,
                  progress=typer.echo)
    typer.echo(summary_markdown(summary))
    typer.echo(f"wrote {summary_path(params.data_dir, info.name)}")


@app.command(short_help='Check every parameter of the pipeline, before any work.')
@handle_errors
def check(params_file: Path = PARAMS_OPTION):
    """Check every parameter of the whole pipeline (the matrix, the sweep, the dataset's schedule).

    The first DVC stage: a bad params.yaml fails here in seconds, before any training.
    Writes <data_dir>/params.checked (constant text, so a passing check re-runs nothing).
    """
    params = load(params_file)
    from stages.check import check as run

    typer.echo(f"{params_file}: {run(params)}")


LAUNCHERS = ("local", "slurm")


@app.command(cls=ParamsHelp, short_help="Train and evaluate the whole matrix, several runs at once (here or on SLURM).")
@handle_errors
def study(
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs at once; how many pay on one GPU: benchmarks/RESULTS.md (dmg bench --concurrent)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    targets: Optional[list[str]] = typer.Option(None, "--target", help="A target; repeat for several. Default: params.yaml matrix.targets."),
    methods: Optional[list[str]] = typer.Option(None, "--method", help="A method; repeat for several. Default: matrix.methods."),
    backbones: Optional[list[str]] = typer.Option(None, "--backbone", help="A backbone; repeat for several. Default: matrix.backbones."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="A seed; repeat for several. Default: matrix.seeds."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run (passed to dmg train); default the schedule's."),
    resident: Optional[str] = typer.Option(None, help="Passed to dmg train: auto, always or never."),
    min_free_gb: float = typer.Option(4.0, help="Start another run only while this much device memory (CUDA) or RAM (CPU) is free."),
    stagger: Optional[float] = typer.Option(None, help="Seconds between starts, so a run's memory shows before the next check; default 20 on CUDA, 0 on the CPU."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Run dmg evaluate after each dmg train."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (every run on this device; slurm: on its node)."),
    launcher: str = typer.Option("local", help="local (processes here, --jobs at once) or slurm (one SLURM job per run, through submitit)."),
    show_status: bool = typer.Option(False, "--status", help="Show every run: finished, running, pending or failed (with its log's last line); starts nothing."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel every queued and running job of the dataset's study (--launcher slurm)."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition; default params.yaml study.partition."),
    time_min: Optional[int] = typer.Option(None, help="slurm: time limit of each run's job, minutes; default study.time_min."),
    gpus: Optional[int] = typer.Option(None, help="slurm: GPUs per run; default study.gpus."),
    cpus: Optional[int] = typer.Option(None, help="slurm: CPUs per run; default study.cpus."),
    mem_gb: Optional[int] = typer.Option(None, help="slurm: memory per run in GB; default study.mem_gb."),
    params_file: Path = PARAMS_OPTION,
):
    """Train (and evaluate) the whole matrix: here, several runs at once with a free-memory check
    before each start, or on a SLURM cluster, one job per run (--launcher slurm).

    The same commands and output folders as dvc.yaml's train/evaluate stages; `dvc commit` records them.
    Run it again to continue: finished runs are skipped, interrupted ones resume from last.pt,
    and (slurm) runs still queued or running are not submitted twice.
    """
    if launcher not in LAUNCHERS:
        raise DmgError(f"study: unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if show_status and cancel:
        raise DmgError("study: --status and --cancel exclude each other")
    params = load(params_file)
    info = get_dataset(dataset or params.dataset)
    matrix = override(params.matrix, targets=tuple(targets) if targets else None,
                      methods=tuple(methods) if methods else None, backbones=tuple(backbones) if backbones else None,
                      seeds=tuple(seeds) if seeds else None)
    if show_status or cancel or launcher == "slurm":
        from stages import study_slurm

        if show_status:
            typer.echo(study_slurm.describe(study_slurm.status(info, params.data_dir, matrix, evaluate)))
        elif cancel:
            study_slurm.cancel(info, params.data_dir, progress=typer.echo)
        else:
            settings = override(params.study, partition=partition, time_min=time_min, gpus=gpus, cpus=cpus,
                                mem_gb=mem_gb)
            submitted = study_slurm.submit(info, params.data_dir, matrix, params_file, settings, device,
                                           study_flags(epochs, resident), evaluate, progress=typer.echo)
            typer.echo(f"study: {len(submitted)} jobs submitted; `dmg study --status` shows them")
        return
    from stages.study import study as run

    seconds = run(info, params.data_dir, matrix, params_file, jobs=jobs, device=device, min_free_gb=min_free_gb,
                  stagger=stagger, train_flags=study_flags(epochs, resident), evaluate=evaluate, progress=typer.echo)
    typer.echo(f"study: {len(seconds)} runs done")


def study_flags(epochs: Optional[int], resident: Optional[str]) -> tuple[str, ...]:
    """The study's flags that each `dmg train` gets."""
    return (*(("--epochs", str(epochs)) if epochs is not None else ()),
            *(("--resident", resident) if resident is not None else ()))


@app.command(short_help='Counts and provenance of an HDF5 file.')
@handle_errors
def info(path: Path = typer.Argument(..., help="An HDF5 file written by `dmg preprocess`."),
         verify: bool = typer.Option(False, "--verify", help="Also read every image and check it against its stored checksum.")):
    """Per domain and split: image and class counts, and the file's provenance."""
    from stages.info import describe

    typer.echo(describe(path, verify))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
