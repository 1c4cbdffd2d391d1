"""Stage 5, report: our accuracies in the paper's tables, figures and a one-page summary.

Reads the metrics files evaluate writes, metrics/<dataset>/<backbone>/<method>/<target>/seed<N>.json.
One table cell is one (backbone, method, target); its seeds are averaged:
  mean +- sample standard deviation (n - 1 in the denominator) over the n seeds.
"Overall" is, per seed, the mean over all columns, then averaged over the seeds that every
column has (the paper's Overall is the mean of its columns). Each cell with a paper number
also shows diff = ours - paper. A cell with no run shows "-" and a footnote with the
commands that produce it.

Tables: the paper's Tables 1-3 (`dmg report --table N`, numbers from dmgcli/paper_tables.json)
and, for any dataset, the out-of-domain and in-domain tables of the params.yaml matrix.
Formats: text, markdown, csv, latex, json. The stage writes reports/<dataset>/:
  tables.{txt,md,csv,tex,json}   out-of-domain + in-domain tables of the matrix
  table<N>.{...}                 the paper's tables of this dataset (pacs: 2; domainnet: 1 and 3)
  figures/                       training curves, mask IoU/keep-probability plots, lambda_O sweep
  index.md                       one page linking all of it
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dmgcli.datasets import get_dataset
from dmgcli.errors import DmgError
from dmgcli.fileio import write_text
from dmgcli.params import MatrixParams

FORMATS = ("text", "markdown", "csv", "latex", "json")
EXTENSIONS = {"text": "txt", "markdown": "md", "csv": "csv", "latex": "tex", "json": "json"}
KINDS = ("out_of_domain", "in_domain")
METHOD_ORDER = ("aggregate", "multihead", "dmg")
# In-domain evaluation modes evaluate writes per method, with their row labels.
METHOD_ROWS = {
    "aggregate": (("average", "Aggregate"),),
    "multihead": (("average", "Multi-Headed"), ("known_domain", "Multi-Headed (own head)")),
    "dmg": (("average", "DMG"), ("known_domain", "DMG-KnownDomain")),
}
BACKBONE_LABELS = {"convnet": "ConvNet", "alexnet": "AlexNet", "resnet18": "ResNet-18", "resnet50": "ResNet-50"}
IMAGENET_BACKBONES = ("alexnet", "resnet18", "resnet50")  # the paper fine-tunes ImageNet weights
PAPER_TABLES_OF = {"domainnet": (1, 3), "pacs": (2,)}


# ----------------------------------------------------------------------------- metrics files

@dataclass(frozen=True)
class Record:
    """One metrics file: where it lies and what it holds."""
    path: Path
    data: dict


@dataclass
class Runs:
    """The metrics files of one dataset, by cell (backbone, method, target), then by seed."""
    dataset: str
    cells: dict[tuple[str, str, str], dict[int, Record]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "path: why", files that could not be used

    def get(self, backbone: str, method: str, target: str) -> dict[int, Record]:
        return self.cells.get((backbone, method, target), {})


def _number(data: dict, *keys: str) -> float:
    """data[k1][k2]... as a float; KeyError/TypeError/ValueError when absent or not a number."""
    for key in keys:
        data = data[key]
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        raise ValueError(f"{'.'.join(keys)} is not a number")
    return float(data)


def read_record(path: Path) -> dict:
    """Parse one metrics file; ValueError naming what is wrong when it is unreadable or partial."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from None
    except json.JSONDecodeError:
        raise ValueError("not valid JSON (truncated or partly written?)") from None
    if not isinstance(data, dict):
        raise ValueError("not a metrics object")
    for key, kind in (("dataset", str), ("backbone", str), ("method", str), ("target", str), ("seed", int),
                      ("sources", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ValueError(f"missing or malformed {key!r}")
    for keys in (("out_of_domain", "accuracy"), ("in_domain", "average", "mean")):
        try:
            _number(data, *keys)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"missing {'.'.join(keys)}") from None
    return data


def check_cell(record: Record, dataset: str, cell: tuple[str, str, str], seed: int, seeds: dict[int, Record]) -> None:
    """Refuse a file whose settings differ from its cell's: another dataset, backbone, method,
    target or seed than its folder says, or other source domains than the cell's other seeds."""
    expected = {"dataset": dataset, "backbone": cell[0], "method": cell[1], "target": cell[2], "seed": seed}
    for key, value in expected.items():
        if record.data[key] != value:
            raise DmgError(f"{record.path} holds metrics for {key}={record.data[key]!r} but lies in the folder of "
                           f"{key}={value!r}; one cell would mix settings. Move or delete that file.")
    for other in seeds.values():
        if other.data["sources"] != record.data["sources"]:
            raise DmgError(f"{record.path} and {other.path} are seeds of one cell ({' '.join(cell)}) but were trained "
                           f"on different source domains ({', '.join(record.data['sources'])} vs "
                           f"{', '.join(other.data['sources'])}). Delete the stale one and re-run evaluate.")


SEED_FILE = re.compile(r"seed(\d+)\.json")


def load_runs(metrics_dir: str | Path, dataset: str) -> Runs:
    """All metrics files of a dataset. Unreadable, partial or misplaced files are listed in
    `skipped`; files that contradict their cell raise DmgError."""
    root = Path(metrics_dir) / dataset
    runs = Runs(dataset)
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        parts = path.relative_to(root).parts
        match = SEED_FILE.fullmatch(parts[-1])
        if len(parts) != 4 or not match:
            runs.skipped.append(f"{path}: not at <backbone>/<method>/<target>/seed<N>.json")
            continue
        try:
            record = Record(path, read_record(path))
        except ValueError as exc:
            runs.skipped.append(f"{path}: {exc}")
            continue
        cell, seed = (parts[0], parts[1], parts[2]), int(match.group(1))
        seeds = runs.cells.setdefault(cell, {})
        check_cell(record, dataset, cell, seed, seeds)
        seeds[seed] = record
    return runs


def metric(data: dict, kind: str, mode: str) -> float | None:
    """The number one metrics file gives a table: out-of-domain accuracy, or the mean
    in-domain accuracy in `mode`; None when the file has no such mode."""
    try:
        if kind == "out_of_domain":
            return _number(data, "out_of_domain", "accuracy")
        return _number(data, "in_domain", mode, "mean")
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- table layouts

@dataclass(frozen=True)
class RowSpec:
    """One table row: a backbone and a method, with the paper's numbers if it has the row."""
    backbone: str
    label: str
    method: str | None  # our method key; None: not implemented here, paper numbers only
    mode: str = "average"  # in-domain evaluation mode
    paper: tuple[float, ...] | None = None  # one per column, then the paper's Overall


@dataclass(frozen=True)
class TableSpec:
    name: str  # file stem: "table1" or "out_of_domain" / "in_domain"
    title: str
    dataset: str
    kind: str  # "out_of_domain" or "in_domain"
    columns: tuple[str, ...]  # target domains
    column_labels: tuple[str, ...]
    backbone_labels: dict[str, str]
    rows: tuple[RowSpec, ...]
    pretrained: bool  # whether the commands for missing cells start from ImageNet weights


def paper_data() -> dict:
    """dmgcli/paper_tables.json: the paper's Tables 1-3 and where they come from."""
    return json.loads(resources.files("dmgcli").joinpath("paper_tables.json").read_text(encoding="utf-8"))


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


def matrix_rows(matrix: MatrixParams, runs: Runs, kind: str) -> tuple[RowSpec, ...]:
    """Rows of the default tables: the matrix's backbones x methods, then any other that has runs."""
    pairs = [(b, m) for b in matrix.backbones for m in matrix.methods]
    pairs += sorted({(b, m) for b, m, _ in runs.cells} - set(pairs),
                    key=lambda p: (p[0], METHOD_ORDER.index(p[1]) if p[1] in METHOD_ORDER else 99, p[1]))
    backbones = list(dict.fromkeys(b for b, _ in pairs))
    pairs.sort(key=lambda p: backbones.index(p[0]))  # stable: group by backbone, matrix order first
    paper = paper_rows(runs.dataset, kind)
    rows = []
    for backbone, method in pairs:
        modes = METHOD_ROWS.get(method, (("average", method),))
        for mode, label in modes[:1] if kind == "out_of_domain" else modes:
            rows.append(RowSpec(backbone, label, method, mode, paper.get((backbone, method, mode))))
    return tuple(rows)


def default_tables(matrix: MatrixParams, runs: Runs) -> list[TableSpec]:
    """The out-of-domain and in-domain tables of a dataset's matrix (any dataset, digits included)."""
    info = get_dataset(runs.dataset)
    titles = {"out_of_domain": f"{info.name}: out-of-domain accuracy (%), column = held-out target domain",
              "in_domain": f"{info.name}: in-domain accuracy (%), mean over the source domains' "
                           f"{'validation (crossval: the official test list is the whole domain)' if info.in_domain_split == 'val' else 'test'} splits, "
                           f"column = held-out target domain"}
    return [TableSpec(kind, titles[kind], info.name, kind, info.domains, info.domains, BACKBONE_LABELS,
                      matrix_rows(matrix, runs, kind), pretrained=False) for kind in KINDS]


# ----------------------------------------------------------------------------- filling cells

@dataclass(frozen=True)
class Stat:
    """Our number in one cell: mean and sample std over seeds."""
    mean: float
    std: float  # 0.0 for one seed
    n: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Cell:
    paper: float | None
    ours: Stat | None
    command: str | None = None  # produces the missing run(s) behind an empty cell

    @property
    def diff(self) -> float | None:
        """ours - paper, from our mean rounded as printed so the three numbers agree."""
        if self.paper is None or self.ours is None:
            return None
        return round(round(self.ours.mean, 2) - self.paper, 2) + 0.0  # + 0.0: no "-0.00"


@dataclass(frozen=True)
class FilledRow:
    spec: RowSpec
    cells: tuple[Cell, ...]  # one per column, then Overall


@dataclass(frozen=True)
class FilledTable:
    spec: TableSpec
    rows: tuple[FilledRow, ...]


def stat(values: dict[int, float]) -> Stat | None:
    if not values:
        return None
    seeds = tuple(sorted(values))
    vals = [values[s] for s in seeds]
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals), seeds)


