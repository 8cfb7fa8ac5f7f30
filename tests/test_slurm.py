"""SLURM: real jobs on the local cluster (slurm/cluster.sh: two hosts in network namespaces, no
accounting). Submitted through `mnist-dist submit` (submitit) and through slurm/train.sbatch; watched
with status/logs/history/cancel. No mocked sbatch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mnist_dist.track import wandb_file

from conftest import ROOT, SECRETS, SHORT_PHASES, load_json, ok, run_cli

GOLDEN = ROOT / "tests/assets/submit_dry_run.sbatch"


def queued() -> set[str]:
    """The ids of the jobs in the queue."""
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


def submit(env: dict[str, str], out: Path, *args: str) -> str:
    proc = ok(run_cli("submit", "--output-dir", out, "--allow-local", "--json", *args, env=env))
    result = json.loads(proc.stdout)
    assert result["run_dir"] == str(out)
    return result["job_id"]


def status(env: dict[str, str], job: str) -> dict:
    return json.loads(ok(run_cli("status", job, "--json", env=env)).stdout)


def wait(env: dict[str, str], job: str, *, until=lambda s: s["finished"], timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = status(env, job)
        if until(info):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {info} after {timeout}s")


@pytest.fixture(scope="module")
def jobs(
    cluster: int, slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple]:
    """Three jobs submitted together: the seed run with W&B (2 CPUs), 1 node x 2 tasks, 2 nodes x 1 task
    (1 CPU per task, the default)."""
    base = tmp_path_factory.mktemp("slurm")
    out = {
        "seed": (base / "seed", ["--partition", "gpu", "--tracker", "wandb", "--cpus-per-task", "2"]),
        "1x2": (base / "one-node", ["--partition", "cpu", "--tasks-per-node", "2", "--tracker", "none"]),
        "2x1": (base / "two-nodes", ["--partition", "cpu", "--nodes", "2", "--tracker", "none"]),
    }
    return {name: (submit(slurm_env, path, *args), path) for name, (path, args) in out.items()}


def test_submit_seed_config_completes(jobs: dict, slurm_env: dict[str, str]):
    job, run_dir = jobs["seed"]
    info = wait(slurm_env, job)
    assert info["state"] == "COMPLETED", info
    history = load_json(run_dir / "history.json")
    assert len(history) == 11 and history[-1]["val_acc"] >= 0.96
    run = load_json(run_dir / "run.json")
    assert run["world_size"] == 1 and run["status"] == "completed"
    # One task: no process group; its threads are the CPUs it asked for.
    assert run["distributed_type"] == "NO"
    assert run["threads"] == {"count": 2, "source": "SLURM_CPUS_PER_TASK"}
    # One W&B run for the job, offline (no key on the nodes), named after the job id.
    files = wandb_file.wandb_run_files(run_dir)
    assert len(files) == 1
    wb = wandb_file.read_wandb_run(files[0])
    assert wb["name"] == f"seed-{job}" and len(wb["history"]) == 11
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in files) and any(p.name.endswith("_log.out") for p in files)
    for p in files:  # config, run.json, logs, submitit's pickles, checkpoints, the W&B run
        blob = p.read_bytes()
        assert not [name for name, value in SECRETS.items() if value.encode() in blob], p


@pytest.mark.parametrize(("name", "hosts"), [("1x2", 1), ("2x1", 2)])
def test_two_processes_on_slurm_match_one_local_process(
    jobs: dict, slurm_env: dict[str, str], seed_run: Path, name: str, hosts: int
):
    job, run_dir = jobs[name]
    info = wait(slurm_env, job)
    assert info["state"] == "COMPLETED", (info, (run_dir / "submitit").iterdir())
    run = load_json(run_dir / "run.json")
    assert run["world_size"] == 2 and run["distributed_type"] == "MULTI_CPU"
    assert run["train_samples_per_process"] == [25_000, 25_000]
    assert len(run["hosts"]) == hosts, run["hosts"]  # ranks really ran on both hosts
    assert run["threads"] == {"count": 1, "source": "SLURM_CPUS_PER_TASK"}
    local = load_json(seed_run / "history.json")
    for a, b in zip(load_json(run_dir / "history.json"), local, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4 and abs(a["val_acc"] - b["val_acc"]) <= 1e-4


def test_status_logs_history_of_a_finished_job(jobs: dict, slurm_env: dict[str, str]):
    job, run_dir = jobs["2x1"]
    wait(slurm_env, job)
    text = ok(run_cli("status", job, env=slurm_env)).stdout
    assert text.startswith(f"job {job}: COMPLETED") and "10 epoch(s) done" in text
    logs = ok(run_cli("logs", job, env=slurm_env)).stdout
    assert "task 0/2" in logs and "Epoch [10], val_loss:" in logs
    assert "task 1/2" in ok(run_cli("logs", job, "--task", "1", env=slurm_env)).stdout
    table = ok(run_cli("history", job, env=slurm_env)).stdout.splitlines()
    assert len(table) == 11 and table[0].startswith("Epoch [0], val_loss:")
    assert ok(run_cli("history", run_dir, env=slurm_env)).stdout.splitlines() == table
    # The same answer from submitit's files alone, as once Slurm has forgotten the job (MinJobAge).
    record = json.loads((run_dir / "job.json").read_text())
    for f in Path(record["folder"]).glob(f"{job}_*"):
        shutil.copy(f, Path(record["folder"]) / f.name.replace(job, "999999", 1))
    forgotten = {**record, "job_id": "999999"}
    Path(slurm_env["MNIST_DIST_STATE_DIR"], "jobs", "999999.json").write_text(json.dumps(forgotten))
    info = status(slurm_env, "999999")
    assert info["state"] == "COMPLETED" and info["source"] == "submitit" and info["finished"]


def test_logs_follow_streams_until_the_job_ends(cluster: int, slurm_env: dict[str, str], tmp_path: Path):
    job = submit(slurm_env, tmp_path / "follow", "-c", str(ROOT / "configs/smoke.yaml"))
    proc = ok(run_cli("logs", job, "--follow", env=slurm_env, timeout=300))
    assert "Epoch [2], val_loss:" in proc.stdout and "done in" in proc.stdout
    assert status(slurm_env, job)["state"] == "COMPLETED"


def test_the_plain_sbatch_template_runs_on_two_nodes(cluster: int, slurm_env: dict[str, str], tmp_path: Path):
    out = tmp_path / "plain"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition",
            "cpu",
            "--nodes",
            "2",
            f"--output={tmp_path}/%j.out",
            str(ROOT / "slurm/train.sbatch"),
            "--output-dir",
            str(out),
            "--tracker",
            "none",
            "--source",
            "dir",
            "--phases",
            "1x0.5,1x0.1",
        ],
        capture_output=True,
        text=True,
        env=slurm_env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    deadline = time.monotonic() + 400
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"sbatch job {job} did not finish"
        time.sleep(1)
    log = (tmp_path / f"{job}.out").read_text()
    assert "2 node(s) x 1 process(es) = 2" in log, log[-3000:]
    assert log.count("Epoch [2], val_loss") == 1, "only global rank 0 prints"
    run = load_json(out / "run.json")
    assert run["world_size"] == 2 and run["hosts"] == ["node1", "node2"] and run["status"] == "completed"


def _normalize(text: str, run_dir: Path) -> str:
    return text.replace(str(run_dir), "RUN_DIR").replace(sys.executable, "PYTHON")


DRY_RUN = [
    "submit",
    "--partition",
    "gpu",
    "--nodes",
    "2",
    "--tasks-per-node",
    "1",
    "--time",
    "00:30:00",
    "--mem",
    "4G",
    "--job-name",
    "golden",
    "--allow-local",
    "--dry-run",
]


def test_dry_run_prints_the_golden_sbatch_script_and_submits_nothing(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path
):
    run_dir = tmp_path / "dry"
    before = queued()
    proc = run_cli(*DRY_RUN, "--output-dir", run_dir, env=slurm_env)
    if cluster >= 2:  # a real submit would pass: exit 0, no warning
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        assert proc.returncode == 2 and "--nodes 2: partition 'gpu' has 1 node(s)" in proc.stderr
    got = _normalize(proc.stdout, run_dir)
    if os.environ.get("MNIST_DIST_REGOLD"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text()
    assert not run_dir.exists()
    assert queued() <= before, "nothing submitted (jobs of earlier tests may have left the queue)"


@pytest.fixture
def silent_controller(tmp_path: Path):
    """The environment of a login node whose controller does not answer: a slurm.conf (the cluster's,
    with another controller) naming a host that takes connections and never replies, as a hung or
    overloaded slurmctld does; Slurm's clients then wait for their MessageTimeout (20 s) and retry."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    taken: list[socket.socket] = []

    def take() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                taken.append(server.accept()[0])

    threading.Thread(target=take, daemon=True).start()
    conf = Path("/etc/slurm/slurm.conf").read_text()
    conf = re.sub(r"^SlurmctldHost=.*$", "SlurmctldHost=silent(127.0.0.1)", conf, flags=re.MULTILINE)
    conf = re.sub(r"^SlurmctldPort=.*$", f"SlurmctldPort={server.getsockname()[1]}", conf, flags=re.MULTILINE)
    (tmp_path / "slurm.conf").write_text(conf)
    yield {"SLURM_CONF": str(tmp_path / "slurm.conf"), "MNIST_DIST_SLURM_TIMEOUT": "3"}
    server.close()
    for conn in taken:
        conn.close()


