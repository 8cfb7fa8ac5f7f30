"""Writing a file so that a reader never sees half of it: into a temporary file beside it, flushed to
disk, then renamed over the target (a rename within a folder is atomic on POSIX file systems)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mnist_dist.store.faults import writing


@contextlib.contextmanager
def atomic_path(target: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `target` for the caller to write; on success it replaces `target`
    (with `mode`, else mkstemp's owner-only 0600), on any failure it is removed."""
    with writing(target):  # a full disk, an I/O error: one WriteFault naming the target
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            if mode is not None:
                tmp.chmod(mode)
            with tmp.open("rb") as f:  # durable before the rename makes it visible
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_atomic(target: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `target` with `data` (text is UTF-8) in one step."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
