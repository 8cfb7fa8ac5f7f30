"""Hyperband's survivors balanced between the packs of a wave, on real processes: one seed, eight
phase-1 lrs (four that learn, four that barely do) that the plan puts four and four (asserted: the
good ones in one pack), W&B's `early_terminate: {type: hyperband, min_iter: 1, eta: 2}` over 4
epochs (bands 1 and 2, band 1 inside phase 1). After band 1 one pack keeps four members and the other
one, so a member moves (its weights, history and W&B run handed over in its run dir) and the packs go
on three and two. The stopped members are W&B's engine's; every member, the moved one too, is
bitwise its `--pack off` run; its W&B offline runs hold each epoch once; a kill -9 after the move and
a rerun end bitwise the same, also when the giver's checkpoints are lost (it drops the member it gave
away) and the receiver's (it takes the member from the handover again)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    hyperband_replay,
    load_json,
    metric_entries,
    ok,
    pack_processes,
    run_cli,
    stopped_members,
    sweep_members,
)

SHARED = pytest.mark.xdist_group("pack-balance")  # one worker for the tests that share the sweeps

GOOD, BAD = [0.55, 0.6, 0.65, 0.42], [0.003, 0.002, 0.001, 0.0045]
PHASES = ["--phases", "2x0.5,2x0.1"]  # epochs 1-2 at the swept lr, 3-4 at 0.1
WANDB = ["--tracker", "wandb", "--set", "wandb.mode=offline"]
NONE = ["--tracker", "none"]  # the tracker is in the member ids: members are matched by their lr
SPEC = f"""name: bal
method: grid
base: {ROOT / "configs" / "seed.yaml"}
metric: {{name: val_acc, goal: maximize}}
parameters:
  phases.0.lr: {{values: {GOOD + BAD}}}
