"""Packs: a sweep's members trained together as one stacked model (packs.py, run.run_pack), each one
still its own run, and on a CPU with one thread bitwise the run it would be alone.

The reference everywhere is `sweep run --pack off`: each member trained by itself, one after another,
exactly as `mnist-dist train` trains it. Phases are SHORT (3 epochs); the 2-process test's are gentler.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist.config import TrainConfig
from mnist_dist.sweep import packing as packs
from mnist_dist.sweep import spec as sweeps
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.local import local_workers
from mnist_dist.sweep.state import member_state
from mnist_dist.train.threads import usable_cpus

from conftest import ROOT, SHORT_PHASES, accelerate_launch, env_with, load_json, ok, run_cli, run_history
from test_train import assert_same_history

# lr 1.5 is the chaotic regime: the rounding difference between 1 and 2 processes grows to 0.3 in
# val_loss within an epoch there, so only bitwise equality passes.
SPEC = """
name: packs
method: grid
parameters:
  phases.0.lr: {values: [0.5, 1.5]}
  seed: {values: [0, 1]}
"""
# The same 4 members (same configs, so the same ids) and 2 whose loss goes NaN in the first epoch. lr
# 1e6 does not do it here: the loss saturates (val_loss about 5e5) but stays finite.
NAN_SPEC = SPEC.replace("[0.5, 1.5]", "[0.5, 1.5, 1.0e+38]")
TWO = ("--multi_gpu", "--num_processes", "2", "-m")
SEEDS_SPEC = "name: seeds\nmethod: grid\nparameters:\n  seed: {values: [0, 1]}\n"


def sweep_command(spec: Path, out: Path, *extra: str, one_cpu: bool = False) -> list[str]:
    """`mnist-dist sweep run`; one_cpu: under `taskset -c 0`, so the sweep has one worker, one pack."""
    base = [sys.executable, "-m", "mnist_dist.cli", "sweep", "run", str(spec), "--output-dir", str(out)]
    base += ["--phases", SHORT_PHASES, "--tracker", "none", "--progress", "off", *extra]
    return ["taskset", "-c", "0", *base] if one_cpu else base


def sweep(spec: Path, out: Path, env: dict[str, str], *extra: str, one_cpu: bool = False):
    return subprocess.run(
        sweep_command(spec, out, *extra, one_cpu=one_cpu), capture_output=True, text=True, env=env, cwd=ROOT
    )


def spec_file(where: Path, text: str = SPEC) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "sweep.yaml").write_text(text)
    return where / "sweep.yaml"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_bitwise(run_dir: Path, reference: Path) -> None:
    """Equal histories (every number, train_loss included, to the last bit) and equal weights."""
    assert run_history(run_dir) == run_history(reference), run_dir.name
    got, expected = weights(run_dir), weights(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), run_dir.name


def kill_once_packs_saved(spec: Path, out: Path, env: dict[str, str], *extra: str, packs: int = 2) -> None:
    """`sweep run` killed (kill -9 of its process group) once `packs` packs saved their first epoch."""
    first = subprocess.Popen(
        sweep_command(spec, out, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own process group; its pack processes stop, saving, once it is gone
    )
    deadline = time.monotonic() + 300
    while len(list(out.glob("packs/*/checkpoints/epoch-0001"))) < packs:
        assert first.poll() is None and time.monotonic() < deadline, "no pack checkpoint"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()


def member_dirs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "members").iterdir())}


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, data_env: dict[str, str]) -> dict[str, Path]:
    """SPEC's 4 members, each trained by itself (`--pack off`)."""
    where = tmp_path_factory.mktemp("alone")
    proc = ok(sweep(spec_file(where), where / "sweep", data_env, "--pack", "off"))
    assert "4 trained" in proc.stdout
    found = member_dirs(where / "sweep")
    assert all("pack" not in load_json(d / "run.json") for d in found.values())
    assert all(load_json(d / "run.json")["threads"]["count"] == 1 for d in found.values())
    return found


