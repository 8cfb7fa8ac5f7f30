"""`mnist-dist sweep`: many runs of one config over swept keys, on this machine or as a SLURM job array.

mnist-dist sweep run configs/sweeps/lr-seeds.yaml                   # -> runs/sweeps/lr-seeds, packed
mnist-dist sweep run configs/sweeps/lr-seeds.yaml --pack off        # one member after another
mnist-dist sweep submit configs/sweeps/lr-seeds.yaml --partition cpu --members-per-task 8
mnist-dist sweep status runs/sweeps/lr-seeds        # or the array's job id
mnist-dist sweep results runs/sweeps/lr-seeds       # the table; results.json, results.csv, plots
mnist-dist sweep cancel runs/sweeps/lr-seeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_dist.cli_options import Opt, option_overrides, training_options
from mnist_dist.errors import UserError

sweep_app = typer.Typer(
    help="Many runs of one config over swept keys (lrs, seeds...): locally or as a SLURM job array.",
    no_args_is_help=True,
)
Spec = Annotated[Path, typer.Argument(help="Sweep file (W&B sweep format, grid or random).")]
Target = Annotated[str, typer.Argument(help="Sweep dir, or the job id of its array.")]


def load_members(spec_path: Path, opts: dict[str, Any], confirm: bool) -> tuple[Any, Path, list[Any]]:
    """(spec, sweep dir, members): every member validated before anything runs or is submitted."""
    from mnist_dist import sweeps

    overrides = option_overrides(opts)
    if overrides.pop("name"):
        raise UserError("--name: a sweep's members are named after the sweep; set `name:` in the sweep file")
    spec = sweeps.read_spec(spec_path)
    if opts.get("config"):  # --config takes the place of the spec's base
        spec.base = opts["config"]
    root = sweeps.sweep_dir(spec, overrides.pop("output_dir"))
    found = sweeps.members(spec, root.absolute(), overrides, opts.get("set_"), confirm)
    return spec, root, found


Yes = Annotated[bool, Opt("--yes", help="Run a grid of more than 1,000 members.")]
PackMode = Annotated[
    str,
    Opt(
        "--pack",
        help="auto: train compatible members together as one stacked model per process (packs); "
        "off: one member after another.",
    ),
]
MaxPack = Annotated[
    int | None, Opt("--max-pack", help="Most members in one pack (default: what memory holds, at most 1024).")
]


def check_pack(pack: str, max_pack: int | None) -> None:
    if pack not in ("auto", "off"):
        raise UserError(f"--pack {pack!r}: use auto or off")
    if max_pack is not None and not 1 <= max_pack <= 1024:
        raise UserError(f"--max-pack {max_pack}: from 1 to 1024")


@sweep_app.command("run")
@training_options
def run(
    spec: Spec,
    yes: Yes = False,
    retry_failed: Annotated[bool, Opt(help="Train members that failed before again.")] = False,
    pack: PackMode = "auto",
    max_pack: MaxPack = None,
    **opts: Any,
) -> None:
    """Train every member on this machine: packs of members, one process per CPU, or per GPU when
    the members train on GPUs (finished members are skipped)."""
    from mnist_dist import datafiles, sweep_results, sweeps
    from mnist_dist.stopping import Preempted, StopFlag, stop_on_signals
    from mnist_dist.sweep_run import PackProcessFailed, local_workers, run_members

    check_pack(pack, max_pack)
    parsed, root, found = load_members(spec, opts, yes)
    for note in parsed.notes:
        print(f"note: {note}")
    for data_dir in sorted({m.cfg.data_dir() for m in found}):  # a data problem is the sweep's, once
        datafiles.prepare(data_dir, found[0].cfg.data.source)
    sweeps.write_manifest(root, parsed, found)
    print(f"sweep {parsed.name}: {len(found)} member(s) in {root}/members")
    stop = StopFlag(found[0].cfg.checkpoint.stop_check_steps)
    stop_on_signals(stop)
    try:
        workers, gpus = local_workers(found[0].cfg)
        counts = run_members(found, stop, print, retry_failed, pack, max_pack, workers=workers, gpus=gpus)
    except Preempted as e:
        print(f"error: {e}: checkpoint saved; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(75) from None
    except PackProcessFailed as e:
        print(f"error: {e}; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(e.code) from None
    results = sweep_results.write(root)
    print(sweep_results.format_table(results), end="")
    print(", ".join(f"{n} {what}" for what, n in counts.items()) + f"; results in {root}/results.json")


@sweep_app.command("pack", hidden=True)
def pack_command(pack_dir: Annotated[Path, typer.Argument(help="A pack dir (SWEEP/packs/pack-*).")]) -> None:
    """One pack of a sweep in this process: what `sweep run` starts, one process per pack."""
    from mnist_dist.stopping import Preempted, StopFlag, stop_on_signals
    from mnist_dist.sweep_run import read_pack, train_pack_dir

    stop = StopFlag(read_pack(pack_dir)[0].checkpoint.stop_check_steps)
    stop_on_signals(stop)
    try:
        train_pack_dir(pack_dir, stop)
    except Preempted:
        raise typer.Exit(75) from None


@sweep_app.command("results")
def results(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep dir (default layout: runs/sweeps/<name>).")],
    as_json: Annotated[bool, Opt("--json", help="Print results.json only.")] = False,
) -> None:
    """The members' table (best first; mean ± std over seeds when seed is swept); writes results.json,
    results.csv, curves.png and final-<key>.png."""
    from mnist_dist import sweep_results

    out = sweep_results.write(sweep_dir)
    if as_json:
        print(json.dumps(out))
        return
    print(sweep_results.format_table(out), end="")
    print(f"files: {sweep_dir}/results.json, results.csv, " + ", ".join(Path(p).name for p in out["plots"]))


@sweep_app.command("status")
def status(target: Target, as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False) -> None:
    """Members pending / running / done / failed / stopped, and per array task when submitted."""
    from mnist_dist import sweep_slurm

    info = sweep_slurm.status(target)
    if as_json:
        print(json.dumps(info))
        return
    counts = ", ".join(f"{n} {state}" for state, n in info["counts"].items())
    job = f" (job {info['job_id']})" if info.get("job_id") else ""
    print(f"sweep {info['name']}{job}: {info['members']} member(s): {counts}")
    for task in info.get("tasks", []):
        members = ", ".join(f"{n} {state}" for state, n in task["counts"].items())
        print(f"  task {task['task']}: {task['state']}; {members}")


@sweep_app.command("cancel")
def cancel(target: Target) -> None:
    """Cancel the sweep's job array (scancel); finished members stay, the rest resume on resubmit."""
    from mnist_dist import sweep_slurm

    info = sweep_slurm.cancel(target)
    print(f"job {info['job_id']}: cancelled; " + ", ".join(f"{n} {s}" for s, n in info["counts"].items()))


