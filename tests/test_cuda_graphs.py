"""The CUDA-graph training step, on a CPU. A GPU cannot exist here, so `cuda_graphs.capture` (warm-up
on a side stream, capture, replay) is replaced by a stand-in that holds the step to what a real
capture holds it to:

- no host sync during capture or replay: `.item()`, `bool()` of a tensor (any `_local_scalar_dense`),
  `.tolist()`, `.cpu()`, `.numpy()`, printing a tensor and making an nn.Parameter raise, as CUDA
  refuses them while capturing (the engine then warns and runs eagerly, and run.json says why);
- a replay reads the buffers the capture read, by address: the stand-in records every tensor the
  captured step reads that it did not make, and a replay that reads another (a tensor replaced since,
  like an lr tensor swapped for a new one) fails, where a real graph would read the old address.

A replay runs the step's Python again with fresh gradients, which is what replaying a graph captured
with the gradients set to None does. Everything around it is real: when it captures (once, with the
lrs updated in place; again after a resume), the weights put back after the warm-up, the loss sums,
the short last batch run eagerly, the preemption save in the middle of an epoch, and run.json's
`cuda_graphs`. The history must equal the eager run's. bench/gpu.sh checks the real capture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_json, run_history

STAND_IN = """
import atexit, json, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from mnist_dist import cli
from mnist_dist.train import cuda_graphs

counts = {"captures": 0, "replays": 0}


class HostSync(RuntimeError):
    pass


def refused(name):
    def call(*args, **kwargs):
        raise HostSync(f"{name} in a captured step (a host sync)")
    return call


REFUSED = {
    (torch.Tensor, "tolist"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy"), (torch.Tensor, "__repr__"),
    (torch.Tensor, "__format__"), (torch.nn.Parameter, "__new__"),
}


class Graph(TorchDispatchMode):
    '''The step as a CUDA graph runs it: no host sync, and the buffers it reads from outside itself
    are the capture's (`known`), by address.'''

    def __init__(self, known=None):
        super().__init__()
        self.known, self.made, self.outside = known, set(), {}
        self.saved = {}

    def __enter__(self):
        for owner, name in REFUSED:
            self.saved[(owner, name)] = owner.__dict__.get(name)
            setattr(owner, name, refused(f"{owner.__name__}.{name}"))
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), value in self.saved.items():
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostSync(f"{func} in a captured step (a host sync)")
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.numel():
                key = t.untyped_storage().data_ptr()
                if key not in self.made and key not in self.outside:
                    if self.known is not None and key not in self.known:
                        raise RuntimeError(f"replayed {func} reads a buffer the graph was not captured with")
                    self.outside[key] = t  # held: its address is not given to another tensor
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None
            if key is not None and key not in self.outside:
                self.made.add(key)
        return out


def capture(step, zero_grad):
    counts["captures"] += 1
    for _ in range(3):  # the real warm-up trains too; the engine must put the weights back
        zero_grad()
        step()
    zero_grad()
    with Graph() as graph:
        step()

    def replay():
        counts["replays"] += 1
        zero_grad()
        with Graph(known=graph.outside):
            step()

    return replay


cuda_graphs.capture = capture
cuda_graphs.applies = lambda cfg, device, world: cfg.cuda_graphs == "auto"
atexit.register(lambda: print("GRAPHS " + json.dumps(counts), flush=True))
sys.exit(cli.main(sys.argv[1:]))
"""

# A step that asks the host whether every member is alive, as the captured step once did: the
# stand-in must refuse it during capture, and the engine fall back to eager steps.
SYNCING = STAND_IN.replace(
    "cuda_graphs.capture = capture",
    """from mnist_dist.train import engine
real_capture = engine.Engine._capture

def syncing_capture(eng, train):
    real_backward = eng.backward

    def backward(loss, gradient):
        bool(eng.loss_grad.all())
        return real_backward(loss, gradient=gradient)

    eng.backward = backward
    try:
        return real_capture(eng, train)
    finally:
        eng.backward = real_backward

engine.Engine._capture = syncing_capture
cuda_graphs.capture = capture""",
)

# Each phase's lrs written into new tensors, not the captured ones: the engine must capture again.
REPLACED_LRS = STAND_IN.replace(
    "cuda_graphs.capture = capture",
    """from mnist_dist.train import member_optimizer
real_set_lrs = member_optimizer.MemberOptimizer.set_lrs

def replacing(self, lrs, alive=None):
    for group in self.param_groups:
        group["lr"] = group["lr"].clone()
    self._shape()
    real_set_lrs(self, lrs, alive)

