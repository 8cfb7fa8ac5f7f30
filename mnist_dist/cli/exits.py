"""How a command ends: one line on stderr and the exit code that says why (errors.ExitCode)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from mnist_dist.errors import ExitCode


def fail(message: str, code: int = ExitCode.USAGE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return int(code)


def fault(e: Exception, then: str) -> int:
    """A fault of the machine (full disk, I/O error): one line and exit 1, the traceback on request."""
    from mnist_dist.store import faults

    if faults.debug():
        traceback.print_exc()
    return fail(f"{e}; {then}", code=ExitCode.FAULT)


def stopped(e: Exception) -> int:
    """A clean stop (drill, SIGUSR2/SIGTERM): exit 75 on every process, one line from the main one.
    Under `accelerate launch` or torchrun the launcher itself then exits 1 with a ChildFailedError
    banner for any non-zero exit, so the line says that this one is the clean stop."""
    from mnist_dist.store.ownership import single_process

    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return ExitCode.STOPPED
    launched = "" if single_process() else " (the launcher reports it as exit 1, ChildFailedError)"
    return fail(f"{e}: checkpoint saved; run the same command again to resume{launched}", ExitCode.STOPPED)


def dry_run_ends(result: Any) -> int:
    """A dry run's output (a slurm.submit.DryRun): each preflight finding as a warning line on stderr,
    the script on stdout; exit 0 when a real submit would pass, 2 when it would be refused."""
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.script.rstrip("\n"))
    return int(ExitCode.USAGE if result.warnings else ExitCode.OK)
