"""The benchmark runs end to end in quick mode (1 repetition, 2 epochs). It asserts that every
contender ran and reported sane numbers, never how fast: speed is judged by bench/run.py's medians."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CONTENDERS = ["mnist-dist", "mnist-dist+wandb+ckpt", "bare loop", "lightning", "tutorial"]


def test_quick_benchmark_runs_every_contender(tmp_path: Path, data_env: dict[str, str]):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=data_env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick" and results["phases"] == "1x0.5,1x0.1"
    assert list(results["contenders"]) == CONTENDERS
    for name, row in results["contenders"].items():
        assert len(row["runs"]) == 1, name
        for key in ("train_seconds", "wall_seconds", "peak_rss_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["wall_seconds"] > row["train_seconds"], name
        assert 0.9 < row["val_acc"] <= 1.0, name  # 2 epochs of the tutorial's training
    # mnist-dist and the bare loop train on the same split, batches and phases.
    assert (
        abs(results["contenders"]["mnist-dist"]["val_acc"] - results["contenders"]["bare loop"]["val_acc"])
        < 0.01
    )
    assert results["two_processes"]["max history difference"] < 1e-4
    shared = results["shared_cores"]  # per-job training seconds of jobs sharing the cores
    assert len(shared["local, alone"]) == 1 and len(shared["local, 2 at once, --threads 1"]) == 2
    cluster = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if os.environ.get("CI") or cluster:  # on a Slurm cluster (CI starts one), as 1-task jobs too
        assert len(shared["slurm 1-task job, alone"]) == 1
        assert len(shared["slurm, 2 1-task jobs at once"]) == 2
        assert "slurm: 2 jobs at once / one local job (≤ 2)" in results["targets"]
    assert all(x > 0 for runs in shared.values() if isinstance(runs, list) for x in runs)
    assert shared["local, 2 at once, overlapped"] is True
    assert set(results["startup"]) == {"mnist-dist --help", 'python -c "import torch"'}
    assert set(results["targets"]) >= {"training / bare loop (≤ 1.10)", "peak RSS GiB (≤ 1.0)"}
    table = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {name} |" in table for name in CONTENDERS)


def bench_script(name: str, env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    """`bash bench/NAME ARGS` with this interpreter."""
    return subprocess.run(
        ["bash", str(ROOT / "bench" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**env, "PYTHON": sys.executable},
        cwd=ROOT,
        timeout=600,
    )


def test_gpu_script_rehearses_on_cpu_without_wandb_or_submitit(tmp_path: Path, data_env: dict[str, str]):
    """bench/gpu.sh is run on a lent GPU with minutes of budget: its rehearsal runs the same stages,
    in the same order, here (with the packages that machine lacks hidden), so a broken stage is found
    before that; each stage leaves its own files."""
    proc = bench_script("gpu.sh", data_env, tmp_path, "--rehearse")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in stages] == ["a. smoke", "b. packed", "c. single runs"], stages
    assert all(": ok in " in line for line in stages), stages
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["problems"] == [] and smoke["gpu"]["cuda_available"] is False
    runs = smoke["runs"]
    assert list(runs) == ["graphs", "eager", "bf16", "pack bf16"], "no fp16 on a CPU"
    singles = ("graphs", "eager", "bf16")
    assert {runs[n]["precision"] for n in singles} == {"no", "bf16"}
    assert all(runs[n]["final_val_acc"] > 0.9 for n in singles)
    # tiny.yaml's 4 members as 2 packs of 2 in bf16: the per-member kernels under autocast.
    assert [m["status"] for m in runs["pack bf16"]["members"]] == ["completed"] * 4
    assert {m["pack"] for m in runs["pack bf16"]["members"]} == {2}
    assert runs["graphs"]["cuda_graphs"] == {"applies": False, "captures": 0, "replays": 0, "failure": None}
    # On a CPU both runs are eager: any difference would be nondeterminism, not the graphs.
    assert smoke["graphs_vs_eager_max_diff_val_loss"] == 0.0
    assert smoke["graphs_vs_eager_max_diff_train_loss"] == 0.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["contenders"]) == ["mnist-dist", "bare loop"] and results["skipped"] == []
    # The packed-members stage: tiny.yaml's 4 members as packs against one member alone.
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["members"] == 4 and set(sweep["medians"]) == {"packed", "one"}
    assert [r["members"] for r in sweep["runs"]["packed"]] == [4]
    assert all(v > 0 for row in sweep["medians"].values() for v in row.values())
    assert "packed training / one member's training" in {t["what"] for t in sweep["targets"]}


def test_gpu_script_skips_what_its_budget_cannot_hold(tmp_path: Path, data_env: dict[str, str]):
    """A budget too short for the first stage: nothing is started, each stage says so, the exit status
    counts them."""
    proc = bench_script("gpu.sh", data_env, tmp_path, "--rehearse", "--budget", "100")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert len(stages) == 3 and all(": not started: " in line for line in stages), stages
    assert not (tmp_path / "smoke.json").exists()


def test_gpu_bundle_over_a_torch_image_imports_and_trains(data_env: dict[str, str]):
    """bench/gpu_bundle.sh --check: the bundle's wheels (pip download from the index), installed with
    --no-index into a fresh venv that has only torch, numpy and matplotlib (what the lent machine has),
    import mnist_dist.cli, typer, pydantic, submitit and accelerate, and train an epoch."""
    proc = bench_script("gpu_bundle.sh", data_env, "--check")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "imports mnist_dist.cli, typer, pydantic, submitit, accelerate" in proc.stdout
    assert "and trains the seed run's first epoch with it" in proc.stdout
