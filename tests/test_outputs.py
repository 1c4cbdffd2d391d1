"""What dmg writes and deletes: only its own marked temporaries of dead writers are cleaned
up, a run being replaced or continued is never lost on the way, only regular files are
replaced, and run folders are never restarted or half-made silently."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from dmgcli.cli import app
from dmgcli.errors import DmgError
from dmgcli.fileio import HOST, atomic_path, run_lock, temp_name, write_text
from dmgcli.runfolder import recover
from test_concurrency import dead_pid, hold_lock, marked, one_error_line
from test_hardening import assert_clean_failure, files_in

runner = CliRunner()


def dmg(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(out, *extra, epochs: int = 1):
    return ["train", "--target", "rot0", "--method", "aggregate", "--epochs", str(epochs), "--device", "cpu",
            "--out", out, *extra]


@pytest.fixture(scope="module")
def finished_run(digits_dir, tmp_path_factory):
    """A finished 1-epoch Aggregate run on rot0 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, [str(a) for a in train_args(out, "--params", digits_dir / "params.yaml")])
    assert result.exit_code == 0, result.output
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --------------------------------------------------------------------------- 1. only what dmg made

def test_temporary_names_carry_the_marker_pid_and_host(tmp_path):
    name = temp_name(tmp_path / "m.json").name
    assert name.startswith(".m.json.~dmg-") and f"-{os.getpid()}-{HOST}-" in name and name.endswith(".tmp")


def test_lock_cleanup_spares_what_dmg_cannot_prove_its_own(tmp_path):
    """The user's dot-files that look like temporaries, a live writer's and another host's
    temporaries all stay; only a dead dmg writer's marked files on this host go."""
    folder = tmp_path / "project"
    users = [folder / ".thesis.old.v1" / "chapter1.tex", folder / ".venv.old.bak" / "bin", folder / ".notes.tmp"]
    live = folder / marked("log.csv", os.getpid())
    elsewhere = folder / marked("log.csv", dead_pid(), host="0123abcd")
    dead = [folder / marked("last.pt", dead_pid()), folder / marked("fetch", dead_pid()) / "x.jpg"]
    for path in users + [live, elsewhere] + dead:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    with run_lock(folder):
        pass
    assert all(p.exists() for p in users + [live, elsewhere]) and not any(p.exists() for p in dead)
    assert not dead[1].parent.exists()


