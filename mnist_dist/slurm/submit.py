"""Sending the training to SLURM with submitit: preflight, the sbatch script, and the job itself.

The job is a Python callable (a submitit Checkpointable), not a shell line: submitit's sbatch script
runs `srun python -m submitit.core._submit FOLDER`, one task per process, and every task calls
TrainJob(), which exports the torch.distributed environment from SLURM's variables and runs the same
`mnist_dist.train.run.run` as `mnist-dist train`. No `accelerate launch` or torchrun inside the tasks:
they would fight submitit over spawning processes and break its requeue.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from submitit.helpers import Checkpointable

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.slurm import commands

# Storage that is local to each node: a run dir there is invisible to the other nodes and to you.
NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp", "/run", "/scratch/local")
SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,:+=@%/-]*$")
TIME_FORMAT = re.compile(r"^(\d+)$|^(?:(\d+)-)?(\d{1,2}):(\d{2})(?::(\d{2}))?$")
MEM_FORMAT = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)
# Default CPUs per task. This model's step gains little from a second thread on a CPU, while a second
# job on the same cores doubles the work done, so CPU jobs ask for one and Slurm packs them onto the
# nodes; a GPU task gets two, one to drive the GPU and one for W&B and I/O.
CPUS_PER_TASK = {"cpu": 1, "gpu": 2}
# What a job may ask for: (least, most); beyond these a value is a typo, not a cluster.
COUNT_BOUNDS = {
    "nodes": (1, 4096),
    "gpus_per_node": (0, 64),
    "tasks_per_node": (1, 1024),
    "cpus_per_task": (1, 4096),
}
TIME_MAX_MINUTES = 365 * 1440


@dataclass
class SlurmOptions:
    """What `mnist-dist submit` asks of Slurm (defaults: one node, one task)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, one on CPU-only partitions
    cpus_per_task: int | None = None  # default: CPUS_PER_TASK
    mem: str | None = None
    time: str = "60"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "mnist-dist"
    signal_delay_s: int = 120
    allow_local: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def cpus(self) -> int:
        """CPUs asked for each task; the task's training threads follow them (threads.py)."""
        return self.cpus_per_task or CPUS_PER_TASK["gpu" if self.gpus_per_node else "cpu"]

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def time_minutes(text: str) -> int:
    """Slurm time (MINUTES, HH:MM, HH:MM:SS or D-HH:MM[:SS]) -> whole minutes (submitit's unit)."""
    m = TIME_FORMAT.match(text.strip())
    if not m:
        raise UserError(f"--time '{text}' is not a Slurm time; write minutes (90) or HH:MM:SS (01:30:00)")
    if m.group(1):
        return int(m.group(1))
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups()[1:])
    return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def check_values(opts: SlurmOptions) -> None:
    """Values that end up in the sbatch script: no newlines, no shell metacharacters."""
    for name in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(opts, name)
        if value is not None and not SAFE_VALUE.match(value):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {value!r} has characters Slurm names do not use; "
                "use letters, digits and . _ - , : + = @ / only"
            )
    for name, (minimum, maximum) in COUNT_BOUNDS.items():
        value = getattr(opts, name)
        if value is not None and not minimum <= value <= maximum:
            raise UserError(f"--{name.replace('_', '-')} {value} must be from {minimum} to {maximum}")
    if opts.mem is not None and not MEM_FORMAT.match(opts.mem):
        raise UserError(f"--mem '{opts.mem}' is not a Slurm memory size; write e.g. 16G or 4000M")
    minutes = time_minutes(opts.time)
    if not 1 <= minutes <= TIME_MAX_MINUTES:
        raise UserError(f"--time '{opts.time}' must be from 1 minute to 365 days; write e.g. 60 or 01:30:00")


def preflight(opts: SlurmOptions, cfg: TrainConfig, run_dir: Path, dry_run: bool = False) -> list[str]:
    """Everything that can be known wrong before a job exists. A real submit: the first finding is
    raised (one UserError). A dry run: every finding is returned (printed as warnings), so the script
    is shown even without a cluster. Values that are wrong anywhere (check_values) raise either way."""
    check_values(opts)
    found = []
    for findings in (_cluster_findings, _place_findings):  # a real submit stops at the first
        for problem in findings(opts, cfg, run_dir):
            if not dry_run:
                raise problem
            found.append(str(problem))
    return found


