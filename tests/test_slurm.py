"""`dmg study --launcher slurm` against a real one-node SLURM cluster started on this machine
(munged, slurmctld, slurmd), and the same launcher logic through submitit's LocalExecutor
where the daemons cannot start.

Each scenario: submit a tiny digits study (2 runs), check that a second submission submits
nothing while the jobs are queued or running, stop one run mid-training (after a checkpoint,
before its end) and kill its job, see `--status` report it failed, submit again (only that run
goes, and resumes its last.pt), and check that both runs end with the metrics of the same runs
made by a local `dmg study`. Nothing here depends on speed: waits poll files and the scheduler
with generous time limits, and the job to kill is frozen (SIGSTOP) at a moment its files show
to be mid-run. On SLURM the other run is requeued mid-run as a preemption would, and resumes.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_params
from dmgcli.cli import app
from dmgcli.datasets import get_dataset
from dmgcli.params import MatrixParams, StudyParams
from stages import study_slurm
from stages.study import die_with_this_process

# Long enough that a run is still training while the test freezes the other one (a digits epoch on
# one thread takes a fraction of a second): the scenario stops both runs mid-run.
EPOCHS = 20
TARGETS = ("rot0", "rot15")
MATRIX = MatrixParams(targets=TARGETS, methods=("aggregate",), backbones=("convnet",), seeds=(0,))
MATRIX_FLAGS = ["--target", "rot0", "--target", "rot15", "--method", "aggregate", "--epochs", str(EPOCHS),
                "--device", "cpu"]
WAIT = 900  # seconds; generous: the machine may be shared and slow
DIGITS = get_dataset("digits")


def project(digits_dir: Path, folder: Path) -> Path:
    prepared = folder / "data" / "prepared"
    prepared.mkdir(parents=True)
    os.symlink(digits_dir / "data" / "prepared" / "digits.h5", prepared / "digits.h5")
    return write_params(folder)


def run_folder(folder: Path, target: str) -> Path:
    return folder / "data" / "runs" / "digits" / "convnet" / "aggregate" / target / "seed0"


def outcome(folder: Path, target: str) -> dict:
    """What must not depend on how the run was launched: metrics and the log without timings."""
    metrics = folder / "metrics" / "digits" / "convnet" / "aggregate" / target
    log = (run_folder(folder, target) / "log.csv").read_text().splitlines()
    return {"headline": json.loads((metrics / "seed0.json").read_text()),
            "details": json.loads((metrics / "seed0.details.json").read_text()),
            "log": [row.split(",")[:6] for row in log]}


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """The study's runs made by the local launcher."""
    folder = tmp_path_factory.mktemp("local-study")
    params = project(digits_dir, folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, ["study", "--params", str(params), *MATRIX_FLAGS])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return {t: outcome(folder, t) for t in TARGETS}


