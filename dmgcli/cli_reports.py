"""`dmg` commands that report: report (tables beside the paper's, figures) and bench (img/s)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_base import PARAMS_OPTION, app, handle_errors, load
from .datasets import get_dataset
from .errors import DmgError
from .help import ParamsHelp
from .params_io import override


@app.command(cls=ParamsHelp, short_help="Tables beside the paper's, figures, index.md.")
@handle_errors
def report(
    table: Optional[int] = typer.Option(None, "--table", help="Print the paper's Table 1 (DomainNet, out-of-domain), 2 "
                                                              "(PACS, out-of-domain) or 3 (DomainNet, in-domain) with "
                                                              "our runs beside it."),
    dataset: Optional[str] = typer.Option(None, help="Dataset whose runs to report (without --table); default "
                                                     "params.yaml's."),
    fmt: Optional[str] = typer.Option(None, "--format", help="text, markdown, csv, latex or json; default params.yaml "
                                                             "report.format."),
    out: Optional[Path] = typer.Option(None, help="Write the table(s) to this file instead of printing them."),
    metrics_dir: Path = typer.Option(Path("metrics"), help="Folder of metrics files written by evaluate."),
    out_dir: Path = typer.Option(Path("reports"), help="Where the report (without --table) is written: "
                                                       "<out-dir>/<dataset>/."),
    figures: Optional[bool] = typer.Option(
        None, "--figures/--no-figures", help="Draw training curves, mask plots and the sweep figure."),
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
        typer.echo(f"wrote {out_dir / name}/ (params {params_file}); start with {out_dir / name / 'index.md'}",
                   err=True)
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


@app.command(short_help='Training and evaluation img/s on one device.')
@handle_errors
def bench(
    backbone: Optional[str] = typer.Option(None, help="alexnet, resnet18, resnet50 or convnet; default resnet50 on "
                                                      "CUDA, resnet18 on the CPU."),
    method: str = typer.Option("dmg", help="aggregate, multihead or dmg."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch; default 64 on CUDA, 8 on the CPU."),
    steps: Optional[int] = typer.Option(None, help="Timed steps of each kind; default 100 on CUDA, 6 on the CPU."),
    warmup: Optional[int] = typer.Option(None, help="Untimed steps first; default 20 on CUDA, 1 on the CPU."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Evaluation batch; default 256 on CUDA, 16 on the CPU."),
    eval_steps: Optional[int] = typer.Option(None, help="Timed evaluation batches; default 20 on CUDA, 2 on the CPU."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers reading the file; default min(8, cores) on "
                                                     "CUDA, 2 on the CPU."),
    domains: Optional[int] = typer.Option(None, help="Source domains (masks or heads); default 5, as DomainNet."),
    classes: Optional[int] = typer.Option(None, help="Classes; default 345, as DomainNet."),
    augmentation: Optional[str] = typer.Option(None, help="pacs (crop, flip, colour jitter; default), domainnet or "
                                                          "none."),
    precision: Optional[str] = typer.Option(None, help="CUDA arithmetic: bf16 (default) or fp32."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the method's training step."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                                                          "max-autotune-no-cudagraphs, max-autotune."),
    concurrent: Optional[list[int]] = typer.Option(
        None, "--concurrent", help="Also the img/s of this many training processes at once (repeat: --concurrent 1 "
                                   "--concurrent 2 --concurrent 4)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("benchmarks/results/local"), help="Folder for the results JSON (the default is "
                                                                    "git-ignored; copy a result up to "
                                                                    "benchmarks/results/ to commit it)."),
):
    """Training img/s end to end from HDF5 JPEGs (streamed and resident) against the same model's
    plain step (the ceiling).

    Also the input path's share of step time and evaluation img/s, in one run on one device.
    Writes <out>/bench-<method>-<backbone>-b<batch>-<device>-<time>.json.
    """
    from stages.bench import report as describe
    from stages.bench import run

    results = run(device, method, out, progress=lambda line: typer.echo(line, err=True), backbone=backbone,
                  batch_size=batch_size, steps=steps, warmup=warmup, eval_batch_size=eval_batch_size,
                  eval_steps=eval_steps, workers=workers, domains=domains, classes=classes,
                  augmentation=augmentation, precision=precision, compile=compile, compile_mode=compile_mode,
                  concurrent=tuple(concurrent) if concurrent else None)
    typer.echo(describe(results))
