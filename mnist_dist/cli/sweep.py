"""`mnist-dist sweep`: many runs of one config over swept keys, on this machine or as a SLURM job array.

mnist-dist sweep run configs/sweeps/lr-seeds.yaml                   # -> runs/sweeps/lr-seeds, packed
mnist-dist sweep run configs/sweeps/lr-seeds.yaml --pack off        # one member after another
mnist-dist sweep submit configs/sweeps/lr-seeds.yaml --partition cpu --members-per-task 8
mnist-dist sweep status runs/sweeps/lr-seeds        # or the array's job id
mnist-dist sweep results runs/sweeps/lr-seeds       # the table; results.json, results.csv, plots
mnist-dist sweep cancel runs/sweeps/lr-seeds
mnist-dist sweep board runs/sweeps/lr-seeds         # TensorBoard's HParams view, offline
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_dist.cli.exits import dry_run_ends
from mnist_dist.cli.options import (
    Opt,
    check_trackers,
    option_overrides,
    slurm_options,
    slurm_options_from,
    training_options,
)
from mnist_dist.errors import ExitCode, UserError

sweep_app = typer.Typer(
    help="Many runs of one config over swept keys (lrs, seeds...): locally or as a SLURM job array.",
    no_args_is_help=True,
)
Spec = Annotated[Path, typer.Argument(help="Sweep file (W&B sweep format, grid or random).")]
Target = Annotated[str, typer.Argument(help="Sweep dir, or the job id of its array.")]


def load_members(spec_path: Path, opts: dict[str, Any], confirm: bool) -> tuple[Any, Path, Any, list, Any]:
    """(spec, sweep dir, build, members, probe): every member validated before anything runs or is
    submitted (a bayes sweep's come later: none yet), `probe` the first or the base config's member,
    the early termination's bands checked against the members' epochs."""
    from mnist_dist.sweep.spec import check_bands

    spec, root, build = load_spec(spec_path, opts, confirm)
    found = build(None)
    probe = found[0] if found else build([{}])[0]  # the base config: a bayes sweep's members come later
    check_trackers(probe.cfg)
    check_bands(spec, max(m.cfg.total_epochs for m in found or [probe]))
    return spec, root, build, found, probe


def load_spec(spec_path: Path, opts: dict[str, Any], confirm: bool) -> tuple[Any, Path, Any]:
    """(spec, sweep dir, build): build(None) is every member of a grid or random sweep, build(combos)
    the members of those swept values (a bayes sweep's proposals), each validated."""
    from mnist_dist.sweep import spec as sweeps

    overrides = option_overrides(opts)
    if overrides.pop("name"):
        raise UserError("--name: a sweep's members are named after the sweep; set `name:` in the sweep file")
    spec = sweeps.read_spec(spec_path)
    if opts.get("config"):  # --config takes the place of the spec's base
        spec.base = opts["config"]
    root = sweeps.sweep_dir(spec, overrides.pop("output_dir"))
    return spec, root, sweeps.Builder(spec, root.absolute(), overrides, opts.get("set_"), confirm)


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
    retry_terminated: Annotated[
        bool,
        Opt(help="Train members that early termination stopped again, to the end (no early termination)."),
    ] = False,
    pack: PackMode = "auto",
    max_pack: MaxPack = None,
    round_size: Annotated[
        int | None, Opt(help="method bayes: members proposed a round (default: about 4 rounds).")
    ] = None,
    **opts: Any,
) -> None:
    """Train every member on this machine: packs of members, one process per CPU, or per GPU when
    the members train on GPUs (finished members are skipped); a bayes sweep in rounds of packs."""
    from mnist_dist.store import datafiles
    from mnist_dist.sweep import results as sweep_results
    from mnist_dist.sweep import spec as sweeps
    from mnist_dist.sweep.local import local_workers

    check_pack(pack, max_pack)
    if round_size is not None and not 1 <= round_size <= 1024:
        raise UserError(f"--round-size {round_size}: from 1 to 1024")
    parsed, root, build, found, probe = load_members(spec, opts, yes)
    for note in parsed.notes:
        print(f"note: {note}")
    for data_dir in sorted({m.cfg.data_dir() for m in found or [probe]}):  # a data problem is the sweep's
        datafiles.prepare(data_dir, probe.cfg.data.source)
    workers, gpus = local_workers(probe.cfg)
    if parsed.method == "bayes":
        from mnist_dist.sweep.rounds import default_round_size

        round_size = round_size or default_round_size(parsed, workers)
        print(
            f"sweep {parsed.name}: bayes, {parsed.count} members, rounds of {round_size}, in {root}/members"
        )
    else:
        sweeps.write_manifest(root, parsed, found)
        print(f"sweep {parsed.name}: {len(found)} member(s) in {root}/members")

    def train(members: list[Any], stop: Any) -> dict[str, int]:
        from mnist_dist.sweep.local import run_members

        retry = frozenset({"failed"} if retry_failed else set()) | (
            {"terminated"} if retry_terminated else set()
        )
        return run_members(members, stop, print, retry, pack, max_pack, workers=workers, gpus=gpus)

    counts = _stoppable(parsed, root, found, build, train, round_size, probe.cfg.checkpoint.stop_check_steps)
    results = sweep_results.write(root)
    print(sweep_results.format_table(results), end="")
    print(", ".join(f"{n} {what}" for what, n in counts.items()) + f"; results in {root}/results.json")


def _stoppable(
    spec: Any, root: Path, found: list[Any], build: Any, train: Any, round_size: int | None, every: int
) -> dict[str, int]:
    """The sweep's training under the stop signals: a stop or a failed pack process is one line and
    its exit code."""
    from mnist_dist.sweep.local import COUNTS, PackProcessFailed, PacksStopped
    from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

    stop = StopFlag(every)
    stop_on_signals(stop, ctrl_c=True)  # a first Ctrl-C stops every pack at a checkpoint, as SIGTERM does
    try:
        if spec.method != "bayes":
            return train(found, stop)
        from mnist_dist.sweep.rounds import run_rounds

        _, done = run_rounds(spec, root, build, lambda members: train(members, stop), round_size or 1)
        return {what: done.get(what, 0) for what in COUNTS}
    except (Preempted, PacksStopped) as e:
        why = "interrupted" if stop.interrupted else str(e)
        print(f"error: {why}: checkpoints saved; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(ExitCode.INTERRUPTED if stop.interrupted else ExitCode.STOPPED) from None
    except PackProcessFailed as e:
        print(f"error: {e}; run the same command again to resume", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None


@sweep_app.command("results")
def results(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep dir (default layout: runs/sweeps/<name>).")],
    as_json: Annotated[bool, Opt("--json", help="Print results.json only.")] = False,
) -> None:
    """The members' table (best first; mean ± std over seeds when seed is swept); writes results.json,
    results.csv, curves.png and final-<key>.png."""
    from mnist_dist.sweep import results as sweep_results

    out = sweep_results.write(sweep_dir)
    if as_json:
        print(json.dumps(out))
        return
    print(sweep_results.format_table(out), end="")
    print(f"files: {sweep_dir}/results.json, results.csv, " + ", ".join(Path(p).name for p in out["plots"]))


@sweep_app.command("board")
def board(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep dir (or a run dir, or a folder of runs).")],
    port: Annotated[int, Opt(help="Port to serve on (0: a free one).", min=0, max=65535)] = 6006,
    host: Annotated[str, Opt(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
) -> None:
    """TensorBoard on the sweep, offline: its HParams dashboard compares the members by their swept
    values (trained with --tracker tensorboard or wandb,tensorboard); prints the URL once it serves."""
    from mnist_dist.sweep.board import BoardFailed, serve

    try:
        code = serve(sweep_dir, host, port)
    except BoardFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(ExitCode.FAULT) from None
    raise typer.Exit(code)


@sweep_app.command("status")
def status(target: Target, as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False) -> None:
    """Members pending / running / done / failed / stopped, and per array task when submitted."""
    from mnist_dist.sweep import array as sweep_slurm
    from mnist_dist.sweep.results import describe

    info = sweep_slurm.status(target)
    if as_json:
        print(json.dumps(info))
        return
    counts = ", ".join(f"{n} {state}" for state, n in info["counts"].items())
    job = f" (job {info['job_id']})" if info.get("job_id") else ""
    how = describe(info, info["metric"])
    how = f" ({how})" if how else ""
    print(f"sweep {info['name']}{job}{how}: {info['members']} member(s): {counts}")
    for task in info.get("tasks", []):
        members = ", ".join(f"{n} {state}" for state, n in task["counts"].items())
        print(f"  task {task['task']}: {task['state']}; {members}")


@sweep_app.command("cancel")
def cancel(target: Target) -> None:
    """Cancel the sweep's job array (scancel); finished members stay, the rest resume on resubmit."""
    from mnist_dist.sweep import array as sweep_slurm

    info = sweep_slurm.cancel(target)
    print(f"job {info['job_id']}: cancelled; " + ", ".join(f"{n} {s}" for s, n in info["counts"].items()))


@sweep_app.command("submit")
@training_options
@slurm_options
def submit(
    spec: Spec,
    members_per_task: Annotated[
        int | None, Opt(help="Members each array task trains one after another (default: ~1 minute's worth).")
    ] = None,
    array_parallelism: Annotated[int, Opt(help="Array tasks running at once (%K).")] = 64,
    workers: Annotated[
        int | None,
        Opt(
            help="An adaptive sweep: K workers (array tasks) that take members, --members-per-task at a "
            "time, until none is left (method bayes: always, default 2)."
        ),
    ] = None,
    yes: Yes = False,
    pack: PackMode = "auto",
    max_pack: MaxPack = None,
    dry_run: Annotated[bool, Opt(help="Print the sbatch script and the packs; submit nothing.")] = False,
    as_json: Annotated[bool, Opt("--json", help='Print {"job_id": ..., "sweep_dir": ...} only.')] = False,
    **opts: Any,
) -> None:
    """Submit the members as one SLURM job array: each task trains its members as one pack (or one
    after another with --pack off)."""
    from mnist_dist.sweep import array as sweep_slurm

    check_pack(pack, max_pack)
    parsed, root, build, found, probe = load_members(spec, opts, yes)
    sopts = slurm_options_from(opts, parsed.name)
    log = (lambda *_: None) if as_json else print
    if parsed.method == "bayes" or workers is not None:
        from mnist_dist.sweep import workers as sweep_workers

        k = 2 if workers is None else workers
        out = sweep_workers.submit(parsed, root, build, probe, sopts, k, members_per_task, dry_run, log)
    else:
        packing = sweep_slurm.Packing(pack, max_pack, members_per_task)
        out = sweep_slurm.submit(parsed, root, found, sopts, packing, array_parallelism, dry_run, log)
    if dry_run:
        raise typer.Exit(dry_run_ends(out))
    elif as_json:
        print(json.dumps({"job_id": out["job_id"], "sweep_dir": str(root.absolute())}))
    else:
        what = f"{out['tasks']} worker(s)" if out.get("workers") else f"{out['tasks']} task(s)"
        print(f"submitted job array {out['job_id']} ({what}); sweep dir {root.absolute()}")
        print(f"  follow:  mnist-dist sweep status {out['job_id']} | mnist-dist sweep results {root}")
        print(f"  stop:    mnist-dist sweep cancel {out['job_id']}")
