"""Experiment tracking (W&B, TensorBoard): the settings, and the Tracker a run logs its history to.

W&B is Accelerate's tracker (`log_with`): the engine builds the Accelerator and hands it to `Tracker`,
which only calls its tracker methods; nothing here imports Accelerate. TensorBoard is written by
tensorboard.py (its run and HParams session named for the member; why not Accelerate's: there).
Tracking never fails a run: when W&B cannot go online the run is written offline under the run
directory (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later), and if that fails too the run
goes on untracked.
Processes other than the main one get a NullTracker.

W&B on its own, given an API key, tries to go online and waits out its init timeout (a minute and
more) on a node without a route to it. So before an online start that nobody forced, one bounded
check (a TCP connection to the W&B host, or to the HTTPS proxy requests would use, DNS included)
decides within seconds, once per process; when it fails the run goes offline at once and says so in
one line. `wandb.mode: online` or WANDB_MODE=online still makes the full attempt.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import functools
import netrc
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.store.provenance import host
from mnist_dist.track.tensorboard import TensorBoardRun
from mnist_dist.track.wandb_file import last_logged_epoch

WANDB_URL = "https://api.wandb.ai"
CHECK_SECONDS = 5.0  # long enough for a slow DNS and a TCP handshake, short next to W&B's minute


def wandb_base_url() -> str:
    """The W&B server as W&B finds it: $WANDB_BASE_URL, else `base_url` in its settings file
    (written by `wandb login --host`; $WANDB_CONFIG_DIR/settings or ~/.config/wandb/settings)."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(config_dir.expanduser() / "settings")
    return parser.get("default", "base_url", fallback=WANDB_URL).rstrip("/")


def wandb_credentials() -> bool:
    """True when W&B has an API key: $WANDB_API_KEY or a ~/.netrc entry (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return urllib.parse.urlsplit(wandb_base_url()).netloc in hosts  # host[:port], as `wandb login` writes


def wandb_mode(configured: str) -> str:
    """online/offline: the config's choice, else $WANDB_MODE, else online only with credentials."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_credentials() else "offline"


@dataclass(frozen=True)
class Reach:
    """The outcome of one reachability check: could a connection be opened, what was tried, how long."""

    ok: bool
    target: str  # host:port (and the proxy, when one is used)
    why: str
    seconds: float

    def unreachable(self) -> str:
        """The start of the one line a run or `sync` says when the check failed."""
        return f"W&B: {self.target} unreachable from {host()} ({self.why})"


def _endpoint(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def _proxy(url: str) -> str | None:
    """The proxy W&B would use for url: $WANDB_HTTPS_PROXY, else $HTTPS_PROXY/$HTTP_PROXY unless
    $NO_PROXY names the host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and os.environ.get("WANDB_HTTPS_PROXY"):
        return os.environ["WANDB_HTTPS_PROXY"]
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def _open(host: str, port: int) -> None:
    # Happy eyeballs: a black-holed IPv6 address must not use up the time an IPv4 one would answer in.
    _, writer = await asyncio.open_connection(host, port, happy_eyeballs_delay=0.25)
    writer.close()


def _reason(error: BaseException) -> str:
    """`Name or service not known`, `Connection refused`: the words of the system, not asyncio's."""
    if isinstance(error, socket.gaierror):
        return str(error.strerror)
    errno = getattr(error, "errno", None)
    return os.strerror(errno) if errno else str(error)


@functools.cache
def wandb_reachable(url: str, timeout: float = CHECK_SECONDS) -> Reach:
    """Whether a TCP connection to the W&B server (or its proxy) opens within `timeout` seconds, DNS
    included (a lookup has no timeout of its own, hence the thread that is given up on). Checked once
    per process and url: what it decides holds for every run the process starts."""
    proxy = _proxy(url)
    server, port = _endpoint(proxy or url)
    target = f"{server}:{port}" + (f" (proxy for {_endpoint(url)[0]})" if proxy else "")
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            asyncio.run(asyncio.wait_for(_open(server, port), timeout))
            outcome.append(None)
        except (OSError, asyncio.TimeoutError) as e:
            outcome.append(e)

    start = time.monotonic()
    probe = threading.Thread(target=connect, name="wandb-reachability", daemon=True)
    probe.start()
    probe.join(timeout)
    seconds = round(time.monotonic() - start, 3)
    if not outcome:
        return Reach(False, target, f"no answer within {timeout:g} s", seconds)
    error = outcome[0]
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):  # DNS answered, the connection did not
        return Reach(False, target, f"no answer within {timeout:g} s", seconds)
    if error is not None:
        return Reach(False, target, _reason(error), seconds)
    return Reach(True, target, "reachable", seconds)


