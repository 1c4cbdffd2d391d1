"""`dmg` commands that train and score runs: train, evaluate, sweep and study (here or on SLURM)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_base import PARAMS_OPTION, app, cpu_threads_for, handle_errors, load, params_with_train_flags
from .datasets import get_dataset
from .errors import DmgError
from .help import ParamsHelp
from .params_io import override


@app.command(cls=ParamsHelp, short_help='Train one leave-one-domain-out run.')
@handle_errors
def train(
    target: Optional[str] = typer.Option(None, help="Held-out target domain; all other domains are sources."),
    source: Optional[list[str]] = typer.Option(None, "--source", help="A source domain (repeat the flag); default: "
                                                                      "every domain but the target."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; may be left out when the target names a domain of one "
                                                     "dataset only."),
    backbone: Optional[str] = typer.Option(None, help="alexnet, resnet18, resnet50 or convnet."),
    method: Optional[str] = typer.Option(None, help="aggregate, multihead or dmg."),
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same metrics on the CPU)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs; default from the dataset's schedule."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate of the network; default from the dataset's "
                                                  "schedule."),
    mask_lr: Optional[float] = typer.Option(None, help="Adam learning rate of the mask logits; default from the "
                                                       "schedule."),
    overlap_lambda: Optional[float] = typer.Option(None, help="Weight lambda_O of the soft-IoU overlap loss (DMG)."),
    pretrained: Optional[bool] = typer.Option(
        None, "--pretrained/--scratch", help="Start from ImageNet weights or from scratch."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (under torchrun: each process its own "
                                                    "GPU)."),
    precision: Optional[str] = typer.Option(None, help="CUDA arithmetic: bf16 (autocast) or fp32; the CPU always uses "
                                                       "fp32."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the training step (CUDA)."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                                                          "max-autotune-no-cudagraphs, max-autotune."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers reading JPEG files; default min(8, cores)."),
    resident: Optional[str] = typer.Option(None, help="Decode each split once and hold it on the device: auto (if it "
                                                      "fits in half the free memory), always or never."),
    image_size: Optional[int] = typer.Option(None, help="Side of the images the network sees (pacs/domainnet "
                                                        "augmentations); default 224."),
    frozen_trunk: Optional[bool] = typer.Option(
        None, "--frozen-trunk/--whole-network", help="Freeze the pretrained layers below the first mask point and "
                                                     "train only those above (cached features: dmg features)."),
    trunk_views: Optional[int] = typer.Option(None, help="Frozen trunk: fixed augmented views of each training image."),
    trunk_cache: Optional[bool] = typer.Option(
        None, "--trunk-cache/--no-trunk-cache", help="Frozen trunk: read its output from the feature cache (built if "
                                                     "missing) or compute it at every step."),
    validation_mode: Optional[str] = typer.Option(None, help="Model selection on source validation: hard (DMG's "
                                                             "reference rule), known_domain (own soft mask / own head) "
                                                             "or average; default: the method's reference rule."),
    schedule: Optional[str] = typer.Option(None, help="Entry of train.schedules to train with; default: the "
                                                      "dataset's."),
    out: Optional[Path] = typer.Option(None, help="Run folder; default "
                                                  "data/runs/<dataset>/<backbone>/<method>/<target>/seed<seed>."),
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
        batch_size=batch_size, lr=lr, mask_lr=mask_lr, overlap_lambda=overlap_lambda, pretrained=pretrained,
        device=device,
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


@app.command(cls=ParamsHelp, short_help='Score a run in and out of domain: its metrics files.')
@handle_errors
def evaluate(
    target: Optional[str] = typer.Option(None, help="Target domain of the run to evaluate."),
    source: Optional[list[str]] = typer.Option(None, "--source", help="A source domain (repeat the flag); as given to "
                                                                      "train."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; may be left out when the target names a domain of one "
                                                     "dataset only."),
    backbone: Optional[str] = typer.Option(None, help="Backbone of the run."),
    method: Optional[str] = typer.Option(None, help="Method of the run."),
    seed: Optional[int] = typer.Option(None, help="Seed of the run."),
    run_folder: Optional[Path] = typer.Option(
        None, "--run", "--run-dir", help="Run folder; default from the flags above (under torchrun write --run-dir: "
                                         "torchrun reads --run as its own --run-path)."),
    out: Optional[Path] = typer.Option(None, help="Metrics JSON; default "
                                                  "metrics/<dataset>/<backbone>/<method>/<target>/seed<seed>.json."),
    average_over: Optional[str] = typer.Option(None, help="Average per-domain outputs over logits (reference) or "
                                                          "probs."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    allow_unfinished: bool = typer.Option(
        False, "--allow-unfinished", help="Evaluate a run that has no run.json (stopped or still training); the report "
                                          "marks it."),
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


@app.command(cls=ParamsHelp, short_help='The lambda_O sweep: DMG per lambda_O x target x seed.')
@handle_errors
def sweep(
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    lambdas: Optional[list[float]] = typer.Option(
        None, "--lambda", help="A lambda_O value; repeat for several. Default: params.yaml report.sweep.lambdas."),
    targets: Optional[list[str]] = typer.Option(
        None, "--target", help="A target domain; repeat for several. Default: report.sweep.targets."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="A seed; repeat for several. Default: "
                                                                   "report.sweep.seeds."),
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


LAUNCHERS = ("local", "slurm")


@app.command(cls=ParamsHelp, short_help="Train and evaluate the whole matrix, several runs at once (here or on SLURM).")
@handle_errors
def study(
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs at once; how many pay on one GPU: benchmarks/RESULTS.md "
                                                     "(dmg bench --concurrent)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    targets: Optional[list[str]] = typer.Option(
        None, "--target", help="A target; repeat for several. Default: params.yaml matrix.targets."),
    methods: Optional[list[str]] = typer.Option(
        None, "--method", help="A method; repeat for several. Default: matrix.methods."),
    backbones: Optional[list[str]] = typer.Option(
        None, "--backbone", help="A backbone; repeat for several. Default: matrix.backbones."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="A seed; repeat for several. Default: "
                                                                   "matrix.seeds."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run (passed to dmg train); default the schedule's."),
    resident: Optional[str] = typer.Option(None, help="Passed to dmg train: auto, always or never."),
    min_free_gb: float = typer.Option(4.0, help="Start another run only while this much device memory (CUDA) or RAM "
                                                "(CPU) is free."),
    stagger: Optional[float] = typer.Option(None, help="Seconds between starts, so a run's memory shows before the "
                                                       "next check; default 20 on CUDA, 0 on the CPU."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Run dmg evaluate after each dmg train."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (every run on this device; slurm: on its "
                                            "node)."),
    launcher: str = typer.Option("local", help="local (processes here, --jobs at once) or slurm (one SLURM job per "
                                               "run, through submitit)."),
    show_status: bool = typer.Option(False, "--status", help="Show every run: finished, running, pending or failed "
                                                             "(with its log's last line); starts nothing."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel every queued and running job of the dataset's study "
                                                        "(--launcher slurm)."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition; default params.yaml study.partition."),
    time_min: Optional[int] = typer.Option(None, help="slurm: time limit of each run's job, minutes; default "
                                                      "study.time_min."),
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
