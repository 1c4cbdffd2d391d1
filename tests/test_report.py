"""The report stage: paper tables beside ours, formats, bad input, figures, the lambda_O sweep.

Fixture metrics (tests/fixtures/metrics) are hand-written in the schema of stages/evaluate.py.
Golden files (tests/golden) hold the expected output of every table in every format;
after an intended change, regenerate them with `DMG_UPDATE_GOLDEN=1 pytest tests/test_report.py`
and review the diff.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmgcli.cli import app
from dmgcli.core import mean_pairwise_iou
from dmgcli.datasets import get_dataset
from dmgcli.errors import DmgError
from dmgcli.params import MatrixParams, SweepParams
from dmgcli.results import details_path, headline
from stages import plots, report, sweep

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "golden"
PAPER_TEXT = HERE.resolve().parents[1] / "shared" / "paper" / "dmg_paper.txt"
SEEDS = (0, 1)
MATRIX = MatrixParams(targets=("rot0", "rot30"), methods=("aggregate", "multihead", "dmg"), backbones=("convnet",),
                      seeds=SEEDS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DMG_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing; create it with DMG_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"output differs from {path}"


@pytest.fixture
def in_fixtures(monkeypatch):
    """Run from tests/fixtures so file names in the output are relative (metrics/...)."""
    monkeypatch.chdir(FIXTURES)


@pytest.fixture
def metrics(tmp_path) -> Path:
    """A writable copy of the fixture metrics."""
    shutil.copytree(FIXTURES / "metrics", tmp_path / "metrics")
    return tmp_path / "metrics"


def cell(table: report.FilledTable, label: str, backbone: str, column: str) -> report.Cell:
    row = next(r for r in table.rows if r.spec.label == label and r.spec.backbone == backbone)
    return row.cells[(*table.spec.columns, "overall").index(column)]


# ----------------------------------------------------------------------------- paper numbers

def test_paper_tables_have_the_papers_layout():
    data = report.paper_data()
    assert data["source"]["venue"] == "ECCV 2020" and "Specificity and Invariance" in data["source"]["title"]
    shapes = {"1": ("domainnet", 10), "2": ("pacs", 21), "3": ("domainnet", 13)}
    for number, (dataset, rows) in shapes.items():
        table = data["tables"][number]
        assert table["caption"].startswith(f"Table {number}: ")
        assert table["dataset"] == dataset and len(table["rows"]) == rows
        assert tuple(table["columns"]) == get_dataset(dataset).domains
        for row in table["rows"]:
            assert len(row["values"]) == len(table["columns"]) + 1
            assert row["method"] in (None, "aggregate", "multihead", "dmg")
            # The paper's Overall is the mean of its columns (prior work rounded to 0.05), except
            # where the paper itself disagrees, which the row's note says.
            if "note" not in row:
                assert abs(statistics.fmean(row["values"][:-1]) - row["values"][-1]) <= 0.051, row["label"]


@pytest.mark.skipif(not PAPER_TEXT.exists(), reason="paper text not available")
def test_paper_numbers_are_the_papers_text():
    """Every transcribed row appears, number for number, as a line of the paper's table text."""
    lines = PAPER_TEXT.read_text().splitlines()
    for table in report.paper_data()["tables"].values():
        for row in table["rows"]:
            numbers = "\t".join(f"{v:.2f}" for v in row["values"])
            assert any(line.endswith("\t" + numbers) for line in lines), row


# ----------------------------------------------------------------------------- cells

def test_cells_average_seeds_and_compare_with_the_paper(in_fixtures):
    table = report.paper_document(1, "metrics", SEEDS).tables[0]
    clipart = cell(table, "DMG (Ours)", "alexnet", "clipart")
    assert clipart.ours.mean == pytest.approx(49.2) and clipart.ours.n == 2 and clipart.ours.seeds == (0, 1)
    assert clipart.ours.std == pytest.approx(statistics.stdev([48.9, 49.5]))
    assert clipart.paper == 49.27 and clipart.diff == pytest.approx(-0.07)
    overall = cell(table, "DMG (Ours)", "alexnet", "overall")  # per seed the mean of the six targets
    per_seed = [statistics.fmean([48.9, 11.2, 33.1, 13.0, 45.2, 28.7]),
                statistics.fmean([49.5, 10.6, 34.0, 13.6, 44.4, 29.5])]
    assert overall.ours.mean == pytest.approx(statistics.fmean(per_seed))
    assert overall.ours.std == pytest.approx(statistics.stdev(per_seed)) and overall.paper == 30.18
    real = cell(table, "Multi-Headed", "resnet50", "real")
    assert real.ours.n == 3 and real.ours.mean == pytest.approx(57.6)


