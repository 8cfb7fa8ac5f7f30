"""Who may write a run directory: its owner only (0700), and one run at a time (a lock file).

Private folders: a run dir holds checkpoints and submitit's pickles, which the nodes execute, so a
folder that others can write is tightened to 0700 when the user owns it and refused when not.

The lock: the main process of a run (`train`, every SLURM job, later each sweep member) creates
RUN_DIR/writer.lock with O_EXCL and holds it until the run ends. A lock file rather than flock():
flock is not reliable on every shared file system, and a file can say who holds it. The file names
host, pid, Slurm job id and start time; a thread refreshes its mtime every STALE/5 seconds. A lock is
stale, and taken over with a warning, when its pid is gone on this host or it was not refreshed for
STALE seconds ($MNIST_DIST_LOCK_STALE_S, default 300) — the holder's node died. A requeued job that
finds its own job's lock (the previous allocation still ending) waits for it up to STALE seconds.
Readers (evaluate, plot, history, status) never take it.

Claims: a sweep's runner takes the locks of all of a pack's members at once or none (`claim`), at the
moment the pack starts, so runners of one sweep (here or on other hosts over a shared file system)
share its members; the pack process it starts for them then `adopt`s the locks, so that each lock
names the process that writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mnist_dist.errors import UserError
from mnist_dist.store import provenance
from mnist_dist.store.atomic import write_atomic

LOCK = "writer.lock"
STALE_ENV = "MNIST_DIST_LOCK_STALE_S"
STALE_DEFAULT_S = 300.0


def private_dir(path: Path, what: str = "run dir") -> Path:
    """Make `path` (and its parents) if missing, as 0700; an existing one that group or others can
    write is tightened to 0700 if this user owns it, else refused (UserError)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise UserError(f"cannot create {what} {path} ({e.strerror}); pass another --output-dir") from None
    if check_private(path, what):
        path.chmod(0o700)
    return path


def check_private(path: Path, what: str = "run dir") -> bool:
    """Whether an existing `path` must be tightened to 0700 (group or others can write it and this
    user owns it); UserError when others can write it and this user does not own it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not stat.S_IMODE(st.st_mode) & 0o022:
        return False
    if st.st_uid != os.getuid():
        raise UserError(
            f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}) and owned by uid "
            f"{st.st_uid}, not you: anyone could replace its checkpoints or job pickles; "
            "pass an --output-dir of your own"
        )
    return True


def single_process() -> bool:
    """No launcher started other processes of this run (WORLD_SIZE unset or 1)."""
    return os.environ.get("WORLD_SIZE", "").strip() in ("", "1")


def stale_after() -> float:
    """Seconds without a refresh after which a lock is taken over ($MNIST_DIST_LOCK_STALE_S)."""
    text = os.environ.get(STALE_ENV, "").strip()
    try:
        value = float(text) if text else STALE_DEFAULT_S
    except ValueError:
        raise UserError(f"${STALE_ENV} '{text}' is not a number of seconds; e.g. 300") from None
    if not value > 0:
        raise UserError(f"${STALE_ENV} {text} must be more than 0 seconds; e.g. 300")
    return value


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; [] when unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str | None:
    """The start time of pid in clock ticks since boot (/proc), to tell a reused pid from its holder."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    if _stat(pid)[:1] == ["Z"]:  # killed, not yet reaped by its parent: it holds nothing
        return False
    return started is None or _process_start(pid) in (None, started)


def describe(holder: dict[str, Any]) -> str:
    job = f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('start_time')}"


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The live holder of run_dir's lock, or None when there is no lock or it is stale."""
    found = _read(run_dir / LOCK)
    return None if found is None or _stale(run_dir / LOCK, found, stale_after()) else found


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written (or half-written by a holder that died): its mtime decides
        return {}
    return found if isinstance(found, dict) else {}


def _stale(path: Path, found: dict[str, Any], limit: float) -> str | None:
    """Why the lock at path is stale, or None while its holder lives."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was released"
    pid, here = found.get("pid"), found.get("host") == provenance.host()
    if here and isinstance(pid, int) and not _alive(pid, found.get("pid_start")):
        return f"its pid {pid} on this host has ended"
    if age > limit:
        return f"it was not refreshed for {age:.0f} s (the limit is {limit:g} s, ${STALE_ENV})"
    return None


class Held(UserError):
    """The run dir's lock is held by a live run (the message names it and what to do)."""


