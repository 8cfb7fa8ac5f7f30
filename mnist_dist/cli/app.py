"""The `mnist-dist` Typer app: its commands, registered from the modules that define them, and the
console entry point, where bad input becomes one line and exit code 2, never a traceback."""

from __future__ import annotations

from typing import Any

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from mnist_dist.cli import jobs, sweep, train
from mnist_dist.cli.exits import fail, fault
from mnist_dist.errors import ExitCode, UserError

app = typer.Typer(
    name="mnist-dist",
    help="The MNIST feed-forward tutorial as a toolkit: train on CPU, GPUs, nodes and SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (train.train, jobs.submit, jobs.status, jobs.logs, jobs.cancel, jobs.history, train.sync):
    app.command()(command)
for command in (train.evaluate, train.plot):
    app.command()(command)
data_app = typer.Typer(help="Fetch and verify the MNIST files.", no_args_is_help=True)
data_app.command("prepare")(train.data_prepare)
app.add_typer(data_app, name="data")
app.add_typer(sweep.sweep_app, name="sweep")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        code: Any = command.main(args=argv, prog_name="mnist-dist", standalone_mode=False)
    except UserError as e:
        return fail(str(e))
    except click_exceptions.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        return fail(f"{e.format_message()}{hint}")
    except click_exceptions.ClickException as e:
        return fail(e.format_message(), code=e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C (click turns it into Abort)
        return fail("interrupted", code=ExitCode.INTERRUPTED)
    except Exception as e:
        from mnist_dist.store.faults import WriteFault

        if not isinstance(e, WriteFault):
            raise
        return fault(e, "fix that and run the same command again")
    return code if isinstance(code, int) else 0
