"""CPU threads that follow what the process was given, not what the machine has.

torch starts as many intra-op threads as the machine has cores. Two jobs that Slurm put on one node
with one CPU each then run four threads on two cores, and spinning OpenMP threads of different jobs
slow each other down by far more than 2x. So every training process sets its thread count from its
allocation, in this order:

1. the config key `threads` (`--threads N`), when not `auto`;
2. `OMP_NUM_THREADS`, when set (`accelerate launch` and torchrun set it for the processes they start);
3. under Slurm, `SLURM_CPUS_PER_TASK` (`mnist-dist submit` always asks for `--cpus-per-task`);
4. otherwise the CPUs of the process's affinity mask, divided by the processes on this machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # what decided it, for the start line and run.json

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _positive(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def decide(configured: int | str, env: Mapping[str, str], affinity: int) -> Threads:
    """The thread count for this process: see the module docstring for the order."""
    if configured != "auto":
        return Threads(int(configured), "config threads")
    omp = _positive(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        return Threads(omp, "OMP_NUM_THREADS")
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None and env.get("SLURM_JOB_ID"):
        return Threads(slurm, "SLURM_CPUS_PER_TASK")
    local = _positive(env.get("LOCAL_WORLD_SIZE")) or 1
    if local == 1:
        return Threads(affinity, "affinity mask")
    return Threads(max(1, affinity // local), f"affinity mask / {local} local processes")


def affinity_cpus() -> int:
    """CPUs this process may run on (the mask Slurm, taskset or a container set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use(configured: int | str) -> Threads:
    """Decide from this process's environment, set torch's intra- and inter-op thread counts, and
    return the intra-op count torch then reports."""
    import torch

    wanted = decide(configured, os.environ, affinity_cpus())
    torch.set_num_threads(wanted.count)
    # Possible only before the first inter-op parallel work; the intra-op count is what matters here.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(wanted.count)
    return Threads(torch.get_num_threads(), wanted.source)  # what torch runs with