"""
EARLY = "early_terminate: {type: hyperband, min_iter: %d, eta: 2}\n"


def _spec(where: Path, early: bool = True, min_iter: int = 1) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / ("bal.yaml" if early else "full.yaml")
    path.write_text(SPEC + (EARLY % min_iter if early else ""))
    return path


def _args(spec: Path, root: Path, *extra: str) -> list[str]:
    return ["sweep", "run", str(spec), *PHASES, "--output-dir", str(root), *extra]


def _by_lr(root: Path) -> dict[float, Path]:
    return {
        m["params"]["phases.0.lr"]: root / "members" / m["id"]
        for m in load_json(root / "sweep.json")["members"]
    }


def _stopped_lrs(root: Path) -> dict[float, int]:
    ids = {d.name: lr for lr, d in _by_lr(root).items()}
    return {ids[mid]: band for mid, band in stopped_members(root).items()}


def _moves(root: Path) -> dict[str, list[dict]]:
    runs = {mid: load_json(root / "members" / mid / "run.json") for mid in sweep_members(root)}
    return {mid: r["moves"] for mid, r in runs.items() if r.get("moves")}


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _same(a: Path, b: Path) -> bool:
    """The history of `a` (but for seconds) is the start of `b`'s; ended at the same epoch, bitwise
    the same weights."""
    import torch

    mine, theirs = metric_entries(a), metric_entries(b)
    if mine != theirs[: len(mine)]:
        return False
    wa, wb = _weights(a), _weights(b)
    return len(mine) < len(theirs) or all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory, data_env: dict) -> tuple[Path, Path, str]:
    """(the sweep with early termination, the same grid to the end with --pack off, the first run's
    stdout)."""
    where = tmp_path_factory.mktemp("balance")
    first = ok(run_cli(*_args(_spec(where), where / "bal", *WANDB), env=data_env))
    full = where / "full"
    ok(run_cli(*_args(_spec(where, early=False), full, "--pack", "off", *NONE), env=data_env))
    return where / "bal", full, first.stdout


@pytest.mark.parametrize("track", [WANDB, NONE], ids=["wandb", "none"])
def test_the_plan_puts_the_good_lrs_in_one_pack(tmp_path: Path, track: list[str]):
    """The precondition of the tests below: their member ids (hashes of the configs) split so."""
    from mnist_dist.cli.sweep import load_members
    from mnist_dist.sweep import packing

    opts = {"phases": PHASES[1], "tracker": track[1], "set_": track[3:], "output_dir": str(tmp_path / "bal")}
    found = load_members(_spec(tmp_path), opts, False)[3]
    packs = [sorted(m.params["phases.0.lr"] for m in pack) for pack in packing.plan(found, workers=2)]
    assert sorted(packs) == [sorted(BAD), sorted(GOOD)], packs


@SHARED
def test_a_member_moves_and_every_member_is_bitwise_its_run(balanced: tuple[Path, Path, str], data_env: dict):
    from mnist_dist.track import wandb_file

    root, full, out = balanced
    histories = {
        mid: [e["val_acc"] for e in metric_entries(root / "members" / mid)] for mid in sweep_members(root)
    }
    assert stopped_members(root) == hyperband_replay(histories, bands=[1, 2], eta=2)
    moves = _moves(root)
    assert len(moves) == 1, moves
    [(mid, [move])] = moves.items()
    assert move["after_epoch"] == 1 and move["from"] != move["to"], move
    assert f"moved {mid} from {Path(move['from']).name} to {Path(move['to']).name}" in out
    run = load_json(root / "members" / mid / "run.json")
    assert run["status"] == "completed" and run["pack"]["dir"] == move["to"]
    counts = [s["members"] for s in run["pack"]["sizes"]]
    assert counts[:2] == [4, 2], f"the receiver: 4, then 1 kept + 1 joined: {counts}"
    theirs = _by_lr(full)
    for lr, run_dir in _by_lr(root).items():
        assert _same(run_dir, theirs[lr]), lr
        assert not (run_dir / ".lock").exists()
    # Its W&B run: one id, started by the giver and resumed by the receiver, each epoch once.
    files = wandb_file.wandb_run_files(root / "members" / mid)
    runs = [wandb_file.read_wandb_run(f) for f in files]
    assert len(files) == 2 and {r["id"] for r in runs} == {run["tracking"]["run_id"]}
    rows = [row for r in runs for row in r["history"]]
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3, 4], "each epoch once"
    again = ok(run_cli(*_args(root.parent / "bal.yaml", root, *WANDB), env=data_env))
    assert "0 trained, 8 skipped" in again.stdout, "a rerun trains nothing"


def _given_at(root: Path, band: int) -> bool:
    """A member was handed over at `band` and its giver saved the checkpoint after it."""
    found = sorted(root.glob(f"members/*/handover/band-{band:04d}.json"))
    return bool(found) and (Path(load_json(found[0])["from"]) / "checkpoints" / f"epoch-{band:04d}").is_dir()


@SHARED
@pytest.mark.parametrize("lose", ["nothing", "checkpoints", "the giver's last"])
def test_a_kill_after_the_move_and_a_rerun_end_bitwise_the_same(
    balanced: tuple[Path, Path, str], tmp_path: Path, data_env: dict, lose: str
):
    """kill -9 once both packs saved epoch 2; `checkpoints`: then both packs' checkpoints are
    removed too, as if they had been killed before their first save (the giver has handed the member
    over: it drops it; the receiver takes it from its run dir again). `the giver's last`: bands at 2
    only (min_iter 2), killed once the giver saved epoch 2, and that checkpoint removed: the giver
    resumes from epoch 1, which holds the member it handed over at band 2, and drops it once loaded."""
    reference, full, _ = balanced
    root, min_iter = tmp_path / "bal", 2 if lose == "the giver's last" else 1
    command = [
        sys.executable,
        "-m",
        "mnist_dist.cli",
        *_args(_spec(tmp_path, min_iter=min_iter), root, *NONE),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=data_env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (  # past the move
        _given_at(root, 2)
        if min_iter == 2
        else len(list(root.glob("packs/*/checkpoints/epoch-0002/progress.json"))) == 2
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended too soon"
        time.sleep(0.01)
    for pid in pack_processes(root):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()
    assert "completed" not in {load_json(r).get("status") for r in root.glob("members/*/run.json")}, "mid-way"
    handed = _moves_on_disk(root)
    assert len(handed) == 1, "the member was handed over"
    if lose == "checkpoints":
        for folder in root.glob("packs/*/checkpoints"):
            shutil.rmtree(folder)
    if lose == "the giver's last":
        giver = Path(load_json(handed[0])["from"])
        for folder in (giver / "checkpoints").glob("epoch-*"):
            if folder.name >= "epoch-0002":
                shutil.rmtree(folder)
        assert (giver / "checkpoints" / "epoch-0001").is_dir(), "the checkpoint before the band"
    again = ok(run_cli(*_args(tmp_path / "bal.yaml", root, *NONE), env=data_env))
    assert ("resuming from" in again.stdout) == (lose != "checkpoints"), again.stdout
    histories = {
        mid: [e["val_acc"] for e in metric_entries(root / "members" / mid)] for mid in sweep_members(root)
    }
    assert stopped_members(root) == hyperband_replay(histories, bands=[1, 2] if min_iter == 1 else [2], eta=2)
    if min_iter == 1:
        assert _stopped_lrs(root) == _stopped_lrs(reference)
    assert sorted(_moves(root)) == [p.parent.parent.name for p in handed], "the same member moved"
    theirs = _by_lr(full)
    for lr, run_dir in _by_lr(root).items():
        assert _same(run_dir, theirs[lr]), lr
        epochs = [e["epoch"] for e in metric_entries(run_dir)]
        assert epochs == sorted(set(epochs)), f"{lr}: each epoch once"


def _moves_on_disk(root: Path) -> list[Path]:
    return sorted(root.glob("members/*/handover/band-*.json"))
