"""`dmg study --launcher slurm`: every run of the matrix as one SLURM job, through submitit.

Each job runs what its run still needs, decided on the node from the run's files
(stages/study.py `run_state`): `dmg train` (with `--resume` when a last.pt is there) and then
`dmg evaluate`, exactly dvc.yaml's commands, in the folder `dmg study` was started in, so the
outputs land where `dvc repro` puts them. One submission is one job array (submitit's batch).

The study is kept on disk, not in a process: <data_dir>/study/<dataset>/jobs.json records each
run's job id and log, submitit's files lie in jobs/ beside it. `status` reads those and asks the
scheduler which jobs are still queued or running (squeue: it needs no accounting database,
which sacct does); a run is finished only when its files say so. Submitting again skips
finished runs and runs whose job is still queued or running, and resubmits the rest; a
resubmitted run continues from its last checkpoint. A job stopped at its time limit or
preempted is requeued by submitit (the job is Checkpointable) and resumes the same way.

submitit's LocalExecutor (`LocalProcesses`) runs the same jobs as processes of this machine:
the tests use it where no SLURM daemons can start.
"""
from __future__ import annotations

import contextlib
import getpass
import io
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import submitit

from dmgcli.datasets import DatasetInfo
from dmgcli.errors import DmgError
from dmgcli.fileio import read_json, run_lock, write_json
from dmgcli.params import MatrixParams, StudyParams
from stages.study import (FINISHED, STATE_NOTES, StudyRun, check_matrix, die_with_this_process,
                          last_line, run_commands, run_state)

RECORDS = "jobs.json"


