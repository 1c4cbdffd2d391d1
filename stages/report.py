"""Stage 5, report: the out-of-domain and in-domain tables of the runs that exist.

Reads every metrics JSON under metrics/<dataset>/ (written by evaluate), groups them into
cells (backbone, method, target), averages seeds, and writes tables as Markdown, CSV and JSON.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dmgcli.datasets import get_dataset
from dmgcli.fileio import write_json, write_text

METHOD_ORDER = ["aggregate", "multihead", "dmg"]
ROW_LABELS = {"aggregate": "Aggregate", "multihead": "Multi-Headed", "dmg": "DMG",
              "dmg/known_domain": "DMG-KnownDomain", "multihead/known_domain": "Multi-Headed (own head)"}


def load_metrics(metrics_dir: str | Path, dataset: str) -> tuple[list[dict], list[str]]:
    """All readable metrics files of a dataset, and the names of those that could not be read."""
    records, skipped = [], []
    for path in sorted(Path(metrics_dir, dataset).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
            record["out_of_domain"]["accuracy"], record["in_domain"]["average"]["mean"]  # noqa: B018 - schema check
            records.append(record)
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(str(path))
    return records, skipped


def cell(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_tables(records: list[dict], domains: tuple[str, ...]) -> dict:
    """{"out_of_domain": {row: {target: cell}}, "in_domain": {row: {target: cell}}}; rows are backbone/method."""
    values = {"out_of_domain": defaultdict(lambda: defaultdict(list)), "in_domain": defaultdict(lambda: defaultdict(list))}
    for r in records:
        base = f"{r['backbone']}/{r['method']}"
        values["out_of_domain"][base][r["target"]].append(r["out_of_domain"]["accuracy"])
        for mode, result in r["in_domain"].items():
            row = base if mode == "average" else f"{base}/{mode}"
            values["in_domain"][row][r["target"]].append(result["mean"])
    tables = {}
    for name, rows in values.items():
        table = {}
        for row in sorted(rows, key=_row_key):
            cells = {t: cell(rows[row][t]) for t in domains if rows[row].get(t)}
            if len(cells) == len(domains):  # overall only when every target has a run
                cells["overall"] = cell([statistics.fmean(rows[row][t]) for t in domains])
            table[row] = cells
        tables[name] = table
    return tables


def _row_key(row: str):
    backbone, method, *mode = row.split("/")
    return backbone, METHOD_ORDER.index(method) if method in METHOD_ORDER else 99, mode


def row_label(row: str) -> str:
    backbone, rest = row.split("/", 1)
    return f"{backbone} {ROW_LABELS.get(rest, rest)}"


def format_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    return f"{c['mean']:.2f}" + (f" ± {c['std']:.2f} (n={c['n']})" if c["n"] > 1 else "")


def to_markdown(table: dict, columns: list[str], title: str) -> str:
    lines = [f"### {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, cells in table.items():
        lines.append(f"| {row_label(row)} | " + " | ".join(format_cell(cells.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(tables: dict, columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["table", "backbone", "method", "column", "mean", "std", "n"])
    for name, table in tables.items():
        for row, cells in table.items():
            backbone, method = row.split("/", 1)
            for column in columns:
                if column in cells:
                    c = cells[column]
                    writer.writerow([name, backbone, method, column, f"{c['mean']:.4f}", f"{c['std']:.4f}", c["n"]])
    return buf.getvalue()


def report(dataset: str, metrics_dir: str | Path = "metrics", out_dir: str | Path = "reports") -> str:
    """Write reports/<dataset>/{tables.md,results.csv,results.json}; returns the Markdown."""
    info = get_dataset(dataset)
    records, skipped = load_metrics(metrics_dir, dataset)
    for path in skipped:
        print(f"warning: skipped unreadable metrics file {path}", file=sys.stderr)
    tables = build_tables(records, info.domains)
    columns = list(info.domains) + ["overall"]
    text = (to_markdown(tables["out_of_domain"], columns, f"{dataset}: out-of-domain accuracy (%), column = target")
            + "\n" + to_markdown(tables["in_domain"], columns,
                                 f"{dataset}: in-domain accuracy (%), mean over source test splits, column = target"))
    out = Path(out_dir) / dataset
    write_text(out / "tables.md", text)
    write_text(out / "results.csv", to_csv(tables, columns))
    write_json(out / "results.json", {"dataset": dataset, "runs": len(records), "skipped": skipped, "tables": tables})
    return text