def test_a_file_lock_spares_a_live_neighbours_temporary(tmp_path):
    """`dmg preprocess my.b` must not delete a running `dmg preprocess my`'s temporary file."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        neighbour = tmp_path / marked("my.h5", holder.pid)
        own_dead = tmp_path / marked("my.b.h5", dead_pid())
        companion_dead = tmp_path / marked("my.b.report.json", dead_pid())
        for path in (neighbour, own_dead, companion_dead):
            path.write_text("half")
        with run_lock(tmp_path / "my.b.h5", folder=False):
            pass
        assert neighbour.exists() and not own_dead.exists() and not companion_dead.exists()
    finally:
        holder.kill()
        holder.wait()


def test_train_into_the_current_folder_keeps_the_users_dot_files(workdir):
    keep = [workdir / ".thesis.old.v1" / "notes.md", workdir / ".venv.old.bak" / "x", workdir / ".draft.tmp"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    result = dmg(*train_args(".", "--source", "rot15"))
    assert result.exit_code == 0, result.output
    assert all(p.read_text() == "the user's" for p in keep)
    assert {"best.pt", "last.pt", "log.csv", "run.json"} <= {p.name for p in workdir.iterdir()}


# --------------------------------------------------------------------------- 2. no run lost or restarted silently

def interrupt_first_epoch(monkeypatch):
    import dmgcli.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmgcli.engine, "train_one_epoch", interrupted)


@pytest.mark.parametrize("flag", ["--force", "--resume"])
def test_interrupted_force_or_resume_keeps_the_finished_run(workdir, finished_run, monkeypatch, flag):
    run = workdir / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    interrupt_first_epoch(monkeypatch)
    result = dmg(*train_args(run, flag, epochs=2))
    assert result.exit_code == 130, result.output
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(before)


def test_force_replaces_the_run_once_the_new_one_has_a_checkpoint(workdir, finished_run):
    run = workdir / "run"
    shutil.copytree(finished_run, run)
    old_last = (run / "last.pt").read_bytes()
    result = dmg(*train_args(run, "--force", "--seed", "1"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "log.csv", "run.json"]
    assert (run / "last.pt").read_bytes() != old_last and json.loads((run / "run.json").read_text())["seed"] == 1


def test_a_killed_force_is_undone_by_the_next_train(workdir, finished_run):
    """What kill -9 during `--force`'s first epoch leaves: the old run kept aside by a dead
    process, nothing of the new run's own. The next `dmg train` of the folder restores it
    (and then refuses to replace it without --force)."""
    run = workdir / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    aside = run / marked("previous-run", dead_pid(), kind="old")
    aside.mkdir()
    for name in before:
        os.replace(run / name, aside / name)
    (run / marked("last.pt", dead_pid())).write_bytes(b"half of the new run's checkpoint")
    result = dmg(*train_args(run, epochs=2))
    line = one_error_line(result)
    assert "holds a finished run (run.json); --resume continues it, --force replaces it" in line
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(before)


def test_a_kept_aside_run_is_dropped_once_the_new_run_has_its_own_checkpoint(tmp_path):
    run = tmp_path / "run"
    aside = run / marked("previous-run", dead_pid(), kind="old")
    aside.mkdir(parents=True)
    for name in ("run.json", "last.pt", "best.pt"):
        (aside / name).write_text(f"old {name}")
    (run / "last.pt").write_text("new last.pt")  # the new run's first epoch ended
    recover(run)
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"] and (run / "last.pt").read_text() == "new last.pt"
    # a live writer's kept-aside run is its own business
    live = run / marked("previous-run", os.getpid(), kind="old")
    live.mkdir()
    recover(run)
    assert live.is_dir()


def test_an_unfinished_run_is_not_restarted_without_resume_or_force(workdir, finished_run):
    run = workdir / "run"
    shutil.copytree(finished_run, run)
    (run / "run.json").unlink()  # what Ctrl-C before the end leaves
    line = assert_clean_failure(workdir, *train_args(run, epochs=2), pattern="holds an unfinished run")
    assert "--resume continues it, --force replaces it" in line


def test_resume_without_a_last_checkpoint_is_refused(workdir):
    (workdir / "empty").mkdir()
    line = assert_clean_failure(workdir, *train_args(workdir / "empty", "--resume"), pattern="--resume: ")
    assert "no last.pt" in line and "drop --resume" in line
    assert_clean_failure(workdir, *train_args(workdir / "nothing", "--resume"), pattern="no last.pt")


def test_failed_pretrained_start_leaves_no_run_folder(workdir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(workdir / "no-torch-home"))
    before = files_in(workdir)
    result = dmg("train", "--target", "rot0", "--backbone", "resnet18", "--pretrained", "--epochs", "1",
                 "--device", "cpu")
    assert "ImageNet weights not found" in one_error_line(result)
    assert files_in(workdir) == before and not (workdir / "data" / "runs").exists()


# --------------------------------------------------------------------------- 3. only regular files are replaced

@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo", "dangling symlink"])
def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path, kind):
    target, other = tmp_path / "out.json", tmp_path / "elsewhere.json"
    other.write_text("the link's target")
    if kind == "symlink":
        target.symlink_to(other)
    elif kind == "dangling symlink":
        target.symlink_to(tmp_path / "missing")
    elif kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)
    with pytest.raises(DmgError, match="cannot write .*out.json: "):
        write_text(target, "new")
    assert other.read_text() == "the link's target" and sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere.json", "out.json"]
    assert target.is_symlink() or not target.is_file()


def test_a_device_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(DmgError, match="a device or other special file"):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            os.mkfifo(target)
    assert not target.is_file() and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def device_node(path: Path) -> str:
    """A character device like /dev/full at `path` (root), else a FIFO; returns what it is."""
    import stat
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        return "device"
    except PermissionError:
        os.mkfifo(path)
        return "fifo"


def test_report_out_to_a_device_leaves_the_device_alone(workdir):
    """`dmg report --out /dev/full` turned the system's device node into a regular file; a copy
    of the node in the test's folder stands in for it (a regression cannot harm the machine)."""
    node = workdir / "full"
    device_node(node)
    assert_clean_failure(workdir, "report", "--no-figures", "--out", node, pattern=f"cannot write {node}: it is a device")
    assert not node.is_file() and not node.is_symlink()


# --------------------------------------------------------------------------- 10. checkpoints sealed by their digest

