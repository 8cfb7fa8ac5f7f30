"""Early termination inside packs, on real processes: a 2 x 2 x 2 grid (phase-1 lr 0.05/1.5 x
phase-2 lr 0.1/0.5 x seeds) with W&B's `early_terminate: {type: hyperband, min_iter: 1, eta: 3}`
over 4 epochs (bands 1 and 3), two pack processes of 4 that meet at each band. The members stopped,
and where, are what W&B's engine decides when this test replays the recorded histories band by band
itself; every member is bitwise its run without early termination (`--pack off`) up to where it
stopped; the packs shrink; a rerun trains nothing; a kill -9 mid-way and a rerun stop the same
members and end bitwise the same; `--retry-terminated` trains them to the end. And an adaptive sweep
on the local Slurm cluster: workers without a server, one preempted and requeued."""

from __future__ import annotations

import json
import os
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
    start_cli,
    stopped_members,
    sweep_members,
)

SHARED = pytest.mark.xdist_group("early-termination")  # one worker for the tests that share the sweeps

PHASES = ["--phases", "1x0.5,3x0.1"]  # epoch 1 at phase 1's lr, epochs 2-4 at phase 2's
EARLY = "early_terminate: {type: hyperband, min_iter: 1, eta: 3}\n"
GRID = f"""name: et
method: grid
base: {ROOT / "configs" / "seed.yaml"}
metric: {{name: val_acc, goal: maximize}}
parameters:
  phases.0.lr: {{values: [0.05, 1.5]}}
  phases.1.lr: {{values: [0.1, 0.5]}}
  seed: {{values: [0, 1]}}
"""


def _spec(where: Path, early: bool = True) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / ("et.yaml" if early else "full.yaml")
    path.write_text(GRID + (EARLY if early else ""))
    return path


def _args(spec: Path, root: Path, *extra: str) -> list[str]:
    return ["sweep", "run", str(spec), *PHASES, "--tracker", "none", "--output-dir", str(root), *extra]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, data_env: dict) -> tuple[Path, Path, str]:
    """(the sweep with early termination, the same grid trained to the end with --pack off, the first
    run's stdout)."""
    where = tmp_path_factory.mktemp("early")
    stopped = ok(run_cli(*_args(_spec(where), where / "et"), env=data_env))
    full = ok(run_cli(*_args(_spec(where, early=False), where / "full", "--pack", "off"), env=data_env))
    assert "8 trained" in full.stdout
    return where / "et", where / "full", stopped.stdout


@SHARED
def test_the_members_stopped_are_those_wandbs_engine_decides(sweeps: tuple[Path, Path, str]):
    root, _, out = sweeps
    assert "2 member(s) in" not in out and "pack pack-" in out, "two pack processes"
    histories = {
        mid: [e["val_acc"] for e in metric_entries(root / "members" / mid)] for mid in sweep_members(root)
    }
    expected = hyperband_replay(histories, bands=[1, 3], eta=3)
    alive = set(histories) - set(expected)
    assert expected and alive, f"the grid stops some members and keeps others: {expected}"
    assert stopped_members(root) == expected
    for mid, band in expected.items():
        epochs = [e["epoch"] for e in metric_entries(root / "members" / mid)]
        assert epochs == list(range(band + 1)), f"{mid}: ends at its band, each epoch logged once"
        run = load_json(root / "members" / mid / "run.json")
        decision = run["early_terminate"]
        assert decision["value"] < decision["threshold"] and decision["rule"] == "hyperband"
        assert (root / "members" / mid / "model.safetensors").is_file()
        assert len(load_json(root / "members" / mid / "history.json")) == band + 1


@SHARED
def test_each_member_is_bitwise_its_run_without_early_termination_and_the_packs_shrink(
    sweeps: tuple[Path, Path, str], data_env: dict
):
    root, full, out = sweeps
    stopped = stopped_members(root)
    for mid in sweep_members(root):
        mine, reference = metric_entries(root / "members" / mid), metric_entries(full / "members" / mid)
        assert mine == reference[: len(mine)], mid
        assert len(mine) == (stopped[mid] + 1 if mid in stopped else 5), mid
        # Stopped or not, a member ends with its plots (a stopped one's drawn when its pack ends).
        assert (root / "members" / mid / "loss.png").read_bytes()[:4] == b"\x89PNG", mid
    sizes = {}
    for mid in sweep_members(root):
        pack = load_json(root / "members" / mid / "run.json")["pack"]
        sizes[pack["dir"]] = pack["sizes"]
    moved = any(load_json(root / "members" / mid / "run.json").get("moves") for mid in sweep_members(root))
    for series in sizes.values():
        counts = [s["members"] for s in series]
        assert counts[0] == 4 and counts[-1] < 4, series
        assert moved or counts == sorted(counts, reverse=True), f"it grows only by a move: {series}"
    assert "early termination after epoch 1" in out
    status = json.loads(ok(run_cli("sweep", "status", root, "--json", env=data_env)).stdout)
    assert status["counts"]["terminated"] == len(stopped) and status["counts"]["done"] == 8 - len(stopped)
    rows = load_json(root / "results.json")["members"]
    assert [r["status"] for r in rows] == ["done"] * (8 - len(stopped)) + ["terminated"] * len(stopped)
    again = ok(run_cli(*_args(root.parent / "et.yaml", root), env=data_env))
    assert "0 trained, 8 skipped" in again.stdout, "a rerun trains nothing"


