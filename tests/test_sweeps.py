"""Sweeps: the spec, members as ordinary run dirs, `sweep run` on this machine (each member equal to its
solo `mnist-dist train`; a rerun trains nothing; a killed sweep finishes on the next run), results and
plots, and `sweep submit` as one job array on the local Slurm cluster with a preempted task requeued."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from mnist_dist.errors import UserError
from mnist_dist.sweep import spec as sweeps
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.track import wandb_file

from conftest import (
    ROOT,
    SHORT_PHASES,
    SWEEP_PHASES,
    SWEEP_SPEC,
    load_json,
    ok,
    run_cli,
    run_history,
    sweep_file,
)

PHASES = SWEEP_PHASES
SPEC = SWEEP_SPEC


def _spec(tmp_path: Path, text: str = SPEC) -> Path:
    return sweep_file(tmp_path, text)


def test_grid_members_are_full_validated_configs_with_stable_ids(tmp_path: Path):
    spec = sweeps.read_spec(_spec(tmp_path))
    assert spec.swept == ["phases.0.lr", "seed"]
    assert spec.notes == ["'program' is W&B's; noted and not used here"]
    found = sweeps.members(spec, tmp_path / "sw", {}, None)
    assert [(m.cfg.phases[0].lr, m.cfg.seed) for m in found] == [(0.1, 0), (0.1, 1), (0.5, 0), (0.5, 1)]
    assert all(m.cfg.phases[1].lr == 0.1 and m.cfg.batch_size == 128 for m in found)
    assert len({m.id for m in found}) == 4
    assert all(m.run_dir == tmp_path / "sw" / "members" / m.id for m in found)
    assert found[2].cfg.sweep.params == {"phases.0.lr": 0.5, "seed": 0}
    again = sweeps.members(sweeps.read_spec(_spec(tmp_path)), tmp_path / "elsewhere", {}, None)
    assert [m.id for m in again] == [m.id for m in found], "the id is the config's, not the dir's"
    other = sweeps.members(spec, tmp_path / "sw", {"batch_size": None}, ["data.split_seed=1"])
    assert not {m.id for m in other} & {m.id for m in found}, "another base config: other members"


def test_random_draws_are_seeded_by_the_sweep_and_within_bounds(tmp_path: Path):
    text = """
name: rnd
method: random
run_cap: 6
parameters:
  phases.0.lr: {distribution: log_uniform_values, min: 0.01, max: 1.0}
  batch_size: {values: [64, 128]}
  seed: {distribution: int_uniform, min: 0, max: 9}