def test_a_pack_of_four_is_each_member_alone_bitwise(alone: dict[str, Path], tmp_path: Path, data_env):
    proc = ok(sweep(spec_file(tmp_path), tmp_path / "one", data_env, one_cpu=True))
    found = member_dirs(tmp_path / "one")
    assert found.keys() == alone.keys()
    pack = load_json(next(iter(found.values())) / "run.json")["pack"]
    assert pack["size"] == 4 and sorted(pack["members"]) == sorted(found)
    assert proc.stdout.count("Epoch [3], 4 members") == 1, "a pack prints one line an epoch"
    for member, run_dir in found.items():
        assert_bitwise(run_dir, alone[member])
        info = load_json(run_dir / "run.json")
        assert info["status"] == "completed" and info["threads"]["count"] == 1
        for name in ("config.yaml", "metrics.jsonl", "history.json", "loss.png", "accuracy.png"):
            assert (run_dir / name).is_file(), name
        assert not (run_dir / "checkpoints").exists(), "the pack's checkpoints are in its pack dir"
    assert (Path(pack["dir"]) / "checkpoints").is_dir()
    if usable_cpus() >= 2:  # packed differently: 2 processes, 2 packs of 2 (one seed each)
        ok(sweep(spec_file(tmp_path), tmp_path / "two", data_env))
        for member, run_dir in member_dirs(tmp_path / "two").items():
            assert load_json(run_dir / "run.json")["pack"]["size"] == 2
            assert_bitwise(run_dir, alone[member])


def test_mnist_dist_train_of_a_members_config_reproduces_it(alone: dict[str, Path], tmp_path: Path, data_env):
    procs = {
        member: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mnist_dist.cli",
                "train",
                "--config",
                str(run_dir / "config.yaml"),
                "--output-dir",
                str(tmp_path / member),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=data_env,
            cwd=ROOT,
        )
        for member, run_dir in alone.items()
    }
    for member, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert_bitwise(tmp_path / member, alone[member])


def test_a_nan_member_is_frozen_and_failed_alone(alone: dict[str, Path], tmp_path: Path, data_env):
    proc = ok(sweep(spec_file(tmp_path, NAN_SPEC), tmp_path / "s", data_env, one_cpu=True))
    assert "4 trained, 0 skipped, 2 failed" in proc.stdout
    found = member_dirs(tmp_path / "s")
    failed = {m: d for m, d in found.items() if m not in alone}
    assert len(failed) == 2 and len(found) == 6
    for run_dir in failed.values():
        info = load_json(run_dir / "run.json")
        assert info["status"] == "failed" and info["pack"]["size"] == 6
        assert info["error"] == "FloatingPointError: training loss is nan in phase 1, epoch 1, lr 1e+38"
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0], "nothing after the epoch it failed in"
        assert not (run_dir / "history.json").exists() and not (run_dir / "model.safetensors").exists()
        assert member_state(run_dir) == "failed"
    for member, reference in alone.items():
        assert_bitwise(found[member], reference)


def test_kill_9_of_a_packed_sweep_and_rerun_gives_the_same_members(
    alone: dict[str, Path], tmp_path: Path, data_env
):
    """2 packs of 3 in 2 processes, each with a member that fails in epoch 1 (NAN_SPEC): the rerun takes
    up both packs from their checkpoints, the failed members frozen as they were."""
    spec, out = spec_file(tmp_path, NAN_SPEC), tmp_path / "s"
    kill_once_packs_saved(spec, out, data_env)
    assert not all((d / "history.json").exists() for d in member_dirs(out).values()), "killed mid-way"
    again = ok(sweep(spec, out, data_env))
    assert again.stdout.count("resuming from") == 2 and "4 trained" in again.stdout
    for member, run_dir in member_dirs(out).items():
        if member in alone:
            assert_bitwise(run_dir, alone[member])
        else:
            assert load_json(run_dir / "run.json")["status"] == "failed"