def _cluster_findings(opts: SlurmOptions, cfg: TrainConfig, run_dir: Path) -> list[UserError]:
    """What Slurm says of this job: sbatch here, the controller answering, the partition existing and
    holding the nodes (and GPUs) asked for."""
    if shutil.which("sbatch") is None:
        return [commands.Unreachable(f"sbatch not found: {commands.ON_A_LOGIN_NODE}")]
    try:
        parts = commands.partitions()
    except commands.Unreachable as e:
        return [e]
    asked = opts.partition or os.environ.get("SBATCH_PARTITION")  # what sbatch will use
    names = asked.split(",") if asked else [n for n, p in parts.items() if p.default][:1]
    unknown = [n for n in names if n not in parts] or ([] if names else ["(default)"])
    if unknown:
        known = ", ".join(parts) or "none"
        what = f"partition '{unknown[0]}' does not exist" if names else "no default partition"
        return [UserError(f"{what}; partitions here: {known}")]
    # Of a list of partitions, Slurm starts the job in the first that can hold it: the roomiest counts.
    name = max(names, key=lambda n: parts[n].most_nodes)
    part, found = parts[name], []
    most = part.most_nodes
    if opts.nodes > most:
        has = f"has {part.total_nodes} node(s)"
        if part.max_nodes and part.max_nodes < part.total_nodes:
            has += f" and allows {part.max_nodes} to a job"
        found.append(
            UserError(
                f"--nodes {opts.nodes}: partition '{name}' {has}, so the job could never start; "
                f"use --nodes {most} or fewer"
            )
        )
    if opts.gpus_per_node and part.gpus_per_node is not None and opts.gpus_per_node > part.gpus_per_node:
        found.append(
            UserError(
                f"--gpus-per-node {opts.gpus_per_node}: the nodes of partition '{name}' have "
                f"{part.gpus_per_node} GPU(s) at most; use --gpus-per-node {part.gpus_per_node} or fewer"
            )
        )
    return found


def _place_findings(opts: SlurmOptions, cfg: TrainConfig, run_dir: Path) -> list[UserError]:
    """Where the job writes and what it runs: an output dir the nodes share and nobody else writes,
    an interpreter they can find, a world size the batch divides."""
    from mnist_dist.store import ownership
    from mnist_dist.store.outputs import check_output_dir

    found: list[UserError] = []
    try:
        check_output_dir(run_dir)
        for path, what in ((run_dir, "output dir"), (run_dir / "submitit", "job dir")):
            ownership.check_private(path, what)
        held = ownership.holder(run_dir)
    except UserError as e:
        found.append(e)
        held = None  # a dir it cannot use has no writer to ask
    if held:
        found.append(
            UserError(
                f"{run_dir} is being written by another run: {ownership.describe(held)}; wait for it to "
                "end or stop it, or pass another --output-dir"
            )
        )
    for path, what, fix in (
        (run_dir, "output dir", "put it on shared storage"),
        (Path(sys.executable), "the Python that runs the job,", "install mnist-dist on shared storage"),
    ):
        local = node_local(path)
        if local and not opts.allow_local:
            found.append(
                UserError(
                    f"{what} {path} is under {local}, which is local to each node; {fix} "
                    "(or pass --allow-local on a one-machine cluster)"
                )
            )
    try:
        cfg.check_processes(
            opts.world_size,
            f"{opts.nodes} node(s) x {opts.ntasks_per_node} task(s) = {opts.world_size} processes",
            "change --batch-size, --nodes or --tasks-per-node",
        )
    except UserError as e:
        found.append(e)
    if opts.gpus_per_node and opts.ntasks_per_node > opts.gpus_per_node:
        found.append(
            UserError(
                f"--tasks-per-node {opts.ntasks_per_node} is more than --gpus-per-node "
                f"{opts.gpus_per_node}; run one task per GPU"
            )
        )
    return found


def node_local(path: Path) -> str | None:
    """The node-local storage `path` is under (NODE_LOCAL), or None."""
    return next((p for p in NODE_LOCAL if path == Path(p) or Path(p) in path.parents), None)


