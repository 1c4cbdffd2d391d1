"""Figures of the report, each saved as PNG and SVG (matplotlib, Agg backend: no display needed).

- training curves of a run (log.csv): loss and source-validation accuracy per epoch
- per DMG run, one panel per masked layer: pairwise hard IoU of the source-domain masks
  (heatmap) and the keep-probabilities of each domain's mask units (histogram; a bar of the
  mean keep-probability when the metrics file has no histogram)
- the lambda_O sweep: out-of-domain accuracy, in-domain accuracy and mean pairwise IoU
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dmgcli.fileio import atomic_path, read_json  # noqa: E402
from dmgcli.results import summary_markdown, summary_path, sweep_epochs  # noqa: E402

# Fixed SVG element ids, so an unchanged figure is byte-identical (DVC sees no change).
plt.rcParams["svg.hashsalt"] = "dmg"


def save(fig, stem: Path) -> Path:
    """Write stem.png and stem.svg atomically and close the figure; returns the stem."""
    for suffix, extra in ((".png", {"dpi": 120}), (".svg", {"metadata": {"Date": None}})):
        with atomic_path(stem.with_suffix(suffix)) as tmp:
            fig.savefig(tmp, format=suffix[1:], **extra)
    plt.close(fig)
    return stem


def read_log(path: Path) -> dict[str, list[float]]:
    """log.csv as columns of floats; ValueError when it has no complete row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        columns = {key: [float(r[key]) for r in rows] for key in ("epoch", "loss", "ce", "overlap", "val_accuracy")}
    except (KeyError, TypeError, ValueError):
        raise ValueError("log.csv is missing columns or has malformed rows") from None
    if not rows:
        raise ValueError("log.csv has no epochs")
    return columns


def plot_curves(log: dict[str, list[float]], stem: Path, title: str) -> Path:
    """Loss (and its cross-entropy part, for DMG) and source-validation accuracy against epoch."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    epochs = log["epoch"]
    loss_ax.plot(epochs, log["loss"], marker=".", label="total loss")
    if any(log["overlap"]):  # DMG: the loss also holds lambda_O x overlap
        loss_ax.plot(epochs, log["ce"], linestyle="--", label="cross-entropy")
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    loss_ax.legend()
    acc = log["val_accuracy"]
    best = epochs[acc.index(max(acc))]
    acc_ax.plot(epochs, acc, marker=".", color="tab:green", label="source validation")
    acc_ax.axvline(best, color="gray", linestyle=":", label=f"best epoch {best:g}")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save(fig, stem)


def mean_off_diagonal(matrix: list[list[float]]) -> float:
    """Mean IoU over pairs of distinct domains (the diagonal is 1 by definition)."""
    d = len(matrix)
    return statistics.fmean(matrix[i][j] for i in range(d) for j in range(d) if i != j)


def plot_iou(masks: dict, sources: list[str], stem: Path, title: str) -> Path:
    """One heatmap per masked layer: hard IoU between each pair of source-domain masks."""
    points = masks["points"]
    fig, axes = plt.subplots(1, len(points), figsize=(3.3 * len(points) + 1, 3.5), squeeze=False,
                             layout="constrained")
    for ax, point in zip(axes[0], points):
        matrix = masks["iou"][point]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(sources)), sources, rotation=45, fontsize=8)
        ax.set_yticks(range(len(sources)), sources, fontsize=8)
        ax.set_title(f"{point}: mean pairwise {mean_off_diagonal(matrix):.2f}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="hard IoU (p > 0.5)")
    fig.suptitle(title)
    return save(fig, stem)


def plot_keep(masks: dict, sources: list[str], stem: Path, title: str) -> Path:
    """One panel per masked layer: keep-probabilities of each domain's mask units."""
    points = masks["points"]
    histogram = masks.get("keep_probability_histogram")
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.4), squeeze=False, layout="constrained")
    for ax, point in zip(axes[0], points):
        if histogram:
            edges = histogram["bin_edges"]
            for source in sources:
                counts = histogram["counts"][point][source]
                total = sum(counts) or 1
                ax.stairs([c / total for c in counts], edges, label=source)
            ax.set(xlabel="keep-probability", ylabel="fraction of units", xlim=(0, 1))
        else:  # older metrics files hold only each domain's mean keep-probability
            means = [masks["keep_probability"][point][s] for s in sources]
            ax.bar(range(len(sources)), means)
            ax.set_xticks(range(len(sources)), sources, rotation=45, fontsize=8)
            ax.set(ylabel="mean keep-probability", ylim=(0, 1))
        ax.set_title(point, fontsize=9)
    if histogram:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, stem)


