"""An adaptive sweep on SLURM with no server, no database and no controller process: `sweep submit
--workers K` (every bayes sweep: K defaults to 2) is a job array of K workers that share the sweep dir.

Each worker loops: under the sweep's proposal lock (`SWEEP_DIR/workers/propose.lock`, flock), it
reads the members on disk and takes the next ones free to train (leased to it in
`workers/leases.json` until it holds their locks): a pack that a preempted worker left (its members
resume from the pack's checkpoint), else pending ones, else, for bayes, new proposals from W&B's
engine given every member on disk (the finished ones with their curves, the others as running runs,
as W&B's controller gives them), appended to sweep.json's proposals up to `run_cap` across all
workers. It trains them as a pack (local.run_members): each member is claimed through its run dir's
lock (O_EXCL), so two workers never train one member, and early termination judges at each band with
the values every worker has written so far (asynchronous, as on W&B). It ends when nothing is left
to take. A preempted worker saves its pack and is requeued (USR2, as every task); any worker resumes
the pack's members. Each worker records the members it took in `workers/task-<i>.json`, for
`sweep status`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable

from mnist_dist.errors import UserError
from mnist_dist.store.atomic import write_atomic
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.spec import Builder, Member, Spec, read_manifest, write_manifest
from mnist_dist.sweep.state import FINAL, NO_RETRY, member_state, to_train

LEASE_S = 120.0  # a member handed to a worker is its own this long, until it holds the member's lock


def lease_file(root: Path) -> Path:
    return SweepDir(root).root / "workers" / "leases.json"


def _leases(root: Path) -> dict[str, list]:
    """Member id: [the worker it was handed to, until when] (read under the proposal lock)."""
    try:
        found = json.loads(lease_file(root).read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in found.items() if isinstance(v, list) and len(v) == 2}
        if isinstance(found, dict)
        else {}
    )


def worker_id() -> str:
    """This worker: its array task (the same after a requeue), or this process off Slurm."""
    return os.environ.get("SLURM_ARRAY_TASK_ID") or f"pid-{os.getpid()}"


def default_take(run_cap: int, workers: int) -> int:
    """Members a worker takes at a time: about two packs per worker over the sweep."""
    return max(1, math.ceil(run_cap / (2 * workers)))


@contextlib.contextmanager
def proposal_lock(root: Path) -> Iterator[None]:
    where = SweepDir(root).root / "workers"
    where.mkdir(mode=0o700, exist_ok=True)
    with (where / "propose.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SweepWorker(Checkpointable):
    """One array task of an adaptive sweep: takes members and trains them until none is left."""

    def __init__(self, build: Builder, data_root: str, take: int) -> None:
        self.build, self.data_root, self.take = build, data_root, take

    def members(self, combos: list[dict[str, Any]] | None) -> list[Member]:
        """The members of these values (None: the spec's grid or draws), as the job runs them."""
        from mnist_dist.slurm.submit import job_config

        out = []
        for m in self.build(combos):
            cfg = job_config(m.cfg, m.run_dir.absolute(), Path(self.data_root))
            out.append(Member(m.id, m.params, cfg))
        return out

    def next_members(self, log: Any = print) -> list[Member]:
        """The next members to train (empty: nothing left), chosen under the proposal lock and leased
        to this worker for LEASE_S seconds: time enough to claim their run dirs' locks, so that no other
        worker takes them first (a worker that dies before it claims them gives them up when the lease
        ends; requeued, it finds its own leases)."""
        from mnist_dist.sweep.pack_dirs import resumable

        spec, root = self.build.spec, self.build.root
        with proposal_lock(root):
            leases, me, now = _leases(root), worker_id(), time.time()
            manifest = read_manifest(root)
            proposals = list(manifest.get("proposals", [])) if spec.method == "bayes" else None
            found = self.members(proposals)

            def mine_to_take(m: Member) -> bool:
                holder, until = leases.get(m.id, [me, 0.0])
                return (holder == me or until < now) and to_train(member_state(m.run_dir), NO_RETRY)

            def free() -> list[Member]:
                return [m for m in found if mine_to_take(m)]

            chosen = next(iter(resumable(found, free())), None)  # a preempted worker's pack, whole
            if chosen is None:
                left = free()
                if spec.method == "bayes" and len(left) < self.take and not _target_reached(root, manifest):
                    proposals = proposals or []
                    size = min(self.take - len(left), spec.count - len(proposals))
                    new = _propose(spec, found, proposals, size)
                    if new:
                        proposals += new
                        found = self.members(proposals)
                        write_manifest(root, spec, found, proposals=proposals, run_cap=spec.count)
                        log(f"proposed {len(new)} member(s): {len(proposals)} of {spec.count}")
                chosen = free()[: self.take]
            leases = {k: v for k, v in leases.items() if v[1] > now and v[0] != me}
            leases |= {m.id: [me, now + LEASE_S] for m in chosen}
            write_atomic(lease_file(root), json.dumps(leases) + "\n")
            return chosen

    def __call__(self) -> dict[str, int]:
        import submitit

        from mnist_dist.slurm import submit as slurm
        from mnist_dist.sweep.local import PacksStopped, run_members
        from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

        job = submitit.JobEnvironment()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"sweep worker {job.job_id} on {job.hostname}, restart {restarts}", flush=True)
        probe = self.members([{}] if self.build.spec.method == "bayes" else None)[0]
        stop = StopFlag(probe.cfg.checkpoint.stop_check_steps)
        requeue = stop_on_signals(stop)
        totals: dict[str, int] = {}
        try:
            while not stop.requested:
                members = self.next_members()
                if not members:
                    break
                self._record(job, members)
                print(f"taking {len(members)} member(s): {' '.join(m.id for m in members)}", flush=True)
                for what, n in run_members(members, stop, pack="auto", max_pack=len(members)).items():
                    totals[what] = totals.get(what, 0) + n
            print("nothing left to take: " + ", ".join(f"{n} {w}" for w, n in totals.items()), flush=True)
            return totals
        except (Preempted, PacksStopped) as e:
            saved = f"{SweepDir(self.build.root).packs}/<pack>/checkpoints"
            slurm.requeue_or_exit(e, job, probe.cfg.max_requeues, requeue, saved, "sweep submit")

    def _record(self, job: Any, members: list[Member]) -> None:
        """workers/task-<i>.json: the members this worker took, in order (for `sweep status`)."""
        path = worker_file(self.build.root, int(os.environ.get("SLURM_ARRAY_TASK_ID", job.global_rank)))
        taken = json.loads(path.read_text()) if path.is_file() else []
        taken += [m.id for m in members if m.id not in taken]
        write_atomic(path, json.dumps(taken) + "\n")