"""
    spec = sweeps.read_spec(_spec(tmp_path, text))
    first, second = sweeps.combinations(spec), sweeps.combinations(spec)
    assert first == second and len(first) == 6
    assert all(0.01 <= c["phases.0.lr"] <= 1.0 and 0 <= c["seed"] <= 9 for c in first)
    assert {c["batch_size"] for c in first} <= {64, 128}
    assert len({c["phases.0.lr"] for c in first}) == 6


def test_run_cap_and_count_cut_a_grid(tmp_path: Path):
    for cap in ("run_cap: 3", "count: 3"):  # count: W&B's older name
        spec = sweeps.read_spec(_spec(tmp_path, SPEC + cap + "\n"))
        found = sweeps.members(spec, tmp_path / "sw", {}, None)
        assert [(m.cfg.phases[0].lr, m.cfg.seed) for m in found] == [(0.1, 0), (0.1, 1), (0.5, 0)], cap


def test_base_is_found_beside_the_sweep_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "small.yaml").write_text("batch_size: 64\nmodel: {hidden_size: 16}\n")
    spec = sweeps.read_spec(
        sweep_file(tmp_path / "sub", "name: b\nbase: small.yaml\nparameters: {seed: {values: [1]}}\n")
    )
    assert spec.base == tmp_path / "sub" / "small.yaml", "relative to the sweep file, from any cwd"
    (member,) = sweeps.members(spec, tmp_path / "sw", {}, None)
    assert (member.cfg.batch_size, member.cfg.model.hidden_size, member.cfg.seed) == (64, 16, 1)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_in_configs_loads_into_valid_members(path: Path, tmp_path: Path):
    from mnist_dist.sweep.rounds import next_round

    spec = sweeps.read_spec(path)
    first_round = next_round(spec, [], [], 4) if spec.method == "bayes" else None
    found = sweeps.members(spec, tmp_path / "sw", {}, None, confirm=True, combos=first_round)
    sizes = [len(p.config["values"]) if "values" in p.config else 1 for p in spec.parameters.values()]
    expected = 4 if first_round else spec.count or math.prod(sizes)
    assert len(found) == expected and len({m.id for m in found}) == expected
    assert all(m.cfg.sweep.name == spec.name for m in found)


def test_goal_minimize_puts_the_lowest_first(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
):
    import shutil

    root = tmp_path / "tiny"
    shutil.copytree(
        local_sweep[0], root, ignore=shutil.ignore_patterns("checkpoints", "*.png", "*.safetensors")
    )
    manifest = load_json(root / "sweep.json")
    manifest["metric"] = {"name": "val_loss", "goal": "minimize"}
    (root / "sweep.json").write_text(json.dumps(manifest))
    rows = json.loads(ok(run_cli("sweep", "results", root, "--json")).stdout)["members"]
    losses = [r["final_val_loss"] for r in rows]
    assert losses == sorted(losses) and rows[0]["best"] is True and len(rows) == 4
    assert [g["phases.0.lr"] for g in load_json(root / "results.json")["seed_groups"]] == [0.5, 0.1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "expected a mapping of keys at the top level"),
        ("name: x\nparameters: {seed: {values: [1]}}\nfoo: 1\n", "unknown key 'foo'"),
        (
            "name: x\nmethod: bayes\nrun_cap: 2\nparameters: {seed: {values: [1, 2]}}\n",
            "method bayes needs a metric",
        ),
        (
            "name: x\nmethod: bayes\nmetric: {name: val_acc}\nparameters: {seed: {values: [1, 2]}}\n",
            "bayes needs run_cap",
        ),
        (
            "name: x\nmethod: bayes\nrun_cap: 2\nmetric: {name: val_acc}\n"
            "parameters: {seed: {values: [1, 2], probabilities: [0.5, 0.5]}}\n",
            "parameter 'seed': bayes cannot take probabilities",
        ),
        ("name: x\nparameters: {seed: {values: []}}\n", "parameter 'seed': {'values': []} is none of W&B's"),
        ("name: x\nparameters: {nope: {values: [1]}}\n", "unknown key 'nope'"),
        (
            "name: x\nparameters: {phases.0.lr: {values: [0.1, -1]}}\n",
            "member 2 (phases.0.lr=-1): 'phases[0].lr'",
        ),
        ("name: x\nmethod: random\nparameters: {seed: {values: [1, 2]}}\n", "random needs run_cap"),
        ("name: x\nparameters: {seed: {distribution: uniform, min: 0, max: 1}}\n", "grid takes values"),
        ("name: x\nparameters: {seed: {values: [1]}, lr: {parameters: {a: 1}}}\n", "parameter 'lr.a': write"),
        ("name: x\nparameters: {seed: {min: 5, max: 1}}\n", "parameter 'seed': min 5 is not less than max 1"),
        (
            "name: x\nparameters: {batch_size: {values: [64, 128], probabilities: [0.5, 0.5]}}\n",
            "grid takes values, a value, int_uniform or q_uniform, not categorical_w_probabilities",
        ),
        ("name: x\nparameters: {seed: {values: [1]}}\nmetric: {name: accuracy}\n", "metric"),
        ("name: 'a b'\nparameters: {seed: {values: [1]}}\n", "name 'a b'"),
        (
            "name: x\nmethod: random\nrun_cap: 2\n"
            "parameters: {phases.0.lr: {distribution: log_uniform, min: -3, max: 0}}\n",
            "parameter 'phases.0.lr': uses log_uniform, where min/max specify base-e exponents. "
            "Use log_uniform_values",
        ),
        (
            "name: x\nmetric: {name: val_acc, target: high}\nparameters: {seed: {values: [1]}}\n",
            "'metric.target': 'high' is not of type 'number'",
        ),
    ],
)
def test_bad_sweep_files_are_one_line_exit_2_and_nothing_is_written(tmp_path: Path, text: str, message: str):
    proc = run_cli("sweep", "run", _spec(tmp_path, text), "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_a_grid_over_1000_members_needs_yes(tmp_path: Path):
    seeds = ", ".join(map(str, range(501)))
    text = f"name: big\nparameters:\n  seed: {{values: [{seeds}]}}\n  batch_size: {{values: [64, 128]}}\n"
    proc = run_cli("sweep", "submit", _spec(tmp_path, text), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "has 1,002 members; pass --yes" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_sweep_run_writes_one_run_dir_per_member_equal_to_its_solo_run(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, data_env: dict
):
    root, proc = local_sweep
    manifest = load_json(root / "sweep.json")
    ids = [m["id"] for m in manifest["members"]]
    assert len(ids) == 4 and "4 trained, 0 skipped, 0 failed" in proc.stdout
    for member in manifest["members"]:
        run_dir = root / "members" / member["id"]
        assert {"history.json", "run.json", "config.yaml", "model.safetensors", "loss.png"} <= {
            p.name for p in run_dir.iterdir()
        }
        assert load_json(run_dir / "run.json")["status"] == "completed"
    # Each member is an ordinary run: `mnist-dist train --config` of its config.yaml gives its history,
    # to the last bit (packed or not, a member makes the calls its run makes alone).
    for member in manifest["members"]:
        run_dir = root / "members" / member["id"]
        solo = tmp_path / member["id"]
        ok(run_cli("train", "--config", run_dir / "config.yaml", "--output-dir", solo, env=data_env))
        a, b = run_history(solo), run_history(run_dir)
        assert len(a) == len(b) == 3 and a == b


def test_results_table_files_and_plots(local_sweep: tuple[Path, subprocess.CompletedProcess]):
    root, _ = local_sweep
    proc = ok(run_cli("sweep", "results", root))
    table = proc.stdout.splitlines()
    assert table[0].split()[:5] == ["id", "phases.0.lr", "seed", "status", "epochs"]
    assert table[1].startswith("*") and "over seeds:" in proc.stdout
    results = load_json(root / "results.json")
    accs = [r["final_val_acc"] for r in results["members"]]
    assert accs == sorted(accs, reverse=True) and results["members"][0]["best"] is True
    assert all(r["status"] == "done" and r["epochs_done"] == 2 for r in results["members"])
    groups = results["seed_groups"]
    assert [g["seeds"] for g in groups] == [2, 2] and groups[0]["val_acc_mean"] > groups[1]["val_acc_mean"]
    assert groups[0]["phases.0.lr"] == 0.5, "lr 0.5 beats 0.1 after one epoch"
    with (root / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [r["id"] for r in results["members"]]
    for name in ("curves.png", "final-phases_0_lr.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status = json.loads(ok(run_cli("sweep", "status", root, "--json")).stdout)
    assert status["counts"]["done"] == 4 and status["members"] == 4


def test_the_curves_figure_draws_a_sweep_that_sweeps_nothing(tmp_path: Path):
    """A sweep of one value (`seed: {values: [0]}`) has no swept key: one colour, not a crash."""
    from mnist_dist.store.plots import sweep_curves

    history = [{"epoch": e, "phase": 0, "val_acc": 0.1 * e, "val_loss": 2.0 - 0.1 * e} for e in range(3)]
    path = sweep_curves(tmp_path / "curves.png", [{"id": "a"}, {"id": "b"}], {"a": history, "b": history}, [])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_trains_nothing(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, data_env: dict
):
    """(Killed and stopped sweeps finish on the next run: test_sweep_faults.py.)"""
    root, _ = local_sweep
    args = ["sweep", "run", _spec(tmp_path), *PHASES, "--tracker", "none"]
    again = ok(run_cli(*args, "--output-dir", root, env=data_env))
    assert (
        "0 trained, 4 skipped, 0 failed, 0 terminated, 0 stopped, 0 in use" in again.stdout
        and "Epoch [" not in again.stdout
    )


def test_a_diverging_member_fails_alone(tmp_path: Path, data_env: dict):
    spec = _spec(tmp_path, "name: nan\nparameters:\n  phases.0.lr: {values: [1.0e38, 0.5]}\n")
    args = ["--phases", "1x0.5", "--tracker", "none", "--output-dir", tmp_path / "s"]
    proc = ok(run_cli("sweep", "run", spec, *args, env=data_env))
    assert "1 trained, 0 skipped, 1 failed" in proc.stdout
    results = load_json(tmp_path / "s" / "results.json")
    assert [r["status"] for r in results["members"]] == ["done", "failed"]
    failed = tmp_path / "s" / "members" / results["members"][1]["id"] / "run.json"
    first = load_json(failed)["start_time"]
    again = ok(run_cli("sweep", "run", spec, *args, env=data_env))
    assert "0 trained, 2 skipped, 0 failed" in again.stdout, "a failed member is not retried by itself"
    retried = ok(run_cli("sweep", "run", spec, *args, "--retry-failed", env=data_env))
    assert "0 trained, 1 skipped, 1 failed" in retried.stdout
    assert load_json(failed)["start_time"] != first and load_json(failed)["status"] == "failed", (
        "trained again"
    )


def _until(check, timeout: float = 400, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return found


def test_sweep_submit_is_one_array_and_a_preempted_task_is_requeued_alone(
    cluster: int, slurm_env: dict, tmp_path: Path
):
    root = tmp_path / "array"
    args = ["--phases", SHORT_PHASES, "--partition", "cpu", "--members-per-task", "2", "--tracker", "wandb"]
    proc = run_cli(
        "sweep",
        "submit",
        _spec(tmp_path),
        *args,
        "--allow-local",
        "--output-dir",
        root,
        "--json",
        env=slurm_env,
    )
    sub = json.loads(ok(proc).stdout)
    job = sub["job_id"]
    assert sub["sweep_dir"] == str(root)
    tasks = load_json(root / "sweep.json")["jobs"][0]["tasks"]
    assert [len(t) for t in tasks] == [2, 2], "4 members, 2 per task: one array of 2 tasks"
    # Each task trains its 2 members as one pack; preempt task 1 after its pack's first checkpoint.
    pack = SweepDir(root).pack(tasks[1])
    _until(lambda: (pack / "checkpoints" / "epoch-0001").is_dir())
    subprocess.run(["scancel", "--signal=USR2", f"{job}_1"], check=True)

    def requeued() -> bool:
        info = json.loads(ok(run_cli("sweep", "status", job, "--json", env=slurm_env)).stdout)
        return info["tasks"][1]["state"] in ("PENDING", "REQUEUED")

    _until(requeued, timeout=120, every=1)
    subprocess.run(["scontrol", "update", f"JobId={job}_1", "StartTime=now"], check=True)  # no requeue delay

    def all_done() -> dict | None:
        info = json.loads(ok(run_cli("sweep", "status", job, "--json", env=slurm_env)).stdout)
        finished = [t["state"] for t in info["tasks"]] == ["COMPLETED", "COMPLETED"]
        return info if finished and info["counts"]["done"] == 4 else None

    _until(all_done, every=1)
    log = next((root / "submitit").glob(f"{job}_1_0_log.out")).read_text()
    assert "restart 1" in log and f"resuming from {pack}/checkpoints" in log
    assert "resuming" not in next((root / "submitit").glob(f"{job}_0_0_log.out")).read_text()
    for member in tasks[1]:
        info = load_json(root / "members" / member / "run.json")
        sizes = [{"after_epoch": 0, "members": 2}]  # no member left it
        assert info["pack"] == {"dir": str(pack), "size": 2, "members": tasks[1], "sizes": sizes}
        assert [s["world_size"] for s in info["segments"]] == [1, 1], "trained, stopped, requeued"
    for member in [m for t in tasks for m in t]:
        runs = [wandb_file.read_wandb_run(f) for f in wandb_file.wandb_run_files(root / "members" / member)]
        assert {r["group"] for r in runs} == {"tiny"} and {r["job_type"] for r in runs} == {"sweep"}
        assert {r["id"] for r in runs} == {f"tiny-{member}"}, "one W&B run per member, across the requeue"
        assert sorted(row["epoch"] for r in runs for row in r["history"]) == [0, 1, 2, 3]
    synced = ok(run_cli("sync", root, "--dry-run", env=slurm_env)).stdout.splitlines()
    # 4 members, and the 2 of the preempted pack have a second offline folder (the same W&B run id).
    assert len(synced) == 6 and all("/members/" in line for line in synced), "every member's W&B runs"
    results = ok(run_cli("sweep", "results", root, "--json", env=slurm_env))
    assert [r["status"] for r in json.loads(results.stdout)["members"]] == ["done"] * 4


def test_in_an_array_a_diverging_member_fails_alone_and_sweep_cancel_stops_the_rest(
    cluster: int, slurm_env: dict, tmp_path: Path
):
    """One task, a pack of 2: lr 1e38 fails in epoch 1 while lr 0.5 trains on; `sweep cancel` of the
    running array ends the task, the member that was training stopped (resumable), not failed."""
    root = tmp_path / "array"
    spec = _spec(tmp_path, "name: cancel\nparameters:\n  phases.0.lr: {values: [1.0e38, 0.5]}\n")
    args = ["--phases", "40x0.5", "--partition", "cpu", "--members-per-task", "2", "--tracker", "none"]
    proc = run_cli(
        "sweep", "submit", spec, *args, "--allow-local", "--output-dir", root, "--json", env=slurm_env
    )
    job = json.loads(ok(proc).stdout)["job_id"]
    (task,) = load_json(root / "sweep.json")["jobs"][0]["tasks"]
    pack = SweepDir(root).pack(task)
    _until(lambda: (pack / "checkpoints" / "epoch-0002").is_dir())
    states = json.loads(ok(run_cli("sweep", "status", job, "--json", env=slurm_env)).stdout)
    assert states["counts"]["failed"] == 1 and states["counts"]["running"] == 1, states
    cancelled = ok(run_cli("sweep", "cancel", job, env=slurm_env))
    assert f"job {job}: cancelled" in cancelled.stdout
    assert "1 failed, 0 terminated, 1 stopped" in cancelled.stdout
    info = json.loads(ok(run_cli("sweep", "status", job, "--json", env=slurm_env)).stdout)
    assert info["tasks"][0]["state"].startswith("CANCELLED"), info
    failed, stopped = (load_json(root / "members" / m / "run.json") for m in task)
    assert failed["status"] == "failed" and "FloatingPointError" in failed["error"]
    assert stopped["status"] == "preempted" and stopped["stopped_at"]["epoch"] > 2, (
        "saved on the cancel: resumable"
    )
    assert len(run_history_lines(root / "members" / task[1])) < 41, "it did not train to the end"


def run_history_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_a_wandb_style_file_is_read_by_wandbs_engine(tmp_path: Path):
    """configs/sweeps/wandb-style.yaml: implicit min/max, q_uniform, probabilities, nested parameters."""
    spec = sweeps.read_spec(ROOT / "configs" / "sweeps" / "wandb-style.yaml")
    kinds = {k: p.distribution for k, p in spec.parameters.items()}
    assert kinds == {
        "phases.0.lr": "uniform",
        "phases.1.lr": "q_uniform",
        "batch_size": "categorical_w_probabilities",
        "seed": "int_uniform",
        "model.hidden_size": "constant",
    }
    assert spec.swept == ["phases.0.lr", "phases.1.lr", "batch_size", "seed"]
    assert spec.early_terminate == {"type": "hyperband", "min_iter": 1, "eta": 3}
    found = sweeps.members(spec, tmp_path / "a", {}, None)
    again = sweeps.members(sweeps.read_spec(spec.path), tmp_path / "elsewhere", {}, None)
    assert [m.params for m in found] == [m.params for m in again] and len(found) == 4, "the same draws"
    for m in found:
        assert 0.1 <= m.cfg.phases[0].lr <= 0.8 and m.cfg.model.hidden_size == 32
        assert m.cfg.phases[1].lr in [round(0.02 * k, 12) for k in range(1, 11)], "on q's grid"
        assert m.cfg.seed in range(4) and m.cfg.batch_size in (128, 256)
    text = (
        spec.path.read_text()
        .replace("run_cap: 4", "run_cap: 400")
        .replace("../seed.yaml", str(ROOT / "configs/seed.yaml"))
    )
    many = sweeps.read_spec(_spec(tmp_path, text))
    draws = sweeps.combinations(many)
    share = sum(d["batch_size"] == 128 for d in draws) / len(draws)
    assert 0.65 < share < 0.85, f"probabilities 0.75/0.25 drew 128 in {share:.0%} of 400"
    assert {type(d["seed"]) for d in draws} == {int} and len({d["seed"] for d in draws}) == 4


def test_grid_enumerates_int_uniform_and_q_uniform_and_nested_keys_are_dotted(tmp_path: Path):
    text = """