def start_mode(configured: str) -> tuple[str, dict[str, Any], Reach | None]:
    """The W&B mode to start in, what run.json records of the decision, and the failed check that
    sent it offline (None otherwise). A mode that was asked for is taken as it is; W&B's own choice
    (online with a key) only after the check passes."""
    asked = wandb_mode(configured)
    if configured != "auto":
        return asked, {"mode_reason": "wandb.mode"}, None
    if os.environ.get("WANDB_MODE", "").strip().lower() == asked:
        return asked, {"mode_reason": "WANDB_MODE"}, None
    if asked != "online":
        return asked, {"mode_reason": "no W&B API key"}, None
    reach = wandb_reachable(wandb_base_url())
    record = {"mode_reason": f"{reach.target}: {reach.why}", "check_seconds": reach.seconds}
    return ("online", record, None) if reach.ok else ("offline", record, reach)


_told: set[str] = set()  # targets whose unreachable line was said: once per process


def init_kwargs(cfg: TrainConfig, run_dir: Path, mode: str, run_id: str | None = None) -> dict[str, Any]:
    """Accelerate's init_trackers(init_kwargs=...) for the configured tracker."""
    if "wandb" in cfg.trackers:
        job = os.environ.get("SLURM_JOB_ID")
        kwargs: dict[str, Any] = {
            "dir": str(run_dir),
            # One W&B run per Slurm job, named after it, so a dashboard row leads back to the job.
            "name": f"{cfg.name}-{job}" if job else cfg.name,
            "mode": mode,
            "entity": cfg.wandb.entity,
            # Our own lines are the log; W&B capturing the console would only copy them.
            "settings": {"console": "off", "init_timeout": 60},
            # A pack's members are one W&B run each, open side by side in one process; so the config
            # goes to its run here, not through Accelerate (which updates the global wandb.config).
            "reinit": "create_new",
            "config": cfg.model_dump(mode="json"),
        }
        if cfg.sweep is not None:  # one W&B group per sweep, one run per member
            kwargs.update(group=cfg.sweep.name, job_type="sweep", name=cfg.name)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        return {"wandb": kwargs}
    return {}


def run_id(cfg: TrainConfig) -> str | None:
    """The W&B run id a run gets again after every resume and requeue: a sweep member's from its
    sweep and member id (many members share one array task), else the Slurm job's, else W&B's own."""
    if cfg.sweep is not None:
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{cfg.sweep.name}-{cfg.sweep.member}")
    return job_run_id()


