"""A sweep on SLURM: one job array through submitit (`executor.batch()`, `array_parallelism`), each array
task training its members as one pack (one stacked model, packs.py; `--pack off`: one member after
another), so 64 two-second members are not 64 jobs.

A preempted or timed-out task saves its pack (or the member it was training) and is requeued alone
(USR2, as `submit` does); its finished members are skipped and the rest resume from the checkpoint.
A member that fails is recorded as failed and the task goes on. `sweep status` reads the members'
run dirs and Slurm's view of each task (slurm/jobs.py): no accounting needed.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.slurm import jobs as slurm_jobs
from mnist_dist.slurm import submit as slurm
from mnist_dist.store.provenance import now
from mnist_dist.sweep import packing as packs
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.results import progress
from mnist_dist.sweep.spec import Member, Spec, read_manifest, write_manifest
from mnist_dist.sweep.state import FINAL, NO_RETRY, STATES, member_state, to_train
from mnist_dist.sweep.target import reached
from mnist_dist.sweep.workers import taken_by

TASK_MINUTE_S = 60.0  # the default task trains about this long: Slurm's scheduling cost stays small
# Planning estimates of the seed config on one CPU thread, to size tasks (SWEEP.md has the measures):
MEMBER_START_S, MEMBER_EPOCH_S = 2.0, 0.5  # a member trained alone: its start-up, each epoch
PACKED_MEMBER_EPOCH_S = 0.15  # a member-epoch in a pack


@dataclass(frozen=True)
class Packing:
    """How the members go into tasks: `pack` auto|off, `max_pack`, `per_task` (None: a minute's worth)."""

    pack: str = "auto"
    max_pack: int | None = None
    per_task: int | None = None


class SweepTask(Checkpointable):
    """The callable every array task runs: its pack of members (local.run_members). Requeued as the
    same callable (submitit's Checkpointable); the members' state is in their checkpoints."""

    def __init__(self, configs: list[dict[str, Any]], pack: str = "auto") -> None:
        self.configs = configs  # plain data: the pickle submitit writes holds no framework objects
        self.pack = pack

    def __call__(self) -> dict[str, int]:
        import submitit

        from mnist_dist.sweep.local import PacksStopped, run_members
        from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

        job = submitit.JobEnvironment()
        cfgs = [TrainConfig.model_validate(c) for c in self.configs]
        members = [Member(c.sweep.member, c.sweep.params, c) for c in cfgs if c.sweep is not None]
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(
            f"array task {job.job_id} on {job.hostname}: {len(members)} member(s), restart {restarts}",
            flush=True,
        )
        stop = StopFlag(cfgs[0].checkpoint.stop_check_steps)
        requeue = stop_on_signals(stop)  # submitit's checkpoint-and-requeue handler
        try:
            return run_members(members, stop, pack=self.pack, max_pack=len(members))
        except (Preempted, PacksStopped) as e:
            sweep = SweepDir.of_member(members[0].run_dir)
            where = sweep.packs / "<pack>" if self.pack == "auto" else sweep.members / "<member>"
            saved = f"{where}/checkpoints"
            slurm.requeue_or_exit(e, job, cfgs[0].max_requeues, requeue, saved, "sweep submit")


def default_per_task(cfg: TrainConfig, pack: str) -> int:
    """Members per task so that a task trains about TASK_MINUTE_S, by the planning estimates: with
    `pack` auto as one pack, with off one after another."""
    if pack == "auto":
        member_s = PACKED_MEMBER_EPOCH_S * cfg.total_epochs
    else:
        member_s = MEMBER_START_S + MEMBER_EPOCH_S * cfg.total_epochs
    return max(1, math.ceil(TASK_MINUTE_S / member_s))


def tasks(todo: list[Member], packing: Packing) -> list[list[Member]]:
    """The members of each array task: with packs, compatible members (one seed's together), as
    even as the per-task size allows; else in order."""
    if packing.pack == "off":
        per = packing.per_task or default_per_task(todo[0].cfg, "off") if todo else 1
        return [todo[i : i + per] for i in range(0, len(todo), per)]
    cap = min(packing.per_task or default_per_task(todo[0].cfg, "auto"), packing.max_pack or packs.MAX_PACK)
    return packs.plan(todo, max_pack=cap) if todo else []


def submit(
    spec: Spec,
    root: Path,
    members: list[Member],
    opts: slurm.SlurmOptions,
    packing: Packing,
    parallelism: int,
    dry_run: bool = False,
    log: Any = print,
) -> Any:
    """Preflight, stage the data, submit the packs of unfinished members as one array."""
    from mnist_dist.store import datafiles

    if packing.per_task is not None and not 1 <= packing.per_task <= 100_000:
        raise UserError(f"--members-per-task {packing.per_task}: from 1 to 100000")
    if not 1 <= parallelism <= 100_000:
        raise UserError(f"--array-parallelism {parallelism}: from 1 to 100000")
    root = root.absolute()
    warnings = slurm.preflight(opts, members[0].cfg, root, dry_run)
    todo = [m for m in members if to_train(member_state(m.run_dir), NO_RETRY)]
    groups = tasks(todo, packing)
    ex = slurm.executor(opts, root / "submitit")
    ex.update_parameters(array_parallelism=parallelism)
    finished = reached(root, {"metric": spec.recorded_metric, "members": [{"id": m.id} for m in members]})
    nothing = None  # why a real submit would send nothing
    if not groups:
        nothing = (
            f"all {len(members)} members of sweep {spec.name} are finished (done, failed or terminated); "
            "nothing to submit"
        )
    elif finished is not None:
        nothing = f"sweep {spec.name}: {finished}; nothing to submit"
    if dry_run:
        how = "one pack each" if packing.pack == "auto" else "one member after another"
        lines = [f"# array of {len(groups)} task(s) (%{parallelism} at once), {how}:"]
        lines += [f"#   task {i}: " + " ".join(m.id for m in group) for i, group in enumerate(groups)]
        script = slurm.sbatch_script(ex).rstrip() + "\n" + "\n".join(lines)
        return slurm.DryRun(script, warnings + ([nothing] if nothing else []))
    if nothing:
        raise UserError(nothing)
    for data_dir in sorted({m.cfg.data_dir().expanduser().absolute() for m in members}):
        datafiles.prepare(data_dir, members[0].cfg.data.source, log=log)  # compute nodes never download
    write_manifest(root, spec, members)
    slurm.private_dirs(root)
    configs = [[_job_config(m) for m in group] for group in groups]
    try:
        with ex.batch():
            jobs = [ex.submit(SweepTask(c, packing.pack)) for c in configs]
    except Exception as e:  # sbatch refused: its message is the useful part
        raise UserError(f"sbatch refused the array: {str(e).strip().splitlines()[-1]}") from None
    array_id = str(jobs[0].job_id).split("_")[0]
    record = {"job_id": array_id, "tasks": [[m.id for m in g] for g in groups], "submitted_at": now()}
    manifest = read_manifest(root)
    write_manifest(root, spec, members, jobs=[*manifest.get("jobs", []), record])
    from mnist_dist.slurm.jobs import remember

    remember(slurm.Submission(array_id, str(root), str(root / "submitit"), opts.partition, 1, 1, spec.name))
    return {"job_id": array_id, "tasks": len(groups)}


def _job_config(member: Member) -> dict[str, Any]:
    data_root = member.cfg.data_dir().expanduser().absolute()
    return slurm.job_config(member.cfg, member.run_dir.absolute(), data_root).model_dump(mode="json")


def find(target: str) -> tuple[Path, dict[str, Any]]:
    """(sweep dir, manifest) of a sweep dir or of the job id of one of its arrays."""
    path = Path(target)
    if path.is_dir():
        return path, read_manifest(path)
    from mnist_dist.slurm.jobs import lookup

    record = lookup(target)
    root = Path(record.get("run_dir") or "")
    if not SweepDir(root).manifest.is_file():
        raise UserError(f"job {target} is not a sweep's array; use `mnist-dist status {target}`")
    return root, read_manifest(root)


def status(target: str) -> dict[str, Any]:
    root, manifest = find(target)
    states = {m["id"]: member_state(SweepDir(root).member(m["id"])) for m in manifest["members"]}
    counted = Counter(states.values())
    info: dict[str, Any] = {
        "name": manifest["name"],
        "sweep_dir": str(root),
        "members": len(states),
        "counts": {s: counted[s] for s in STATES},
        "metric": manifest["metric"],
        **progress(root, manifest),
    }
    jobs = manifest.get("jobs", [])
    if jobs:
        job = jobs[-1]
        slurm_states = slurm_jobs.array_task_states(job["job_id"])
        info["job_id"] = job["job_id"]
        info["tasks"] = []
        for index, ids in enumerate(job["tasks"]):
            if job.get("workers"):  # an adaptive sweep's worker: the members it took so far
                ids = taken_by(root, index)
            counts = Counter(states.get(i, "pending") for i in ids)
            done = all(states.get(i) in FINAL for i in ids)
            info["tasks"].append(
                {
                    "task": index,
                    "state": slurm_states.get(index, "COMPLETED" if done else "UNKNOWN"),
                    "members": ids,
                    "counts": {s: counts[s] for s in STATES if counts[s]},
                }
            )
    return info


def cancel(target: str) -> dict[str, Any]:
    root, manifest = find(target)
    jobs = manifest.get("jobs", [])
    if not jobs:
        raise UserError(f"sweep {manifest['name']} in {root} was never submitted; nothing to cancel")
    array_id = jobs[-1]["job_id"]
    slurm_jobs.scancel(array_id)
    deadline = time.monotonic() + 60  # the tasks get KillWait to exit
    live = ("RUNNING", "PENDING", "COMPLETING", "REQUEUED")
    while time.monotonic() < deadline and any(
        s in live for s in slurm_jobs.array_task_states(array_id).values()
    ):
        time.sleep(0.5)
    return status(str(root))
