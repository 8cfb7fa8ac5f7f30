"""The fp16 path's loss scaling, on a CPU. On a GPU, `precision: fp16` makes Accelerate put a
GradScaler on the Accelerator; the engine takes its settings as one scale per pack member
(member_scaler.py: each member's gradients scaled, unscaled and checked by its own scale, a member
whose gradients overflow skipping its own step) and puts Accelerate's aside. fp16 autocast cannot run
here, so the stand-in below gives the CPU Accelerator a real `torch.amp.GradScaler("cpu")` where
Accelerate would put the CUDA one; the forward stays fp32. The scale is a power of two, so scaling and
unscaling are exact and the history must equal the unscaled run's to the last bit; the scale grows
every 100 steps, so its final value (run.json's `grad_scaler`) shows that every step went through
it and that a mid-epoch resume restored its state from the checkpoint. bench/gpu.sh runs real fp16
on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, load_json, ok, run_history
from test_packs import member_dirs, spec_file, sweep

STAND_IN = """
import sys
import torch
from mnist_dist import cli
from mnist_dist.train import engine

real = engine.make_accelerator

def accelerator(cfg, run_dir):
    acc = real(cfg, run_dir)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=100)
    return acc

engine.make_accelerator = accelerator
sys.exit(cli.main(sys.argv[1:]))
"""

STEPS = 391  # 50,000 images in batches of 128: 390 full and 1 short optimizer step an epoch


def train(out: Path, env: dict[str, str], *extra: str, scaler: bool = True) -> int:
    head = [sys.executable, "-c", STAND_IN] if scaler else [sys.executable, "-m", "mnist_dist.cli"]
    cmd = [*head, "train", "-c", str(ROOT / "configs/smoke.yaml"), "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode in (0, 75), proc.stderr[-3000:]
    return proc.returncode


def expected(steps: int, skipped: int = 0) -> dict:
    """The scaler's state after `steps` steps without overflow: doubled every 100 steps."""
    return {"scale": 2.0**16 * 2 ** (steps // 100), "growth_tracker": steps % 100, "skipped_steps": skipped}


def test_scaled_steps_give_the_unscaled_run_history(tmp_path: Path, data_env: dict[str, str]):
    assert train(tmp_path / "plain", data_env, scaler=False) == 0
    assert "grad_scaler" not in load_json(tmp_path / "plain/run.json")
    assert train(tmp_path / "scaled", data_env) == 0
    # Every optimizer step went through the scaler (scaled backward, unscale, step, update): without
    # it the scale would still be 2**16.
    assert load_json(tmp_path / "scaled/run.json")["grad_scaler"] == expected(2 * STEPS)
    assert run_history(tmp_path / "scaled") == run_history(tmp_path / "plain")
    files = load_json(tmp_path / "scaled/checkpoints/epoch-0002/progress.json")["files"]
    assert "custom_checkpoint_0.pkl" in files and "scaler.pt" not in files, (
        "the engine's scaler, not Accelerate's"
    )


def test_scaler_state_resumes_mid_epoch(tmp_path: Path, data_env: dict[str, str]):
    assert train(tmp_path / "run", data_env, "--simulate-preemption-at", "2:100") == 75
    assert load_json(tmp_path / "run/run.json")["grad_scaler"] == expected(STEPS + 100)
    assert train(tmp_path / "run", data_env) == 0
    # A scaler started afresh at the resume (291 steps left) would end at 2**18, 91 steps counted.
    assert load_json(tmp_path / "run/run.json")["grad_scaler"] == expected(2 * STEPS)
    assert train(tmp_path / "plain", data_env, scaler=False) == 0
    assert run_history(tmp_path / "run") == run_history(tmp_path / "plain")


def test_a_member_whose_gradients_overflow_skips_alone(tmp_path: Path, data_env: dict[str, str]):
    """A pack of 3 with one GradScaler: the lr-1e38 member's gradients are inf from its second step
    on, so every member's step would be skipped from then on, and every scale halved. One scale per
    member: the overflowing member skips alone (and fails, its loss NaN), the others train as alone."""
    text = "name: fp16\nmethod: grid\nparameters:\n  phases.0.lr: {values: [0.5, 0.2, 1.0e+38]}\n"
    spec = spec_file(tmp_path, text)
    args = ["--phases", "1x0.5,1x0.1", "--tracker", "none", "--progress", "off"]
    cmd = ["taskset", "-c", "0", sys.executable, "-c", STAND_IN, "sweep", "run", str(spec)]
    proc = subprocess.run(
        [*cmd, "--output-dir", str(tmp_path / "packed"), *args],
        capture_output=True,
        text=True,
        env=data_env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trained, 0 skipped, 1 failed" in proc.stdout
    alone = member_dirs(
        ok(sweep(spec, tmp_path / "alone", data_env, "--pack", "off", *args[:2])) and tmp_path / "alone"
    )
    for member, run_dir in member_dirs(tmp_path / "packed").items():
        info = load_json(run_dir / "run.json")
        assert info["pack"]["size"] == 3
        if info["status"] == "failed":
            assert "training loss is nan" in info["error"]
            continue
        assert info["grad_scaler"] == expected(2 * STEPS), "no step skipped, its scale its own"
        assert run_history(run_dir) == run_history(alone[member])