def plot_sweep(summary: dict, stem: Path) -> Path:
    """Accuracies (top) and mean pairwise IoU (bottom) against lambda_O, mean +- std over seeds."""
    rows = summary["summary"]
    x = range(len(rows))
    fig, (acc_ax, iou_ax) = plt.subplots(2, 1, sharex=True, figsize=(5.5, 5.5), layout="constrained")
    for key, label in (("out_of_domain", "out-of-domain"), ("in_domain", "in-domain")):
        acc_ax.errorbar(x, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                        capsize=3, label=label)
    acc_ax.set(ylabel="accuracy (%)")
    acc_ax.legend()
    iou_ax.errorbar(x, [r["mean_iou"]["mean"] for r in rows], yerr=[r["mean_iou"]["std"] for r in rows],
                    marker="o", capsize=3, color="tab:purple")
    iou_ax.set(ylabel="mean pairwise IoU", xlabel="λ_O (overlap-loss weight)")
    iou_ax.set_xticks(list(x), [f"{r['lambda']:g}" for r in rows])
    fig.suptitle(f"{summary['dataset']} {summary['backbone']} DMG: targets {', '.join(summary['targets'])}, "
                 f"{len(summary['seeds'])} seed(s), {sweep_epochs(summary)}", fontsize=9)
    return save(fig, stem)


@dataclass
class Figures:
    """The figures one report drew, as paths relative to the report folder (without suffix)."""
    curves: list[tuple[str, str]] = field(default_factory=list)  # (run, stem)
    masks: list[tuple[str, str, str]] = field(default_factory=list)  # (run, iou stem, keep stem)
    sweep: dict | None = None  # the sweep summary, when there is one
    problems: list[str] = field(default_factory=list)  # inputs that could not be drawn, and why

    def markdown(self) -> list[str]:
        """The figures section of index.md."""
        lines = ["## λ_O sweep", ""]
        if self.sweep:
            lines += ["![lambda_O sweep](figures/lambda_sweep.png) ([svg](figures/lambda_sweep.svg))", "",
                      summary_markdown(self.sweep), ""]
        else:
            lines += ["No sweep yet: `dmg sweep` trains and evaluates DMG for each λ_O of params.yaml "
                      "`report.sweep`.", ""]
        lines += ["## Masks of the DMG runs", ""]
        for run, iou, keep in self.masks:
            lines += [f"### {run}", "", f"![IoU]({iou}.png) ![keep-probabilities]({keep}.png)", ""]
        if not self.masks:
            lines += ["No DMG metrics with masks.", ""]
        lines += ["## Training curves", "", "| run | curves |", "|---|---|"]
        lines += [f"| {run} | [png]({stem}.png) · [svg]({stem}.svg) |" for run, stem in self.curves]
        if self.problems:
            lines += ["", "Not drawn:", ""] + [f"- {p}" for p in self.problems]
        return lines + [""]


def draw_report_figures(dataset: str, runs, data_dir: str | Path, folder: Path) -> Figures:
    """Draw every figure of a dataset's report into folder/figures; bad inputs are listed, not fatal.

    runs: dmgcli.results.Runs (the metrics files). Curves come from every run folder under
    <data_dir>/runs/<dataset>; the sweep from <data_dir>/sweeps/<dataset>/sweep.json.
    """
    figures = Figures()
    for log_path in sorted(Path(data_dir, "runs", dataset).glob("*/*/*/seed*/log.csv")):
        backbone, method, target, seed = log_path.parts[-5:-1]
        name = f"{backbone}-{method}-{target}-{seed}"
        try:
            plot_curves(read_log(log_path), folder / "figures" / "curves" / name, f"{dataset} {name}")
            figures.curves.append((f"{backbone} {method} {target} {seed}", f"figures/curves/{name}"))
        except (OSError, ValueError) as exc:
            figures.problems.append(f"{log_path}: {exc}")
    for (backbone, method, target), seeds in sorted(runs.cells.items()):
        for seed, record in sorted(seeds.items()):
            if "masks" not in record.data:
                continue
            name = f"{backbone}-{method}-{target}-seed{seed}"
            stem = folder / "figures" / "masks" / name
            sources, masks = record.data["sources"], record.data["masks"]
            try:
                plot_iou(masks, sources, stem.with_name(name + "-iou"), f"{dataset} {name}: mask overlap")
                plot_keep(masks, sources, stem.with_name(name + "-keep"), f"{dataset} {name}: keep-probabilities")
                figures.masks.append((f"{backbone} {method} {target} seed{seed}", f"figures/masks/{name}-iou",
                                      f"figures/masks/{name}-keep"))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                plt.close("all")
                figures.problems.append(f"{record.path}: masks incomplete ({type(exc).__name__}: {exc})")
    sweep_file = summary_path(data_dir, dataset)
    if sweep_file.exists():
        try:
            figures.sweep = read_json(sweep_file)
            plot_sweep(figures.sweep, folder / "figures" / "lambda_sweep")
        except (OSError, KeyError, TypeError, ValueError) as exc:
            plt.close("all")
            figures.sweep = None
            figures.problems.append(f"{sweep_file}: {exc}")
    return figures