name: g
parameters:
  seed: {min: 0, max: 2}
  phases.0.lr: {distribution: q_uniform, min: 0.1, max: 0.4, q: 0.1}
  model:
    parameters:
      hidden_size: {values: [16, 32]}
"""
    spec = sweeps.read_spec(_spec(tmp_path, text))
    combos = sweeps.combinations(spec)
    assert len(combos) == 3 * 4 * 2 and {c["seed"] for c in combos} == {0, 1, 2}
    assert sorted({c["phases.0.lr"] for c in combos}) == [0.1, 0.2, 0.3, 0.4], "min..max by q, no float noise"
    found = sweeps.members(spec, tmp_path / "sw", {}, None)
    assert {m.cfg.model.hidden_size for m in found} == {16, 32} and len(found) == 24


def test_a_wandb_style_sweep_runs(tmp_path: Path, data_env: dict):
    spec = ROOT / "configs" / "sweeps" / "wandb-style.yaml"
    args = ["--phases", "1x0.5,1x0.1", "--tracker", "none", "--output-dir", tmp_path / "s"]
    proc = ok(run_cli("sweep", "run", spec, *args, env=data_env))
    last = proc.stdout.strip().splitlines()[-1]
    counts = {what: int(n) for n, what in re.findall(r"(\d+) (trained|terminated|failed)", last)}
    assert counts["trained"] + counts["terminated"] == 4 and counts["failed"] == 0, counts
    assert counts["terminated"] >= 1, "its hyperband block stops members at band 1"
    rows = load_json(tmp_path / "s" / "results.json")["members"]
    assert [r["final_val_loss"] for r in rows] == sorted(r["final_val_loss"] for r in rows), "goal: minimize"


def test_bayes_proposals_are_a_function_of_the_finished_members(tmp_path: Path):
    """rounds.next_round on recorded histories, without training: the same finished members give the
    same proposals (in any directory); a changed result gives another."""
    from mnist_dist.sweep import rounds

    spec = sweeps.read_spec(ROOT / "configs" / "sweeps" / "bayes-lr.yaml")
    assert spec.method == "bayes" and spec.count == 12 and sweeps.combinations(spec) == []
    first = rounds.next_round(spec, [], [], 4)
    assert len(first) == 4 and first == rounds.next_round(spec, [], [], 4), "seeded by the name and index"
    assert all(0.02 <= p["phases.0.lr"] <= 2.0 and 0.01 <= p["phases.1.lr"] <= 0.5 for p in first)
    found = sweeps.members(spec, tmp_path / "sw", {}, None, combos=first)

    def record(accs: list[float]) -> list[list[dict]]:
        for member, acc in zip(found, accs, strict=True):
            member.run_dir.mkdir(parents=True, exist_ok=True)
            history = [
                {"phase": None, "epoch": 0, "val_acc": 0.1, "val_loss": 2.3},
                {"phase": 0, "epoch": 1, "val_acc": acc, "val_loss": 1 - acc},
            ]
            (member.run_dir / "history.json").write_text(json.dumps(history))
            (member.run_dir / "run.json").write_text(json.dumps({"status": "completed"}))
        return rounds.next_round(spec, found, first, 4)

    one = record([0.97, 0.5, 0.5, 0.5])
    assert one == record([0.97, 0.5, 0.5, 0.5]), "the same finished members: the same proposals"
    other = record([0.5, 0.5, 0.5, 0.97])
    assert other != one, "the next round follows the finished members' results"
    (found[3].run_dir / "run.json").write_text(json.dumps({"status": "failed"}))
    worst = rounds.next_round(spec, found, first, 4)  # a failed member counts as the worst (the default)
    spec.impute = "best"
    assert rounds.next_round(spec, found, first, 4) != worst, "metric.impute goes to the engine"
    spec.impute = None
    assert len(rounds.next_round(spec, found, first * 3, 4)) == 0, "run_cap: 12 proposals at most"


def test_a_bayes_sweep_trains_in_rounds_and_a_rerun_goes_on_from_its_proposals(
    tmp_path: Path, data_env: dict
):
    """configs/sweeps/bayes-lr.yaml as written (run_cap 12), in 2 rounds of 6 (each 2 packs of 3)."""
    text = (ROOT / "configs" / "sweeps" / "bayes-lr.yaml").read_text()
    spec = _spec(tmp_path, text.replace("../seed.yaml", str(ROOT / "configs" / "seed.yaml")))
    args = [
        "--phases",
        "1x0.5,1x0.1",
        "--tracker",
        "none",
        "--round-size",
        "6",
        "--output-dir",
        tmp_path / "s",
    ]
    proc = ok(run_cli("sweep", "run", spec, *args, env=data_env))
    assert "bayes, 12 members, rounds of 6" in proc.stdout
    assert "12 trained, 0 skipped, 0 failed" in proc.stdout, proc.stdout
    manifest = load_json(tmp_path / "s" / "sweep.json")
    assert manifest["rounds"] == [6, 6] and len(manifest["proposals"]) == len(manifest["members"]) == 12
    results = load_json(tmp_path / "s" / "results.json")
    assert [r["status"] for r in results["members"]] == ["done"] * 12
    progress = [results[k] for k in ("method", "rounds", "proposed", "run_cap")]
    assert progress == ["bayes", 2, 12, 12]
    status = ok(run_cli("sweep", "status", tmp_path / "s", env=data_env)).stdout
    assert "(bayes: 2 round(s), 12 of 12 proposed): 12 member(s): 0 pending, 0 running, 12 done" in status
    again = ok(run_cli("sweep", "run", spec, *args, env=data_env))
    assert (
        "0 trained" in again.stdout
        and load_json(tmp_path / "s" / "sweep.json")["proposals"] == manifest["proposals"]
    )


def test_current_wandb_keys_that_sweeps_0_2_0_refuses_are_taken(tmp_path: Path):
    """run_cap and hyperband's strict are in W&B's current schema (wandb/sweeps main), not in 0.2.0's."""
    text = "name: s\nmethod: random\nrun_cap: 2\nparameters: {seed: {min: 0, max: 9}}\n"
    spec = sweeps.read_spec(
        _spec(tmp_path, text + "early_terminate: {type: hyperband, min_iter: 1, strict: true}\n")
    )
    assert spec.count == 2 and len(sweeps.combinations(spec)) == 2
    with pytest.raises(UserError, match=r"'early_terminate\.strict': 3 is not true or false"):
        sweeps.read_spec(
            _spec(tmp_path, text + "early_terminate: {type: hyperband, min_iter: 1, strict: 3}\n")
        )


