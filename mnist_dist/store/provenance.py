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


def cpu() -> dict[str, str]:
    """The CPU and the kernels torch takes on it: model and vendor (/proc/cpuinfo), torch's vector
    capability (AVX512, AVX2, ...) and its BLAS, with MKL's code path when MKL_CBWR or
    MKL_ENABLE_INSTRUCTIONS chose one. What a bitwise claim, or a failure of one, holds for."""
    import torch

    found = {"model name": platform.processor() or "unknown", "vendor_id": "unknown"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in found and value.strip():
                    found[key.strip()] = value.strip()
                if not line.strip():  # the first processor's block is enough
                    break
    except OSError:
        pass
    config = torch.__config__.show()
    words = config.replace(",", " ").split()
    blas = next((w.split("=", 1)[1] for w in words if w.startswith("BLAS_INFO=")), "?")
    mkl = next((line for line in config.splitlines() if "Math Kernel Library Version" in line), "")
    if mkl:
        blas += " " + mkl.split("Version ")[-1].split("-")[0]
    path = [f"{k}={os.environ[k]}" for k in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(k)]
    return {
        "model": found["model name"],
        "vendor": found["vendor_id"],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "blas": " ".join([blas, *path]),
    }
