"""Reading results without torch: metrics files, run protocols, the paper's data, the sweep summary.

The report, its figures and the sweep share this module, so `dmg report` neither imports
torch nor the training stages, and no stage module imports another in a circle.

evaluate writes two files per run (stages/evaluate.py):
  metrics/<dataset>/<backbone>/<method>/<target>/seed<N>.json          headline (DVC metrics)
  metrics/<dataset>/<backbone>/<method>/<target>/seed<N>.details.json  everything: identity,
      per-domain accuracies, masks, and the run's protocol
Metrics files written before the split hold everything in seed<N>.json; they are still read.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import DmgError
from .params import DEFAULT_SCHEDULES, PreprocessParams, TrainParams

CROP = 224  # dmgcli/augment.py's training crop (imported from there it would load torch)

# ----------------------------------------------------------------------------- file names


def metrics_path(metrics_dir: str | Path, dataset: str, backbone: str, method: str, target: str, seed: int) -> Path:
    return Path(metrics_dir) / dataset / backbone / method / target / f"seed{seed}.json"


def details_path(headline: str | Path) -> Path:
    """seed0.json -> seed0.details.json: where the full metrics of a headline file lie."""
    headline = Path(headline)
    return headline.with_name(headline.stem + ".details.json")


def headline(details: dict) -> dict:
    """The few numbers `dvc metrics show` prints for one run (accuracies in %)."""
    in_domain = details["in_domain"]
    numbers = {"out_of_domain": details["out_of_domain"]["accuracy"], "in_domain": in_domain["average"]["mean"]}
    if "known_domain" in in_domain:  # DMG-KnownDomain, or Multi-Headed's own head
        numbers["in_domain_known_domain"] = in_domain["known_domain"]["mean"]
    numbers["best_epoch"] = details["selection"]["best_epoch"]
    return numbers


def sweep_dir(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / "sweeps" / dataset


def summary_path(data_dir: str | Path, dataset: str) -> Path:
    """Where `dmg sweep` leaves its summary; the report stage reads it from there."""
    return sweep_dir(data_dir, dataset) / "sweep.json"


# ----------------------------------------------------------------------------- protocols

# The protocol keys that must agree between the seeds of one table cell. Not compared:
# epochs_run (an unfinished run is marked instead), schedule_epochs, dmg_version, git_commit.
PROTOCOL_KEYS = ("pretrained", "weights", "epochs", "batch_size", "image_size", "crop", "overlap_lambda", "lr",
                 "mask_lr", "augmentation", "precision", "selection")


def paper_data() -> dict:
    """dmgcli/paper_tables.json: the paper's Tables 1-3, its protocols, and where they come from."""
    return json.loads(resources.files("dmgcli").joinpath("paper_tables.json").read_text(encoding="utf-8"))


def reference_protocol(dataset: str, method: str) -> tuple[str, dict]:
    """(what it is, the protocol) a run of `method` on `dataset` is compared with.

    PACS and DomainNet: the paper's. Every other dataset: its own definition (for a folder
    dataset, its declaration in params.yaml: a declared image_size or augmentation is no
    deviation). The schedule (epochs, learning rates) is the built-in one the dataset names, so
    a schedule changed in params.yaml is marked; a schedule only a declaration defines (not
    built in) is the run's own. The start (pretrained or not) is compared only for the paper's
    datasets and digits: for the others it is the user's choice, so its value is None."""
    from .datasets import get_dataset  # the declared folder datasets, registered by the CLI

    info = get_dataset(dataset)
    schedule = DEFAULT_SCHEDULES.get(info.schedule_key)
    timing = {"lr": None, "mask_lr": None, "epochs": None} if schedule is None else {
        "lr": schedule.lr, "mask_lr": schedule.mask_lr,
        "epochs": schedule.epochs if method == "dmg" else schedule.baseline_epochs}
    paper = paper_data()["protocols"]
    if dataset in paper:
        ref = paper[dataset]
        return "the paper's protocol", {**ref, **timing, "epochs": ref["epochs"][method]}
    train, prep = TrainParams(), PreprocessParams()
    declared = getattr(info, "spec", None)  # a folder dataset's declaration
    if dataset == "digits":
        image_size, pretrained = prep.digits_size, False
    else:
        image_size = declared.image_size if declared and declared.image_size else prep.image_size
        pretrained = None
    return (f"{dataset}'s declaration" if declared else "the defaults"), {
        **timing, "pretrained": pretrained, "batch_size": train.batch_size, "image_size": image_size,
        "crop": None if info.augmentation == "none" else CROP, "overlap_lambda": train.overlap_lambda}


