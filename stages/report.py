"""Stage 5, report: our accuracies in the paper's tables, figures and a one-page summary.

Reads the metrics files evaluate writes, metrics/<dataset>/<backbone>/<method>/<target>/seed<N>.json.
One table cell is one (backbone, method, target); its seeds are averaged:
  mean +- sample standard deviation (n - 1 in the denominator) over the n seeds.
"Overall" is, per seed, the mean over all columns, then averaged over the seeds that every
column has (the paper's Overall is the mean of its columns). The default tables' columns are the
targets of the matrix and those with runs, so a matrix of some targets has the Overall of those
(and a paper row there no paper Overall). Each cell with a paper number also shows
diff = ours - paper. A cell with no run shows "-" and a footnote with the commands that produce it.

Tables: the paper's Tables 1-3 (`dmg report --table N`, numbers from dmgcli/paper_tables.json)
and, for any dataset, the out-of-domain and in-domain tables of the params.yaml matrix.
Formats (stages/report_formats.py, of the Document in stages/report_document.py): text, markdown, csv,
latex, json. The stage writes reports/<dataset>/:
  tables.{txt,md,csv,tex,json}   out-of-domain + in-domain tables of the matrix
  table<N>.{...}                 the paper's tables of this dataset (pacs: 2; domainnet: 1 and 3)
  figures/                       training curves, mask IoU/keep-probability plots, lambda_O sweep
  index.md                       one page linking all of it
"""
from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from dmgcli.datasets import get_dataset
from dmgcli.errors import DmgError
from dmgcli.fileio import write_text
from dmgcli.params import MatrixParams, Params, ReportParams
from dmgcli.results import (STILL_LEARNING, Record, Runs, Stat, load_runs, metric, paper_data,  # noqa: F401 - re-exported
                            run_marks, stat)
from stages.report_document import Cell, Document, FilledRow, FilledTable, RowSpec, TableSpec
from stages.report_formats import (EXTENSIONS, FORMATS, Notes, footnotes, render, to_csv, to_json,  # noqa: F401
                                   to_latex, to_markdown, to_text)

KINDS = ("out_of_domain", "in_domain")
METHOD_ORDER = ("aggregate", "multihead", "dmg")
# In-domain evaluation modes evaluate writes per method, with their row labels.
METHOD_ROWS = {
    "aggregate": (("average", "Aggregate"),),
    "multihead": (("average", "Multi-Headed"), ("known_domain", "Multi-Headed (own head)")),
    "dmg": (("average", "DMG"), ("known_domain", "DMG-KnownDomain")),
}
BACKBONE_LABELS = {"convnet": "ConvNet", "alexnet": "AlexNet", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
                   "efficientnet_lite0": "EffNet-Lite0", "efficientnet_lite0_mlp": "EffNet-Lite0 fc6-8"}
