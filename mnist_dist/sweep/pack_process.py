"""One pack of a sweep in a process of its own, as `sweep run` starts it (one per CPU or GPU):

    python -m mnist_dist.sweep.pack_process SWEEP_DIR/packs/pack-<digest>

It trains the members that the pack dir's members.json lists and ends with the exit code of the
command it stands for (errors.ExitCode): 0, 2 with one line for bad input, 75 after a requested stop
saved its checkpoint, 1 with one line for a fault of the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_dist.errors import ExitCode, UserError
from mnist_dist.sweep.local import home, read_pack
from mnist_dist.train.stopping import Preempted, StopFlag, stop_on_signals


def train_pack_dir(where: Path, stop: StopFlag) -> None:
    """The pack that `where` describes, in this process; a member that fails is in its run.json."""
    from mnist_dist.train.run import run_pack

    cfgs = read_pack(where)
    _, failures = run_pack(cfgs, home(cfgs, where), stop=stop)
    for cfg, why in zip(cfgs, failures, strict=True):
        if why is not None:
            print(f"member {cfg.name} failed: training diverged: {why}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from mnist_dist.store.faults import WriteFault

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise UserError("usage: python -m mnist_dist.sweep.pack_process PACK_DIR")
        where = Path(args[0])
        stop = StopFlag(read_pack(where)[0].checkpoint.stop_check_steps)
        stop_on_signals(stop)
        train_pack_dir(where, stop)
    except UserError as e:
        return _say(str(e), ExitCode.USAGE)
    except Preempted:
        return ExitCode.STOPPED
    except WriteFault as e:
        return _say(f"{e}; fix that and run the same command again", ExitCode.FAULT)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _say(message: str, code: ExitCode) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