def overall(columns: list[dict[int, float]]) -> Stat | None:
    """Per seed, the mean over all columns; only seeds that every column has."""
    common = set.intersection(*(set(c) for c in columns)) if columns else set()
    return stat({s: statistics.fmean(c[s] for c in columns) for s in common})


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
    """Our numbers (or the commands that would make them) for every cell of a layout."""
    rows = []
    for row in spec.rows:
        paper = row.paper or (None,) * (len(spec.columns) + 1)
        columns = []
        for target in spec.columns:
            records = runs.get(row.backbone, row.method, target) if row.method else {}
            values = {s: metric(r.data, spec.kind, row.mode) for s, r in records.items()}
            columns.append({s: v for s, v in values.items() if v is not None})
        cells = []
        for target, values, paper_value in zip(spec.columns, columns, paper):
            ours = stat(values)
            command = None if ours or not row.method else run_command(
                spec.dataset, row.backbone, row.method, target, seeds, spec.pretrained)
            cells.append(Cell(paper_value, ours, command))
        cells.append(Cell(paper[-1], overall(columns) if row.method else None))
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


@dataclass(frozen=True)
class Document:
    """Tables rendered together (one footnote numbering) and the metrics files behind them."""
    tables: tuple[FilledTable, ...]
    runs: Runs
    missing: tuple[str, ...] = ()  # metrics files the matrix expects that are not there

    @property
    def skipped(self) -> list[str]:
        return self.runs.skipped

    @property
    def count(self) -> int:
        """How many metrics files (runs) were tabulated."""
        return sum(len(seeds) for seeds in self.runs.cells.values())


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