def study_folder(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / "study" / dataset


@dataclass
class RunJob(submitit.helpers.Checkpointable):
    """One run as a job: what the run still needs, decided when the job starts (a requeued or
    resubmitted job sees the last.pt its earlier attempt left and resumes it)."""
    run: StudyRun
    dataset: str
    data_dir: str
    params_file: str
    device: str
    train_flags: tuple[str, ...]
    evaluate: bool
    cwd: str  # where `dmg study` ran: metrics/ and a relative data_dir are resolved there

    def __call__(self) -> str:
        cwd = Path(self.cwd)
        state = run_state(cwd / self.data_dir, self.dataset, self.run, self.evaluate, cwd / "metrics")
        for command in run_commands(self.run, state, self.dataset, self.params_file, self.device,
                                    self.train_flags, self.evaluate):
            print(f"$ {shlex.join(command)}", flush=True)
            code = subprocess.run(command, cwd=cwd, preexec_fn=die_with_this_process()).returncode
            if code != 0:
                raise RuntimeError(f"dmg {command[3]} of {self.run.name} exited with code {code}")
        return state


def run_tool(command: list[str]) -> str:
    """A scheduler command's output; a failure is one line naming the command."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise DmgError(f"study: {command[0]} not found: the slurm launcher runs on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise DmgError(f"study: {command[0]} gave no answer in 60 s; is the SLURM controller up?") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise DmgError(f"study: {shlex.join(command[:2])} failed: {message[-1] if message else result.returncode}")
    return result.stdout


class Slurm:
    """Jobs of a SLURM cluster: submitted by submitit's SlurmExecutor, watched with squeue, cancelled with scancel."""
    name = "slurm"

    def check(self) -> None:
        for tool in ("sbatch", "squeue"):
            if shutil.which(tool) is None:
                raise DmgError(f"study: {tool} not found: `--launcher slurm` runs on a SLURM login node")

    def executor(self, folder: Path, settings: StudyParams, job_name: str):
        executor = submitit.SlurmExecutor(folder, max_num_timeout=settings.timeout_requeues)
        executor.update_parameters(
            job_name=job_name, time=settings.time_min, partition=settings.partition,
            gpus_per_node=settings.gpus or None, cpus_per_task=settings.cpus, mem=f"{settings.mem_gb}G",
            array_parallelism=settings.array_parallelism, stderr_to_stdout=True,
            additional_parameters=dict(settings.extra))
        return executor

    def active(self, job_ids: list[str]) -> dict[str, str]:
        """Which of the jobs SLURM still holds, and their state (PENDING, RUNNING, COMPLETING, ...).

        All of this user's jobs, one line per array task (-r): `squeue -j` fails outright on an id
        the controller has forgotten, which every finished job becomes."""
        if not job_ids:
            return {}
        out = run_tool(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
        states = dict(line.split("|", 1) for line in out.split() if "|" in line)
        return {job: states[job] for job in job_ids if job in states}

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            run_tool(["scancel", *job_ids])


class LocalProcesses:
    """The same jobs as processes of this machine, through submitit's LocalExecutor (a job id is a pid)."""
    name = "submitit-local"

    def check(self) -> None:
        pass

    def executor(self, folder: Path, settings: StudyParams, job_name: str):
        executor = submitit.LocalExecutor(folder, max_num_timeout=settings.timeout_requeues)
        executor.update_parameters(timeout_min=settings.time_min, gpus_per_node=settings.gpus,
                                   stderr_to_stdout=True)
        return executor

    def active(self, job_ids: list[str]) -> dict[str, str]:
        return {job: "RUNNING" for job in job_ids if alive(int(job))}

    def cancel(self, job_ids: list[str]) -> None:
        """SIGKILL each job's controller and every process under it: submitit's job process
        ignores SIGTERM (it waits for SLURM's requeue signal instead)."""
        for job in job_ids:
            for pid in [int(job), *descendants(int(job))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an ended child nobody has waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


SCHEDULERS = {s.name: s for s in (Slurm(), LocalProcesses())}


def load_records(folder: Path) -> dict[str, dict]:
    path = folder / RECORDS
    if not path.exists():
        return {}
    try:
        return dict(read_json(path)["runs"])
    except (ValueError, KeyError, TypeError):
        raise DmgError(f"study: {path} is damaged; move it away to start the study's records afresh") from None


def active_jobs(records: dict[str, dict]) -> dict[str, str]:
    """Run name -> scheduler state, for the runs whose recorded job is still queued or running."""
    found = {}
    for launcher in {r["launcher"] for r in records.values()}:
        ids = {r["job"]: name for name, r in records.items() if r["launcher"] == launcher}
        for job, state in SCHEDULERS[launcher].active(list(ids)).items():
            found[ids[job]] = state
    return found


def submit(info: DatasetInfo, data_dir: str | Path, matrix: MatrixParams, params_file: str | Path,
           settings: StudyParams, device: str = "auto", train_flags: tuple[str, ...] = (), evaluate: bool = True,
           launcher: str = "slurm", progress: Callable[[str], None] = print) -> dict[str, str]:
    """Submit one job per run that is neither finished nor queued/running; returns run name -> job id."""
    runs = check_matrix(info, matrix)
    scheduler = SCHEDULERS[launcher]
    scheduler.check()  # before anything is written
    folder = study_folder(data_dir, info.name)
    with run_lock(folder / RECORDS, folder=False):  # two submitters would each submit every run
        records = load_records(folder)
        active = active_jobs(records)
        todo, done, waiting = [], 0, 0
        for run in runs:
            state = run_state(data_dir, info.name, run, evaluate)
            if state == FINISHED:
                done += 1
                continue
            if run.name in active:
                waiting += 1
                progress(f"study: {run.name} is {active[run.name].lower()} as job {records[run.name]['job']}; "
                         f"not submitted again")
            else:
                todo.append((run, state))
        progress(f"study: {len(runs)} runs of {info.name}: {done} finished, {waiting} queued or running, "
                 f"{len(todo)} to submit")
        if not todo:
            return {}
        executor = scheduler.executor(folder / "jobs", settings, f"dmg-{info.name}")
        jobs = []
        try:
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # one job array
                for run, _ in todo:
                    jobs.append(executor.submit(RunJob(run, info.name, str(data_dir), str(params_file), device,
                                                       tuple(train_flags), evaluate, str(Path.cwd()))))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise DmgError(f"study: the scheduler refused the jobs: {lines[-1] if lines else exc}; "
                           f"nothing was submitted") from None
        submitted = time.strftime("%Y-%m-%d %H:%M:%S")
        for (run, state), job in zip(todo, jobs):
            again = run.name in records
            records[run.name] = {"job": str(job.job_id), "launcher": launcher, "log": str(job.paths.stdout),
                                 "submitted": submitted}
            what = STATE_NOTES.get(state, " (resubmitted)" if again else "")
            progress(f"study: submitted {run.name} as job {job.job_id}{what}; log {job.paths.stdout}")
        write_json(folder / RECORDS, {"runs": records})
    return {run.name: str(job.job_id) for (run, _), job in zip(todo, jobs)}


@dataclass(frozen=True)
class RunStatus:
    run: StudyRun
    state: str  # finished, running, pending, failed, unfinished
    detail: str  # job id, and the log's last line


def status(info: DatasetInfo, data_dir: str | Path, matrix: MatrixParams, evaluate: bool = True) -> list[RunStatus]:
    """Every run of the matrix: finished (its files), pending or running (its job, per the
    scheduler), failed (its job ended without finishing the run), or unfinished (no job: a local
    study's run, not finished)."""
    runs = check_matrix(info, matrix)
    folder = study_folder(data_dir, info.name)
    records = load_records(folder)
    active = active_jobs({name: r for name, r in records.items() if name in {run.name for run in runs}})
    out = []
    for run in runs:
        record = records.get(run.name)
        log = Path(record["log"]) if record else folder / f"{run.name}.log"
        job = f"job {record['job']}" if record else ""
        if run_state(data_dir, info.name, run, evaluate) == FINISHED:
            out.append(RunStatus(run, "finished", job))
        elif run.name in active:
            state = "pending" if active[run.name] == "PENDING" else "running"
            out.append(RunStatus(run, state, f"{job}: {last_line(log)}" if state == "running" else job))
        elif record:
            out.append(RunStatus(run, "failed", f"{job}: {last_line(log) or 'no log'} ({log})"))
        else:
            out.append(RunStatus(run, "unfinished" if log.exists() else "pending",
                                 last_line(log) if log.exists() else "not submitted"))
    return out


def describe(statuses: list[RunStatus]) -> str:
    width = max(len(s.run.name) for s in statuses)
    lines = [f"{s.state:<10} {s.run.name:<{width}}  {s.detail}".rstrip() for s in statuses]
    counts = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    return "\n".join([*lines, "study: " + ", ".join(f"{n} {state}" for state, n in counts.items())])


def cancel(info: DatasetInfo, data_dir: str | Path, progress: Callable[[str], None] = print) -> list[str]:
    """Cancel every queued or running job of the study; returns their run names."""
    folder = study_folder(data_dir, info.name)
    records = load_records(folder)
    active = active_jobs(records)
    for launcher in {records[name]["launcher"] for name in active}:
        SCHEDULERS[launcher].cancel([records[name]["job"] for name in active if records[name]["launcher"] == launcher])
    for name in active:
        progress(f"study: cancelled {name} (job {records[name]['job']})")
    progress(f"study: {len(active)} jobs cancelled" + ("" if active else "; none was queued or running"))
    return sorted(active)