def job_run_id() -> str | None:
    """In a Slurm job, a W&B run id that every requeue of the job gets again: one run per job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{os.environ.get('SLURM_CLUSTER_NAME', 'slurm')}-{job}"


def entry_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """What one history entry sends to the tracker: numbers only, epoch as the x-axis."""
    keys = ("epoch", "phase", "lr", "val_loss", "val_acc", "train_loss", "seconds")
    return {k: entry[k] for k in keys if entry.get(k) is not None}


class Tracker:
    """The main process's tracker of one run (one member of a pack): started with an offline
    fallback, each history entry logged once (a resumed run skips the epochs its W&B run already
    has), finished on every exit path. The Accelerator builds it; the tracker objects are then kept
    here, not on the Accelerator, so that each member of a pack has its own."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, accelerator: Any, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.accelerator, self.warn = cfg, run_dir, accelerator, log
        self.trackers: list[Any] = []  # Accelerate's: W&B
        self.board: TensorBoardRun | None = None
        self.logged_through = -1  # the last epoch W&B has

    def start(self, run_id: str | None = None) -> dict[str, Any]:
        """Start the configured trackers; return what run.json records of them. Never raises."""
        started, failed, info = [], [], {}
        if "wandb" in self.cfg.trackers:
            wandb_info = self._start_wandb(run_id)
            (started if wandb_info.get("tracker") == "wandb" else failed).append("wandb")
            info.update({k: v for k, v in wandb_info.items() if k not in ("tracker", "tracker_failed")})
        if "tensorboard" in self.cfg.trackers:
            try:
                self.board = TensorBoardRun(self.cfg, self.run_dir)
                started.append("tensorboard")
                info["tensorboard"] = str(self.board.dir)
            except Exception as e:
                self.warn(f"warning: tensorboard tracker did not start: {e}".splitlines()[0])
                failed.append("tensorboard")
        if failed:
            info["tracker_failed"] = ",".join(failed)
        return {"tracker": ",".join(started) or "none", **info}

    def _start_wandb(self, run_id: str | None) -> dict[str, Any]:
        """W&B, through Accelerate, online or offline (see the module's docstring)."""
        mode, decision, unreachable = start_mode(self.cfg.wandb.mode)
        if unreachable is not None:
            self._say_offline(unreachable)
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self._init(attempt, run_id)
                info = {**self._info(attempt), **decision}
                self._define_metrics()
                self.logged_through = self._last_logged_epoch(info.get("run_id"))
                return info
            except Exception as e:
                self.warn(f"warning: wandb tracker ({attempt}) did not start: {e}".splitlines()[0])
                decision = {**decision, "mode_reason": f"{attempt} start failed"}
        self.trackers = []
        return {"tracker": "none", "tracker_failed": "wandb"}

    def _init(self, mode: str, run_id: str | None) -> None:
        acc = self.accelerator
        acc.trackers = []
        kwargs = init_kwargs(self.cfg, self.run_dir, mode, run_id)  # the config goes to this member's run
        try:
            acc.init_trackers(self.cfg.wandb.project, init_kwargs=kwargs)
        finally:
            self.trackers, acc.trackers = acc.trackers, []

    def _wandb_run(self) -> Any:
        return next(t.tracker for t in self.trackers if t.name == "wandb")

    def _define_metrics(self) -> None:
        """W&B: epoch is the x-axis, and the summary holds the best val_acc and val_loss, so the runs
        table (and a sweep's group) sorts by them rather than by the last value."""
        run = self._wandb_run()
        run.define_metric("epoch")
        best = {"val_acc": "max,last", "val_loss": "min,last"}
        for name in ("val_loss", "val_acc", "train_loss", "lr", "phase", "seconds"):
            run.define_metric(name, step_metric="epoch", **({"summary": best[name]} if name in best else {}))

    def _say_offline(self, reach: Reach) -> None:
        """One line, once per process, when the check sent the run offline: why, and what to do."""
        if reach.target in _told:
            return
        _told.add(reach.target)
        self.warn(
            f"{reach.unreachable()}; logging offline to "
            f"{self.run_dir / 'wandb'} (upload later: mnist-dist sync {self.run_dir})"
        )

    def _info(self, mode: str) -> dict[str, Any]:
        run = self._wandb_run()
        return {"tracker": "wandb", "mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent)}

    def _last_logged_epoch(self, run_id: str | None) -> int:
        """The last epoch this W&B run already has (resumed runs): from its earlier offline files, or
        from the summary an online run resumes with."""
        if run_id is None:
            return -1
        last = last_logged_epoch(self.run_dir, run_id)
        run = self._wandb_run()
        with contextlib.suppress(Exception):
            last = max(last, int(run.summary.get("epoch", -1)))
        return last

    def log(self, entry: dict[str, Any]) -> None:
        """Send a history entry, once: epochs a tracker already has (before a resume) are skipped."""
        metrics = entry_metrics(entry)
        if self.board is not None:
            try:
                self.board.log(metrics, entry["epoch"])
            except Exception as e:
                self.warn(f"warning: tensorboard log failed: {e}".splitlines()[0])
        if self.trackers and entry["epoch"] > self.logged_through:
            try:
                for tracker in self.trackers:
                    tracker.log(metrics, step=entry["epoch"])
                self.logged_through = entry["epoch"]
            except Exception as e:
                self.warn(f"warning: tracker log failed: {e}".splitlines()[0])

    def end(self, status: str) -> None:
        """How the run ended (run.json's status), for TensorBoard's HParams session."""
        if self.board is not None:
            with contextlib.suppress(Exception):
                self.board.end(status)

    def summarize(self, values: dict[str, Any]) -> None:
        """Keys for the run's summary (W&B; the other trackers keep none): how it ended, e.g."""
        if "wandb" not in self.cfg.trackers or not self.trackers:
            return
        try:
            self._wandb_run().summary.update(values)
        except Exception as e:
            self.warn(f"warning: tracker summary failed: {e}".splitlines()[0])

    def close(self) -> None:
        """Finish every started tracker (W&B writes its last records here)."""
        for tracker in self.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
        self.trackers = []


class NullTracker:
    """What processes other than the main one get: nothing is started or logged."""

    def start(self, run_id: str | None = None) -> dict[str, Any]:
        return {"tracker": None}

    def log(self, entry: dict[str, Any]) -> None: ...

    def end(self, status: str) -> None: ...

    def summarize(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
