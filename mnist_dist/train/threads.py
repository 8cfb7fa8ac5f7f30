"""CPU threads that follow what the process was given, not what the machine has.

torch starts as many intra-op threads as the machine has cores. Two jobs that Slurm put on one node
with one CPU each then run four threads on two cores, and spinning OpenMP threads of different jobs
slow each other down by far more than 2x. So every training process sets its thread count from its
allocation, in this order:

1. the config key `threads` (`--threads N`), when not `auto`;
2. `OMP_NUM_THREADS`, when set (`accelerate launch` and torchrun set it for the processes they start);
3. under Slurm, `SLURM_CPUS_PER_TASK` (`mnist-dist submit` always asks for `--cpus-per-task`);
4. otherwise the CPUs this process may use (affinity mask, cgroup CPU quota), divided by the
   processes on this machine.

2 and 3 are capped at the CPUs this process may use: a value inherited from an outer allocation
(sbatch's SLURM_CPUS_PER_TASK in a 1-CPU step, `accelerate launch --cpu`'s physical cores) must not
oversubscribe the process's own share. Accelerate sets its own count (physical cores / local
processes) when it builds a CPU process group without OMP_NUM_THREADS, so the engine sets the count
again after building the Accelerator.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # what decided it, for the start line and run.json


def _positive(text: str | None) -> int | None:
    """A thread count from the environment; OpenMP's nested form `4,2` counts its first level."""
    try:
        value = int(str(text).split(",")[0].strip())
    except ValueError:
        return None
    return value if value > 0 else None


def decide(configured: int | str, env: Mapping[str, str], cpus: int) -> Threads:
    """The thread count for this process, `cpus` being those it may use: see the module docstring."""
    if configured != "auto":
        return Threads(int(configured), "config threads")
    omp = _positive(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        return Threads(min(omp, cpus), "OMP_NUM_THREADS")
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None and env.get("SLURM_JOB_ID"):
        return Threads(min(slurm, cpus), "SLURM_CPUS_PER_TASK")
    local = _positive(env.get("LOCAL_WORLD_SIZE")) or 1
    if local == 1:
        return Threads(cpus, "affinity mask")
    return Threads(max(1, cpus // local), f"affinity mask / {local} local processes")


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs a cgroup v2 quota allows (`docker --cpus 2`: "200000 100000"), rounded up; None: no quota."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 here, or a file we cannot read
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (Slurm, taskset), within a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def use(configured: int | str) -> Threads:
    """Decide from this process's environment, set torch's intra- and inter-op thread counts, and
    return the intra-op count torch then reports."""
    import torch

    wanted = decide(configured, os.environ, usable_cpus())
    torch.set_num_threads(wanted.count)
    # Possible only before the first inter-op parallel work; the intra-op count is what matters here.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(wanted.count)
    return Threads(torch.get_num_threads(), wanted.source)  # what torch runs with