# ----------------------------------------------------------------------------- rendering

def legend(doc: Document) -> str:
    paper = any(row.spec.paper for table in doc.tables for row in table.rows)
    return ("ours: mean ± sample std over n seeds" + ("; diff = ours - paper" if paper else "")
            + "; -#k = no run yet, made by command #k below.")


def footnotes(doc: Document) -> dict[str, int]:
    """Number each distinct command in order of appearance (a DMG run fills DMG and DMG-KnownDomain)."""
    notes: dict[str, int] = {}
    for table in doc.tables:
        for row in table.rows:
            for cell in row.cells:
                if cell.command and cell.command not in notes:
                    notes[cell.command] = len(notes) + 1
    return notes


def row_n(row: FilledRow) -> int | None:
    """The number of seeds when every filled cell of the row has the same; else None."""
    ns = {c.ours.n for c in row.cells if c.ours}
    return ns.pop() if len(ns) == 1 else None


def ours_text(cell: Cell, common_n: int | None, notes: dict[str, int]) -> str:
    if cell.ours is None:
        return f"-#{notes[cell.command]}" if cell.command else "-"
    text = f"{cell.ours.mean:.2f}" + (f"±{cell.ours.std:.2f}" if cell.ours.n > 1 else "")
    return text if cell.ours.n == common_n else f"{text} (n={cell.ours.n})"