def test_missing_cells_carry_the_command_and_unimplemented_rows_only_paper(in_fixtures):
    table = report.paper_document(1, "metrics", (0,)).tables[0]
    missing = cell(table, "Aggregate", "alexnet", "infograph")
    assert missing.ours is None and missing.paper == 9.88
    assert missing.command == (
        "dmg train --dataset domainnet --target infograph --backbone alexnet --method aggregate --seed 0 --pretrained"
        " && dmg evaluate --dataset domainnet --target infograph --backbone alexnet --method aggregate --seed 0")
    assert cell(table, "Aggregate", "alexnet", "overall").ours is None  # not every target ran
    metareg = next(r for r in table.rows if r.spec.label == "MetaReg [1]")
    assert all(c.ours is None and c.command is None for c in metareg.cells)
    several = report.paper_document(1, "metrics", (0, 1, 2)).tables[0]
    assert cell(several, "Aggregate", "alexnet", "infograph").command.startswith("for seed in 0 1 2; do dmg train")


def test_in_domain_table_uses_the_evaluation_modes(in_fixtures):
    table = report.paper_document(3, "metrics", SEEDS).tables[0]
    average = cell(table, "DMG (Ours)", "alexnet", "clipart")
    known = cell(table, "DMG-KnownDomain (Ours)", "alexnet", "clipart")
    assert average.ours.mean == pytest.approx(statistics.fmean([49.0, 49.5]))  # fixture: 47 + j, mean of 5 = 49
    assert known.ours.mean == pytest.approx(average.ours.mean + 2.0)


def test_default_tables_follow_the_matrix_and_list_missing_files(in_fixtures):
    doc = report.default_document("digits", MATRIX, "metrics")
    ood, ind = doc.tables
    assert [r.spec.label for r in ood.rows] == ["Aggregate", "Multi-Headed", "DMG"]
    assert [r.spec.label for r in ind.rows] == ["Aggregate", "Multi-Headed", "Multi-Headed (own head)", "DMG",
                                                "DMG-KnownDomain"]
    assert cell(ood, "Aggregate", "convnet", "rot0").ours.mean == pytest.approx(71.0)
    assert "metrics/digits/convnet/dmg/rot30/seed1.json" in doc.missing
    assert len(doc.missing) == 5 and doc.count == 7


# ----------------------------------------------------------------------------- golden files

@pytest.mark.parametrize("fmt", report.FORMATS)
@pytest.mark.parametrize("number", [1, 2, 3])
def test_paper_table_golden(in_fixtures, number, fmt):
    doc = report.paper_document(number, "metrics", SEEDS)
    check_golden(f"table{number}.{report.EXTENSIONS[fmt]}", report.render(doc, fmt))


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_default_tables_golden(in_fixtures, fmt):
    doc = report.default_document("digits", MATRIX, "metrics")
    check_golden(f"default.{report.EXTENSIONS[fmt]}", report.render(doc, fmt))