member_optimizer.MemberOptimizer.set_lrs = replacing
cuda_graphs.capture = capture""",
)
# ... and had the engine kept its graph anyway (graphs were once kept by the lrs' values), the
# replay would read the old tensors: the stand-in must refuse it.
STALE = REPLACED_LRS.replace(
    "cuda_graphs.capture = capture",
    "cuda_graphs.CapturedStep.reads = lambda self, buffers: True\ncuda_graphs.capture = capture",
)


def train(out: Path, env: dict[str, str], *extra: str, script: str = STAND_IN, phases: str = "2x0.5,1x0.1"):
    cmd = [sys.executable, "-c", script, "train", "-c", str(ROOT / "configs/smoke.yaml")]
    cmd += ["--phases", phases, "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GRAPHS "))
    return proc, json.loads(line.removeprefix("GRAPHS "))


MOMENTUM = ("--set", "optimizer.momentum=0.9", "--set", "optimizer.weight_decay=0.001")


@pytest.mark.parametrize("optimizer", [(), MOMENTUM], ids=["sgd", "sgd-momentum"])
def test_graph_steps_give_the_eager_run_history(optimizer: tuple, tmp_path: Path, data_env: dict[str, str]):
    """With momentum the captured step also updates the momentum buffers and step counts in place
    (and the warm-up's are put back)."""
    eager, counts = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off", *optimizer)
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert counts == {"captures": 0, "replays": 0}
    assert load_json(tmp_path / "eager/run.json")["cuda_graphs"]["applies"] is False

    graphs, counts = train(tmp_path / "graphs", data_env, *optimizer)
    assert graphs.returncode == 0, graphs.stderr[-3000:]
    assert "capture failed" not in graphs.stdout + graphs.stderr
    # 50,000 images in batches of 128: 390 full batches replayed and 1 short one run eagerly, an
    # epoch; one capture for the run: the lrs of each phase are written into the captured tensors.
    assert counts == {"captures": 1, "replays": 3 * 390}
    report = load_json(tmp_path / "graphs/run.json")["cuda_graphs"]
    assert report == {"applies": True, "captures": 1, "replays": 3 * 390, "failure": None}
    assert run_history(tmp_path / "graphs") == run_history(tmp_path / "eager")


def test_equal_lr_phases_replay_the_live_lrs(tmp_path: Path, data_env: dict[str, str]):
    """Phases of equal lrs (2x0.1,2x0.1): the graph of phase 1 is replayed in phase 2, reading the
    lr tensors phase 2 wrote in place."""
    eager, _ = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off", phases="2x0.1,2x0.1")
    assert eager.returncode == 0, eager.stderr[-3000:]
    graphs, counts = train(tmp_path / "graphs", data_env, phases="2x0.1,2x0.1")
    assert graphs.returncode == 0, graphs.stderr[-3000:]
    assert counts == {"captures": 1, "replays": 4 * 390}
    assert run_history(tmp_path / "graphs") == run_history(tmp_path / "eager")


def test_the_stand_in_refuses_a_host_sync_and_the_engine_runs_eagerly(tmp_path: Path, data_env: dict):
    proc, counts = train(tmp_path / "run", data_env, script=SYNCING, phases="1x0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: CUDA graph capture failed (aten._local_scalar_dense" in proc.stdout
    assert counts == {"captures": 1, "replays": 0}
    report = load_json(tmp_path / "run/run.json")["cuda_graphs"]
    assert report["captures"] == 0 and report["replays"] == 0 and "host sync" in report["failure"]
    eager, _ = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off", phases="1x0.5")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert run_history(tmp_path / "run") == run_history(tmp_path / "eager"), "the warm-up was undone"


def test_replaced_lrs_are_captured_again(tmp_path: Path, data_env: dict[str, str]):
    proc, counts = train(tmp_path / "run", data_env, script=REPLACED_LRS, phases="1x0.1,1x0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts == {"captures": 2, "replays": 2 * 390}
    eager, _ = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off", phases="1x0.1,1x0.1")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert run_history(tmp_path / "run") == run_history(tmp_path / "eager")


def test_the_stand_in_refuses_a_replay_that_reads_replaced_buffers(tmp_path: Path, data_env: dict):
    proc, counts = train(tmp_path / "run", data_env, script=STALE, phases="1x0.1,1x0.1")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "reads a buffer the graph was not captured with" in proc.stderr
    assert counts == {"captures": 1, "replays": 391}, "the first replay of phase 2 is refused"


def test_graph_steps_resume_mid_epoch_exactly(tmp_path: Path, data_env: dict[str, str]):
    stopped, counts = train(tmp_path / "run", data_env, "--simulate-preemption-at", "2:100")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert counts == {"captures": 1, "replays": 390 + 100}
    resumed, counts = train(tmp_path / "run", data_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Captured again after loading the checkpoint (its lrs are new tensors, the weights new values).
    assert counts == {"captures": 1, "replays": 390 - 100 + 390}
    eager, _ = train(tmp_path / "eager", data_env, "--set", "cuda_graphs=off")
    assert eager.returncode == 0
    assert run_history(tmp_path / "run") == run_history(tmp_path / "eager")