@sweep_app.command("submit")
@training_options
def submit(
    spec: Spec,
    partition: Annotated[str | None, Opt(help="Slurm partition (default: the cluster's default).")] = None,
    members_per_task: Annotated[
        int | None, Opt(help="Members each array task trains one after another (default: ~1 minute's worth).")
    ] = None,
    array_parallelism: Annotated[int, Opt(help="Array tasks running at once (%K).")] = 64,
    gpus_per_node: Annotated[int, Opt(help="GPUs per task (0: CPU-only).")] = 0,
    cpus_per_task: Annotated[int | None, Opt(help="CPUs per task (default: 1 on CPU, 2 per GPU).")] = None,
    mem: Annotated[str | None, Opt(help="Memory per task, e.g. 4G.")] = None,
    time: Annotated[str, Opt("--time", help="Time limit of each task: minutes or HH:MM:SS.")] = "60",
    account: Annotated[str | None, Opt(help="Slurm account.")] = None,
    qos: Annotated[str | None, Opt(help="Slurm QOS.")] = None,
    constraint: Annotated[str | None, Opt(help="Node features.")] = None,
    job_name: Annotated[str | None, Opt(help="Job name (default: the sweep's name).")] = None,
    allow_local: Annotated[
        bool, Opt(help="Allow a node-local sweep dir (/tmp...): one-machine clusters.")
    ] = False,
    yes: Yes = False,
    pack: PackMode = "auto",
    max_pack: MaxPack = None,
    dry_run: Annotated[bool, Opt(help="Print the sbatch script and the packs; submit nothing.")] = False,
    as_json: Annotated[bool, Opt("--json", help='Print {"job_id": ..., "sweep_dir": ...} only.')] = False,
    **opts: Any,
) -> None:
    """Submit the members as one SLURM job array: each task trains its members as one pack (or one
    after another with --pack off)."""
    from mnist_dist import slurm, sweep_slurm

    check_pack(pack, max_pack)
    parsed, root, found = load_members(spec, opts, yes)
    sopts = slurm.SlurmOptions(
        partition=partition,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time=time,
        account=account,
        qos=qos,
        constraint=constraint,
        job_name=job_name or parsed.name,
        allow_local=allow_local,
    )
    log = (lambda *_: None) if as_json else print
    packing = sweep_slurm.Packing(pack, max_pack, members_per_task)
    out = sweep_slurm.submit(parsed, root, found, sopts, packing, array_parallelism, dry_run, log)
    if dry_run:
        print(out)
    elif as_json:
        print(json.dumps({"job_id": out["job_id"], "sweep_dir": str(root.absolute())}))
    else:
        print(f"submitted job array {out['job_id']} ({out['tasks']} task(s)); sweep dir {root.absolute()}")
        print(f"  follow:  mnist-dist sweep status {out['job_id']} | mnist-dist sweep results {root}")
        print(f"  stop:    mnist-dist sweep cancel {out['job_id']}")
