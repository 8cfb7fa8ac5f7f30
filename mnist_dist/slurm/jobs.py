"""Watching submitted jobs: status, logs, cancel, history, with or without Slurm accounting.

A job's state comes from squeue while Slurm holds it, then scontrol (for MinJobAge after the end),
then submitit's own files in the run directory (its result file, Slurm's cancel line in the log).
sacct is never needed. A requeued or preempted job is never reported as finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

from mnist_dist.errors import UserError
from mnist_dist.slurm import commands
from mnist_dist.store.outputs import read_entries

FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
}
JOB_ID = re.compile(r"^\d+$")


# Why a job pends that no wait can clear (squeue's reason): it asks for more than its partition has.
NEVER_STARTS = {
    "PartitionConfig": "it asks for more than its partition has (nodes, CPUs, memory or GPUs)",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows a job",
    "PartitionTimeLimit": "its --time is over its partition's time limit",
    "BadConstraints": "no node of its partition has what it asks for",
}


def state_dir() -> Path:
    """Where submitted jobs are remembered: $MNIST_DIST_STATE_DIR, else ~/.local/state/mnist-dist."""
    base = os.environ.get("MNIST_DIST_STATE_DIR") or Path.home() / ".local" / "state" / "mnist-dist"
    return Path(base) / "jobs"


def remember(sub: Any) -> None:
    from dataclasses import asdict

    record = {**asdict(sub), "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from mnist_dist.store.atomic import write_atomic
    from mnist_dist.store.ownership import private_dir

    folder = private_dir(state_dir(), "job records dir")
    write_atomic(folder / f"{sub.job_id}.json", json.dumps(record, indent=2) + "\n")
    write_atomic(Path(sub.run_dir) / "job.json", json.dumps(record, indent=2) + "\n")


def lookup(job: str) -> dict[str, Any]:
    """The record of a job id, or of the job whose run directory is `job`."""
    path = Path(job)
    if path.is_dir() and (path / "job.json").is_file():
        return _read_record(path / "job.json")
    if not JOB_ID.match(job):
        raise UserError(f"'{job}' is neither a job id (digits) nor a run directory submitted by mnist-dist")
    record = state_dir() / f"{job}.json"
    if record.is_file():
        return _read_record(record)
    if _squeue(job) or _scontrol(job):
        return {"job_id": job, "run_dir": None, "folder": None}
    raise UserError(
        f"job {job} is not known to Slurm or to mnist-dist (records in {state_dir()}); "
        "check the id with squeue"
    )


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"job record {path} is unreadable ({e}); delete it, or pass the job id") from None
    if not isinstance(record, dict) or not JOB_ID.match(str(record.get("job_id", ""))):
        raise UserError(f"job record {path} has no job_id; delete it, or pass the job id")
    return record


def _squeue(job_id: str) -> dict[str, str] | None:
    proc = commands.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N|%M"])
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not line:
        return None
    state, reason, nodes, elapsed = line.split("|")
    return {"state": state, "reason": reason, "nodes": nodes, "elapsed": elapsed, "source": "squeue"}


def _scontrol(job_id: str) -> dict[str, str] | None:
    proc = commands.run(["scontrol", "-o", "show", "job", job_id])
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    return {
        "state": fields.get("JobState", "UNKNOWN"),
        "reason": fields.get("Reason", ""),
        "nodes": fields.get("NodeList", ""),
        "exit_code": fields.get("ExitCode", ""),
        "restarts": fields.get("Restarts", "0"),
        "source": "scontrol",
    }


def array_task_states(array_id: str) -> dict[int, str]:
    """Slurm's state of each task of a job array, by task index: scontrol (which knows tasks that
    ended lately), then squeue (which knows pending tasks scontrol lists as one line). submitit
    submits a batch of one as a plain job: that job is task 0."""
    states: dict[int, str] = {}
    for cmd in (
        ["scontrol", "-o", "show", "job", array_id],
        ["squeue", "-h", "-r", "-j", array_id, "-o", "ArrayTaskId=%K JobState=%T"],
    ):
        proc = commands.run(cmd)
        for line in proc.stdout.splitlines():
            m = re.search(r"ArrayTaskId=(\d+)\b.*?JobState=(\w+)", line)
            plain = re.match(rf"JobId={re.escape(array_id)}\s.*?JobState=(\w+)", line)
            if m:
                states[int(m.group(1))] = m.group(2)
            elif plain and "ArrayJobId=" not in line:
                states[0] = plain.group(1)
    return states


def scancel(job_id: str) -> None:
    proc = commands.run(["scancel", job_id])
    if proc.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def slurm_state(job_id: str) -> str | None:
    """What Slurm says of the job right now (COMPLETING after an scancel), or None if it cannot say."""
    try:
        found = _scontrol(job_id)
    except commands.Unreachable:
        return None
    return found["state"] if found else None


class _PlainData(pickle.Unpickler):
    """submitit's result file, read without running code: only builtins' containers and scalars."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a job result file")