def test_a_two_process_pack_equals_the_one_process_pack(tmp_path: Path, data_env: dict[str, str]):
    """A pack is data-parallel like a single run: 2 gloo processes, each half of every batch of every
    member, within 1e-4 of 1 process; and each member of the 2-process pack is bitwise the 2-process
    run of its config (the construction makes it so: a member's own products in both, and the sum of
    two processes' gradients is the same in either order).

    1 and 2 processes add a batch's gradient in a different order, about 1e-8 apart, and how far that
    grows depends on the regime, not on the code: at the seed phases (lr 0.5) it reaches 6e-3 in
    val_loss within 5 epochs for some seeds (seeds 0-7: 2e-8 to 6e-3), single runs alike. So this
    compares at lr 0.1 for 3 epochs, where it stays small for every seed: at most 4e-6 over seeds 0-7
    and MKL's default, AVX2 and compatible paths (a 25x margin). One image's flip of val_acc is 1e-4."""
    spec = spec_file(tmp_path, SEEDS_SPEC)
    cmd = sweep_command(spec, tmp_path / "one", one_cpu=True)
    cmd[cmd.index("--phases") + 1] = "3x0.1"
    ok(subprocess.run(cmd, capture_output=True, text=True, env=data_env, cwd=ROOT))
    one = member_dirs(tmp_path / "one")
    pack = Path(load_json(next(iter(one.values())) / "run.json")["pack"]["dir"])
    configs = json.loads((pack / SweepDir.PACK_MEMBERS).read_text())
    for c in configs:
        c["output_dir"] = str(tmp_path / "two" / Path(c["output_dir"]).name)
    (tmp_path / "pack2").mkdir(mode=0o700)
    (tmp_path / "pack2" / SweepDir.PACK_MEMBERS).write_text(json.dumps(configs))
    proc = ok(accelerate_launch(*TWO, "mnist_dist.sweep.pack_process", tmp_path / "pack2", env=data_env))
    assert proc.stdout.count("Epoch [3], 2 members") == 1, "only the main process prints"
    for member, run_dir in one.items():
        two = tmp_path / "two" / member
        info = load_json(two / "run.json")
        assert info["world_size"] == 2 and info["pack"]["size"] == 2
        assert info["train_samples_per_process"] == [25_000, 25_000]
        assert_same_history(load_json(two / "history.json"), load_json(run_dir / "history.json"))
    member = next(iter(one))
    config = tmp_path / "two" / member / "config.yaml"
    ok(
        accelerate_launch(
            *TWO, "mnist_dist.train", "--config", config, "--output-dir", tmp_path / "solo2", env=data_env
        )
    )
    assert_bitwise(tmp_path / "two" / member, tmp_path / "solo2")


# --- planning ---------------------------------------------------------------------------------------


def _members(tmp_path: Path, text: str, sets: list[str] | None = None) -> list[sweeps.Member]:
    spec = sweeps.read_spec(spec_file(tmp_path, text))
    return sweeps.members(spec, tmp_path / "sw", {}, sets)


def test_plan_packs_compatible_members_with_one_seeds_together(tmp_path: Path):
    grid = SPEC.replace("[0, 1]", "[0, 1, 2, 3]")  # 2 lrs x 4 seeds
    found = _members(tmp_path, grid)
    assert all(m.cfg.threads == 1 for m in found), "sweep members train with one thread"
    based = _members(tmp_path, f"base: {ROOT}/configs/seed.yaml\n" + grid)  # it says threads: auto
    assert all(m.cfg.threads == 1 for m in based)
    assert {m.cfg.threads for m in _members(tmp_path, grid, ["threads=2"])} == {2}, "unless set"
    two = packs.plan(found, workers=2)
    assert [len(p) for p in two] == [4, 4]
    assert [[m.cfg.seed for m in p] for p in two] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert [len(p) for p in packs.plan(found, workers=1)] == [8]
    assert [len(p) for p in packs.plan(found, workers=1, max_pack=3)] == [3, 3, 2]
    assert [len(p) for p in packs.plan(found[:1], workers=2)] == [1]
    # Members differing in more than seed and lr never share a pack: here, the epochs of phase 1.
    cfg = found[0].cfg
    odd = sweeps.Member(
        "odd", {}, cfg.model_copy(update={"phases": [cfg.phases[0].model_copy(update={"epochs": 7})]})
    )
    mixed = packs.plan([*found[:3], odd], workers=1)
    assert sorted(len(p) for p in mixed) == [1, 3] and [odd] in mixed


