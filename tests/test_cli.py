"""The CLI on temporary folders: the digits pipeline, repeatability, resume, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, write_params
from dmgcli.cli import app
from dmgcli.params import Params, load_params
from dmgcli.results import details_path

runner = CliRunner()


def dmg(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_line_error(result, pattern: str):
    assert result.exit_code != 0
    message = result.stderr if hasattr(result, "stderr") else result.output
    lines = [l for l in message.strip().splitlines() if l]
    assert len(lines) == 1 and "Traceback" not in message, message
    assert pattern in lines[0], lines[0]


def test_help_lists_every_stage():
    out = dmg("--help").output
    for stage in ("download", "preprocess", "train", "evaluate", "report", "info"):
        assert stage in out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed[:7] == ["check", "download", "preprocess", "train", "evaluate", "sweep", "report"]  # dvc.yaml's order


def test_version():
    from dmgcli import __version__

    assert dmg("--version").output == f"dmg {__version__}\n"


def test_help_shows_the_defaults_params_yaml_gives(workdir):
    write_params(workdir, train={"target": "rot30", "method": "aggregate"}, report={"format": "markdown"})
    text = " ".join(dmg("train", "--help").output.split())  # help text wraps
    assert "--target <str> Held-out target domain; all other domains are sources. [default: (rot30 from params.yaml)]" \
        in text
    assert "[default: (aggregate from params.yaml)]" in text and "[default: (convnet from params.yaml)]" in text
    assert "[default: (digits from params.yaml)]" in text  # --dataset
    assert "[default: (markdown from params.yaml)]" in " ".join(dmg("report", "--help").output.split())
    (workdir / "params.yaml").unlink()  # outside a project: nothing to show, and help still works
    assert "from params.yaml" not in dmg("train", "--help").output


def test_unknown_target_lists_the_datasets_domains_and_the_closest_name(workdir):
    one_line_error(dmg("train", "--target", "rot31", ok=False), "unknown domain 'rot31' for dataset digits "
                   "(did you mean 'rot30'?); valid: rot0, rot15, rot30, rot45, rot60, rot75")
    result = dmg("evaluate", "--target", "quickdrw", ok=False)
    one_line_error(result, "unknown domain 'quickdrw' for dataset digits (did you mean 'quickdraw' of --dataset "
                           "domainnet?); valid: rot0, rot15")
    assert "art_painting" not in result.stderr  # not the domains of every dataset
    one_line_error(dmg("train", "--target", "zzz", ok=False),
                   "unknown domain 'zzz' for dataset digits; valid: rot0, rot15, rot30, rot45, rot60, rot75")


def test_info_on_the_preprocess_report_says_what_it_is(digits_dir):
    report = digits_dir / "data" / "prepared" / "digits.report.json"
    assert report.exists()
    result = dmg("info", report, ok=False)
    one_line_error(result, f"{report} is not an HDF5 file: dmg info reads data/prepared/<dataset>.h5")
    assert "dmg preprocess" not in result.stderr  # the file is fine: nothing to delete or re-run


def test_train_evaluate_report_and_same_seed_same_metrics(workdir):
    for run in ("a", "b"):
        dmg("train", "--target", "rot45", "--method", "dmg", "--epochs", "2", "--out", workdir / run)
        dmg("evaluate", "--target", "rot45", "--method", "dmg", "--run", workdir / run, "--out", workdir / f"{run}.json")
    a, b = (json.loads((workdir / f"{r}.details.json").read_text()) for r in "ab")
    assert a == b
    assert set(a["in_domain"]) == {"average", "known_domain"}
    assert set(a["in_domain"]["average"]["per_domain"]) == set(a["sources"]) and "rot45" not in a["sources"]
    assert set(a["masks"]["iou"]) == {"conv3", "fc1", "fc"}
    assert 0 <= a["out_of_domain"]["accuracy"] <= 100
    log = (workdir / "a" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss") and len(log) == 3


def test_default_paths_and_report(workdir):
    dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "1")
    assert (workdir / "data/runs/digits/convnet/aggregate/rot0/seed0/best.pt").exists()
    dmg("evaluate", "--target", "rot0", "--method", "aggregate")
    assert (workdir / "metrics/digits/convnet/aggregate/rot0/seed0.json").exists()
    out = dmg("report").output
    assert "Aggregate" in out and (workdir / "reports" / "digits").is_dir()


def test_resume_continues_to_the_same_result(workdir):
    dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "3", "--out", workdir / "full")
    dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "1", "--out", workdir / "part")
    dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "3", "--out", workdir / "part", "--resume")
    full = (workdir / "full" / "log.csv").read_text().splitlines()
    part = (workdir / "part" / "log.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:6]) for r in rows]  # drop timing columns
    assert strip(full) == strip(part)


def test_resume_refuses_other_hyperparameters(workdir):
    dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "1", "--out", workdir / "h")
    result = dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "2", "--overlap-lambda", "5",
                 "--out", workdir / "h", "--resume", ok=False)
    one_line_error(result, "config.overlap_lambda=0.1, not 5.0")
    result = dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "2", "--seed", "3",
                 "--out", workdir / "h", "--resume", ok=False)
    one_line_error(result, "seed=0, not 3")


def test_resume_refuses_a_checkpoint_of_another_method(workdir):
    dmg("train", "--target", "rot15", "--method", "aggregate", "--epochs", "1", "--out", workdir / "r")
    result = dmg("train", "--target", "rot15", "--method", "dmg", "--epochs", "2", "--out", workdir / "r", "--resume",
                 ok=False)
    one_line_error(result, "method='aggregate'")


@pytest.mark.parametrize("args, message", [
    (["train", "--target", "rot99"], "unknown domain 'rot99'"),
    (["train", "--target", "rot0", "--backbone", "vgg"], "unknown backbone 'vgg'"),
    (["train", "--target", "rot0", "--method", "erm"], "unknown method 'erm'"),
    (["train", "--target", "rot0", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--target", "cartoon"], "prepare pacs first with `dmg download pacs && dmg preprocess pacs`"),
    (["train", "--target", "quickdraw", "--backbone", "alexnet"], "dmg download domainnet && dmg preprocess domainnet"),
    (["evaluate", "--target", "rot30", "--method", "dmg"],
     "(best.pt not found); make it with `dmg train --dataset digits --target rot30 --backbone convnet --method dmg "
     "--seed 0`"),
    (["train", "--target", "rot0", "--source", "rot0", "--source", "rot15"], "target 'rot0' is also a source"),
    (["train", "--target", "rot0", "--source", "rot7"], "unknown source domain 'rot7'"),
    (["train", "--target", "rot0", "--batch-size", "0"], "train.batch_size must be at least 1"),
    (["train", "--target", "rot0", "--lr", "-1"], "train.lr must be positive"),
    (["train", "--target", "rot0", "--overlap-lambda", "-1"], "train.overlap_lambda must be at least 0"),
    (["train", "--target", "rot0", "--epochs", "0"], "train.epochs must be at least 1"),
    (["evaluate", "--target", "rot0", "--average-over", "prob"], "evaluate.average_over must be logits or probs"),
])
def test_bad_input_is_one_line_and_nonzero(workdir, args, message):
    one_line_error(dmg(*args, ok=False), message)


def test_a_subset_of_sources(workdir):
    dmg("train", "--target", "rot0", "--source", "rot15", "--source", "rot75", "--method", "dmg", "--epochs", "1",
        "--out", workdir / "sub")
    dmg("evaluate", "--target", "rot0", "--source", "rot15", "--source", "rot75", "--method", "dmg",
        "--run", workdir / "sub", "--out", workdir / "sub.json")
    metrics = json.loads((workdir / "sub.details.json").read_text())
    assert metrics["sources"] == ["rot15", "rot75"]
    assert len(metrics["masks"]["iou"]["fc"]) == 2


def test_ambiguous_domain_uses_params_dataset(workdir):
    # `sketch` is a domain of PACS and DomainNet: params.yaml's dataset (digits) decides, and it has no sketch
    one_line_error(dmg("train", "--target", "sketch", ok=False), "unknown domain 'sketch' for dataset digits")


@pytest.mark.parametrize("text, message", [
    ("train: {lr: fast}", "train.lr must be a number"),
    ("train: {epoch: 3}", "unknown key 'train.epoch'"),
    ("trian: {}", "unknown key 'trian'"),
    ("train: [1, 2", "not valid YAML"),
    ("matrix: {seeds: [a]}", "matrix.seeds[0] must be an integer"),
    ("train: {pretrained: 1}", "train.pretrained must be true or false"),
])
def test_malformed_params_name_the_key(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    one_line_error(dmg("train", "--params", tmp_path / "bad.yaml", ok=False), message)


def test_missing_params_file_is_an_error(tmp_path):
    one_line_error(dmg("train", "--params", tmp_path / "nope.yaml", ok=False), "not found")


@pytest.mark.parametrize("args", [["train", "--target", "rot0"], ["report"], ["download"], ["check"]])
def test_outside_a_project_nothing_is_written(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    one_line_error(dmg(*args, ok=False), f"params file params.yaml not found in {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_the_builtin_defaults_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = dmg("report", "--params", "defaults", "--no-figures", ok=False)  # read the defaults, found no metrics
    one_line_error(result, "nothing to report: metrics/digits does not exist")
    assert not (tmp_path / "reports").exists()


def test_a_finished_run_is_replaced_only_with_force(workdir):
    folder = workdir / "data/runs/digits/convnet/aggregate/rot0/seed0"
    dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "1")
    run = (folder / "run.json").read_text()
    result = dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "2", ok=False)
    one_line_error(result, f"{folder.relative_to(workdir)} holds a finished run (run.json); --resume continues it, "
                           "--force replaces it")
    assert (folder / "run.json").read_text() == run and len((folder / "log.csv").read_text().splitlines()) == 2
    dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "2", "--resume")  # one more epoch
    assert json.loads((folder / "run.json").read_text())["protocol"]["epochs_run"] == 2
    dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "1", "--force")
    assert len((folder / "log.csv").read_text().splitlines()) == 2  # trained afresh: one epoch


def test_unfinished_runs_are_evaluated_only_when_asked_and_marked(workdir):
    folder = workdir / "run"
    dmg("train", "--target", "rot30", "--method", "dmg", "--epochs", "2", "--out", folder)
    (folder / "run.json").unlink()  # what a run killed before its end leaves: run.json is written last
    metrics = workdir / "metrics/digits/convnet/dmg/rot30/seed0.json"
    result = dmg("evaluate", "--target", "rot30", "--method", "dmg", "--run", folder, ok=False)
    one_line_error(result, "holds an unfinished run (no run.json: stopped or still training); finish it with "
                           f"`dmg train --dataset digits --target rot30 --backbone convnet --method dmg --seed 0 "
                           f"--out {folder} --epochs 2 --resume`, or pass --allow-unfinished")
    assert not metrics.exists()
    out = dmg("evaluate", "--target", "rot30", "--method", "dmg", "--run", folder, "--allow-unfinished").output
    assert "(unfinished run)" in out
    details = json.loads(details_path(metrics).read_text())
    assert details["finished"] is False and details["protocol"]["epochs_run"] == 2
    text = dmg("report", "--no-figures").output
    assert "[a] unfinished run (seed 0: 2 of 2 epochs); 2 of 96 epochs (vs the defaults)" in text


def test_metrics_headline_is_small_and_the_protocol_is_recorded(workdir):
    dmg("train", "--target", "rot45", "--method", "dmg", "--epochs", "2", "--batch-size", "32")
    dmg("evaluate", "--target", "rot45", "--method", "dmg")
    path = workdir / "metrics/digits/convnet/dmg/rot45/seed0.json"
    headline = json.loads(path.read_text())
    assert list(headline) == ["out_of_domain", "in_domain", "in_domain_known_domain", "best_epoch"]
    details = json.loads(details_path(path).read_text())
    assert headline["out_of_domain"] == details["out_of_domain"]["accuracy"] and headline["best_epoch"] in (1, 2)
    protocol = details["protocol"]
    assert protocol["pretrained"] is False and protocol["weights"] is None
    assert (protocol["epochs"], protocol["schedule_epochs"], protocol["epochs_run"]) == (2, 96, 2)
    assert (protocol["batch_size"], protocol["image_size"], protocol["crop"]) == (32, 16, None)
    assert (protocol["overlap_lambda"], protocol["lr"], protocol["mask_lr"]) == (0.1, 1e-3, 1e-2)
    assert protocol["augmentation"] == "none" and protocol["precision"] == "fp32"
    assert protocol["selection"] == "best mean source-validation accuracy" and protocol["dmg_version"] == "0.1.0"
    text = dmg("report", "--no-figures").output
    assert "[a] 2 of 96 epochs; batch 32 (not 64) (vs the defaults)" in text


def test_a_run_still_learning_at_its_end_is_warned_about_and_marked(workdir):
    """Aggregate from scratch climbs fast in its first epochs (seed 0: about 30, 57, 71 %): after 3
    epochs the best is the last and validation still rises, so train warns and the report marks it."""
    trained = dmg("train", "--target", "rot0", "--method", "aggregate", "--epochs", "3")
    assert [line for line in trained.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: may not have finished learning: best epoch 3 of 3, source validation still rising; train longer "
        "(--epochs N --resume continues this run)"]
    run = json.loads((workdir / "data/runs/digits/convnet/aggregate/rot0/seed0/run.json").read_text())
    assert run["protocol"]["still_learning"] is True
    dmg("evaluate", "--target", "rot0", "--method", "aggregate")
    text = dmg("report", "--no-figures").output
    assert "may not have finished learning (seed 0: best epoch 3 of 3, source validation still rising)" in text


def test_check_names_the_bad_matrix_entry(workdir):
    write_params(workdir, matrix={"targets": ["rot0", "rot31"]})
    one_line_error(dmg("check", ok=False), "params: matrix.targets: unknown domain 'rot31' for dataset digits")
    write_params(workdir, report={"sweep": {"targets": ["sketch"]}})
    one_line_error(dmg("check", ok=False), "params: report.sweep: unknown domain 'sketch' for dataset digits")
    write_params(workdir, matrix={"methods": ["dmg", "erm"]})
    one_line_error(dmg("check", ok=False), "params: matrix.methods has unknown 'erm'; valid: ")
    write_params(workdir)
    assert "ok: digits, 9 runs (3 targets x 3 methods" in dmg("check").output
    assert (workdir / "data/params.checked").exists()


def test_bad_flags_and_the_report_need_no_torch(workdir):
    """Arguments are checked before torch loads, and the report does not load it at all."""
    code = ("import sys; from typer.testing import CliRunner; from dmgcli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    for args, expected in ((["train", "--batch-size", "-3"], "1 False"), (["report", "--no-figures"], "1 False"),
                           (["train", "--help"], "0 False"),
                           (["report", "--table", "2"], "0 False")):
        result = subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                                env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
        assert result.stdout.split()[-2:] == expected.split(), (args, result.stdout, result.stderr)


def test_help_has_no_type_labels_and_whole_defaults():
    text = dmg("train", "--help").output
    assert "<bool>" not in text and "--pretrained / --scratch" in text
    assert "data/runs/<dataset>/<backbone>" in text.replace("\n", "").replace(" ", "")
    assert "benchmarks/results/local" in dmg("bench", "--help").output.replace("\n", "").replace(" ", "")


def test_bench_and_dvc_plots_outputs_are_ignored_by_git():
    for path in ("benchmarks/results/local/bench.json", "dvc_plots/index.html", "scratch/run/best.pt"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def test_params_yaml_in_repo_loads_and_matches_defaults():
    from conftest import REPO
    loaded = load_params(REPO / "params.yaml")
    assert loaded == Params()
    assert yaml.safe_load((REPO / "params.yaml").read_text())["train"]["overlap_lambda"] == 0.1


def test_the_digits_convnet_trains_on_one_cpu_thread_unless_told(monkeypatch):
    """Two threads on a 16 px network only wait for each other (4x slower on a busy machine)."""
    from dmgcli.cli_base import cpu_threads_for
    from dmgcli.params import TrainParams

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_threads_for(TrainParams(backbone="resnet18"))
    assert "OMP_NUM_THREADS" not in os.environ
    cpu_threads_for(TrainParams(backbone="convnet"))
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpu_threads_for(TrainParams(backbone="efficientnet_lite0_mlp", pretrained=True, frozen_trunk=True))
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the layers above a frozen trunk are as small
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    cpu_threads_for(TrainParams(backbone="convnet"))
    assert os.environ["OMP_NUM_THREADS"] == "4"
