"""The CUDA-graph training step's bookkeeping, on a CPU. A GPU cannot exist here, so the one piece that
needs it, `cuda_graphs.capture` (warm-up on a side stream, capture, replay), is replaced by a stand-in
with the same effect: the warm-up steps run, and a replay is one step with fresh gradients, which is
what replaying a graph captured with the gradients set to None does. Everything around it is real:
when it captures (once per phase, again after a resume), the weights put back after the warm-up, the
loss sums, the short last batch run eagerly, and the preemption save in the middle of an epoch. The
history must equal the eager run's. bench/gpu.sh checks the same on a real GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_history

STAND_IN = """
import atexit, json, sys
from mnist_dist import cli, cuda_graphs

counts = {"captures": 0, "replays": 0}

def capture(step, zero_grad):
    counts["captures"] += 1
    for _ in range(3):  # the real warm-up trains too; the engine must put the weights back
        zero_grad()
        step()
    zero_grad()

    def replay():
        counts["replays"] += 1
        zero_grad()
        step()

    return replay

cuda_graphs.capture = capture
cuda_graphs.applies = lambda cfg, device, world: cfg.cuda_graphs == "auto"
atexit.register(lambda: print("GRAPHS " + json.dumps(counts), flush=True))
sys.exit(cli.main(sys.argv[1:]))
"""


def train(out: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, "-c", STAND_IN, "train", "-c", str(ROOT / "configs/smoke.yaml")]
    cmd += ["--phases", "2x0.5,1x0.1", "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GRAPHS "))
    return proc, json.loads(line.removeprefix("GRAPHS "))


def test_graph_steps_give_the_eager_run_history(tmp_path: Path, data_env: dict[str, str]):
    eager, counts = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert counts == {"captures": 0, "replays": 0}

    graphs, counts = train(tmp_path / "graphs", data_env)
    assert graphs.returncode == 0, graphs.stderr[-3000:]
    # 50,000 images in batches of 128: 390 full batches replayed and 1 short one run eagerly, an
    # epoch; one capture per phase (the lr is part of the graph).
    assert counts == {"captures": 2, "replays": 3 * 390}
    assert run_history(tmp_path / "graphs") == run_history(tmp_path / "eager")


def test_graph_steps_resume_mid_epoch_exactly(tmp_path: Path, data_env: dict[str, str]):
    stopped, counts = train(tmp_path / "run", data_env, "--simulate-preemption-at", "2:100")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert counts == {"captures": 1, "replays": 390 + 100}
    resumed, counts = train(tmp_path / "run", data_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Captured again after loading the checkpoint (the weights it holds are new).
    assert counts == {"captures": 2, "replays": 390 - 100 + 390}
    eager, _ = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off")
    assert eager.returncode == 0
    assert run_history(tmp_path / "run") == run_history(tmp_path / "eager")