def test_machine_formats_parse(in_fixtures):
    doc = report.paper_document(2, "metrics", SEEDS)
    data = json.loads(report.render(doc, "json"))
    row = next(r for r in data["tables"][0]["rows"] if r["backbone"] == "resnet18" and r["method"] == "dmg")
    sketch = row["cells"]["sketch"]  # fixture: from scratch, 30 epochs, 128 px: no diff across protocols
    assert sketch["ours"]["mean"] == 74.1 and sketch["diff"] is None
    assert data["notes"][sketch["mark"]] == "from scratch; 30 of 150 epochs; stored at 128 px (vs the paper's protocol)"
    table1 = json.loads(report.render(report.paper_document(1, "metrics", SEEDS), "json"))
    row = next(r for r in table1["tables"][0]["rows"] if r["backbone"] == "alexnet" and r["method"] == "dmg")
    assert row["cells"]["clipart"]["diff"] == -0.07 and row["cells"]["clipart"]["mark"] is None
    lines = report.render(doc, "csv").splitlines()
    assert len(lines) == 1 + 21 * 5  # header + (rows x (4 targets + overall))
    latex = report.render(report.paper_document(1, "metrics", SEEDS), "latex")
    assert "49.20 $\\pm$ 0.42" in latex and "\\$" not in latex  # math stays math
    assert "& -\\#1 &" in latex  # footnote marks escaped


def test_unknown_table_and_format_are_errors():
    with pytest.raises(DmgError, match="tables 1, 2, 3"):
        report.paper_table(4)
    with pytest.raises(DmgError, match="valid: text, markdown"):
        report.render(report.Document((), report.Runs("digits")), "html")


# ----------------------------------------------------------------------------- bad input

def test_partial_and_misplaced_files_are_skipped_by_name(metrics):
    truncated = metrics / "pacs/resnet18/dmg/photo/seed0.json"
    details_path(truncated).write_text(details_path(truncated).read_text()[:200])
    headline_only = metrics / "pacs/resnet18/dmg/cartoon/seed0.json"
    details_path(headline_only).unlink()
    no_accuracy = metrics / "pacs/alexnet/aggregate/sketch/seed0.json"
    data = json.loads(no_accuracy.read_text())
    del data["out_of_domain"]
    no_accuracy.write_text(json.dumps(data))
    stray = metrics / "pacs/notes.json"
    stray.write_text("{}")
    runs = report.load_runs(metrics, "pacs")
    assert runs.skipped == [f"{no_accuracy}: missing out_of_domain.accuracy", f"{stray}: not at "
                            "<backbone>/<method>/<target>/seed<N>.json",
                            f"{headline_only}: headline only: seed0.details.json is missing beside it",
                            f"{truncated}: seed0.details.json: not valid JSON (truncated or partly written?)"]
    table = report.fill(report.paper_table(2), runs, (0,))
    assert cell(table, "DMG (Ours)", "resnet18", "photo").ours is None
    assert cell(table, "DMG (Ours)", "resnet18", "sketch").ours.mean == pytest.approx(74.1)


def test_a_missing_metrics_folder_gives_empty_cells(tmp_path):
    table = report.paper_document(2, tmp_path / "nothing", (0,)).tables[0]
    assert all(c.ours is None for r in table.rows for c in r.cells)