class RunLock:
    """The exclusive right to write one run directory, for the life of a run (see the module doc)."""

    def __init__(self, run_dir: Path, log: Any = print) -> None:
        self.run_dir, self.path, self.log = run_dir, run_dir / LOCK, log
        self.limit = stale_after()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created = False

    def _record(self) -> dict[str, Any]:
        return {
            "host": provenance.host(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "start_time": provenance.now(),
            "token": self.token,
        }

    def acquire(self) -> RunLock:
        """Take the lock (private_dir first), or UserError naming the holder and what to do."""
        self.created = not self.run_dir.exists()
        private_dir(self.run_dir)
        record = json.dumps(self._record(), indent=1) + "\n"
        waited_until = time.monotonic() + self.limit
        while not self._create(record):
            found = _read(self.path)
            if found is None:
                continue  # released between the two calls
            reason = _stale(self.path, found, self.limit)
            if reason:
                self.log(f"warning: taking over the lock of {self.run_dir} from {describe(found)}: {reason}")
                write_atomic(self.path, record, mode=0o600)
                if (_read(self.path) or {}).get("token") == self.token:
                    break
                continue  # another run took it over at the same moment: look again
            ours = os.environ.get("SLURM_JOB_ID")
            if ours and found.get("slurm_job_id") == ours and time.monotonic() < waited_until:
                time.sleep(1)  # this job's previous allocation is still ending: wait for it
                continue
            raise Held(
                f"{self.run_dir} is being written by another run: {describe(found)}; wait for it to end or "
                f"stop it (`mnist-dist cancel JOB`, or kill the pid), or pass another --output-dir"
            )
        self._start_refresh()
        return self

    def adopt(self, claimer: int) -> RunLock:
        """Take over the lock that process `claimer` on this host claimed for this process (a sweep's
        runner, for the pack process it started); UserError when it is not that process's."""
        found = _read(self.path) or {}
        if found.get("host") != provenance.host() or found.get("pid") != claimer:
            raise UserError(f"{self.run_dir} was not claimed for this process: its lock is {describe(found)}")
        write_atomic(self.path, json.dumps(self._record(), indent=1) + "\n", mode=0o600)
        self._start_refresh()
        return self

    def take_over(self, giver: int | None) -> RunLock:
        """Take over the lock of a member that moved into this process's pack from a sibling (the
        `giver`'s pid, or any process this one's parent started: the packs of one `sweep run`), from
        that parent (which claimed it), or free or stale; UserError when another run holds it."""
        found = _read(self.path)
        ours = os.getppid()
        if found is not None and not _stale(self.path, found, self.limit):
            pid = found.get("pid")
            family = isinstance(pid, int) and (pid in (giver, ours) or _stat(pid)[1:2] == [str(ours)])
            if found.get("host") != provenance.host() or not family:
                raise Held(f"{self.run_dir} is being written by another run: {describe(found)}")
        private_dir(self.run_dir)
        write_atomic(self.path, json.dumps(self._record(), indent=1) + "\n", mode=0o600)
        self._start_refresh()
        return self

    def hand_over(self) -> None:
        """Stop refreshing: the process this lock was claimed for adopts it. `release()` afterwards
        removes it only if that process never did."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start_refresh(self) -> None:
        self._thread = threading.Thread(target=self._refresh, name="run-dir-lock", daemon=True)
        self._thread.start()

    def _create(self, record: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(min(self.limit / 5, 60)):
            if not self.held():
                taker = describe(_read(self.path) or {})
                self.log(f"warning: the lock of {self.run_dir} was taken over by {taker}")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def held(self) -> bool:
        return (_read(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        """Stop refreshing and remove the lock file, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            with contextlib.suppress(OSError):
                self.path.unlink()
                if self.created:  # a run refused before its first write leaves no empty folder
                    self.run_dir.rmdir()


def claim(run_dirs: list[Path], log: Any = print) -> list[RunLock]:
    """The locks of all `run_dirs`, or of none: when one is refused (Held: a live run holds it), the
    ones taken are released and the refusal raised."""
    taken: list[RunLock] = []
    try:
        for run_dir in run_dirs:
            taken.append(RunLock(run_dir, log).acquire())
    except BaseException:
        for lock in taken:
            lock.release()
        raise
    return taken