def sub_rows(row: FilledRow, notes: dict[str, int]) -> list[tuple[str, list[str]]]:
    """(sub-label, cell texts) lines of one row: paper, ours, diff, as far as the row has them."""
    lines = []
    if row.spec.paper:
        lines.append(("paper", [f"{c.paper:.2f}" for c in row.cells]))
    if row.spec.method:
        n = row_n(row)
        lines.append((f"ours (n={n})" if n else "ours", [ours_text(c, n, notes) for c in row.cells]))
        if any(c.diff is not None for c in row.cells):
            lines.append(("diff", ["-" if c.diff is None else f"{c.diff:+.2f}" for c in row.cells]))
    return lines


def grid(table: FilledTable, notes: dict[str, int]) -> list[list[str]]:
    """Header plus one line per sub-row: [backbone, method, sub-label, cells...]; backbone and
    method only on their first line, as the paper prints them."""
    spec = table.spec
    lines = [["", "Method", "", *spec.column_labels, "Overall"]]
    last_backbone = None
    for row in table.rows:
        for i, (sub, cells) in enumerate(sub_rows(row, notes)):
            backbone = spec.backbone_labels.get(row.spec.backbone, row.spec.backbone)
            lines.append([backbone if row.spec.backbone != last_backbone else "", row.spec.label if i == 0 else "",
                          sub, *cells])
            last_backbone = row.spec.backbone
    return lines


def command_list(notes: dict[str, int], prefix: str = "") -> list[str]:
    return [f"{prefix}#{k} {command}" for command, k in notes.items()]


def to_text(doc: Document) -> str:
    notes = footnotes(doc)
    blocks = []
    for table in doc.tables:
        lines = grid(table, notes)
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        text = [table.spec.title]
        for line in lines:
            cells = [c.ljust(w) for c, w in zip(line[:3], widths)] + [c.rjust(w) for c, w in zip(line[3:], widths[3:])]
            text.append("  ".join(cells).rstrip())
        blocks.append("\n".join(text))
    return "\n\n".join(blocks) + "\n\n" + legend(doc) + "\n" + "".join(line + "\n" for line in command_list(notes))


def to_markdown(doc: Document) -> str:
    notes = footnotes(doc)
    blocks = []
    for table in doc.tables:
        lines = grid(table, notes)
        lines[0][0] = "Backbone"
        text = [f"### {table.spec.title}", "", "| " + " | ".join(lines[0]) + " |",
                "|" + "---|" * 3 + "---:|" * (len(lines[0]) - 3)]
        text += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        blocks.append("\n".join(text))
    commands = [f"- #{k} `{command}`" for command, k in notes.items()]
    return "\n\n".join(blocks) + "\n\n" + legend(doc) + "\n" + ("\n" + "\n".join(commands) + "\n" if commands else "")