def _record(run_dir: Path, values: list[float], status: str | None = "completed") -> None:
    """A member's files as a run writes them: epoch 0's evaluation, then one entry per epoch; with a
    status, run.json and history.json (finished), without, metrics.jsonl only (still training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = [{"phase": None, "epoch": 0, "val_acc": 0.1, "val_loss": 2.3}]
    entries += [{"phase": 0, "epoch": i, "val_acc": v, "val_loss": 1 - v} for i, v in enumerate(values, 1)]
    if status is None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        return
    (run_dir / "history.json").write_text(json.dumps(entries))
    (run_dir / "run.json").write_text(json.dumps({"status": status}))


def test_a_target_is_reached_by_an_epoch_of_any_member_as_far_as_it_got(tmp_path: Path):
    """target.reached on recorded members, without training: done or still training, any epoch so far
    (the value bayes learns from), >= for maximize and <= for minimize; a failed member never."""
    from mnist_dist.sweep.target import reached

    root = tmp_path / "sw"
    members = [{"id": i} for i in ("failed", "dipped", "training", "pending")]
    _record(SweepDir(root).member("failed"), [0.99], status="failed")
    _record(SweepDir(root).member("dipped"), [0.91, 0.95, 0.9])
    _record(SweepDir(root).member("training"), [0.93], status=None)

    def at(target: float | None, goal: str = "maximize") -> tuple[str, float] | None:
        metric = {"name": "val_acc", "goal": goal, "target": target}
        hit = reached(root, {"metric": metric, "members": members})
        return None if hit is None else (hit.member, hit.value)

    assert at(None) is None and at(0.96) is None
    assert at(0.95) == ("dipped", 0.95), "an epoch that reached it: the member's best, >= counts"
    assert at(0.93) == ("dipped", 0.95), "the first member in the sweep's order"
    members.reverse()
    assert at(0.93) == ("training", 0.93), "a member still training counts as far as it got"
    assert at(0.05, "minimize") is None and at(0.9, "minimize") == ("dipped", 0.9)


def test_a_reached_target_starts_no_new_member(tmp_path: Path, data_env: dict):
    """As W&B: once a member reaches metric.target, the members training go on to their end, no pack
    that has not started starts, a rerun trains nothing, status and results say who reached it."""
    text = SPEC.replace("{name: val_acc, goal: maximize}", "{name: val_acc, goal: maximize, target: 0.5}")
    args = ["sweep", "run", _spec(tmp_path, text), *PHASES, "--tracker", "none", "--max-pack", "1"]
    root = tmp_path / "s"
    proc = ok(run_cli(*args, "--output-dir", root, env=data_env))
    assert "target val_acc >= 0.5 reached by member " in proc.stdout, proc.stdout
    counts = proc.stdout.strip().splitlines()[-1]
    trained, not_started = (int(counts.split(f" {w}")[0].split()[-1]) for w in ("trained", "not started"))
    assert trained + not_started == 4 and not_started >= 2, counts  # 2 packs of one at once, at most
    results = load_json(root / "results.json")
    assert [r["status"] for r in results["members"]].count("pending") == not_started
    hit = results["target_reached"]
    assert hit["value"] >= 0.5 and any(r["id"] == hit["member"] for r in results["members"])
    status = ok(run_cli("sweep", "status", root, env=data_env)).stdout
    assert f"target val_acc >= 0.5 reached by member {hit['member']}" in status, status
    again = ok(run_cli(*args, "--output-dir", root, env=data_env))
    assert f"0 trained, {trained} skipped" in again.stdout and f"{not_started} not started" in again.stdout
    assert "reached by member" in again.stdout and "Epoch [" not in again.stdout