def test_sweep_run_on_a_gpu_machine_runs_one_pack_process_per_gpu(
    tmp_path: Path, data_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    """3 GPUs made visible by the environment (none is there: each process then trains on the CPU):
    3 packs, each its own process with one GPU of its own in CUDA_VISIBLE_DEVICES."""
    spec = spec_file(tmp_path, SPEC.replace("[0.5, 1.5]", "[0.1, 0.2, 0.5]"))  # 3 lrs x 2 seeds
    env = {**data_env, "CUDA_VISIBLE_DEVICES": "0,1,2"}
    proc = ok(sweep(spec, tmp_path / "s", env, "--phases", "1x0.5"))
    starts = [line for line in proc.stdout.splitlines() if "a process of its own" in line]
    assert sorted(line.rsplit(" on GPU ", 1)[1] for line in starts) == ["0", "1", "2"], proc.stdout
    found = member_dirs(tmp_path / "s")
    infos = [load_json(d / "run.json") for d in found.values()]
    assert len(infos) == 6 and all(i["status"] == "completed" for i in infos)
    by_gpu: dict[str, set[str]] = {}
    for info in infos:
        by_gpu.setdefault(info["cuda_visible_devices"], set()).add(info["pack"]["dir"])
    assert sorted(by_gpu) == ["0", "1", "2"] and all(len(p) == 1 for p in by_gpu.values()), by_gpu
    # Members that train on the CPU take one pack process per CPU, and no GPU, GPUs visible or not.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert local_workers(TrainConfig(device="cpu")) == (usable_cpus(), [])
    assert local_workers(TrainConfig(device="auto")) == (3, ["0", "1", "2"])


def test_pack_size_follows_the_memory(tmp_path: Path):
    cfg = _members(tmp_path, SPEC)[0].cfg
    per = packs.member_bytes(cfg)
    assert 500_000 < per < 1_000_000, per  # about 0.7 MB for the seed config
    for optimizer in ({"momentum": 0.9}, {"name": "adam"}):  # their state, its copies and scratch
        with_state = TrainConfig.model_validate({**cfg.model_dump(), "optimizer": optimizer})
        assert packs.member_bytes(with_state) > 1.5 * per, optimizer
    assert packs.size_cap(cfg, None, available=100 * per) == 50, "half the available memory"
    assert packs.size_cap(cfg, 8, available=100 * per) == 8
    assert packs.size_cap(cfg, None, available=10**15) == packs.MAX_PACK
    assert packs.size_cap(cfg, None, available=per) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pack", "on"], "--pack 'on': use auto or off"),
        (["--max-pack", "0"], "--max-pack 0: from 1 to 1024"),
        (["--max-pack", "5000"], "--max-pack 5000: from 1 to 1024"),
    ],
)
def test_bad_pack_options_are_exit_2(tmp_path: Path, args: list[str], message: str):
    proc = run_cli("sweep", "run", spec_file(tmp_path), "--output-dir", tmp_path / "s", *args, env=env_with())
    assert proc.returncode == 2 and proc.stderr == f"error: {message}\n"
    assert not (tmp_path / "s").exists()


def test_a_big_pack_draws_its_members_figures_in_parallel_processes(tmp_path: Path):
    """plot_all with CPUs to spare (here said to be 4) and 16 members: 2 spawned processes draw them,
    and every member gets both figures."""
    from mnist_dist.store import outputs

    history = [{"epoch": 0, "phase": None, "val_loss": 2.3, "val_acc": 0.1}]
    history += [{"epoch": e, "phase": e // 3, "val_loss": 1 / e, "val_acc": 0.9} for e in (1, 2, 3, 4)]
    runs = []
    for i in range(16):
        (tmp_path / f"m{i}").mkdir()
        runs.append((outputs.RunDir(tmp_path / f"m{i}"), history))
    runs.append((outputs.NullRunDir(tmp_path / "not-main"), history))
    outputs.plot_all(runs, cpus=4)
    for i in range(16):
        for name in ("loss.png", "accuracy.png"):
            assert (tmp_path / f"m{i}" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (i, name)
    assert not (tmp_path / "not-main").exists()