def latex_escape(text: str) -> str:
    """LaTeX source for one cell: special characters escaped, ± and † as math."""
    return re.sub(r"([_&%#$])", r"\\\1", text).replace("±", " $\\pm$ ").replace("†", "$^\\dagger$")


def to_latex(doc: Document) -> str:
    """booktabs tables; the commands for missing cells as LaTeX comments below each table."""
    notes = footnotes(doc)
    blocks = []
    for table in doc.tables:
        lines = grid(table, notes)
        text = [f"% {table.spec.title}", "\\begin{tabular}{lll" + "r" * (len(lines[0]) - 3) + "}", "\\toprule",
                " & ".join(latex_escape(c) for c in lines[0]) + " \\\\", "\\midrule"]
        for i, line in enumerate(lines[1:], 1):
            if i > 1 and line[0]:
                text.append("\\midrule")
            text.append(" & ".join(latex_escape(c) for c in line) + " \\\\")
        text += ["\\bottomrule", "\\end{tabular}"]
        blocks.append("\n".join(text))
    comments = [f"% {line}" for line in [legend(doc)] + command_list(notes)]
    return "\n\n".join(blocks) + "\n" + "\n".join(comments) + "\n"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def to_csv(doc: Document) -> str:
    """One line per cell: the paper's number, ours (mean, std, n, seeds), the difference, the command."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "dataset", "kind", "backbone", "row", "method", "mode", "column", "paper", "ours_mean",
                     "ours_std", "n", "seeds", "diff", "command"])
    for table in doc.tables:
        spec = table.spec
        for row in table.rows:
            for column, cell in zip((*spec.columns, "overall"), row.cells):
                ours = cell.ours
                writer.writerow([spec.name, spec.dataset, spec.kind, row.spec.backbone, row.spec.label,
                                 row.spec.method or "", row.spec.mode, column,
                                 "" if cell.paper is None else f"{cell.paper:.2f}",
                                 f"{ours.mean:.4f}" if ours else "", f"{ours.std:.4f}" if ours else "",
                                 ours.n if ours else 0, " ".join(map(str, ours.seeds)) if ours else "",
                                 "" if cell.diff is None else f"{cell.diff:.2f}", cell.command or ""])
    return buf.getvalue()


def table_json(table: FilledTable) -> dict:
    spec = table.spec
    rows = []
    for row in table.rows:
        cells = {}
        for column, cell in zip((*spec.columns, "overall"), row.cells):
            ours = cell.ours and {"mean": _round(cell.ours.mean), "std": _round(cell.ours.std), "n": cell.ours.n,
                                  "seeds": list(cell.ours.seeds)}
            cells[column] = {"paper": cell.paper, "ours": ours, "diff": cell.diff, "command": cell.command}
        rows.append({"backbone": row.spec.backbone, "label": row.spec.label, "method": row.spec.method,
                     "mode": row.spec.mode, "cells": cells})
    return {"name": spec.name, "title": spec.title, "dataset": spec.dataset, "kind": spec.kind,
            "columns": list(spec.columns), "column_labels": list(spec.column_labels), "rows": rows}


def to_json(doc: Document) -> str:
    data = {"source": paper_data()["source"], "runs": doc.count, "tables": [table_json(t) for t in doc.tables],
            "commands": {str(k): c for c, k in footnotes(doc).items()}, "skipped": list(doc.skipped),
            "missing": list(doc.missing)}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


RENDERERS = {"text": to_text, "markdown": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}


def render(doc: Document, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise DmgError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    return RENDERERS[fmt](doc)


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


def report(dataset: str, matrix: MatrixParams, metrics_dir: str | Path = "metrics", out_dir: str | Path = "reports",
           data_dir: str | Path = "data", figures: bool = True) -> Document:
    """The report stage: write reports/<dataset>/ (tables, paper tables, figures, index.md)."""
    info = get_dataset(dataset)
    doc = default_document(info.name, matrix, metrics_dir)
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
