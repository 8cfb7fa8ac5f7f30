"""CPU threads follow the allocation (mnist_dist/threads.py), and a world of one process trains
without a process group. The SLURM side (threads = --cpus-per-task, a 1-task job without a process
group) is checked on the real cluster in test_slurm.py; the per-job speed of jobs sharing cores is
measured by bench/run.py, not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist.train.threads import Threads, _cgroup_quota, decide

from conftest import ROOT, env_with, free_port, load_json, ok, run_cli, run_history

JOB = {"SLURM_JOB_ID": "7"}


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        ("auto", {}, Threads(8, "affinity mask")),
        ("auto", {"LOCAL_WORLD_SIZE": "2"}, Threads(4, "affinity mask / 2 local processes")),
        ("auto", {"LOCAL_WORLD_SIZE": "16"}, Threads(1, "affinity mask / 16 local processes")),
        ("auto", {**JOB, "SLURM_CPUS_PER_TASK": "3"}, Threads(3, "SLURM_CPUS_PER_TASK")),
        # Left over in a shell, outside any job: not an allocation.
        ("auto", {"SLURM_CPUS_PER_TASK": "3"}, Threads(8, "affinity mask")),
        ("auto", {**JOB, "SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"}, Threads(1, "OMP_NUM_THREADS")),
        ("auto", {"OMP_NUM_THREADS": "lots"}, Threads(8, "affinity mask")),
        (2, {**JOB, "SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"}, Threads(2, "config threads")),
        ("auto", {"OMP_NUM_THREADS": "4,2"}, Threads(4, "OMP_NUM_THREADS")),  # OpenMP's nested form
        # Inherited counts larger than what this process may use (sbatch's value in a 1-CPU step,
        # accelerate launch --cpu's physical cores) are capped; an explicit config key is not.
        ("auto", {**JOB, "SLURM_CPUS_PER_TASK": "32"}, Threads(8, "SLURM_CPUS_PER_TASK")),
        ("auto", {"OMP_NUM_THREADS": "64"}, Threads(8, "OMP_NUM_THREADS")),
        (16, {}, Threads(16, "config threads")),
    ],
)
def test_thread_count_follows_config_then_omp_then_slurm_then_affinity(configured, env, expected):
    assert decide(configured, env, cpus=8) == expected


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2), ("junk", None), ("5 0", None)],
)
def test_a_cgroup_cpu_quota_limits_the_usable_cpus(tmp_path: Path, text: str, cpus: int | None):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert _cgroup_quota(tmp_path / "cpu.max") == cpus


def smoke(out: Path, *args: str, **env: str):
    cmd = ["train", "-c", ROOT / "configs/smoke.yaml", "--output-dir", out, *args]
    return ok(run_cli(*cmd, env=env_with(**env)))


def test_omp_num_threads_and_the_threads_key_set_torchs_threads(tmp_path: Path, data_env: dict[str, str]):
    data = {"MNIST_DIST_DATA_DIR": data_env["MNIST_DIST_DATA_DIR"]}
    proc = smoke(tmp_path / "omp", OMP_NUM_THREADS="1", **data)
    assert "1 CPU thread(s) each (OMP_NUM_THREADS)" in proc.stdout
    # run.json holds what torch reports after setting it, not only what was decided.
    assert load_json(tmp_path / "omp/run.json")["threads"] == {"count": 1, "source": "OMP_NUM_THREADS"}
    smoke(tmp_path / "key", "--threads", "2", OMP_NUM_THREADS="1", **data)
    assert load_json(tmp_path / "key/run.json")["threads"] == {"count": 2, "source": "config threads"}
    assert "threads: 2" in (tmp_path / "key/config.yaml").read_text().splitlines()
    proc = run_cli("train", "--threads", "0", "--output-dir", tmp_path / "bad", env=data_env)
    assert proc.returncode == 2 and "'threads' = 0: must be 'auto' or a whole number" in proc.stderr


def test_a_launch_of_one_process_has_no_process_group(tmp_path: Path, data_env: dict[str, str]):
    """torchrun with one process exports a world of one (RANK, WORLD_SIZE=1, MASTER_ADDR...); Accelerate
    would build a gloo group of one and wrap the model in DDP. The run is the plain one, to the bit."""
    launched = tmp_path / "launched"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    torchrun += ["--master_port", str(free_port())]  # a free one, not the default
    args = ["-m", "mnist_dist.train", "-c", str(ROOT / "configs/smoke.yaml"), "--output-dir", str(launched)]
    launch = subprocess.run([*torchrun, *args], capture_output=True, text=True, env=data_env, cwd=ROOT)
    ok(launch)
    run = load_json(launched / "run.json")
    assert (run["world_size"], run["distributed_type"]) == (1, "NO")
    smoke(tmp_path / "plain", MNIST_DIST_DATA_DIR=data_env["MNIST_DIST_DATA_DIR"])
    assert load_json(tmp_path / "plain/run.json")["threads"] == run["threads"]
    assert run_history(launched) == run_history(tmp_path / "plain")
