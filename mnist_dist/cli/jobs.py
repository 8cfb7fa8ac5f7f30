"""The commands for SLURM jobs: `submit`, `status`, `logs`, `cancel`, `history`."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from mnist_dist.cli.exits import dry_run_ends
from mnist_dist.cli.options import (
    Opt,
    config_from_options,
    slurm_options,
    slurm_options_from,
    training_options,
)
from mnist_dist.errors import UserError


@training_options
@slurm_options
def submit(
    nodes: Annotated[int, Opt(help="Nodes.")] = 1,
    tasks_per_node: Annotated[
        int | None, Opt(help="Processes per node (default: one per GPU, else 1).")
    ] = None,
    dry_run: Annotated[
        bool, Opt(help="Print the sbatch script and what each task runs; submit nothing.")
    ] = False,
    as_json: Annotated[bool, Opt("--json", help='Print {"job_id": ..., "run_dir": ...} only.')] = False,
    **opts: Any,
) -> None:
    """Submit the training to SLURM (submitit): one process per task, nodes x tasks = world size."""
    from mnist_dist.slurm import submit as slurm

    sopts = slurm_options_from(opts, "mnist-dist", nodes=nodes, tasks_per_node=tasks_per_node)
    cfg = config_from_options(opts)
    result = slurm.submit(cfg, sopts, dry_run=dry_run, log=(lambda *_: None) if as_json else print)
    if isinstance(result, slurm.DryRun):
        world, run_dir = sopts.world_size, cfg.run_dir().absolute()
        result.script = result.script.rstrip("\n") + (
            f"\n# each of the {world} task(s) runs mnist_dist.slurm.submit.TrainJob: rank = SLURM_PROCID, "
            f"world size {world}, {sopts.cpus} CPU thread(s), then mnist_dist.train.run.run(config) "
            f"into {run_dir}"
        )
        raise typer.Exit(dry_run_ends(result))
    if as_json:
        print(slurm.submission_json(result))
        return
    print(f"submitted job {result.job_id}; run dir {result.run_dir}")
    print(
        f"  follow:  mnist-dist status {result.job_id} | mnist-dist logs {result.job_id} --follow | "
        f"mnist-dist history {result.job_id}"
    )
    print(f"  stop:    mnist-dist cancel {result.job_id}")


def status(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """State of a submitted job (works without Slurm accounting)."""
    from mnist_dist.slurm import jobs

    info = jobs.status(job)
    if as_json:
        print(json.dumps(info))
        return
    line = f"job {info['job_id']}: {info['state']}"
    if info.get("reason") and info["reason"] not in ("None", "(null)"):
        line += f" ({info['reason']})"
    if info.get("nodes"):
        line += f" on {info['nodes']}"
    if "epochs_done" in info:
        line += f"; {info['epochs_done']} epoch(s) done"
    if info.get("never"):
        line += f": {info['never']}"
    print(line)
    if info.get("error"):
        print(f"error: {info['error']}")


def logs(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    task: Annotated[int, Opt(help="Task (rank) whose log to show.")] = 0,
    follow: Annotated[bool, Opt("--follow", "-f", help="Keep printing until the job finishes.")] = False,
) -> None:
    """The stdout and stderr of one task of a job."""
    import time as clock

    from mnist_dist.slurm import jobs

    if task < 0:
        raise UserError(f"--task {task}: tasks are numbered from 0 (the rank); e.g. --task 0")
    from mnist_dist.slurm.commands import Unreachable

    files = jobs.log_files(job, task)
    shown, missed = [0, 0], 0
    while True:
        # Read after deciding: the lines written before the job ended are still printed.
        try:
            done = not follow or jobs.status(job)["finished"]
            missed = 0
        except Unreachable:  # a controller slow to answer once does not end a long follow
            missed += 1
            if missed >= 3:
                raise
            done = False
        for i, path in enumerate(files):
            if path.exists():
                with path.open("rb") as f:
                    f.seek(shown[i])
                    chunk = f.read()
                shown[i] += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        if done:
            return
        clock.sleep(1)


def cancel(job: Annotated[str, typer.Argument(help="Job id or run directory.")]) -> None:
    """Cancel a job (scancel) and show its state."""
    from mnist_dist.slurm import jobs

    info = jobs.cancel(job)
    print(f"job {info['job_id']}: {info['state']}")


def history(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """The per-epoch validation table of a run (also while it runs)."""
    from mnist_dist.slurm import jobs
    from mnist_dist.store.outputs import format_entry

    entries = jobs.history(job)
    if as_json:
        print(json.dumps(entries))
        return
    phases = len({e["phase"] for e in entries if e.get("phase") is not None}) or 1
    for entry in entries:
        print(format_entry(entry, phases))