def executor(opts: SlurmOptions, folder: Path) -> Any:
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    params: dict[str, Any] = {
        "job_name": opts.job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.ntasks_per_node,
        "time": time_minutes(opts.time),
        "cpus_per_task": opts.cpus,
        # Slurm 22.05's srun does not inherit --cpus-per-task from the job: the step would get one.
        "srun_args": [f"--cpus-per-task={opts.cpus}"],
        # submitit's checkpoint/requeue signal (USR2) this long before the time limit.
        "signal_delay_s": opts.signal_delay_s,
    }
    optional = {
        "partition": opts.partition,
        "mem": opts.mem,
        "account": opts.account,
        "qos": opts.qos,
        "constraint": opts.constraint,
        "gpus_per_node": opts.gpus_per_node or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.extra:
        params["additional_parameters"] = opts.extra
    ex.update_parameters(**params)
    return ex


def sbatch_script(ex: Any) -> str:
    """The exact script submitit hands to sbatch for this executor."""
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


class TrainJob(Checkpointable):
    """The callable every Slurm task runs: rank facts from SLURM's variables, then the usual training.

    Preemption and time limits: Slurm sends USR2 (submitit's signal, `signal_delay_s` before the
    limit) or SIGTERM. The handler only sets a flag; at the next step boundary all ranks agree, save
    a checkpoint together, and rank 0 hands over to submitit, which calls checkpoint() and requeues
    the job. The requeued job resumes from that checkpoint, with the same W&B run id: submitit's
    Checkpointable requeues this same callable (its config is plain data), the training state being
    in the run's checkpoints.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config  # plain data: the pickle submitit writes holds no framework objects

    def __call__(self) -> dict[str, Any]:
        import submitit

        from mnist_dist.train.run import run
        from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

        env = submitit.helpers.TorchDistributedEnvironment()
        # All GPUs of the node stay visible: Accelerate puts rank r on cuda:LOCAL_RANK itself.
        env.export(set_cuda_visible_devices=False)
        job = submitit.JobEnvironment()
        cfg = TrainConfig.model_validate(self.config)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        print(
            f"task {job.global_rank}/{job.num_tasks} on {job.hostname} (node {job.node}), master "
            f"{env.master_addr}:{env.master_port}, restart {restarts}",
            flush=True,
        )
        stop = StopFlag(cfg.checkpoint.stop_check_steps)
        requeue = stop_on_signals(stop)  # submitit's checkpoint-and-requeue handler, called below
        try:
            history = run(cfg, resume="auto", stop=stop)
        except Preempted as e:
            requeue_or_exit(e, job, cfg.max_requeues, requeue, f"{cfg.run_dir()}/checkpoints", "submit")
        return {"entries": len(history), "final_val_acc": history[-1]["val_acc"], "job_id": job.job_id}


def requeue_or_exit(
    e: Exception, job: Any, max_requeues: int, requeue: Any, saved: str, resubmit: str
) -> NoReturn:
    """After a requested stop saved its checkpoint (every task): rank 0 has submitit requeue the job
    (or, for an array task, that task alone), unless Slurm is cancelling it or the requeues are spent.
    Never returns."""
    import signal

    from mnist_dist.slurm.jobs import slurm_state

    print(f"preempted: {e}; checkpoint saved", flush=True)
    if job.global_rank != 0:
        sys.exit(-1)  # rank 0 requeues the whole job
    state = slurm_state(job.job_id)
    if state not in (None, "RUNNING"):  # scancel sends SIGTERM too: a cancel is not a preemption
        print(f"job is {state}: not requeued", flush=True)
        sys.exit(-1)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise RuntimeError(
            f"not requeued: the job was already requeued {restarts} time(s) (max_requeues "
            f"{max_requeues}); its checkpoint is in {saved}, resume with `mnist-dist {resubmit}` into "
            "the same --output-dir"
        ) from None
    if callable(requeue):
        try:
            requeue(signal.SIGUSR2, None)  # checkpoint() -> scontrol requeue -> exit
        except subprocess.CalledProcessError as err:  # Slurm is requeueing it already
            print(f"requeue by submitit failed ({err}); exiting for Slurm's own requeue", flush=True)
    sys.exit(-1)


def job_config(cfg: TrainConfig, run_dir: Path, data_root: Path) -> TrainConfig:
    """The config the job runs: absolute paths, and data only verified there (nodes never download)."""
    data = cfg.data.model_copy(update={"dir": str(data_root), "source": "dir"})
    return cfg.model_copy(update={"output_dir": str(run_dir), "data": data, "progress": "off"})


@dataclass
class Submission:
    job_id: str
    run_dir: str
    folder: str
    partition: str | None
    nodes: int
    tasks_per_node: int
    name: str


@dataclass
class DryRun:
    """What a submit would send (the sbatch script and what each task runs) and what preflight found
    that would refuse it (none: a real submit would pass)."""

    script: str
    warnings: list[str]


def submit(
    cfg: TrainConfig, opts: SlurmOptions, dry_run: bool = False, log: Any = print
) -> Submission | DryRun:
    """Preflight, stage the data, submit. dry_run: the script and preflight's findings, touching nothing."""
    from mnist_dist.store import datafiles

    run_dir = cfg.run_dir().expanduser().absolute()
    warnings = preflight(opts, cfg, run_dir, dry_run)
    folder = run_dir / "submitit"
    data_dir = cfg.data_dir().expanduser().absolute()
    job_cfg = job_config(cfg, run_dir, data_dir)
    ex = executor(opts, folder)
    if dry_run:
        return DryRun(sbatch_script(ex), warnings)
    # On the submitting host, before the job exists: compute nodes may have no internet.
    datafiles.prepare(data_dir, cfg.data.source, log=log)
    private_dirs(run_dir)
    try:
        job = ex.submit(TrainJob(job_cfg.model_dump(mode="json")))
    except Exception as e:  # sbatch refused: its message is the useful part
        raise UserError(f"sbatch refused the job: {str(e).strip().splitlines()[-1]}") from None
    sub = Submission(
        job.job_id, str(run_dir), str(folder), opts.partition, opts.nodes, opts.ntasks_per_node, cfg.name
    )
    from mnist_dist.slurm.jobs import remember

    remember(sub)
    return sub


def private_dirs(run_dir: Path) -> None:
    """The output dir and its submitit job dir, 0700: the nodes execute the pickles there."""
    from mnist_dist.store.ownership import private_dir

    private_dir(run_dir, "output dir")
    private_dir(run_dir / "submitit", "job dir")


def submission_json(sub: Submission) -> str:
    return json.dumps({"job_id": sub.job_id, "run_dir": sub.run_dir})