def wait_for(condition, seconds: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def statuses(folder: Path) -> dict[str, tuple[str, str]]:
    return {s.run.target: (s.state, s.detail) for s in study_slurm.status(DIGITS, folder / "data", MATRIX)}


def settled(folder: Path):
    """The statuses once no job of the study is pending or running."""
    now = statuses(folder)
    return now if all(state not in ("pending", "running") for state, _ in now.values()) else None


def training_process(folder: Path, target: str) -> int | None:
    """The pid of the `dmg train` of `target` working in `folder` (whoever started it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"dmgcli.cli" in args and b"train" in args and target.encode() in args \
                    and os.readlink(f"/proc/{entry}/cwd") == str(folder):
                return int(entry)
        except OSError:
            continue
    return None


def freeze_mid_run(folder: Path, target: str) -> int:
    """SIGSTOP the run's training once its files show it mid-run: a checkpoint (last.pt) but no
    run.json. Frozen first and looked at second, so it cannot finish between look and kill."""
    run = run_folder(folder, target)

    def frozen():
        pid = training_process(folder, target)
        if pid is None:
            return None
        os.kill(pid, signal.SIGSTOP)
        if (run / "last.pt").exists():
            assert not (run / "run.json").exists(), "the run finished before it could be stopped mid-run"
            return pid
        os.kill(pid, signal.SIGCONT)
        return None

    return wait_for(frozen, WAIT, f"{target}'s training to write its first checkpoint", poll=0.05)


def job_log(folder: Path, target: str) -> str:
    record = json.loads((folder / "data" / "study" / "digits" / "jobs.json").read_text())["runs"]
    return Path(record[f"convnet-aggregate-{target}-seed0"]["log"]).read_text()


def scenario(folder: Path, reference: dict, submit, kill, preempt=None) -> None:
    """The whole story for one launcher; `submit()` returns the submitter's output, `kill(job)`
    kills a job, `preempt(job)` (if given) has the scheduler stop and requeue one."""
    output = submit()
    assert output.count("as job") == 2 and output.count("_log.out") == 2, output
    again = submit()  # the jobs are queued or running: nothing is submitted twice
    assert "0 to submit" in again and again.count("not submitted again") == 2, again

    preempted = freeze_mid_run(folder, "rot0") if preempt else None
    killed = freeze_mid_run(folder, "rot15")
    records = json.loads((folder / "data" / "study" / "digits" / "jobs.json").read_text())["runs"]
    kill(records["convnet-aggregate-rot15-seed0"]["job"])
    if preempt:  # requeued by the scheduler, the same job starts again and resumes its last.pt
        preempt(records["convnet-aggregate-rot0-seed0"]["job"])
        wait_for(lambda: statuses(folder)["rot0"][0] == "finished", WAIT, "the preempted run to finish")
        assert not study_slurm.alive(preempted) and "--resume" in job_log(folder, "rot0")
    wait_for(lambda: not study_slurm.alive(killed), WAIT, "the killed job's training to end")
    now = wait_for(lambda: settled(folder), WAIT, "the first study's jobs to end")
    assert now["rot0"][0] == "finished" and now["rot15"][0] == "failed", now
    assert not (run_folder(folder, "rot15") / "run.json").exists()
    shown = CliRunner().invoke(app, ["study", "--params", str(folder / "params.yaml"), *MATRIX_FLAGS, "--status"])
    assert shown.exit_code == 0 and "failed     convnet-aggregate-rot15-seed0  job " in shown.output, shown.output
    assert "1 finished, 1 failed" in shown.output

    output = submit()  # the finished run is skipped, the failed one resubmitted and resumed
    assert "1 finished, 0 queued or running, 1 to submit" in output, output
    assert "submitted convnet-aggregate-rot15-seed0" in output and "(resumes its last.pt)" in output, output
    now = wait_for(lambda: settled(folder), WAIT, "the resubmitted job to end")
    assert {t: s for t, (s, _) in now.items()} == {"rot0": "finished", "rot15": "finished"}, now
    assert "--resume" in job_log(folder, "rot15")
    for target in TARGETS:
        assert outcome(folder, target) == reference[target], target


def test_local_executor_study_skips_resubmits_and_resumes(digits_dir, reference, tmp_path, monkeypatch):
    """The launcher's logic through submitit's LocalExecutor (jobs are processes of this machine)."""
    project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    settings = StudyParams(gpus=0, cpus=1, mem_gb=1, time_min=60)

    def submit():
        lines = []
        study_slurm.submit(DIGITS, tmp_path / "data", MATRIX, tmp_path / "params.yaml", settings, device="cpu",
                           train_flags=("--epochs", str(EPOCHS)), launcher="submitit-local", progress=lines.append)
        return "\n".join(lines)

    scenario(tmp_path, reference, submit, lambda job: study_slurm.SCHEDULERS["submitit-local"].cancel([job]))

    # --cancel: a queued/running job of the study is cancelled and then shows as failed.
    lines = []
    long = MatrixParams(targets=("rot30",), methods=("aggregate",), backbones=("convnet",), seeds=(0,))
    study_slurm.submit(DIGITS, tmp_path / "data", long, tmp_path / "params.yaml", settings, device="cpu",
                       train_flags=("--epochs", "1000"), launcher="submitit-local", progress=lines.append)
    result = CliRunner().invoke(app, ["study", "--params", str(tmp_path / "params.yaml"), "--target", "rot30",
                                      "--method", "aggregate", "--cancel"])
    assert result.exit_code == 0 and "cancelled convnet-aggregate-rot30-seed0" in result.output, result.output
    wait_for(lambda: study_slurm.status(DIGITS, tmp_path / "data", long)[0].state == "failed", 60,
             "the cancelled job to show as failed")


def test_without_slurm_the_launcher_says_so_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-folder"))  # no sbatch, no squeue
    result = CliRunner().invoke(app, ["study", "--launcher", "slurm", "--target", "rot0", "--method", "dmg"])
    assert result.exit_code == 1 and "sbatch not found" in result.output, result.output
    assert not (tmp_path / "data").exists()
    result = CliRunner().invoke(app, ["study", "--launcher", "pbs"])
    assert result.exit_code == 1 and "unknown launcher 'pbs'; valid: local, slurm" in result.output
    result = CliRunner().invoke(app, ["study", "--status", "--cancel"])
    assert result.exit_code == 1 and "exclude each other" in result.output
    result = CliRunner().invoke(app, ["study", "--cancel", "--target", "rot0"])  # no jobs recorded
    assert result.exit_code == 0 and "0 jobs cancelled; none was queued or running" in result.output


# --- a real one-node SLURM cluster -------------------------------------------------------------

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


SLURM_CONF = """ClusterName=dmgtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster of this machine; yields the environment that points at it.

    Each daemon runs in the foreground as a child of this process (and dies with it), so it
    is stopped by its own PID; the jobs are cancelled first."""
    missing = [d for d in DAEMONS if find(d) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found; .ci/run installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (slurmd starts jobs as their user)")
    root = Path(f"/tmp/dmg-slurm-{os.getpid()}")  # short: a UNIX socket path has a 107-byte limit
    shutil.rmtree(root, ignore_errors=True)
    (root / "state").mkdir(parents=True)
    (root / "spool").mkdir()
    root.chmod(0o755)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                      user=os.environ.get("USER", "root"), cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    commands = [
        [find("munged"), "-F", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
         f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
        [find("slurmctld"), "-D", "-i", "-f", str(conf)],
        [find("slurmd"), "-D", "-f", str(conf), "-N", host],
    ]
    daemons = []
    try:
        for command in commands:
            with open(root / f"{Path(command[0]).name}.out", "w") as out:
                daemons.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                preexec_fn=die_with_this_process()))
            time.sleep(1)
            if daemons[-1].poll() is not None:
                pytest.skip(f"{Path(command[0]).name} did not start (exit {daemons[-1].returncode}): "
                            f"{(root / (Path(command[0]).name + '.out')).read_text()[-300:]}")

        def idle():
            result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        try:
            wait_for(idle, 60, "the SLURM node to be idle")
        except AssertionError as exc:
            pytest.skip(f"the one-node SLURM cluster did not come up: {exc}")
        yield env
    finally:
        if daemons and all(d.poll() is None for d in daemons):
            subprocess.run(["scancel", "-u", os.environ.get("USER", "root")], env=env, capture_output=True)
            empty = lambda: subprocess.run(["squeue", "-h"], env=env, capture_output=True,  # noqa: E731
                                           text=True).stdout.strip() == ""
            try:
                wait_for(empty, 60, "the cancelled jobs to end")
            except AssertionError:
                pass
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_study_skips_resubmits_and_resumes(slurm_cluster, digits_dir, reference, tmp_path, monkeypatch):
    """`dmg study --launcher slurm` on the real one-node cluster: scancel kills one job mid-run,
    `scontrol requeue` preempts the other, which starts again and resumes."""
    project(digits_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    resources = ["--gpus", "0", "--cpus", "1", "--mem-gb", "1", "--time-min", "60"]

    def submit():
        result = CliRunner().invoke(app, ["study", "--params", str(tmp_path / "params.yaml"), "--launcher", "slurm",
                                          *MATRIX_FLAGS, *resources])
        assert result.exit_code == 0, result.output
        return result.output

    def scancel(job):
        subprocess.run(["scancel", job], env=slurm_cluster, check=True)

    def requeue(job):
        """What SLURM does to a preempted job (PreemptMode=REQUEUE), without the usual wait
        before a requeued job may start again."""
        subprocess.run(["scontrol", "requeue", job], env=slurm_cluster, check=True)
        wait_for(lambda: subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], env=slurm_cluster,
                                        capture_output=True).returncode == 0, 60, f"job {job} to be pending again")

    scenario(tmp_path, reference, submit, scancel, preempt=requeue)

    # A submission the cluster refuses is one line, and records nothing.
    records = (tmp_path / "data" / "study" / "digits" / "jobs.json").read_text()
    result = CliRunner().invoke(app, ["study", "--params", str(tmp_path / "params.yaml"), "--launcher", "slurm",
                                      "--target", "rot30", "--method", "aggregate", *resources, "--partition", "nosuch"])
    assert result.exit_code == 1 and "the scheduler refused the jobs" in result.output, result.output
    assert "invalid partition" in result.output.lower() and len(result.output.strip().splitlines()) == 2
    assert (tmp_path / "data" / "study" / "digits" / "jobs.json").read_text() == records
    script = next((tmp_path / "data" / "study" / "digits" / "jobs").glob("*_submission.sh")).read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=1G" in script and "--array=" in script


@pytest.mark.parametrize("section, message", [
    ({"nodes": 2}, "unknown key 'study.nodes'"),
    ({"gpus": -1}, "study.gpus must be at least 0"),
    ({"time_min": 0}, "study.time_min must be at least 1"),
    ({"extra": {"account": 7}}, "study.extra.account must be a string"),
])
def test_the_study_section_is_checked_like_every_other(tmp_path, monkeypatch, section, message):
    write_params(tmp_path, study=section)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["study", "--status"])
    assert result.exit_code == 1 and message in result.output, result.output