def test_an_unreachable_controller_is_one_line_in_seconds_and_a_dry_run_still_prints_the_script(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path, silent_controller: dict[str, str]
):
    env = {**slurm_env, **silent_controller}
    sweep = tmp_path / "sweep"  # a submitted sweep's dir, as `sweep submit` leaves it
    sweep.mkdir()
    manifest = {"name": "s", "metric": {"name": "val_acc", "goal": "maximize"}, "swept": [], "members": []}
    (sweep / "sweep.json").write_text(json.dumps({**manifest, "jobs": [{"job_id": "4242", "tasks": []}]}))
    said = "error: Slurm controller silent(127.0.0.1) not reachable ("
    for args in (
        ["submit", "--output-dir", tmp_path / "run", "--allow-local", "--tracker", "none"],
        ["status", "4242"],
        ["sweep", "status", sweep],
    ):
        start = time.monotonic()
        proc = run_cli(*args, env=env)
        took = time.monotonic() - start
        assert proc.returncode == 2 and proc.stderr.startswith(said), (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "timed out after 3 s" in proc.stderr, proc.stderr
        assert took < 15, f"{args[0]} took {took:.0f} s"
    assert not (tmp_path / "run").exists()
    proc = run_cli(*DRY_RUN, "--output-dir", tmp_path / "dry", env=env)  # the script, and why not
    assert proc.returncode == 2 and proc.stderr.startswith(f"warning: {said.removeprefix('error: ')}")
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert _normalize(proc.stdout, tmp_path / "dry") == GOLDEN.read_text()


def test_gpus_per_node_and_the_slurm_timeout_are_read_as_slurm_and_users_write_them(monkeypatch):
    from mnist_dist.errors import UserError
    from mnist_dist.slurm import commands

    lines = "gpu*|gpu:4\ngpu|gpu:a100:8(S:0-1),tmpdisk:100\ncpu|(null)\nmixed|gpu:2,gpu:v100:1\n"
    assert commands.gpus_per_node(lines) == {"gpu": 8, "mixed": 2}
    assert commands.timeout_s() == commands.TIMEOUT_S
    monkeypatch.setenv("MNIST_DIST_SLURM_TIMEOUT", "2.5")
    assert commands.timeout_s() == 2.5
    monkeypatch.setenv("MNIST_DIST_SLURM_TIMEOUT", "soon")
    with pytest.raises(UserError, match="MNIST_DIST_SLURM_TIMEOUT 'soon': seconds"):
        commands.timeout_s()


def test_more_nodes_than_the_partition_has_is_refused_and_a_job_that_can_never_start_says_so(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path
):
    before = queued()
    proc = run_cli("submit", "--nodes", "4", "--output-dir", tmp_path / "run", "--allow-local", env=slurm_env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--nodes 4: partition 'gpu' has {cluster} node(s), so the job could never start" in proc.stderr
    assert queued() <= before, "nothing submitted (jobs of earlier tests may have left the queue)"
    # Submitted some other way (sbatch here), such a job pends for a reason no wait clears.
    job = subprocess.run(
        ["sbatch", "--parsable", "-p", "gpu", "-N", "4", "-o", "/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while "it may never start" not in (line := run_cli("status", job, env=slurm_env).stdout):
            assert time.monotonic() < deadline, line
            time.sleep(1)
        assert f"job {job}: PENDING (" in line and "submit it again asking for less" in line, line
    finally:
        subprocess.run(["scancel", job], check=False)


def test_an_interpreter_on_node_local_storage_is_refused_like_an_output_dir(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path
):
    """A venv under /tmp (its python, pyvenv.cfg and lib beside it): the nodes would not find it."""
    venv = Path(sys.executable).parent.parent
    local = Path(tempfile.mkdtemp(prefix="venv-", dir="/tmp"))
    try:
        (local / "bin").mkdir()
        (local / "bin" / "python").symlink_to(Path(sys.executable).resolve())
        (local / "lib").symlink_to(venv / "lib")
        shutil.copy(venv / "pyvenv.cfg", local / "pyvenv.cfg")
        command = [str(local / "bin" / "python"), "-m", "mnist_dist.cli", "submit", "--dry-run"]
        proc = subprocess.run(
            [*command, "--output-dir", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            env=slurm_env,
            cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"warning: the Python that runs the job, {local}/bin/python is under /tmp" in proc.stderr
        assert "#SBATCH" in proc.stdout
    finally:
        shutil.rmtree(local)


def test_pending_job_is_not_finished_and_cancel_works(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path
):
    # A DOWN partition queues jobs and starts none: the job is PENDING for sure (a hold after submit
    # raced the scheduler, which can start a 1-CPU job on an idle cluster first).
    subprocess.run(["scontrol", "update", "PartitionName=cpu", "State=DOWN"], check=True)
    try:
        job = submit(slurm_env, tmp_path / "held", "--tracker", "none", "--partition", "cpu")
        info = status(slurm_env, job)
        subprocess.run(["scontrol", "hold", job], check=True)  # and stays so once the partition is up
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=cpu", "State=UP"], check=True)
    assert info["state"] == "PENDING" and not info["finished"]
    text = ok(run_cli("cancel", job, env=slurm_env)).stdout
    assert text.strip() == f"job {job}: CANCELLED"
    assert status(slurm_env, job)["finished"]


def test_running_job_shows_progress_then_cancel(cluster: int, slurm_env: dict[str, str], tmp_path: Path):
    job = submit(slurm_env, tmp_path / "long", "--tracker", "none", "--phases", "200x0.1")
    info = wait(slurm_env, job, until=lambda s: s["state"] == "RUNNING" and s.get("epochs_done", 0) >= 1)
    assert not info["finished"]
    assert "Epoch [1], val_loss:" in ok(run_cli("logs", job, env=slurm_env)).stdout
    assert ok(run_cli("history", job, env=slurm_env)).stdout.count("Epoch [") >= 2
    assert ok(run_cli("cancel", job, env=slurm_env)).stdout.strip() == f"job {job}: CANCELLED"
    info = status(slurm_env, job)
    assert info["state"] == "CANCELLED" and info["finished"]


def test_a_job_that_raises_shows_the_python_error(cluster: int, slurm_env: dict[str, str], tmp_path: Path):
    job = submit(slurm_env, tmp_path / "diverge", "--tracker", "none", "--phases", "1x1e38")
    info = wait(slurm_env, job)
    assert info["state"] == "FAILED", info
    assert re.match(
        r"FloatingPointError: training loss is (nan|inf) in phase 1, epoch 1, lr 1e\+38", info["error"]
    )
    text = ok(run_cli("status", job, env=slurm_env)).stdout
    assert "error: FloatingPointError" in text
    assert "FloatingPointError" in ok(run_cli("logs", job, env=slurm_env)).stdout
    assert load_json(tmp_path / "diverge/run.json")["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "nosuch"], "partition 'nosuch' does not exist; partitions here: gpu, cpu"),
        (["--tasks-per-node", "3"], "batch_size 128 is not divisible by 1 node(s) x 3 task(s) = 3 processes"),
        (["--partition", "gpu;rm"], "--partition 'gpu;rm' has characters Slurm names do not use"),
        (["--job-name", "a\nb"], "--job-name 'a\\nb' has characters Slurm names do not use"),
        (["--time", "soon"], "--time 'soon' is not a Slurm time"),
        (["--gpus-per-node", "1", "--tasks-per-node", "2"], "is more than --gpus-per-node 1"),
    ],
)
def test_preflight_errors_exit_2_and_submit_nothing(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path, args: list[str], message: str
):
    before = queued()
    proc = run_cli("submit", "--output-dir", tmp_path / "run", "--allow-local", *args, env=slurm_env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert queued() <= before, "nothing submitted (jobs of earlier tests may have left the queue)"
    assert not (tmp_path / "run").exists()


def test_node_local_output_dir_is_refused_without_allow_local(
    cluster: int, slurm_env: dict[str, str], tmp_path: Path
):
    proc = run_cli("submit", "--output-dir", tmp_path / "run", env=slurm_env)
    assert proc.returncode == 2 and "which is local to each node" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("submit", "--output-dir", blocker / "run", "--allow-local", env=slurm_env)
    assert proc.returncode == 2 and "is not writable" in proc.stderr


def test_sbatch_missing_is_exit_2(cluster: int, slurm_env: dict[str, str], tmp_path: Path):
    env = {**slurm_env, "PATH": str(Path(sys.executable).parent)}  # the venv, without Slurm's commands
    proc = run_cli("submit", "--output-dir", tmp_path / "run", "--allow-local", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: sbatch not found")
    assert not (tmp_path / "run").exists()


def test_unknown_job_id_is_exit_2(cluster: int, slurm_env: dict[str, str]):
    for command in ("status", "logs", "cancel", "history"):
        proc = run_cli(command, "987654", env=slurm_env)
        assert proc.returncode == 2 and "job 987654 is not known to Slurm or to mnist-dist" in proc.stderr
    proc = run_cli("status", "12; rm -rf /", env=slurm_env)
    assert proc.returncode == 2 and "is neither a job id" in proc.stderr


def test_sync_wraps_wandb_sync(jobs: dict, slurm_env: dict[str, str]):
    job, run_dir = jobs["seed"]
    wait(slurm_env, job)
    lines = ok(run_cli("sync", run_dir, "--dry-run", env=slurm_env)).stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"sync {wandb_file.wandb_run_files(run_dir)[0].parent}")
    proc = run_cli("sync", run_dir.parent, env=slurm_env)
    assert proc.returncode == 2 and "has no W&B offline run" in proc.stderr


def _after_epochs(run_dir: Path, epochs: int, timeout: float = 300) -> None:
    """Return as soon as the run has logged `epochs` epochs (polled fast: the seed run is seconds long)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > epochs):
        assert time.monotonic() < deadline, f"{run_dir} did not reach epoch {epochs}"
        time.sleep(0.05)


def _preempt(env: dict[str, str], job: str, run_dir: Path, sig: str) -> None:
    """Signal a running job once it has trained 2 epochs; release its requeue at once (BeginTime)."""
    _after_epochs(run_dir, 2)
    subprocess.run(["scancel", f"--signal={sig}", job], check=True)
    info = wait(env, job, until=lambda s: s["state"] in ("PENDING", "REQUEUED") or s["finished"], timeout=120)
    assert info["state"] in ("PENDING", "REQUEUED") and not info["finished"], info
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_usr2_preemption_requeues_and_resumes_with_one_wandb_run(
    cluster: int, slurm_env: dict[str, str], seed_run: Path, tmp_path: Path
):
    out = tmp_path / "usr2"
    # As many threads as the local seed run (its affinity mask), so its history is the reference to the bit.
    cpus = str(len(os.sched_getaffinity(0)))
    job = submit(slurm_env, out, "--tracker", "wandb", "--cpus-per-task", cpus)
    _preempt(slurm_env, job, out, "USR2")
    info = wait(slurm_env, job)
    assert info["state"] == "COMPLETED", info
    logs = ok(run_cli("logs", job, env=slurm_env)).stdout
    assert "preempted: stopped in epoch" in logs and "resuming from" in logs and "restart 1" in logs
    history = load_json(out / "history.json")
    assert [e["epoch"] for e in history] == list(range(11))
    local = load_json(seed_run / "history.json")
    assert [(e["val_loss"], e["val_acc"]) for e in history] == [(e["val_loss"], e["val_acc"]) for e in local]
    runs = [wandb_file.read_wandb_run(f) for f in wandb_file.wandb_run_files(out)]
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1, "one W&B run id across the requeue"
    epochs = sorted(row["epoch"] for r in runs for row in r["history"])
    assert epochs == list(range(11)), "no epoch missing or logged twice"


def test_sigterm_then_requeue_with_two_tasks(
    cluster: int, slurm_env: dict[str, str], seed_run: Path, tmp_path: Path
):
    out = tmp_path / "term"
    job = submit(slurm_env, out, "--tracker", "none", "--partition", "cpu", "--tasks-per-node", "2")
    _preempt(slurm_env, job, out, "TERM")
    info = wait(slurm_env, job)
    assert info["state"] == "COMPLETED", info
    run = load_json(out / "run.json")
    assert run["world_size"] == 2 and "resumed_from" in run
    for a, b in zip(load_json(out / "history.json"), load_json(seed_run / "history.json"), strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4 and abs(a["val_acc"] - b["val_acc"]) <= 1e-4


def test_requeues_are_bounded_and_a_2_node_checkpoint_resumes_as_a_1_node_job(
    cluster: int, slurm_env: dict[str, str], short_run: Path, tmp_path: Path
):
    out = tmp_path / "bounded"
    args = ("--tracker", "none", "--partition", "cpu", "--phases", SHORT_PHASES)
    job = submit(slurm_env, out, *args, "--nodes", "2", "--set", "max_requeues=0")
    _after_epochs(out, 1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait(slurm_env, job)
    assert info["state"] == "FAILED", info
    assert "not requeued: the job was already requeued 0 time(s) (max_requeues 0)" in info["error"]
    assert list((out / "checkpoints").glob("epoch-*-step-*")), "the state is saved for a manual resume"
    # The manual resume the message asks for, on another topology: `submit` into the same output dir.
    again = submit(slurm_env, out, *args, "--nodes", "1")
    assert wait(slurm_env, again)["state"] == "COMPLETED"
    run = load_json(out / "run.json")
    assert [s["world_size"] for s in run["segments"]] == [2, 1] and run["world_size"] == 1
    assert len(run["segments"][0]["hosts"]) == 2 and "step-" in run["resumed_from"]
    for a, b in zip(load_json(out / "history.json"), load_json(short_run / "history.json"), strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4 and abs(a["val_acc"] - b["val_acc"]) <= 1e-4
        if a["epoch"]:  # the stopped epoch's mean training loss too (the 2 processes' sums, averaged)
            assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (
                a["epoch"],
                a["train_loss"],
                b["train_loss"],
            )


def test_submit_tightens_its_dirs_and_refuses_another_users(cluster: int, tmp_path: Path, slurm_env: dict):
    from test_ownership import _foreign, _open_dir

    out = _open_dir(tmp_path / "job")
    _open_dir(out / "submitit")
    args = ["submit", "-c", ROOT / "configs/smoke.yaml", "--partition", "cpu", "--allow-local", "--json"]
    sub = json.loads(ok(run_cli(*args, "--output-dir", out, env=slurm_env)).stdout)
    run_cli("cancel", sub["job_id"], env=slurm_env)
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "submitit").stat().st_mode & 0o777 == 0o700
    theirs = _foreign(_open_dir(tmp_path / "theirs"))
    proc = run_cli(*args, "--output-dir", theirs, env=slurm_env)
    assert proc.returncode == 2 and "owned by uid 65534" in proc.stderr
    assert list(theirs.iterdir()) == []


def test_cluster_stop_stops_what_start_started_munged_included(cluster: int):
    """Last of this module: it stops the local cluster and starts it again (the same nodes), once
    every job of this module has ended. A munged that `start` started (its pid recorded) is stopped
    with the rest; one that was running before is left."""
    if os.geteuid() != 0:
        pytest.skip("slurm/cluster.sh stop/start need root")
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "jobs still in the queue"
        time.sleep(2)
    pid_file = Path("/var/lib/mnist-dist-slurm/munged.pid")
    ours = pid_file.read_text().strip() if pid_file.is_file() else None
    script = ["bash", str(ROOT / "slurm/cluster.sh")]
    try:
        ok(subprocess.run([*script, "stop"], capture_output=True, text=True))
        for daemon in ("slurmctld", "slurmd"):
            assert subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 1, daemon
        left = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
        assert not pid_file.exists() and (ours is None or ours not in left), (ours, left)
    finally:
        ok(subprocess.run([*script, "start", "--nodes", str(cluster)], capture_output=True, text=True))
    if not left:  # start started munged: it is recorded as ours, so the next stop stops it
        assert (
            pid_file.read_text().strip()
            in subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
        )
