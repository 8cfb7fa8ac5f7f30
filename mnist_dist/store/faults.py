"""Faults of the machine while writing: a full disk, an I/O error, a read-only or forbidden file system.

Any write of a run (checkpoint, history, metrics, plots, weights, config, the data files) that fails
this way becomes one WriteFault naming the file and the cause. The CLI prints it as one line and exits
1 (the traceback only with --debug or MNIST_DIST_DEBUG=1); temporary files are removed where the
write failed, and the same command resumes from the last sound checkpoint once the fault is gone.

torch.save and safetensors do not raise OSError on a full disk (a RuntimeError "unexpected pos ..."
and a SafetensorError "... (os error 28)"), so those are recognised too, by the error code in the
message or by the state of the file system the file was going to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

HARD = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
DEBUG_ENV = "MNIST_DIST_DEBUG"


class WriteFault(Exception):
    """Writing `path` failed for a reason of the machine, not of the program or its input."""

    def __init__(self, path: Path | str, cause: str) -> None:
        super().__init__(f"cannot write {path}: {cause}")
        self.path, self.cause = Path(path), cause
        self.last_checkpoint: Path | None = None  # set by the run, for the one line


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _file_system_state(path: Path) -> int | None:
    """ENOSPC or EROFS when the file system that `path` is on is full or read-only, else None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 1 << 20 or (st.f_files and st.f_favail == 0):  # < 1 MiB or no inodes
        return errno.ENOSPC
    return None


def classify(e: BaseException, path: Path) -> WriteFault | None:
    """The WriteFault that `e`, raised while writing `path`, stands for; None for any other error."""
    if isinstance(e, WriteFault):
        return e
    if isinstance(e, OSError) and e.errno in HARD:
        return WriteFault(e.filename or path, e.strerror or os.strerror(e.errno))
    if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
        return None
    code = re.search(r"os error (\d+)|code: (\d+)", str(e))
    number = int(code.group(1) or code.group(2)) if code else _file_system_state(path)
    if number in HARD:
        return WriteFault(path, os.strerror(number))
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a machine fault while writing `path` into a WriteFault; let every other error through."""
    try:
        yield
    except Exception as e:
        fault = classify(e, path)
        if fault is None or fault is e:
            raise
        raise fault from e
