"""`dmg` commands that fetch, convert and check data: check, download, preprocess, features, info."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_base import DATASET_NAMES, PARAMS_OPTION, app, handle_errors, load
from .datasets import get_dataset
from .help import ParamsHelp
from .params_io import override


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


@app.command(cls=ParamsHelp, short_help="Fetch a dataset's raw files into <data_dir>/raw/.")
@handle_errors
def download(
    dataset: str = typer.Argument("digits", help=f"Dataset to fetch: {DATASET_NAMES} (VLCS, Office-Home, "
                                                 "TerraIncognita from DomainBed's sources), or a folder dataset "
                                                 "declared in params.yaml's datasets: section."),
    source: Optional[str] = typer.Option(None, "--from", help="Local zip or tar, extracted folder or mirror URL to use "
                                                              "instead of the public download (folder datasets: "
                                                              "<root>/<domain>/<class>/<image>)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Folder holding the split lists (PACS and folder "
                                                                "datasets with split: lists: "
                                                                "<domain>_{train,crossval,test}_kfold.txt; DomainNet: "
                                                                "official/ and tv_0.9_splits/); default: look beside "
                                                                "the images."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Extract an archive even if it expands far beyond "
                                                                  "the dataset's size (refused by default: a zip "
                                                                  "bomb)."),
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
    encoding: Optional[str] = typer.Option(None, help="Stored images: jpeg (encoded bytes + offsets) or raw (uint8 "
                                                      "pixels)."),
    params_file: Path = PARAMS_OPTION,
):
    """Convert raw files into one HDF5 file, <data_dir>/prepared/<dataset>.h5 (unchanged inputs: nothing to do)."""
    params = load(params_file)
    settings = override(params.preprocess, image_size=image_size, workers=workers, encoding=encoding)
    from stages.preprocess import preprocess as run

    out = run(dataset, params.data_dir, settings)
    typer.echo(f"{dataset}: {out}")


@app.command(cls=ParamsHelp, short_help="Cache a frozen trunk's features: <data_dir>/features/<dataset>/.")
@handle_errors
def features(
    dataset: Optional[str] = typer.Option(None, help="Dataset; default params.yaml's."),
    backbone: Optional[list[str]] = typer.Option(
        None, "--backbone", help="Backbone (repeat the flag); default: the matrix's backbones."),
    image_size: Optional[int] = typer.Option(None, help="Side of the images the trunk sees; default train.image_size."),
    trunk_views: Optional[int] = typer.Option(None, help="Augmented views of each training image; default "
                                                         "train.trunk_views."),
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


@app.command(short_help='Counts and provenance of an HDF5 file.')
@handle_errors
def info(path: Path = typer.Argument(..., help="An HDF5 file written by `dmg preprocess`."),
         verify: bool = typer.Option(False, "--verify", help="Also read every image and check it against its stored "
                                                             "checksum.")):
    """Per domain and split: image and class counts, and the file's provenance."""
    from stages.info import describe

    typer.echo(describe(path, verify))