def _move(src: Path, dst: Path) -> None:
    """Copy a metrics file (and its details file, when it has one) to another place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    if details_path(src).exists():
        shutil.copy(details_path(src), details_path(dst))


@pytest.mark.parametrize("what, message", [
    ("backbone", "backbone='convnet' but lies in the folder of backbone='alexnet'"),
    ("dataset", "dataset='digits' but lies in the folder of dataset='pacs'"),
    ("seed", "seed=0 but lies in the folder of seed=5"),
    ("sources", "different source domains"),
])
def test_mismatched_settings_in_one_cell_are_refused(metrics, what, message):
    good = metrics / "digits/convnet/dmg/rot0/seed0.json"
    dataset = "digits"
    if what == "backbone":
        _move(good, metrics / "digits/alexnet/dmg/rot0/seed0.json")
    elif what == "dataset":
        _move(good, metrics / "pacs/convnet/dmg/rot0/seed0.json")
        dataset = "pacs"
    elif what == "seed":
        _move(good, metrics / "digits/convnet/dmg/rot0/seed5.json")
    else:
        other = details_path(metrics / "digits/convnet/dmg/rot0/seed1.json")
        data = json.loads(other.read_text())
        data["sources"] = data["sources"][:-1]
        other.write_text(json.dumps(data))
    with pytest.raises(DmgError, match=message):
        report.load_runs(metrics, dataset)


def _set_protocol(headline: Path, **changes) -> None:
    details = details_path(headline)
    data = json.loads(details.read_text())
    data["protocol"].update(changes)
    details.write_text(json.dumps(data))


def test_seeds_under_different_protocols_are_refused_naming_the_keys(metrics):
    _set_protocol(metrics / "digits/convnet/dmg/rot0/seed1.json", epochs=2, batch_size=32)
    with pytest.raises(DmgError, match=r"different protocols \(epochs 2 vs 96, batch_size 32 vs 64\)"):
        report.load_runs(metrics, "digits")


def test_a_scratch_run_and_a_pretrained_run_of_one_cell_are_reported_differently(metrics):
    sketch = metrics / "pacs/resnet18/dmg/sketch/seed0.json"
    scratch = cell(report.paper_document(2, metrics, (0,)).tables[0], "DMG (Ours)", "resnet18", "sketch")
    assert scratch.marks == ("from scratch; 30 of 150 epochs; stored at 128 px (vs the paper's protocol)",)
    assert scratch.diff is None and scratch.ours.mean == pytest.approx(74.1)
    _set_protocol(sketch, pretrained=True, weights="imagenet (torchvision)", epochs=150, image_size=256)
    table = report.paper_document(2, metrics, (0,)).tables[0]
    paper_protocol = cell(table, "DMG (Ours)", "resnet18", "sketch")
    assert paper_protocol.marks == () and paper_protocol.diff == pytest.approx(74.1 - 75.21)
    overall = cell(table, "DMG (Ours)", "resnet18", "overall")  # the other three targets are still from scratch
    assert overall.diff is None and "from scratch" in overall.note
    text = report.render(report.paper_document(2, metrics, (0,)), "text")
    assert "74.10 [" not in text and "-1.11" in text


def test_old_metrics_unfinished_runs_and_other_lambda_are_marked(in_fixtures, metrics):
    table = report.paper_document(2, "metrics", SEEDS).tables[0]
    assert cell(table, "Aggregate*", "alexnet", "sketch").marks == ("protocol unknown (seed 0)",)
    ood = report.default_document("digits", MATRIX, "metrics").tables[0]
    assert cell(ood, "DMG", "convnet", "rot30").marks == ("unfinished run (seed 0: 2 of 96 epochs)",)
    assert cell(ood, "DMG", "convnet", "rot0").marks == ()  # the digits defaults
    for seed in (0, 1):
        _set_protocol(metrics / f"digits/convnet/dmg/rot0/seed{seed}.json", overlap_lambda=0.5)
    ood = report.default_document("digits", MATRIX, metrics).tables[0]
    assert cell(ood, "DMG", "convnet", "rot0").marks == ("lambda_O 0.5 (not 0.1) (vs the defaults)",)


def _folder_run(metrics: Path, name: str, method: str, target: str, **protocol) -> None:
    """A metrics file of a folder dataset's run: a copy of a digits DMG run, renamed."""
    data = json.loads((FIXTURES / "metrics/digits/convnet/dmg/rot0/seed0.details.json").read_text())
    data.update(dataset=name, method=method, target=target, sources=["b", "c"])
    data["protocol"].update(protocol)
    folder = metrics / name / "convnet" / method / target
    folder.mkdir(parents=True)
    (folder / "seed0.details.json").write_text(json.dumps(data))
    (folder / "seed0.json").write_text(json.dumps(headline(data)))  # a headline must be its details' own


@pytest.fixture
def declared():
    """A folder dataset `mydata` (domains a, b, c) declared at 32 px without crops, as in params.yaml."""
    from dmgcli.datasets import declare
    from dmgcli.params import FolderDatasetParams, Params

    declare(Params(datasets={"mydata": FolderDatasetParams(domains=("a", "b", "c"), image_size=32,
                                                           augmentation="none")}))
    yield
    declare(Params())


