"""The report's formats: text, markdown, csv, latex and json of one Document (stages/report_document.py).

Every format carries the same content: the paper's numbers, ours (mean ± sample std, n), the
diff where our runs follow the paper's protocol, a mark [x] on cells whose runs are
unfinished or differ from the reference protocol with note [x] naming the differences, and
the command #k that makes an empty cell.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass

from dmgcli.errors import DmgError
from dmgcli.results import paper_data
from stages.report_document import Cell, Document, FilledRow, FilledTable

FORMATS = ("text", "markdown", "csv", "latex", "json")
EXTENSIONS = {"text": "txt", "markdown": "md", "csv": "csv", "latex": "tex", "json": "json"}


def legend(doc: Document) -> str:
    paper = any(row.spec.paper for table in doc.tables for row in table.rows)
    return ("ours: mean ± sample std over n seeds"
            + ("; diff = ours - paper, only where our runs follow the paper's protocol" if paper else "")
            + "; [x] = runs unlike the reference protocol or unfinished, see note [x]"
            + "; -#k = no run yet, made by command #k below.")


@dataclass(frozen=True)
class Notes:
    """The footnotes of a document: commands of empty cells (#1, #2, ...) and marks ([a], [b], ...)."""
    commands: dict[str, int]  # command -> k
    marks: dict[str, str]  # note text -> letter


def footnotes(doc: Document) -> Notes:
    """Number each distinct command and letter each distinct mark, in order of appearance
    (a DMG run fills DMG and DMG-KnownDomain, which share them)."""
    commands: dict[str, int] = {}
    marks: dict[str, str] = {}
    for table in doc.tables:
        for row in table.rows:
            for cell in row.cells:
                if cell.command and cell.command not in commands:
                    commands[cell.command] = len(commands) + 1
                if cell.note and cell.note not in marks:
                    marks[cell.note] = mark_letter(len(marks))
    return Notes(commands, marks)


def mark_letter(i: int) -> str:
    """a, b, ..., z, aa, ab, ..."""
    return (mark_letter(i // 26 - 1) if i >= 26 else "") + chr(ord("a") + i % 26)


def row_n(row: FilledRow) -> int | None:
    """The number of seeds when every filled cell of the row has the same; else None."""
    ns = {c.ours.n for c in row.cells if c.ours}
    return ns.pop() if len(ns) == 1 else None


def ours_text(cell: Cell, common_n: int | None, notes: Notes) -> str:
    if cell.ours is None:
        return f"-#{notes.commands[cell.command]}" if cell.command else "-"
    text = f"{cell.ours.mean:.2f}" + (f"±{cell.ours.std:.2f}" if cell.ours.n > 1 else "")
    text = text if cell.ours.n == common_n else f"{text} (n={cell.ours.n})"
    return f"{text} [{notes.marks[cell.note]}]" if cell.note else text


def sub_rows(row: FilledRow, notes: Notes) -> list[tuple[str, list[str]]]:
    """(sub-label, cell texts) lines of one row: paper, ours, diff, as far as the row has them."""
    lines = []
    if row.spec.paper:
        # "-": a paper number the table does not show (its Overall when only some targets are columns)
        lines.append(("paper", ["-" if c.paper is None else f"{c.paper:.2f}" for c in row.cells]))
    if row.spec.method:
        n = row_n(row)
        lines.append((f"ours (n={n})" if n else "ours", [ours_text(c, n, notes) for c in row.cells]))
        if any(c.diff is not None for c in row.cells):
            lines.append(("diff", ["-" if c.diff is None else f"{c.diff:+.2f}" for c in row.cells]))
    return lines


def grid(table: FilledTable, notes: Notes) -> list[list[str]]:
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


def command_list(notes: Notes) -> list[str]:
    return [f"#{k} {command}" for command, k in notes.commands.items()]


def mark_list(notes: Notes) -> list[str]:
    return [f"[{letter}] {text}" for text, letter in notes.marks.items()]


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
    return ("\n\n".join(blocks) + "\n\n" + legend(doc) + "\n"
            + "".join(line + "\n" for line in mark_list(notes) + command_list(notes)))


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
    marks = [f"- [{letter}] {text}" for text, letter in notes.marks.items()]
    commands = [f"- #{k} `{command}`" for command, k in notes.commands.items()]
    return ("\n\n".join(blocks) + "\n\n" + legend(doc) + "\n"
            + "".join("\n" + "\n".join(part) + "\n" for part in (marks, commands) if part))


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
    comments = [f"% {line}" for line in [legend(doc)] + mark_list(notes) + command_list(notes)]
    return "\n\n".join(blocks) + "\n" + "\n".join(comments) + "\n"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def to_csv(doc: Document) -> str:
    """One line per cell: the paper's number, ours (mean, std, n, seeds), the difference, the command."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "dataset", "kind", "backbone", "row", "method", "mode", "column", "paper", "ours_mean",
                     "ours_std", "n", "seeds", "diff", "mark", "note", "command"])
    notes = footnotes(doc)
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
                                 "" if cell.diff is None else f"{cell.diff:.2f}",
                                 notes.marks[cell.note] if cell.note else "", cell.note or "", cell.command or ""])
    return buf.getvalue()


def table_json(table: FilledTable, notes: Notes) -> dict:
    spec = table.spec
    rows = []
    for row in table.rows:
        cells = {}
        for column, cell in zip((*spec.columns, "overall"), row.cells):
            ours = cell.ours and {"mean": _round(cell.ours.mean), "std": _round(cell.ours.std), "n": cell.ours.n,
                                  "seeds": list(cell.ours.seeds)}
            cells[column] = {"paper": cell.paper, "ours": ours, "diff": cell.diff, "command": cell.command,
                             "mark": notes.marks[cell.note] if cell.note else None, "marks": list(cell.marks)}
        rows.append({"backbone": row.spec.backbone, "label": row.spec.label, "method": row.spec.method,
                     "mode": row.spec.mode, "cells": cells})
    return {"name": spec.name, "title": spec.title, "dataset": spec.dataset, "kind": spec.kind,
            "columns": list(spec.columns), "column_labels": list(spec.column_labels), "rows": rows}


def to_json(doc: Document) -> str:
    notes = footnotes(doc)
    data = {"source": paper_data()["source"], "runs": doc.count, "tables": [table_json(t, notes) for t in doc.tables],
            "notes": {letter: text for text, letter in notes.marks.items()},
            "commands": {str(k): c for c, k in notes.commands.items()}, "skipped": list(doc.skipped),
            "missing": list(doc.missing)}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


RENDERERS = {"text": to_text, "markdown": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}


def render(doc: Document, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise DmgError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    return RENDERERS[fmt](doc)