def test_every_byte_of_a_checkpoint_is_covered_by_its_seal(finished_run, tmp_path):
    """Any changed byte, wherever it lies (weights, zip records, the seal itself), is refused
    before torch.load; an unchanged sealed file loads, and so does an older unsealed one."""
    import numpy as np
    import torch

    from dmgcli.checkpoint import SEAL_LENGTH, load_checkpoint, seal_matches

    original = (finished_run / "best.pt").read_bytes()
    path = tmp_path / "best.pt"
    path.write_bytes(original)
    assert seal_matches(path) is True and load_checkpoint(path)["epoch"] == 1
    tail = range(len(original) - 22 - SEAL_LENGTH, len(original))
    positions = sorted({*np.random.default_rng(0).integers(0, len(original), 40).tolist(), *tail[::7], tail[-1]})
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(DmgError, match=f"checkpoint {path} "):
            load_checkpoint(path)
    torch.save(torch.load(finished_run / "best.pt", weights_only=True), path)  # as dmg before the seal wrote it
    assert seal_matches(path) is None and load_checkpoint(path)["epoch"] == 1


def as_written_before_issue_19(ckpt: dict) -> dict:
    """A checkpoint as dmg wrote it before average_over left the method's config (it is evaluate's
    setting now) and before mask_init_value existed."""
    config = {k: v for k, v in ckpt["config"].items() if k != "mask_init_value"}
    old = {**ckpt, "config": {**config, "average_over": "logits"}}
    if "settings" in ckpt:
        old["settings"] = {k: v for k, v in ckpt["settings"].items() if k != "config.mask_init_value"}
    return old


def test_checkpoints_holding_average_over_still_load(finished_run, tmp_path, digits_dir):
    """Checkpoints written before issue 19 load, and the run still evaluates and resumes."""
    import torch

    from dmgcli.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        save_checkpoint(run / name, as_written_before_issue_19(ckpt))
        assert "average_over" not in load_checkpoint(run / name)["config"]
    params = digits_dir / "params.yaml"
    result = dmg("evaluate", "--target", "rot0", "--method", "aggregate", "--device", "cpu", "--run", run,
                 "--out", tmp_path / "m.json", "--average-over", "probs", "--params", params)
    assert result.exit_code == 0, result.output
    result = dmg(*train_args(run, "--resume", "--params", params, epochs=2))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["best"]["epoch"] in (1, 2)