def test_a_folder_datasets_declared_size_is_no_deviation_but_a_changed_schedule_is(metrics, declared):
    """Marks compare with the protocol that applies: the declaration (32 px, no crops) and the
    `default` schedule it names (DMG 75 epochs, lr 1e-4), not the digits or the paper's."""
    follows = dict(image_size=32, crop=None, epochs=75, schedule_epochs=75, epochs_run=75, lr=1e-4, mask_lr=1e-4)
    _folder_run(metrics, "mydata", "dmg", "a", **follows)
    _folder_run(metrics, "mydata", "aggregate", "a", **{**follows, "epochs": 50, "schedule_epochs": 50})
    # params.yaml's `default` schedule edited to 20 epochs at lr 1e-3: the run says 20 of its 20
    _folder_run(metrics, "mydata", "dmg", "b", **{**follows, "epochs": 20, "schedule_epochs": 20, "lr": 1e-3})
    _folder_run(metrics, "mydata", "dmg", "c", **{**follows, "image_size": 64})
    matrix = MatrixParams(targets=("a", "b", "c"), methods=("aggregate", "dmg"), backbones=("convnet",), seeds=(0,))
    ood = report.default_document("mydata", matrix, metrics).tables[0]
    assert cell(ood, "DMG", "convnet", "a").marks == () and cell(ood, "Aggregate", "convnet", "a").marks == ()
    assert cell(ood, "DMG", "convnet", "b").marks == ("20 of 75 epochs; lr 0.001 (not 0.0001) (vs mydata's declaration)",)
    assert cell(ood, "DMG", "convnet", "c").marks == ("stored at 64 px (vs mydata's declaration)",)


def test_a_changed_digits_schedule_is_marked(metrics):
    for seed in (0, 1):  # params.yaml's digits schedule edited: 48 epochs, mask lr 0.05; each run did all its epochs
        _set_protocol(metrics / f"digits/convnet/dmg/rot0/seed{seed}.json", epochs=48, schedule_epochs=48,
                      epochs_run=48, mask_lr=0.05)
    ood = report.default_document("digits", MATRIX, metrics).tables[0]
    assert cell(ood, "DMG", "convnet", "rot0").marks == ("48 of 96 epochs; mask lr 0.05 (not 0.01) (vs the defaults)",)


def test_still_learning_needs_a_late_best_epoch_and_rising_validation():
    from dmgcli.results import still_learning

    assert still_learning([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0], 10)  # rising to the end
    assert not still_learning([10.0, 90.0, 80.0, 85.0, 84.0, 83.0, 82.0, 81.0, 80.0, 79.0], 10)  # best long ago
    flat = [50.0] * 16 + [85.0, 84.0, 83.0, 86.0]  # 20 epochs: best at 20, but the last tenth is no higher
    assert not still_learning(flat, 20)
    assert still_learning([50.0] * 16 + [83.0, 84.0, 85.0, 86.0], 20)
    assert not still_learning([10.0, 20.0], 3)  # not all epochs run
    assert not still_learning([10.0], 1)  # one epoch shows no trend
    assert still_learning([10.0] * 86 + [20.0] * 9 + [21.0], 96)  # best 96 in 87..96, whose mean beats 77..86's


def test_a_run_that_may_not_have_finished_learning_is_marked(metrics):
    details = json.loads((metrics / "digits/convnet/dmg/rot0/seed1.details.json").read_text())
    _set_protocol(metrics / "digits/convnet/dmg/rot0/seed1.json", still_learning=True)
    ood = report.default_document("digits", MATRIX, metrics).tables[0]
    best = details["selection"]["best_epoch"]
    assert cell(ood, "DMG", "convnet", "rot0").marks == (
        f"may not have finished learning (seed 1: best epoch {best} of 96, source validation still rising)",)
    # the Overall counts such columns instead of repeating each run's note
    assert cell(ood, "DMG", "convnet", "overall").marks == (
        "unfinished run (seed 0: 2 of 96 epochs)", "may not have finished learning (1 of 2 targets)")  # the columns shown


def test_the_reports_crop_is_the_training_crop():
    from dmgcli import augment, results

    assert results.CROP == augment.CROP