def protocol_differences(protocol: dict, reference: dict, method: str) -> list[str]:
    """How a run's protocol differs from the reference, in words ("from scratch; 30 of 150 epochs").

    A reference value None is not compared (epochs: the run's own schedule is the reference)."""
    parts = []
    if reference["pretrained"] is not None and protocol["pretrained"] != reference["pretrained"]:
        parts.append("from scratch" if not protocol["pretrained"] else "ImageNet-pretrained")
    epochs = reference["epochs"] if reference["epochs"] is not None else protocol["schedule_epochs"]
    if protocol["epochs"] != epochs:
        parts.append(f"{protocol['epochs']} of {epochs} epochs")
    if reference["lr"] is not None and protocol["lr"] != reference["lr"]:
        parts.append(f"lr {protocol['lr']:g} (not {reference['lr']:g})")
    if method == "dmg" and reference["mask_lr"] is not None and protocol["mask_lr"] != reference["mask_lr"]:
        parts.append(f"mask lr {protocol['mask_lr']:g} (not {reference['mask_lr']:g})")
    if protocol["batch_size"] != reference["batch_size"]:
        parts.append(f"batch {protocol['batch_size']} (not {reference['batch_size']})")
    if protocol["image_size"] != reference["image_size"]:
        parts.append(f"stored at {protocol['image_size']} px")
    if protocol["crop"] != reference["crop"]:
        parts.append(f"{protocol['crop']} px crops" if protocol["crop"] else "no crops")
    if protocol.get("frozen_trunk"):  # recorded since frozen trunks exist; the paper fine-tunes everything
        parts.append(f"frozen trunk ({protocol.get('trunk_views')} views)")
    if method == "dmg" and protocol["overlap_lambda"] != reference["overlap_lambda"]:
        parts.append(f"lambda_O {protocol['overlap_lambda']:g} (not {reference['overlap_lambda']:g})")
    return parts


def still_learning(val_accuracy: list[float], epochs: int) -> bool:
    """Whether a run may not have finished learning: its best source-validation epoch lies in the
    last tenth of the schedule and validation was still rising there (the last tenth's mean above
    the tenth's before; a single epoch cannot show that). val_accuracy: one value per epoch."""
    tenth = math.ceil(epochs / 10)
    if not val_accuracy or len(val_accuracy) < epochs:
        return False
    best = max(range(epochs), key=lambda e: (val_accuracy[e], -e)) + 1  # the first best, as training selects it
    last, before = val_accuracy[epochs - tenth:epochs], val_accuracy[max(0, epochs - 2 * tenth):epochs - tenth]
    return best > epochs - tenth and bool(before) and statistics.fmean(last) > statistics.fmean(before)


STILL_LEARNING = "may not have finished learning"


def learning_note(records: dict[int, "Record"]) -> str | None:
    """"may not have finished learning (seed 0: best epoch 95 of 96)" for the seeds whose run said so."""
    seeds = [(s, r.data) for s, r in sorted(records.items()) if (r.data.get("protocol") or {}).get("still_learning")]
    if not seeds:
        return None
    return f"{STILL_LEARNING} (" + ", ".join(
        f"seed {s}: best epoch {d['selection']['best_epoch']} of {d['protocol']['epochs']}" for s, d in seeds) + \
        ", source validation still rising)"