def submit(
    spec: Spec,
    root: Path,
    build: Builder,
    probe: Member,
    opts: Any,
    workers: int,
    take: int | None,
    dry_run: bool = False,
    log: Any = print,
) -> Any:
    """Preflight, stage the data, submit `workers` SweepWorkers as one array (all at once)."""
    from mnist_dist.slurm import submit as slurm
    from mnist_dist.slurm.jobs import remember
    from mnist_dist.store import datafiles
    from mnist_dist.store.provenance import now

    if not 1 <= workers <= 1024:
        raise UserError(f"--workers {workers}: from 1 to 1024")
    if take is not None and not 1 <= take <= 100_000:
        raise UserError(f"--members-per-task {take}: from 1 to 100000")
    root = root.absolute()
    warnings = slurm.preflight(opts, probe.cfg, root, dry_run)
    manifest = read_manifest(root) if SweepDir(root).manifest.is_file() else {}
    proposals = list(manifest.get("proposals", [])) if spec.method == "bayes" else None
    found = build(proposals)
    cap = spec.count if spec.method == "bayes" else len(found)
    take = take or default_take(cap or 1, workers)
    left = [m for m in found if to_train(member_state(m.run_dir), NO_RETRY)]
    nothing = None
    if not left and len(found) >= (cap or 0):
        nothing = f"all {len(found)} members of sweep {spec.name} are finished; nothing to submit"
    elif _target_reached(root, {"metric": spec.recorded_metric, "members": [{"id": m.id} for m in found]}):
        nothing = f"sweep {spec.name}: its metric target is reached; nothing to submit"
    ex = slurm.executor(opts, root / "submitit")
    ex.update_parameters(array_parallelism=workers)
    if dry_run:
        line = f"# array of {workers} worker(s), each taking {take} member(s) at a time until none is left"
        return slurm.DryRun(
            slurm.sbatch_script(ex).rstrip() + "\n" + line, warnings + ([nothing] if nothing else [])
        )
    if nothing:
        raise UserError(nothing)
    datafiles.prepare(probe.cfg.data_dir().expanduser().absolute(), probe.cfg.data.source, log=log)
    extra = {"proposals": proposals, "run_cap": spec.count} if proposals is not None else {}
    write_manifest(root, spec, found, **extra)
    slurm.private_dirs(root)
    absolute = dataclasses.replace(spec, base=spec.base.absolute() if spec.base else None)
    worker = SweepWorker(dataclasses.replace(build, spec=absolute, root=root), str(_data_root(probe)), take)
    try:
        with ex.batch():
            jobs = [ex.submit(worker) for _ in range(workers)]
    except Exception as e:  # sbatch refused: its message is the useful part
        raise UserError(f"sbatch refused the array: {str(e).strip().splitlines()[-1]}") from None
    array_id = str(jobs[0].job_id).split("_")[0]
    record = {
        "job_id": array_id,
        "workers": workers,
        "tasks": [[] for _ in range(workers)],
        "submitted_at": now(),
    }
    write_manifest(root, spec, found, **extra, jobs=[*read_manifest(root).get("jobs", []), record])
    remember(slurm.Submission(array_id, str(root), str(root / "submitit"), opts.partition, 1, 1, spec.name))
    return {"job_id": array_id, "tasks": workers, "workers": workers}


def _data_root(member: Member) -> Path:
    return member.cfg.data_dir().expanduser().absolute()


def worker_file(root: Path, task: int) -> Path:
    return SweepDir(root).root / "workers" / f"task-{task}.json"


def taken_by(root: Path, task: int) -> list[str]:
    path = worker_file(root, task)
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return []


def _target_reached(root: Path, manifest: dict[str, Any]) -> bool:
    if (manifest.get("metric") or {}).get("target") is None:
        return False
    from mnist_dist.sweep.target import reached

    return reached(root, manifest) is not None


def _propose(
    spec: Any, found: list[Member], proposals: list[dict[str, Any]], size: int
) -> list[dict[str, Any]]:
    """`size` new proposals from W&B's engine: the finished members with their curves, every other
    member (running, pending, stopped: on another worker) and the new ones as running runs."""
    from mnist_dist.sweep import engine
    from mnist_dist.sweep.target import curve

    params = list(spec.parameters.values())
    finished, pending = [], []
    for m in found:
        if member_state(m.run_dir) in FINAL:
            finished.append((m.params, curve(m.run_dir, spec.metric, done_only=False)))
        else:
            pending.append(m.params)
    out: list[dict[str, Any]] = []
    for _ in range(max(0, size)):
        index = len(proposals) + len(out)
        out.append(engine.propose(params, spec.engine_metric, finished, pending + out, spec.name, index))
    return out