# the paper fine-tunes ImageNet weights
IMAGENET_BACKBONES = ("alexnet", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite0_mlp")
PAPER_TABLES_OF = {"domainnet": (1, 3), "pacs": (2,)}


# ----------------------------------------------------------------------------- table layouts

def paper_table(number: int) -> TableSpec:
    """The layout and numbers of the paper's Table `number` (1, 2 or 3)."""
    tables = paper_data()["tables"]
    if str(number) not in tables:
        raise DmgError(f"unknown table {number}; the paper has tables {', '.join(tables)}")
    t = tables[str(number)]
    rows = tuple(RowSpec(r["backbone"], r["label"], r["method"], r.get("mode", "average"), tuple(r["values"]))
                 for r in t["rows"])
    return TableSpec(f"table{number}", t["caption"].split(". ")[0], t["dataset"], t["kind"], tuple(t["columns"]),
                     tuple(t["column_labels"]), t["backbone_labels"], rows, pretrained=True)


def paper_rows(dataset: str, kind: str) -> dict[tuple[str, str, str], tuple[float, ...]]:
    """Paper numbers by (backbone, method, mode) for the rows we implement, e.g. for the default tables."""
    found = {}
    for t in paper_data()["tables"].values():
        if t["dataset"] == dataset and t["kind"] == kind:
            for r in t["rows"]:
                if r["method"]:
                    found.setdefault((r["backbone"], r["method"], r.get("mode", "average")), tuple(r["values"]))
    return found


def shown_targets(matrix: MatrixParams, runs: Runs) -> tuple[str, ...]:
    """Columns of the default tables: the dataset's domains that the matrix targets or that have
    runs, in the dataset's order (a matrix of some targets gets a table, and an Overall, of those)."""
    wanted = set(matrix.targets) | {target for _, _, target in runs.cells}
    return tuple(d for d in get_dataset(runs.dataset).domains if d in wanted)


def paper_columns(values: tuple[float, ...] | None, domains: tuple[str, ...],
                  columns: tuple[str, ...]) -> tuple[float | None, ...] | None:
    """A paper row (one number per domain, then its Overall) cut to `columns`; the paper's
    Overall only when every domain is shown (the mean of other columns is not the paper's)."""
    if values is None:
        return None
    by_domain = dict(zip(domains, values))
    return tuple(by_domain[c] for c in columns) + (values[-1] if columns == domains else None,)


def matrix_rows(matrix: MatrixParams, runs: Runs, kind: str,
                columns: tuple[str, ...]) -> tuple[RowSpec, ...]:
    """Rows of the default tables: the matrix's backbones x methods, then any other that has runs."""
    pairs = [(b, m) for b in matrix.backbones for m in matrix.methods]
    pairs += sorted({(b, m) for b, m, _ in runs.cells} - set(pairs),
                    key=lambda p: (p[0], METHOD_ORDER.index(p[1]) if p[1] in METHOD_ORDER else 99, p[1]))
    backbones = list(dict.fromkeys(b for b, _ in pairs))
    pairs.sort(key=lambda p: backbones.index(p[0]))  # stable: group by backbone, matrix order first
    paper = paper_rows(runs.dataset, kind)
    domains = get_dataset(runs.dataset).domains
    rows = []
    for backbone, method in pairs:
        modes = METHOD_ROWS.get(method, (("average", method),))
        for mode, label in modes[:1] if kind == "out_of_domain" else modes:
            values = paper_columns(paper.get((backbone, method, mode)), domains, columns)
            rows.append(RowSpec(backbone, label, method, mode, values))
    return tuple(rows)


def default_tables(matrix: MatrixParams, runs: Runs) -> list[TableSpec]:
    """The out-of-domain and in-domain tables of a dataset's matrix (any dataset, digits included)."""
    info = get_dataset(runs.dataset)
    titles = {"out_of_domain": f"{info.name}: out-of-domain accuracy (%), column = held-out target domain",
              "in_domain": f"{info.name}: in-domain accuracy (%), mean over the source domains' "
                           f"{'validation (crossval: the official test list is the whole domain)' if info.in_domain_split == 'val' else 'test'} splits, "
                           f"column = held-out target domain"}
    columns = shown_targets(matrix, runs)
    return [TableSpec(kind, titles[kind], info.name, kind, columns, columns, BACKBONE_LABELS,
                      matrix_rows(matrix, runs, kind, columns), pretrained=False) for kind in KINDS]


# ----------------------------------------------------------------------------- filling cells

def overall(columns: list[dict[int, float]]) -> Stat | None:
    """Per seed, the mean over all columns; only seeds that every column has."""
    common = set.intersection(*(set(c) for c in columns)) if columns else set()
    return stat({s: statistics.fmean(c[s] for c in columns) for s in common})


def overall_marks(column_marks: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Every mark of the columns an Overall averages; the still-learning notes, which name each
    run's best epoch, as one count (listing them all again would repeat the columns' notes)."""
    learning = sum(any(m.startswith(STILL_LEARNING) for m in ms) for ms in column_marks)
    marks = dict.fromkeys(m for ms in column_marks for m in ms if not m.startswith(STILL_LEARNING))
    if learning:
        marks[f"{STILL_LEARNING} ({learning} of {len(column_marks)} targets)"] = None
    return tuple(marks)


def run_command(dataset: str, backbone: str, method: str, target: str, seeds: tuple[int, ...], pretrained: bool) -> str:
    """The train + evaluate commands that produce one cell, for every seed."""
    seeds = seeds or (0,)
    seed = "$seed" if len(seeds) > 1 else str(seeds[0])
    which = f"--dataset {dataset} --target {target} --backbone {backbone} --method {method} --seed {seed}"
    start = " --pretrained" if pretrained and backbone in IMAGENET_BACKBONES else ""
    command = f"dmg train {which}{start} && dmg evaluate {which}"
    if len(seeds) > 1:
        return f"for seed in {' '.join(map(str, seeds))}; do {command}; done"
    return command


def fill(spec: TableSpec, runs: Runs, seeds: tuple[int, ...]) -> FilledTable:
    """Our numbers (or the commands that would make them) for every cell of a layout, each
    marked where its runs are unfinished or differ from the reference protocol."""
    rows = []
    for row in spec.rows:
        paper = row.paper or (None,) * (len(spec.columns) + 1)
        columns, column_marks = [], []
        for target in spec.columns:
            records = runs.get(row.backbone, row.method, target) if row.method else {}
            values = {s: metric(r.data, spec.kind, row.mode) for s, r in records.items()}
            used = {s: r for s, r in records.items() if values[s] is not None}
            columns.append({s: values[s] for s in used})
            column_marks.append(run_marks(used, spec.dataset, row.method) if used else ())
        cells = []
        for target, values, marks, paper_value in zip(spec.columns, columns, column_marks, paper):
            ours = stat(values)
            command = None if ours or not row.method else run_command(
                spec.dataset, row.backbone, row.method, target, seeds, spec.pretrained)
            cells.append(Cell(paper_value, ours, command, marks))
        cells.append(Cell(paper[-1], overall(columns) if row.method else None, marks=overall_marks(column_marks)))
        rows.append(FilledRow(row, tuple(cells)))
    return FilledTable(spec, tuple(rows))


def missing_files(matrix: MatrixParams, runs: Runs, metrics_dir: str | Path) -> list[str]:
    """Metrics files the matrix promises that do not exist (or could not be used)."""
    missing = []
    targets = [t for t in matrix.targets if t in get_dataset(runs.dataset).domains]
    for backbone, method, target, seed in itertools.product(matrix.backbones, matrix.methods, targets, matrix.seeds):
        if seed not in runs.get(backbone, method, target):
            missing.append(str(Path(metrics_dir, runs.dataset, backbone, method, target, f"seed{seed}.json")))
    return missing


def paper_document(number: int, metrics_dir: str | Path, seeds: tuple[int, ...]) -> Document:
    """The paper's Table `number` with our runs beside it."""
    spec = paper_table(number)
    runs = load_runs(metrics_dir, spec.dataset)
    return Document((fill(spec, runs, seeds),), runs)


def default_document(dataset: str, matrix: MatrixParams, metrics_dir: str | Path) -> Document:
    """The out-of-domain and in-domain tables of `dataset`'s runs and the matrix."""
    info = get_dataset(dataset)
    if not set(matrix.targets) & set(info.domains):  # params.yaml's matrix is for another dataset: runs only
        matrix = MatrixParams(targets=(), methods=(), backbones=(), seeds=matrix.seeds)
    runs = load_runs(metrics_dir, info.name)
    tables = tuple(fill(spec, runs, matrix.seeds) for spec in default_tables(matrix, runs))
    return Document(tables, runs, tuple(missing_files(matrix, runs, metrics_dir)))


# ----------------------------------------------------------------------------- the stage

def write_formats(stem: Path, doc: Document) -> list[Path]:
    """stem.txt, .md, .csv, .tex and .json of one document."""
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix("." + EXTENSIONS[fmt])
        write_text(path, render(doc, fmt))
        paths.append(path)
    return paths


def index_page(dataset: str, doc: Document, paper_numbers: tuple[int, ...], figures) -> str:
    """reports/<dataset>/index.md: the tables inline, links to every file, the figures."""
    source = paper_data()["source"]
    links = " · ".join(f"[{fmt}](tables.{EXTENSIONS[fmt]})" for fmt in FORMATS)
    lines = [f"# DMG reproduction report: {dataset}", "",
             f"{doc.count} runs (metrics files) tabulated. Paper: *{source['title']}*, {source['venue']}.", "",
             "## Tables", "", f"Files: {links}", ""]
    for n in paper_numbers:
        lines.append(f"The paper's Table {n} beside ours: " + " · ".join(
            f"[{fmt}](table{n}.{EXTENSIONS[fmt]})" for fmt in FORMATS))
        lines.append("")
    lines += [to_markdown(doc).replace("### ", "#### "), ""]
    if figures is not None:
        lines += figures.markdown()
    if doc.skipped or doc.missing:
        lines += ["## Files not tabulated", ""]
        lines += [f"- skipped {s}" for s in doc.skipped] + [f"- missing {m}" for m in doc.missing] + [""]
    return "\n".join(lines)


def check_something_to_report(doc: Document, root: Path, data_dir: str | Path) -> None:
    """Refuse to write (and so replace) a report of nothing: no metrics file of the dataset was
    found (a missing or mistyped metrics folder) and there is no lambda_O sweep to show."""
    from dmgcli.results import summary_path

    if doc.count or doc.skipped or summary_path(data_dir, doc.runs.dataset).exists():
        return
    where = f"{root} does not exist" if not root.is_dir() else f"{root} holds no seed<N>.json metrics files"
    raise DmgError(f"nothing to report: {where}; run `dmg evaluate` first, or pass --metrics-dir FOLDER "
                   f"(nothing was written)")


def report(dataset: str, matrix: MatrixParams, metrics_dir: str | Path, out_dir: str | Path,
           data_dir: str | Path = Params.data_dir, figures: bool = ReportParams.figures) -> Document:
    """The report stage: write reports/<dataset>/ (tables, paper tables, figures, index.md)."""
    info = get_dataset(dataset)
    doc = default_document(info.name, matrix, metrics_dir)
    check_something_to_report(doc, Path(metrics_dir) / info.name, data_dir)
    folder = Path(out_dir) / info.name
    write_formats(folder / "tables", doc)
    numbers = PAPER_TABLES_OF.get(info.name, ())
    for n in numbers:
        write_formats(folder / f"table{n}", paper_document(n, metrics_dir, matrix.seeds))
    drawn = None
    if figures:
        from stages.plots import draw_report_figures  # matplotlib only when figures are wanted

        drawn = draw_report_figures(info.name, doc.runs, data_dir, folder)
    write_text(folder / "index.md", index_page(info.name, doc, numbers, drawn))
    return doc
