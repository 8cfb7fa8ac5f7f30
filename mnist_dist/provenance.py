"""Where and with what a run ran, for run.json: versions, the git commit, the host, the time."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import accelerate
    import torch

    import mnist_dist

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "mnist_dist": mnist_dist.__version__,
    }


def host() -> str:
    # Under Slurm the node's name, not the machine's: test clusters run several nodes on one host.
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