def _result(record: dict[str, Any]) -> tuple[str, Any] | None:
    folder = record.get("folder")
    if not folder:
        return None
    path = Path(folder) / f"{record['job_id']}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            outcome, value = _PlainData(f).load()
    except Exception:  # an unreadable result is reported, not raised
        return ("error", "result file unreadable")
    return outcome, value


def log_paths(record: dict[str, Any], task: int = 0) -> tuple[Path, Path] | None:
    folder = record.get("folder")
    if not folder:
        return None
    base = Path(folder) / f"{record['job_id']}_{task}_log"
    return base.with_suffix(".out"), base.with_suffix(".err")


def _last_error(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*", line.strip()):
            return line.strip()
    return None


def status(job: str) -> dict[str, Any]:
    record = lookup(job)
    job_id = record["job_id"]
    info: dict[str, Any] = {"job_id": job_id, "run_dir": record.get("run_dir")}
    live = _squeue(job_id)
    found = live or _scontrol(job_id)
    result = _result(record)
    if found:
        info.update(found)
    elif result is not None:
        info.update(state="COMPLETED" if result[0] == "success" else "FAILED", source="submitit")
    else:
        paths = log_paths(record)
        err = paths[1].read_text(errors="replace") if paths and paths[1].is_file() else ""
        cancelled = re.search(r"\*\*\* JOB \d+ ON \S+ CANCELLED", err)
        info.update(state="CANCELLED" if cancelled else "UNKNOWN", source="submitit logs")
    info["finished"] = info["state"] in FINISHED
    if info["state"] == "PENDING" and info.get("reason") in NEVER_STARTS:
        info["never"] = (
            f"it may never start: {NEVER_STARTS[info['reason']]} (or the nodes it needs are down); "
            f"if so, cancel it (mnist-dist cancel {job_id}) and submit it again asking for less"
        )
    if result is not None and result[0] == "error":
        info["error"] = _last_error(str(result[1])) or str(result[1]).strip().splitlines()[-1]
    elif info["state"] == "FAILED":
        paths = log_paths(record)
        if paths and paths[1].is_file():
            info["error"] = _last_error(paths[1].read_text(errors="replace"))
    run_dir = record.get("run_dir")
    with contextlib.suppress(UserError):  # a damaged metrics.jsonl: no count, the job's state still
        entries = read_entries(Path(run_dir)) if run_dir else None
        if entries:
            info["epochs_done"] = max(0, len(entries) - 1)
    return info


def cancel(job: str) -> dict[str, Any]:
    record = lookup(job)
    if not (_squeue(record["job_id"]) or _scontrol(record["job_id"])):  # over, or forgotten by Slurm
        return status(record["job_id"])
    scancel(record["job_id"])
    deadline = time.monotonic() + 90  # scancel returns at once; the tasks get KillWait to exit
    while time.monotonic() < deadline:
        info = status(record["job_id"])
        if info["finished"]:
            return info
        time.sleep(0.5)
    return status(record["job_id"])


def log_files(job: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of one task of a job submitted by mnist-dist."""
    record = lookup(job)
    paths = log_paths(record, task)
    if paths is None:
        raise UserError(
            f"job {record['job_id']} was not submitted by mnist-dist: its logs are where its "
            "sbatch script says"
        )
    n_tasks = int(record.get("nodes", 1)) * int(record.get("tasks_per_node", 1))
    if not 0 <= task < n_tasks:
        raise UserError(f"--task {task}: job {record['job_id']} has tasks 0..{n_tasks - 1}")
    return paths


def history(job_or_dir: str) -> list[dict[str, Any]]:
    """The per-epoch entries of a run: history.json when finished, metrics.jsonl while it runs."""
    path = Path(job_or_dir)
    run_dir = path if path.is_dir() else Path(lookup(job_or_dir).get("run_dir") or "")
    entries = read_entries(run_dir)
    if entries is None and path.is_dir():
        raise UserError(f"{run_dir} has no history.json or metrics.jsonl; pass a run directory")
    return entries or []
