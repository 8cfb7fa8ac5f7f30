"""The fp16 path's gradient scaler, on a CPU. On a GPU, `precision: fp16` makes Accelerate put a
GradScaler on the Accelerator; the engine then keeps Accelerate's optimizer wrapper and
`accelerator.backward` (they scale the loss, unscale the gradients, skip steps whose gradients
overflowed and grow the scale), where it otherwise calls the plain optimizer. fp16 autocast cannot run
here, so the stand-in below gives the CPU Accelerator a real `torch.amp.GradScaler("cpu")` where
Accelerate would put the CUDA one; the forward stays fp32. Its scale is a power of two, so scaling and
unscaling are exact and the history must equal the unscaled run's to the last bit; the scale grows
every 100 steps, so its final value shows that the scaler ran every step and that a mid-epoch resume
restored its state from the checkpoint. bench/gpu.sh runs real fp16 on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, load_json, run_history

STAND_IN = """
import atexit, json, sys
import torch
from mnist_dist import cli, engine

scalers = []
real = engine._accelerator

def accelerator(cfg, run_dir):
    acc = real(cfg, run_dir)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=100)
    scalers.append(acc.scaler)
    return acc

def report():
    s = scalers[-1]
    print("SCALER " + json.dumps({"scale": s.get_scale(), "growth": s._get_growth_tracker()}), flush=True)

engine._accelerator = accelerator
atexit.register(report)
sys.exit(cli.main(sys.argv[1:]))
"""

STEPS = 391  # 50,000 images in batches of 128: 390 full and 1 short optimizer step an epoch


def train(out: Path, env: dict[str, str], *extra: str, scaler: bool = True) -> tuple[int, dict | None]:
    head = [sys.executable, "-c", STAND_IN] if scaler else [sys.executable, "-m", "mnist_dist.cli"]
    cmd = [*head, "train", "-c", str(ROOT / "configs/smoke.yaml"), "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode in (0, 75), proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SCALER ")), None)
    return proc.returncode, line and json.loads(line.removeprefix("SCALER "))


def expected(steps: int) -> dict:
    """The scaler's state after `steps` steps without overflow: doubled every 100 steps."""
    return {"scale": 2.0**16 * 2 ** (steps // 100), "growth": steps % 100}


def test_scaled_steps_give_the_unscaled_run_history(tmp_path: Path, data_env: dict[str, str]):
    assert train(tmp_path / "plain", data_env, scaler=False) == (0, None)
    rc, state = train(tmp_path / "scaled", data_env)
    assert rc == 0
    # Every optimizer step went through the scaler (scale(loss).backward, step, update): with the
    # plain optimizer the scale would still be 2**16.
    assert state == expected(2 * STEPS)
    assert run_history(tmp_path / "scaled") == run_history(tmp_path / "plain")
    assert "scaler.pt" in load_json(tmp_path / "scaled/checkpoints/epoch-0002/progress.json")["files"]


def test_scaler_state_resumes_mid_epoch(tmp_path: Path, data_env: dict[str, str]):
    rc, state = train(tmp_path / "run", data_env, "--simulate-preemption-at", "2:100")
    assert (rc, state) == (75, expected(STEPS + 100))
    rc, state = train(tmp_path / "run", data_env)
    # A scaler started afresh at the resume (291 steps left) would end at 2**18, 91 steps counted.
    assert (rc, state) == (0, expected(2 * STEPS))
    assert train(tmp_path / "plain", data_env, scaler=False) == (0, None)
    assert run_history(tmp_path / "run") == run_history(tmp_path / "plain")