def run_marks(records: dict[int, "Record"], dataset: str, method: str) -> tuple[str, ...]:
    """What a reader must know about a cell's runs, in words; empty when they follow the reference."""
    marks = []
    unfinished = [(s, r.data.get("protocol")) for s, r in sorted(records.items()) if r.data.get("finished") is False]
    if unfinished:
        marks.append("unfinished run (" + ", ".join(
            f"seed {s}: {p.get('epochs_run', '?')} of {p['epochs']} epochs" if p else f"seed {s}" for s, p in unfinished) + ")")
    unknown = [s for s, r in sorted(records.items()) if "protocol" not in r.data]
    if unknown:
        marks.append("protocol unknown (seed " + ", ".join(map(str, unknown)) + ")")
    known = [r.data["protocol"] for r in records.values() if "protocol" in r.data]
    if known:  # the seeds agree on the compared keys (check_cell)
        what, reference = reference_protocol(dataset, method)
        differences = protocol_differences(known[0], reference, method)
        if differences:
            marks.append("; ".join(differences) + f" (vs {what})")
    note = learning_note(records)
    if note:
        marks.append(note)
    return tuple(marks)


# ----------------------------------------------------------------------------- metrics files

@dataclass(frozen=True)
class Record:
    """One run's metrics: where they lie (the headline file) and what they hold (all of them)."""
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from None
    except json.JSONDecodeError:
        raise ValueError("not valid JSON (truncated or partly written?)") from None