@SHARED
def test_a_kill_mid_way_and_a_rerun_stop_the_same_members_bitwise(
    sweeps: tuple[Path, Path, str], tmp_path: Path, data_env: dict
):
    reference, full, _ = sweeps
    root = tmp_path / "et"
    command = [sys.executable, "-m", "mnist_dist.cli", *_args(_spec(tmp_path), root)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=data_env,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(root.glob("packs/*/checkpoints/epoch-0002/progress.json")):  # past band 1
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended too soon"
        time.sleep(0.02)
    packs = pack_processes(root)
    assert len(packs) == 2
    for pid in packs:  # what trains, first: else the runner's death would let them save and stop
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert "completed" not in {load_json(r).get("status") for r in root.glob("members/*/run.json")}, "mid-way"
    again = ok(run_cli(*_args(tmp_path / "et.yaml", root), env=data_env))
    assert "resuming from" in again.stdout
    assert stopped_members(root) == stopped_members(reference)
    for mid in sweep_members(root):
        assert metric_entries(root / "members" / mid) == metric_entries(reference / "members" / mid), mid
    retried = ok(run_cli(*_args(tmp_path / "et.yaml", root, "--retry-terminated"), env=data_env))
    assert f"{len(stopped_members(reference))} trained" in retried.stdout and "0 terminated" in retried.stdout
    for mid in sweep_members(root):
        assert metric_entries(root / "members" / mid) == metric_entries(full / "members" / mid), (
            f"{mid}: to the end"
        )
        assert load_json(root / "members" / mid / "run.json")["status"] == "completed"


def test_a_pack_that_does_not_arrive_at_a_band_is_a_fault_and_the_rerun_resumes(
    tmp_path: Path, data_env: dict
):
    """Two packs of one; one is stopped (SIGSTOP: alive, never at band 1): the other waits
    MNIST_DIST_BAND_TIMEOUT seconds, says so in one line, exits 1 and records its member `fault`, not
    `failed` (not the member's fault: the same command resumes it, without --retry-failed)."""
    spec = tmp_path / "two.yaml"
    spec.write_text(
        GRID.replace("  phases.1.lr: {values: [0.1, 0.5]}\n", "").replace("[0, 1]", "[0]") + EARLY
    )
    root, short = tmp_path / "two", ["--phases", "1x0.5,1x0.1"]
    proc = start_cli(*_args(spec, root, *short), env={**data_env, "MNIST_DIST_BAND_TIMEOUT": "2"})
    deadline = time.monotonic() + 120
    while len(packs := pack_processes(root)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the packs did not start"
        time.sleep(0.01)
    os.kill(packs[0], signal.SIGSTOP)  # before its first epoch: the pack start alone takes seconds
    try:
        while len(pack_processes(root)) > 1:  # the other one, timed out at band 1
            assert time.monotonic() < deadline, "the pack that arrived did not give up waiting"
            time.sleep(0.05)
    finally:
        os.kill(packs[0], signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    said = [line for line in stderr.splitlines() if "did not arrive" in line]
    assert len(said) == 1 and said[0].startswith("error: hyperband band 1: waited 2 s"), stderr[-3000:]
    assert "Traceback" not in stderr
    written = [root / "members" / mid / "run.json" for mid in sweep_members(root)]
    runs = [load_json(path) for path in written if path.is_file()]  # the stalled one's may be missing
    faults = [r for r in runs if r["status"] == "fault"]
    assert len(faults) == 1 and "did not arrive" in faults[0]["error"], runs
    again = ok(run_cli(*_args(spec, root, *short), env=data_env))
    assert "0 failed" in again.stdout and "0 stopped" in again.stdout, again.stdout
    ends = {load_json(root / "members" / mid / "run.json")["status"] for mid in sweep_members(root)}
    assert ends <= {"completed", "terminated"}, ends


@pytest.mark.parametrize(
    ("early", "said"),
    [
        (
            "{type: hyperband, min_iter: 2, eta: 3}",
            "early_terminate: its bands (2, 6, 18, ...) are not before",
        ),
        ("{type: hyperband, max_iter: 2, s: 1}", "early_terminate: max_iter / eta^k is below 1"),
    ],
    ids=["bands past the last epoch", "no band"],
)
def test_bands_that_cannot_stop_anything_are_refused(tmp_path: Path, data_env: dict, early: str, said: str):
    spec = tmp_path / "s.yaml"
    spec.write_text(GRID + f"early_terminate: {early}\n")
    proc = run_cli(*_args(spec, tmp_path / "out", "--phases", "1x0.5,1x0.1"), env=data_env)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and said in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing trained or written"


def test_bands_are_the_engines():
    from mnist_dist.sweep.hyperband import bands, reachable

    assert bands({"min_iter": 1, "eta": 3})[:4] == [1, 3, 9, 27]
    assert bands({"max_iter": 27, "s": 3, "eta": 3}) == [1, 3, 9]
    assert reachable({"min_iter": 1, "eta": 3}, 4) == [1, 3], (
        "band 9 is past, a band at the last epoch stops nothing"
    )


def test_train_loss_cannot_judge_bands(tmp_path: Path, data_env: dict):
    spec = tmp_path / "s.yaml"
    spec.write_text(GRID.replace("{name: val_acc, goal: maximize}", "{name: train_loss}") + EARLY)
    proc = run_cli(*_args(spec, tmp_path / "out"), env=data_env)
    assert proc.returncode == 2 and "early_terminate with metric train_loss" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_an_adaptive_sweep_on_slurm_is_workers_without_a_server(
    cluster: int, slurm_env: dict, tmp_path: Path
):
    """bayes, run_cap 6, hyperband: 2 workers (array tasks) that take 3 members at a time from the
    shared sweep dir; worker 1 preempted with USR2 after its pack's first checkpoint and requeued."""
    from mnist_dist.sweep.layout import SweepDir

    root, spec = tmp_path / "adaptive", tmp_path / "bayes.yaml"
    spec.write_text(
        f"name: adaptive\nmethod: bayes\nrun_cap: 6\nbase: {ROOT / 'configs' / 'seed.yaml'}\n"
        "metric: {name: val_acc, goal: maximize}\n" + EARLY + "parameters:\n"
        "  phases.0.lr: {distribution: log_uniform_values, min: 0.02, max: 2.0}\n"
    )
    args = ["--phases", "3x0.5,1x0.1", "--partition", "cpu", "--workers", "2", "--members-per-task", "3"]
    args += ["--tracker", "none", "--allow-local", "--output-dir", str(root), "--json"]
    job = json.loads(ok(run_cli("sweep", "submit", spec, *args, env=slurm_env)).stdout)["job_id"]
    taken = root / "workers" / "task-1.json"
    deadline = time.monotonic() + 300
    while not (taken.is_file() and (SweepDir(root).pack(sorted(load_json(taken))) / "checkpoints").is_dir()):
        assert time.monotonic() < deadline, "worker 1 never trained a pack"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", f"{job}_1"], check=True)

    def status() -> dict:
        return json.loads(ok(run_cli("sweep", "status", job, "--json", env=slurm_env)).stdout)

    while status()["tasks"][1]["state"] not in ("PENDING", "REQUEUED"):
        assert time.monotonic() < deadline + 120, "worker 1 was not requeued"
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job}_1", "StartTime=now"], check=True)
    while True:
        info = status()
        if [t["state"] for t in info["tasks"]] == ["COMPLETED", "COMPLETED"]:
            break
        assert time.monotonic() < deadline + 600, info
        time.sleep(1)
    manifest = load_json(root / "sweep.json")
    assert len(manifest["proposals"]) == 6 and len(manifest["members"]) == 6, "run_cap held across workers"
    assert info["counts"]["done"] + info["counts"]["terminated"] == 6, info["counts"]
    log = next((root / "submitit").glob(f"{job}_1_0_log.out")).read_text()
    assert "restart 1" in log and "preempted" in log
    stopped = 0
    for mid in sweep_members(root):
        epochs = [e["epoch"] for e in metric_entries(root / "members" / mid)]
        assert epochs == list(range(len(epochs))), f"{mid}: each epoch trained once: {epochs}"
        run = load_json(root / "members" / mid / "run.json")
        if run["status"] == "terminated":
            stopped += 1
            decision = run["early_terminate"]
            assert len(epochs) == decision["epoch"] + 1 and decision["values_at_band"], decision
            assert decision["value"] < decision["threshold"] and decision["members_at_band"] >= 2
            assert decision["threshold"] in decision["values_at_band"], "the values it used are recorded"
    assert stopped >= 1, "hyperband stopped a member"
    took = set(load_json(root / "workers" / "task-0.json")) | set(load_json(taken))
    assert took == set(sweep_members(root)), (
        "the workers took every member (the preempted pack maybe twice: resumed)"
    )


def test_workers_take_disjoint_members_and_run_cap_holds_across_them(tmp_path: Path, monkeypatch):
    """The proposal lock and the leases, without Slurm: each worker (array task) gets members no other
    worker was given, bayes proposes up to run_cap in all, a requeued worker finds its own members, and
    a lease that ran out is given to another."""
    from mnist_dist.sweep import spec as sweeps
    from mnist_dist.sweep import workers

    spec_path = tmp_path / "b.yaml"
    spec_path.write_text(
        f"name: b\nmethod: bayes\nrun_cap: 5\nbase: {ROOT / 'configs' / 'seed.yaml'}\n"
        "metric: {name: val_acc, goal: maximize}\n"
        "parameters:\n  phases.0.lr: {distribution: log_uniform_values, min: 0.02, max: 2.0}\n"
    )
    spec, root = sweeps.read_spec(spec_path), tmp_path / "sw"
    sweeps.write_manifest(root, spec, [], proposals=[], run_cap=5)
    worker = workers.SweepWorker(sweeps.Builder(spec, root, {}), str(tmp_path), take=2)
    said: list[str] = []
    taken = []
    for task in range(4):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        taken.append([m.id for m in worker.next_members(said.append)])
    assert [len(t) for t in taken] == [2, 2, 1, 0], taken
    assert len({i for t in taken for i in t}) == 5 and len(load_json(root / "sweep.json")["proposals"]) == 5
    assert said[-1] == "proposed 1 member(s): 5 of 5"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert [m.id for m in worker.next_members(said.append)] == taken[0], "requeued: its own members"
    leases = load_json(workers.lease_file(root))
    workers.lease_file(root).write_text(json.dumps({k: [t, u - 1000] for k, (t, u) in leases.items()}))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    again = [m.id for m in worker.next_members(said.append)]
    assert again == taken[0], "a worker that never claimed its members gives them up when its lease ends"


def test_members_leave_a_pack_exactly_while_a_steps_graph_is_alive():
    """MnistPack.keep/relayout + MemberOptimizer.regroup, no training data: after one step of a pack of 4
    (two seeds), with that step's graph still referenced (as a traceback or a cycle may hold it),
    members 0 and 3 leave; the next step works and gives each survivor bitwise what a pack of only the
    survivors gives. Then a member of another pack joins (seed 1: it merges into the seed-1 group)
    and every member steps on bitwise as in the pack it came from."""
    import torch

    from mnist_dist.train.member_optimizer import PLAIN, MemberOptimizer
    from mnist_dist.train.model import MnistPack

    torch.set_num_threads(1)
    x, y = torch.rand(7, 784), torch.randint(0, 10, (7,))

    def step(pack: MnistPack, opt: MemberOptimizer) -> torch.Tensor:
        loss = pack.training_step(pack(x), y)
        loss.backward(torch.ones(len(pack)))
        opt.update()
        opt.clear()
        return loss

    def make(seeds: list[int], lrs: list[float]) -> tuple[MnistPack, MemberOptimizer]:
        pack = MnistPack.seeded(seeds, 32)
        per, start = [], 0
        for size in pack.sizes:
            per.append(torch.tensor(lrs[start : start + size]))
            start += size
        return pack, MemberOptimizer(pack.member_parameters(), per)

    pack, opt = make([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    held = step(pack, opt)  # its graph stays alive
    carried = [opt.member_state(1), opt.member_state(2)]
    pack.keep([1, 2])
    opt.regroup(pack.member_parameters(), pack.sizes, [PLAIN] * 2, carried)
    step(pack, opt)
    assert held.shape == (4,) and pack.sizes == [1, 1] and pack.group_seeds == [0, 1]
    alone, alone_opt = make([0, 1], [0.2, 0.3])
    step(alone, alone_opt)
    step(alone, alone_opt)
    for i in range(2):
        mine, theirs = pack.member_state_dict(i), alone.member_state_dict(i)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"member {i} bitwise its pack of survivors"

    other, other_opt = make([1, 2], [0.5, 0.6])
    step(other, other_opt)
    carried = [opt.member_state(0), opt.member_state(1), other_opt.member_state(0)]
    pack.relayout([pack.member_state_dict(i) for i in range(2)] + [other.member_state_dict(0)], [0, 1, 1])
    opt.regroup(pack.member_parameters(), pack.sizes, [PLAIN] * 3, carried)
    assert pack.sizes == [1, 2] and pack.group_seeds == [0, 1]
    step(pack, opt), step(alone, alone_opt), step(other, other_opt)
    before = [alone.member_state_dict(0), alone.member_state_dict(1), other.member_state_dict(0)]
    for i, theirs in enumerate(before):
        mine = pack.member_state_dict(i)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"member {i} bitwise where it came from"
