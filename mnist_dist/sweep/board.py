"""`mnist-dist sweep board DIR`: TensorBoard on a sweep (or any folder of runs), without W&B or a
network: its HParams dashboard lists the members by their swept values with val_acc, val_loss and the
best of each so far, and how each ended (track/tensorboard.py writes all of it). It reads the files
while the sweep trains, so a board opened on a running sweep fills in as members train.

The board is TensorBoard itself (`tensorboard --logdir DIR` shows the same), started in the foreground
here and said ready only once it answers: the URL printed is one that serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mnist_dist.errors import UserError
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.track import tensorboard

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WILDCARDS = ("0.0.0.0", "::")  # every interface
READY_SECONDS = 60.0  # TensorBoard answers within seconds; a slow disk or a large sweep takes longer
TRAIN_WITH = "train with --tracker tensorboard (or wandb,tensorboard, to have both)"


def check_dir(root: Path) -> None:
    """UserError unless TensorBoard is installed and root holds its files (a sweep's hparams config or
    any run's events)."""
    tensorboard.require("")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a sweep dir (runs/sweeps/<name>) or a run dir")
    if (root / tensorboard.CONFIG_FILE).is_file():
        return
    if next(root.glob("**/events.out.tfevents.*"), None) is None:
        what = "the sweep" if SweepDir(root).manifest.is_file() else "its runs"
        raise UserError(f"{root} has no TensorBoard files: {what} did not write any; {TRAIN_WITH}")


def free_port(host: str, port: int) -> int:
    """`port` if it can be bound on host (0: one the system picks); UserError if it is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"--port {port}: in use on {host}; pass another, or --port 0 for a free one"
                ) from None
            raise UserError(
                f"--host {host}: cannot listen there ({e.strerror}); pass an address of this machine"
            ) from None
        return s.getsockname()[1]


def _shown(host: str) -> str:
    """The host as a browser elsewhere reaches it: this machine's name for a wildcard address."""
    if host in WILDCARDS:
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
        return reply.status == 200
    return False


class BoardFailed(Exception):
    """TensorBoard did not start, or did not answer in time (exit 1)."""


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)  # through serve's `finally`, so TensorBoard stops with the board


def _die_with_parent() -> None:
    """In TensorBoard's process before it starts: SIGTERM when the board dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(root: Path, host: str, port: int, say: Callable[[str], object] = print) -> int:
    """Run TensorBoard on root until it exits or the board is stopped (Ctrl-C, SIGTERM, SIGHUP); say its
    URL once it serves. Returns TensorBoard's exit code."""
    check_dir(root)
    port = free_port(host, port)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", host]
    command += ["--port", str(port), "--reload_interval", "5"]
    url = f"http://{_shown(host)}:{port}/"
    probe = url if host not in WILDCARDS else f"http://127.0.0.1:{port}/"
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    with tempfile.TemporaryFile("w+") as log:
        board = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent
        )
        try:
            deadline = time.monotonic() + READY_SECONDS
            while not _answers(probe):
                if board.poll() is not None:
                    log.seek(0)
                    last = log.read().strip().splitlines() or ["no output"]
                    raise BoardFailed(f"TensorBoard exited ({board.returncode}): {last[-1]}")
                if time.monotonic() > deadline:
                    raise BoardFailed(f"TensorBoard did not answer on {url} within {READY_SECONDS:g} s")
                time.sleep(0.2)
            say(f"TensorBoard on {root}: {url}#hparams (Ctrl-C stops it)")
            sys.stdout.flush()
            return board.wait()
        finally:
            if board.poll() is None:
                board.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    board.wait(10)
                if board.poll() is None:
                    board.kill()