def test_a_constant_mask_init_run_written_before_mask_init_value_resumes(digits_dir, tmp_path):
    """Before mask_init_value, `mask_init: constant` meant logit 0: such a last.pt resumes under
    the default value 0 and is refused under another."""
    import torch

    from conftest import write_params
    from dmgcli.checkpoint import save_checkpoint

    params = write_params(tmp_path, data_dir=str(digits_dir / "data"), train={"mask_init": "constant"})
    run = tmp_path / "run"
    dmg_args = ["train", "--target", "rot0", "--method", "dmg", "--device", "cpu", "--out", run, "--params", params]
    result = dmg(*dmg_args, "--epochs", "1")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(run / "last.pt", weights_only=True)
    save_checkpoint(run / "last.pt", as_written_before_issue_19(ckpt))
    other = write_params(tmp_path, data_dir=str(digits_dir / "data"),
                         train={"mask_init": "constant", "mask_init_value": 2.0})
    refused = dmg(*dmg_args[:-1], other, "--epochs", "2", "--resume")
    assert refused.exit_code == 1 and "config.mask_init_value=0.0, not 2.0" in refused.output
    params = write_params(tmp_path, data_dir=str(digits_dir / "data"), train={"mask_init": "constant"})
    result = dmg(*dmg_args, "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["protocol"]["epochs_run"] == 2


# --------------------------------------------------------------------------- 5. the data a run was trained on

def test_evaluate_refuses_a_dataset_preprocessed_again_with_another_split_seed(workdir, finished_run):
    from conftest import write_params

    run = workdir / "run"
    shutil.copytree(finished_run, run)
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert recorded["file"] == "digits.h5" and recorded["split_seed"] == 0 and len(recorded["fingerprint"]) == 16
    import torch
    assert torch.load(run / "best.pt", weights_only=True)["data"] == recorded
    evaluate = ["evaluate", "--target", "rot0", "--method", "aggregate", "--run", run, "--device", "cpu",
                "--out", workdir / "m.json"]
    assert dmg(*evaluate).exit_code == 0
    write_params(workdir, preprocess={"seed": 1})
    assert dmg("download", "digits").exit_code == 0 and dmg("preprocess", "digits").exit_code == 0
    line = assert_clean_failure(workdir, *evaluate, pattern=f"{run} was trained on digits.h5 with fingerprint "
                                                            f"{recorded['fingerprint']}, split seed 0, but ")
    assert "split seed 1" in line
    assert_clean_failure(workdir, *train_args(run, "--resume", epochs=2), pattern="split seed 1")


def empty_split(h5: Path, domain: str, split: str) -> None:
    """Make one split of a dmg HDF5 file hold no images (as a folder dataset with a tiny domain can)."""
    import h5py
    import numpy as np

    with h5py.File(h5, "r+") as f:
        group = f[f"{domain}/{split}"]
        shape = group["images"].shape[1:]
        for name in list(group):
            del group[name]
        group.create_dataset("labels", data=np.zeros(0, np.int64))
        group.create_dataset("paths", data=np.array([], dtype=object), dtype=h5py.string_dtype())
        group.create_dataset("crc32", data=np.zeros(0, np.uint32))
        group.create_dataset("images", shape=(0, *shape), dtype=np.uint8)


def test_empty_splits_are_refused_before_training_and_evaluation(workdir):
    h5 = workdir / "data" / "prepared" / "digits.h5"
    empty_split(h5, "rot15", "val")
    assert_clean_failure(workdir, *train_args(workdir / "r1"),
                         pattern="digits.h5: the val split of domain 'rot15' holds no images; training needs it")
    empty_split(h5, "rot0", "test")
    assert dmg(*train_args(workdir / "r2", "--source", "rot30")).exit_code == 0
    assert_clean_failure(workdir, "evaluate", "--target", "rot0", "--method", "aggregate", "--source", "rot30",
                         "--run", workdir / "r2", "--device", "cpu", "--out", workdir / "m.json",
                         pattern="the test split of domain 'rot0' holds no images; evaluation needs it")


# --------------------------------------------------------------------------- 4. headline and details as one unit

def test_a_headline_beside_details_of_another_evaluation_is_not_tabulated(workdir, finished_run):
    from dmgcli.results import details_path, load_runs

    headline = workdir / "metrics/digits/convnet/aggregate/rot0/seed0.json"
    assert dmg("evaluate", "--target", "rot0", "--method", "aggregate", "--run", finished_run,
               "--device", "cpu").exit_code == 0
    runs = load_runs(workdir / "metrics", "digits")
    assert not runs.skipped and list(runs.get("convnet", "aggregate", "rot0")) == [0]
    # what a kill between the two renames, or a second evaluate of another run, leaves
    other = json.loads(headline.read_text())
    other["out_of_domain"] += 1.0
    other["in_domain_known_domain"] = 50.0  # a Multi-Headed headline beside Aggregate details
    headline.write_text(json.dumps(other))
    runs = load_runs(workdir / "metrics", "digits")
    assert not runs.get("convnet", "aggregate", "rot0") and len(runs.skipped) == 1
    assert f"seed0.json does not match {details_path(headline).name} beside it" in runs.skipped[0]
    report = dmg("report", "--no-figures")
    assert report.exit_code == 0 and "does not match seed0.details.json" in report.stderr


def test_two_evaluations_do_not_write_one_pair_at_once(workdir, finished_run):
    headline = workdir / "m.json"
    holder = hold_lock(headline, folder=False)
    try:
        line = assert_clean_failure(workdir, "evaluate", "--target", "rot0", "--method", "aggregate", "--run",
                                    finished_run, "--device", "cpu", "--out", headline,
                                    pattern="is being written by another dmg process")
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- 8. one schedule lookup

@pytest.mark.parametrize("dataset, targets", [("mydata", ["hospital_a"]), ("vlcs", ["caltech101", "sun09"]),
                                              ("office_home", ["art"]), ("terra_incognita", ["location_38"])])
def test_check_finds_the_schedule_train_uses(tmp_path, monkeypatch, dataset, targets):
    """A folder dataset and vlcs/office_home/terra_incognita train with train.schedules.default:
    `dmg check` (the pipeline's first stage) must look it up as train does."""
    from conftest import write_params

    monkeypatch.chdir(tmp_path)
    sweep = {"targets": targets[:1], "lambdas": [0.1], "seeds": [0]}
    folders = {"mydata": {"root": str(tmp_path / "images"), "domains": ["hospital_a", "hospital_b"]}} \
        if dataset == "mydata" else {}
    params = write_params(tmp_path, dataset=dataset, matrix={"targets": targets}, report={"sweep": sweep},
                          **({"datasets": folders} if folders else {}))
    result = dmg("check", "--params", params)
    assert result.exit_code == 0, result.output
    assert f"ok: {dataset}, {len(targets) * 3} runs" in result.output and (tmp_path / "data/params.checked").exists()


# --------------------------------------------------------------------------- 9. faults as one line

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def fill_disk(monkeypatch, free: int = 1 << 20):
    """Writes fail as on a full disk: torch.save and text files go to /dev/full (ENOSPC), and the
    disk reports `free` bytes left."""
    import torch

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full", *a, **k))

    def write_text(self, text, *args, **kwargs):
        with open("/dev/full", "w") as f:
            f.write(text)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))