def read_record(path: Path) -> dict:
    """The full metrics of one run: seed<N>.details.json beside `path`, else `path` itself
    (older files); ValueError naming what is wrong when unreadable or partial."""
    details = details_path(path)
    try:
        data = _read_json(details if details.exists() else path)
    except ValueError as exc:
        raise ValueError(f"{details.name}: {exc}" if details.exists() else str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a metrics object")
    if "dataset" not in data and not details.exists():
        raise ValueError(f"headline only: {details.name} is missing beside it")
    for key, kind in (("dataset", str), ("backbone", str), ("method", str), ("target", str), ("seed", int),
                      ("sources", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ValueError(f"missing or malformed {key!r}")
    for keys in (("out_of_domain", "accuracy"), ("in_domain", "average", "mean")):
        try:
            _number(data, *keys)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"missing {'.'.join(keys)}") from None
    if "protocol" in data:
        check_protocol(data["protocol"])
    if details.exists():
        check_pair(path, data)
    return data


_INT, _NUMBER, _TEXT = (int,), (int, float), (str,)
PROTOCOL_TYPES = {  # what the report reads of a protocol, and the types evaluate writes (None: may be null)
    "pretrained": ((bool,), False), "weights": (_TEXT, True), "epochs": (_INT, False), "batch_size": (_INT, False),
    "image_size": (_INT, False), "crop": (_INT, True), "overlap_lambda": (_NUMBER, False), "lr": (_NUMBER, False),
    "mask_lr": (_NUMBER, False), "augmentation": (_TEXT, False), "precision": (_TEXT, False),
    "selection": (_TEXT, False), "schedule_epochs": (_INT, True), "epochs_run": (_INT, True)}


def check_protocol(protocol) -> None:
    """ValueError naming the first key of a run's protocol that is missing or of the wrong type."""
    if not isinstance(protocol, dict):
        raise ValueError("malformed protocol (not a mapping)")
    for key, (kinds, nullable) in PROTOCOL_TYPES.items():
        if key not in protocol and key == "epochs_run":
            continue  # protocols written before it was recorded
        value = protocol.get(key)
        ok = (value is None and nullable and key in protocol) or (
            isinstance(value, kinds) and (kinds == (bool,) or not isinstance(value, bool)))
        if not ok:
            raise ValueError(f"malformed protocol ({key}: {str(value)[:40]!r})" if key in protocol
                             else f"malformed protocol (no {key})")


def check_pair(path: Path, details: dict) -> None:
    """The headline must be exactly what its details give (evaluate writes the details first,
    then the headline from them): else the two files come from different evaluations (one
    killed between its two writes, or two at once) and DVC would show other numbers than the report."""
    try:
        expected = headline(details)
    except (KeyError, TypeError):
        raise ValueError(f"{details_path(path).name}: missing selection or accuracies") from None
    if _read_json(path) != expected:
        raise ValueError(f"{path.name} does not match {details_path(path).name} beside it (written by different "
                         f"evaluations: one interrupted, or two at once); run `dmg evaluate` for it again")


def check_cell(record: Record, dataset: str, cell: tuple[str, str, str], seed: int, seeds: dict[int, Record]) -> None:
    """Refuse a file whose settings differ from its cell's: another dataset, backbone, method,
    target or seed than its folder says, or other source domains or another protocol than the
    cell's other seeds."""
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
        mine, theirs = record.data.get("protocol"), other.data.get("protocol")
        if mine and theirs:
            keys = [k for k in PROTOCOL_KEYS if mine[k] != theirs[k]]
            if keys:
                differ = ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in keys)
                raise DmgError(f"{record.path} and {other.path} are seeds of one cell ({' '.join(cell)}) but were run "
                               f"under different protocols ({differ}). Re-run one like the other, or delete it.")


SEED_FILE = re.compile(r"seed(\d+)\.json")
DETAILS_FILE = re.compile(r"seed(\d+)\.details\.json")


def load_runs(metrics_dir: str | Path, dataset: str) -> Runs:
    """All metrics files of a dataset. Unreadable, partial or misplaced files are listed in
    `skipped`; files that contradict their cell raise DmgError."""
    root = Path(metrics_dir) / dataset
    runs = Runs(dataset)
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        parts = path.relative_to(root).parts
        details = DETAILS_FILE.fullmatch(parts[-1])
        if details and len(parts) == 4 and path.with_name(f"seed{details.group(1)}.json").exists():
            continue  # read with its headline file
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


@dataclass(frozen=True)
class Stat:
    """Our number in one cell: mean and sample std over seeds."""
    mean: float
    std: float  # 0.0 for one seed
    n: int
    seeds: tuple[int, ...]


def stat(values: dict[int, float]) -> Stat | None:
    if not values:
        return None
    seeds = tuple(sorted(values))
    vals = [values[s] for s in seeds]
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals), seeds)


# ----------------------------------------------------------------------------- the lambda_O sweep

SWEEP_MEASURES = ("out_of_domain", "in_domain", "in_domain_known", "mean_iou")


def summary_markdown(summary: dict) -> str:
    """The sweep's per-lambda_O numbers as a Markdown table."""
    n = len(summary["seeds"])
    lines = [f"{summary['dataset']} {summary['backbone']}, targets {', '.join(summary['targets'])}, "
             f"{sweep_epochs(summary)}; " + (f"mean ± std over {n} seeds" if n > 1 else "one seed")
             + ", each the mean over targets.", "",
             "| λ_O | out-of-domain (%) | in-domain (%) | in-domain, known domain (%) | mean pairwise IoU |",
             "|---:|---:|---:|---:|---:|"]
    for row in summary["summary"]:
        cells = [_mean_std(row[k], digits=3 if k == "mean_iou" else 2) for k in SWEEP_MEASURES]
        lines.append(f"| {row['lambda']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_epochs(summary: dict) -> str:
    """"48 epochs"; summaries written before the epochs were resolved hold null."""
    return f"{summary['epochs']} epochs" if summary.get("epochs") else "the schedule's epochs"


def _mean_std(value: dict, digits: int) -> str:
    """mean, with +- std when there is more than one seed."""
    text = f"{value['mean']:.{digits}f}"
    return text + (f" ± {value['std']:.{digits}f}" if value["n"] > 1 else "")
