"""The one exception type for bad input, and the exit codes every command and process ends with."""

from enum import IntEnum


class UserError(Exception):
    """Bad input (config, CLI value, data file, run directory): say what is wrong and how to fix it."""


class BandTimeout(TimeoutError):
    """The packs of a sweep's wave did not meet at a hyperband band (a peer's band file, or a member
    it hands over, never came): another pack process ended or stalled. Not the members' fault: they
    are recorded `fault` and resume on a rerun."""


class ExitCode(IntEnum):
    """What an exit code means, for every command, task and pack process of this project."""

    OK = 0
    FAULT = 1  # a fault of the machine (full disk, I/O error) or a run that diverged: one line
    USAGE = 2  # bad input: one line saying what is wrong and how to fix it; nothing changed
    STOPPED = 75  # EX_TEMPFAIL: a clean stop on request (SIGUSR2/SIGTERM, drill), checkpoint saved
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