def test_marks_appear_in_every_format(in_fixtures):
    doc = report.paper_document(2, "metrics", SEEDS)
    note = "from scratch; 30 of 150 epochs; stored at 128 px (vs the paper's protocol)"
    assert "74.10 [b]" in report.render(doc, "text") and f"[b] {note}" in report.render(doc, "text")
    assert "74.10 [b]" in report.render(doc, "markdown") and f"- [b] {note}" in report.render(doc, "markdown")
    assert "74.10 [b]" in report.render(doc, "latex") and f"% [b] {note}" in report.render(doc, "latex")
    rows = [line for line in report.render(doc, "csv").splitlines() if ",resnet18,DMG (Ours),dmg,average,sketch," in line]
    assert len(rows) == 1 and f",,b,{note}," in rows[0]  # no diff, the mark and its note


# ----------------------------------------------------------------------------- figures and summary

def _is_png(path: Path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_MAGIC


def _is_svg(path: Path) -> bool:
    return path.stat().st_size > 0 and "<svg" in path.read_text()[:2000]


def test_report_stage_writes_tables_figures_and_index(tmp_path):
    out = tmp_path / "reports"
    report.report("digits", MATRIX, FIXTURES / "metrics", out, FIXTURES / "data")
    folder = out / "digits"
    for ext in report.EXTENSIONS.values():
        assert (folder / f"tables.{ext}").stat().st_size > 0
    stems = ["figures/curves/convnet-dmg-rot0-seed0", "figures/curves/convnet-aggregate-rot0-seed0",
             "figures/masks/convnet-dmg-rot0-seed0-iou", "figures/masks/convnet-dmg-rot0-seed1-keep",
             "figures/masks/convnet-dmg-rot30-seed0-iou", "figures/lambda_sweep"]
    for stem in stems:
        assert _is_png(folder / f"{stem}.png") and _is_svg(folder / f"{stem}.svg"), stem
    index = (folder / "index.md").read_text()
    for stem in stems:
        assert f"{stem}.png" in index
    for link in [part.split(")")[0] for part in index.split("](")[1:]]:  # every link resolves
        assert (folder / link).exists(), link
    assert "| 1 | 59.50 ± 0.71 |" in index  # the sweep's lambda_O = 1 row
    assert "missing metrics/" in index or "missing " in index


def test_paper_datasets_also_get_the_paper_tables(tmp_path):
    out = tmp_path / "reports"
    report.report("domainnet", MatrixParams(targets=("clipart",), methods=("dmg",), backbones=("alexnet",),
                                            seeds=(0,)), FIXTURES / "metrics", out, tmp_path, figures=False)
    for name in ("tables", "table1", "table3"):
        assert (out / "domainnet" / f"{name}.md").exists()
    tables = (out / "domainnet" / "tables.txt").read_text()
    assert "paper" in tables and "49.27" in tables  # the paper's number beside our DMG row


def test_keep_probability_plot_without_histogram_draws_bars(tmp_path):
    data = json.loads((FIXTURES / "metrics/digits/convnet/dmg/rot0/seed0.details.json").read_text())
    del data["masks"]["keep_probability_histogram"]
    plots.plot_keep(data["masks"], data["sources"], tmp_path / "keep", "bars")
    assert _is_png(tmp_path / "keep.png") and _is_svg(tmp_path / "keep.svg")


def test_unreadable_inputs_are_listed_not_fatal(tmp_path, metrics):
    log = tmp_path / "data/runs/digits/convnet/dmg/rot0/seed0/log.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,loss\n")
    record = metrics / "digits/convnet/dmg/rot0/seed0.json"
    data = json.loads(details_path(record).read_text())
    del data["masks"]["iou"]
    details_path(record).write_text(json.dumps(data))
    figures = plots.draw_report_figures("digits", report.load_runs(metrics, "digits"), tmp_path / "data",
                                        tmp_path / "out")
    assert any(str(log) in p for p in figures.problems)
    assert any(str(record) in p and "masks incomplete" in p for p in figures.problems)
    assert len(figures.masks) == 2  # the two intact DMG runs


# ----------------------------------------------------------------------------- sweep

