"""One pack of a sweep in a process of its own, as `sweep run` starts it (one per CPU or GPU):

    python -m mnist_dist.sweep.pack_process SWEEP_DIR/packs/pack-<digest>

It trains the members that the pack dir's members.json lists and ends with the exit code of the
command it stands for (errors.ExitCode): 0, 2 with one line for bad input, 75 after a requested stop
(SIGUSR2, SIGTERM, SIGINT) saved its checkpoint, 1 with one line for a fault of the machine.

Started by a runner (local.py, which sets $MNIST_DIST_CLAIMED_BY to its pid), it adopts the locks the
runner claimed for its members, and stops (saving) when the runner dies: PR_SET_PDEATHSIG on Linux,
a thread watching the parent elsewhere. Run by hand, it takes the locks itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mnist_dist.config import TrainConfig
from mnist_dist.errors import BandTimeout, ExitCode, UserError
from mnist_dist.sweep.local import CLAIMED_BY, RELAYED
from mnist_dist.sweep.pack_dirs import home, read_pack
from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals

PR_SET_PDEATHSIG = 1


def train_pack_dir(where: Path, cfgs: list[TrainConfig], stop: StopFlag, claimer: int | None) -> None:
    """The pack that `where` describes, in this process; a member that fails is in its run.json."""
    from mnist_dist.store import handover
    from mnist_dist.store.ownership import RunLock
    from mnist_dist.sweep.barrier import Judge, mark_ended
    from mnist_dist.train.run import run_pack

    locks: list[RunLock] = []
    at = home(cfgs, where)
    try:
        if claimer is not None:
            for cfg in cfgs:
                if handover.owner(cfg.run_dir()) not in (None, str(at)):
                    continue  # it moved on to another pack at a band: that one trains it
                locks.append(RunLock(cfg.run_dir()).adopt(claimer))
        judge = Judge.from_environment(at, cfgs[0])
        _, failures = run_pack(cfgs, at, stop=stop, locks=list(locks) or None, judge=judge)
    finally:
        mark_ended(at)  # the packs of its wave wait for it no more
        for lock in locks:
            lock.release()
    for cfg, why in zip(cfgs, failures, strict=True):
        if why is not None:
            print(f"member {cfg.name} failed: training diverged: {why}", flush=True)


def end_with(parent: int) -> None:
    """SIGTERM (a clean stop) for this process once `parent` is gone, so no pack trains as an orphan."""
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0:
            return
    except (OSError, AttributeError):  # not Linux
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="runner-watch", daemon=True).start()


def _claimer() -> int | None:
    text = os.environ.get(CLAIMED_BY, "").strip()
    return int(text) if text.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    from mnist_dist.store.faults import WriteFault

    args = sys.argv[1:] if argv is None else argv
    claimer = _claimer()
    try:
        if claimer is not None:
            end_with(claimer)  # the stop signal it sends waits (blocked) until the handlers are in place
        if len(args) != 1:
            raise UserError("usage: python -m mnist_dist.sweep.pack_process PACK_DIR")
        where = Path(args[0])
        cfgs = read_pack(where)
        stop = StopFlag(cfgs[0].checkpoint.stop_check_steps)
        stop_on_signals(stop, ctrl_c=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)  # blocked by the runner that started it
        if claimer is not None and os.getppid() != claimer:
            return _say(f"the sweep run that started the pack in {where} has ended", ExitCode.STOPPED)
        train_pack_dir(where, cfgs, stop, claimer)
    except UserError as e:
        return _say(str(e), ExitCode.USAGE)
    except Preempted:
        return ExitCode.STOPPED
    except WriteFault as e:
        return _say(f"{e}; fix that and run the same command again", ExitCode.FAULT)
    except BandTimeout as e:
        return _say(str(e), ExitCode.FAULT)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _say(message: str, code: ExitCode) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
