"""What the report renders: table layouts (`RowSpec`, `TableSpec`), the filled tables
(`Cell`, `FilledRow`, `FilledTable`) and the `Document` of tables rendered together.
stages/report.py fills them, stages/report_formats.py renders them; both import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from dmgcli.results import Runs, Stat


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


@dataclass(frozen=True)
class Cell:
    paper: float | None
    ours: Stat | None
    command: str | None = None  # produces the missing run(s) behind an empty cell
    marks: tuple[str, ...] = ()  # how its runs differ from the reference protocol, unfinished runs, ...

    @property
    def diff(self) -> float | None:
        """ours - paper, from our mean rounded as printed so the three numbers agree; only for
        cells whose runs follow the paper's protocol (a marked cell compares across protocols)."""
        if self.paper is None or self.ours is None or self.marks:
            return None
        return round(round(self.ours.mean, 2) - self.paper, 2) + 0.0  # + 0.0: no "-0.00"

    @property
    def note(self) -> str | None:
        """The footnote text of a marked cell."""
        return "; ".join(self.marks) or None


@dataclass(frozen=True)
class FilledRow:
    spec: RowSpec
    cells: tuple[Cell, ...]  # one per column, then Overall


@dataclass(frozen=True)
class FilledTable:
    spec: TableSpec
    rows: tuple[FilledRow, ...]


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