def test_sweep_summary_averages_targets_then_seeds():
    points = [{"lambda": 0.1, "target": t, "seed": s, "out_of_domain": o, "in_domain": 50.0, "in_domain_known": 60.0,
               "mean_iou": 0.5} for t, s, o in (("a", 0, 10.0), ("b", 0, 20.0), ("a", 1, 30.0), ("b", 1, 40.0))]
    (row,) = sweep.summarize(points, (0.1,))
    assert row["out_of_domain"]["mean"] == pytest.approx(25.0)
    assert row["out_of_domain"]["std"] == pytest.approx(statistics.stdev([15.0, 35.0])) and row["mean_iou"]["n"] == 2
    masks = {"points": ["a", "b"], "iou": {"a": [[1, 0.2], [0.2, 1]], "b": [[1, 0.6], [0.6, 1]]}}
    assert mean_pairwise_iou([masks["iou"][p] for p in masks["points"]]) == pytest.approx(0.4)
    metrics = {"out_of_domain": {"accuracy": 1.0}, "in_domain": {"average": {"mean": 2.0}, "known_domain": {"mean": 3.0}},
               "masks": {**masks, "mean_pairwise_iou": 0.25}}
    assert sweep.measure(metrics)["mean_iou"] == 0.25  # the value the evaluation recorded


def test_sweep_settings_are_checked():
    digits = get_dataset("digits")
    with pytest.raises(DmgError, match="unknown domain 'sketch'"):
        sweep.check_settings(digits, SweepParams(targets=("sketch",)))
    with pytest.raises(DmgError, match=">= 0"):
        sweep.check_settings(digits, SweepParams(lambdas=(-1.0,)))
    with pytest.raises(DmgError, match="at least one"):
        sweep.check_settings(digits, SweepParams(lambdas=()))