@needs_dev_full
def test_disk_full_in_train_says_disk_full(workdir, monkeypatch):
    fill_disk(monkeypatch)
    line = assert_clean_failure(workdir, *train_args(workdir / "run", "--source", "rot15"), pattern="the disk is full")
    assert f"cannot write {workdir / 'run' / 'last.pt'}: the disk is full (torch could not write" in line
    assert "1 MB free there now" in line


@needs_dev_full
def test_disk_full_in_evaluate_and_report_says_disk_full(workdir, finished_run, monkeypatch):
    assert dmg("evaluate", "--target", "rot0", "--method", "aggregate", "--run", finished_run,
               "--device", "cpu").exit_code == 0  # metrics to report
    fill_disk(monkeypatch)
    assert_clean_failure(workdir, "evaluate", "--target", "rot0", "--method", "aggregate", "--run", finished_run,
                         "--device", "cpu", "--out", workdir / "m.json", pattern="the disk is full")
    assert_clean_failure(workdir, "report", "--no-figures", pattern="the disk is full")


def test_nan_keep_probabilities_do_not_stop_the_draw():
    import torch

    from dmgcli.core import straight_through_bernoulli

    masks = straight_through_bernoulli(torch.tensor([[float("nan"), 0.0, 1.0]]))
    assert torch.isnan(masks[0, 0]) and masks[0, 1:].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("flags", [["--lr", "1e30", "--mask-lr", "1e30"],
                                   ["--overlap-lambda", "1e30", "--mask-lr", "1e30"]])
def test_dmg_divergence_is_reported_as_divergence(workdir, flags):
    assert_clean_failure(workdir, "train", "--target", "rot0", "--method", "dmg", "--epochs", "1", "--device", "cpu",
                         "--source", "rot15", "--out", workdir / "run", *flags, pattern="training diverged at epoch 1")


@pytest.mark.parametrize("change", [{"overlap_lambda": "0.1"}, {"epochs": None}, {"pretrained": "no"},
                                    {"image_size": [16]}, "not a mapping"])
def test_malformed_protocol_in_details_is_one_warning_line(workdir, finished_run, change):
    from dmgcli.results import details_path

    headline = workdir / "metrics/digits/convnet/aggregate/rot0/seed0.json"
    assert dmg("evaluate", "--target", "rot0", "--method", "aggregate", "--run", finished_run,
               "--device", "cpu").exit_code == 0
    details = json.loads(details_path(headline).read_text())
    details["protocol"] = change if isinstance(change, str) else {**details["protocol"], **change}
    details_path(headline).write_text(json.dumps(details))
    result = dmg("report", "--no-figures")
    assert result.exit_code == 0 and result.exception is None, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "malformed protocol" in warnings[0] and "Traceback" not in result.output


# --------------------------------------------------------------------------- 7. a report of nothing is not written

def test_report_with_a_missing_or_wrong_metrics_folder_writes_nothing(workdir, finished_run):
    assert dmg("evaluate", "--target", "rot0", "--method", "aggregate", "--run", finished_run,
               "--device", "cpu").exit_code == 0
    assert dmg("report", "--no-figures").exit_code == 0  # the real report
    assert_clean_failure(workdir, "report", "--no-figures", "--metrics-dir", "metrcs",
                         pattern="nothing to report: metrcs/digits does not exist; run `dmg evaluate` first")
    (workdir / "other" / "digits").mkdir(parents=True)
    assert_clean_failure(workdir, "report", "--no-figures", "--metrics-dir", "other",
                         pattern="other/digits holds no seed<N>.json metrics files")


def test_a_restore_killed_half_way_is_finished_by_the_next_train(tmp_path):
    """Kill -9 while the kept-aside run was being put back: last.pt is put back last, so the
    next recovery still sees no checkpoint of the new run's own and finishes the restore."""
    run = tmp_path / "run"
    aside = run / marked("previous-run", dead_pid(), kind="old")
    aside.mkdir(parents=True)
    for name in ("last.pt", "log.csv"):
        (aside / name).write_text(f"old {name}")
    for name in ("run.json", "best.pt"):  # already put back
        (run / name).write_text(f"old {name}")
    recover(run)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "log.csv", "run.json"]
    assert all((run / name).read_text() == f"old {name}" for name in ("best.pt", "last.pt", "log.csv", "run.json"))
