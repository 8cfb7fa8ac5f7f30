"""Training a sweep's members one after another in this process: `mnist-dist sweep run`, and each task
of a `sweep submit` job array.

Each member is `run.run(member config)`, exactly as `mnist-dist train` runs it (its own lock, resume
from its own checkpoints, its own W&B run). Finished (and failed) members are skipped, so running the
same sweep again trains only what is left; a member that fails (NaN, a bad value for its lr) is
recorded as failed in its run.json and the next one starts. A requested stop (SIGUSR2/SIGTERM, the
drill) ends the whole pack after the current member saved its checkpoint; so does a full disk (it
is the other members' disk too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from mnist_dist.errors import UserError
from mnist_dist.stopping import StopFlag
from mnist_dist.sweeps import Member, member_state


def run_members(
    members: Iterable[Member],
    stop: StopFlag | None = None,
    log: Callable[[str], Any] = print,
    retry_failed: bool = False,
) -> dict[str, int]:
    """Train what is left of `members`; return how many were trained, skipped, failed or in use."""
    from mnist_dist.run import run  # torch: once the members are known good

    counts = {"trained": 0, "skipped": 0, "failed": 0, "in use": 0}
    for member in members:
        state = member_state(member.run_dir)
        if state == "done" or (state == "failed" and not retry_failed):
            counts["skipped"] += 1
            continue
        if state == "running":
            counts["in use"] += 1
            log(f"member {member.id}: being trained elsewhere; skipped")
            continue
        log(f"member {member.id}: {_describe(member.params)}")
        try:
            run(member.cfg, resume="auto", stop=stop)
            counts["trained"] += 1
        except FloatingPointError as e:
            counts["failed"] += 1
            log(f"member {member.id} failed: training diverged: {e}")
        except UserError as e:  # another writer took it between the check and the run, a bad checkpoint
            counts["in use" if "being written by another run" in str(e) else "failed"] += 1
            log(f"member {member.id}: {e}")
    return counts


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