@pytest.mark.slow
def test_sweep_runs_end_to_end_on_digits(tmp_path, monkeypatch):
    """Download, preprocess, sweep the default lambda_O values for one epoch each, then report it (about a minute)."""
    monkeypatch.chdir(tmp_path)
    # the schedule's epochs, not --epochs: the summary must say how many that was (it said "None")
    (tmp_path / "params.yaml").write_text("dataset: digits\ndata_dir: data\nmatrix:\n  targets: [rot0]\n"
                                          "  methods: [dmg]\n  seeds: [0]\n"
                                          "train:\n  schedules:\n    digits: {epochs: 1, baseline_epochs: 1, lr: 1.0e-3, "
                                          "mask_lr: 1.0e-2, weight_decay: 0.0, lr_schedule: constant}\n")
    for args in (["download", "digits"], ["preprocess", "digits"], ["sweep"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "data/sweeps/digits/sweep.json").read_text())
    assert summary["epochs"] == 1
    assert [r["lambda"] for r in summary["summary"]] == [0.0, 0.1, 1.0]
    for row in summary["summary"]:
        assert 0 <= row["out_of_domain"]["mean"] <= 100 and 0 <= row["mean_iou"]["mean"] <= 1
    assert _is_png(tmp_path / "data/sweeps/digits/lambda_sweep.png")
    for lam in ("0", "0.1", "1"):  # the default lambda_O values
        assert (tmp_path / f"data/sweeps/digits/lambda{lam}/rot0/seed0/metrics.json").exists()
    result = runner.invoke(app, ["report", "--no-figures"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert _is_png(tmp_path / "reports/digits/figures/lambda_sweep.png")
    index = (tmp_path / "reports/digits/index.md").read_text()
    assert "λ_O sweep" in index and "1 epochs; one seed" in index and "None" not in index


def test_old_sweep_summaries_without_epochs_say_the_schedule():
    summary = json.loads((FIXTURES / "data/sweeps/digits/sweep.json").read_text())
    summary["epochs"] = None
    assert "targets rot0, the schedule's epochs; mean ± std over 2 seeds" in sweep.summary_markdown(summary)


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A temporary project: the fixture metrics and run logs, a params.yaml with two seeds."""
    shutil.copytree(FIXTURES / "metrics", tmp_path / "metrics")
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(
        "dataset: digits\ndata_dir: data\nmatrix:\n  targets: [rot0, rot30]\n  seeds: [0, 1]\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("number", [1, 2, 3])
def test_cli_table_prints_the_golden_table(project, number):
    result = runner.invoke(app, ["report", "--table", str(number), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / f"table{number}.md").read_text()
    assert not (project / "reports").exists()  # --table only prints


def test_cli_default_report_writes_the_folder_and_prints_text(project):
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / "default.txt").read_text()
    assert "warning: missing metrics/digits/convnet/dmg/rot30/seed1.json" in result.stderr
    assert (project / "reports/digits/index.md").exists()
    assert _is_png(project / "reports/digits/figures/lambda_sweep.png")


def test_cli_out_file_and_formats(project):
    result = runner.invoke(app, ["report", "--table", "2", "--format", "latex", "--out", "t2.tex"])
    assert result.exit_code == 0, result.output
    assert (project / "t2.tex").read_text() == (GOLDEN / "table2.tex").read_text()
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--table", "4"], "unknown table 4"),
    (["--format", "html"], "unknown report format 'html'"),
    (["--table", "2", "--dataset", "domainnet"], "table 2 is pacs"),
])
def test_cli_bad_options_are_one_line_errors(project, args, message):
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output


def test_cli_skips_partial_files_and_refuses_mismatched_ones(project):
    partial = project / "metrics/domainnet/alexnet/aggregate/clipart/seed0.json"
    partial.write_text("{")
    result = runner.invoke(app, ["report", "--table", "1"])
    assert result.exit_code == 0
    assert f"warning: skipped {Path('metrics/domainnet/alexnet/aggregate/clipart/seed0.json')}" in result.stderr
    _move(project / "metrics/domainnet/alexnet/dmg/real/seed0.json",
          project / "metrics/domainnet/resnet18/dmg/real/seed0.json")
    result = runner.invoke(app, ["report", "--table", "1"])
    assert result.exit_code == 1
    assert "dmg: error:" in result.stderr and "backbone='alexnet'" in result.stderr


def test_default_tables_of_another_dataset_than_the_matrix_come_from_its_runs(in_fixtures):
    doc = report.default_document("pacs", MATRIX, "metrics")  # MATRIX names digits targets
    ood = doc.tables[0]
    assert [(r.spec.backbone, r.spec.label) for r in ood.rows] == [("alexnet", "Aggregate"), ("resnet18", "DMG")]
    assert doc.missing == ()
    sketch = cell(ood, "DMG", "resnet18", "sketch")  # the paper's Table 2 number beside ours
    assert sketch.paper == 75.21 and sketch.ours.mean == pytest.approx(74.1)


def test_default_tables_show_the_matrix_targets_and_those_with_runs(in_fixtures, tmp_path):
    """A matrix of some targets tabulates those (and any target with runs), its Overall is the mean
    of the columns shown, and a paper row keeps its numbers for those columns but not its Overall."""
    pacs = MatrixParams(targets=("sketch",), methods=("aggregate",), backbones=("alexnet",), seeds=(0,))
    ood = report.default_document("pacs", pacs, "metrics").tables[0]
    assert ood.spec.columns == ("art_painting", "cartoon", "photo", "sketch")  # resnet18 DMG has all four
    shutil.copytree("metrics/pacs/alexnet", tmp_path / "pacs" / "alexnet")  # sketch only
    ood = report.default_document("pacs", pacs, tmp_path).tables[0]
    assert ood.spec.columns == ("sketch",)
    aggregate = next(r for r in ood.rows if r.spec.label == "Aggregate")
    table2 = next(r for r in report.paper_table(2).rows if (r.backbone, r.method) == ("alexnet", "aggregate"))
    assert aggregate.spec.paper == (table2.paper[3], None)  # the paper's sketch number, no paper Overall
    assert aggregate.cells[-1].ours.mean == aggregate.cells[0].ours.mean  # Overall of the one column
    doc = report.default_document("pacs", pacs, tmp_path)
    for fmt in report.FORMATS:  # every format renders a paper row without its Overall
        assert "sketch" in report.render(doc, fmt)
    assert f"| AlexNet | Aggregate | paper | {table2.paper[3]:.2f} | - |" in report.render(doc, "markdown")
