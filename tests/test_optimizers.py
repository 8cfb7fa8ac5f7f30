"""The optimizer section (config.OptimizerConfig; train/member_optimizer.py): SGD with momentum,
Nesterov and weight decay, Adam and AdamW. A run with each is torch.optim's own run to the bit (on
ATen's DEFAULT kernels, where torch.optim's fused forms round as plain operations do: the module's
docstring says why only there); members with different hyperparameters share a pack, each bitwise
its run alone, through a kill -9 and a rerun; the optimizer's state resumes mid-epoch exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mnist_dist.errors import UserError

from conftest import ROOT, SHORT_PHASES, load_json, ok, run_cli, run_history
from test_packs import assert_bitwise, kill_once_packs_saved, member_dirs, sweep

# Each case: its optimizer section and phases that train well with it (Adam's lrs are SGD's / 100).
CASES = {
    "sgd": ({"name": "sgd"}, SHORT_PHASES),
    "sgd-momentum": (
        {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
        "2x0.05,1x0.01",
    ),
    "adam": ({"name": "adam", "weight_decay": 0.0001}, "2x0.005,1x0.001"),
    "adamw": ({"name": "adamw", "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01}, "2x0.005,1x0.001"),
}

# torch.optim's optimizer, built over the run's own parameters at its first step, steps them instead
# of the engine's: the same model, data, order, evaluation and files; only the update is torch's.
TORCH_OPTIM = """
import sys
import torch
from mnist_dist import cli
from mnist_dist.train import member_optimizer


def update(self, finite=None):
    if not hasattr(self, "reference"):
        params = [p for group in self.param_groups for p in group["params"]]
        s = self.settings[0]
        if s["name"] == "sgd":
            self.reference = torch.optim.SGD(params, lr=self.host_lrs[0], momentum=s["momentum"],
                nesterov=s["nesterov"], weight_decay=s["weight_decay"], foreach=False)
        else:
            kind = torch.optim.Adam if s["name"] == "adam" else torch.optim.AdamW
            self.reference = kind(params, lr=self.host_lrs[0], betas=tuple(s["betas"]), eps=s["eps"],
                weight_decay=s["weight_decay"], foreach=False)
        print("REFERENCE", type(self.reference).__name__, flush=True)
    for group in self.reference.param_groups:
        group["lr"] = self.host_lrs[0]
    self.reference.step()


member_optimizer.MemberOptimizer.update = update
sys.exit(cli.main(sys.argv[1:]))
"""


def optimizer_args(case: str) -> list[str]:
    section, phases = CASES[case]
    sets = [f"optimizer.{k}={json.dumps(v)}" for k, v in section.items()]
    return ["--phases", phases, "--threads", "1", *[a for s in sets for a in ("--set", s)]]


def command(out: Path, case: str, *extra: str, script: str | None = None) -> list[str]:
    args = ["train", "-c", str(ROOT / "configs/smoke.yaml"), "--output-dir", str(out), "--progress", "off"]
    args += [*optimizer_args(case), *extra]
    entry = ["-c", script] if script else ["-m", "mnist_dist.cli"]
    return [sys.executable, *entry, *args]


def train(out: Path, env: dict[str, str], case: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, case, *extra), capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def default_kernels(data_env: dict[str, str]) -> dict[str, str]:
    return {**data_env, "ATEN_CPU_CAPABILITY": "default"}


def both(where: Path, env: dict[str, str], case: str) -> tuple[Path, subprocess.CompletedProcess]:
    """The case's run here and torch.optim's, at once; returns the first and the second's process."""
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for cmd in (command(where / "run", case), command(where / "torch", case, script=TORCH_OPTIM))
    ]
    done = []
    for cmd, proc in zip(("run", "torch"), procs, strict=True):
        out, err = proc.communicate(timeout=600)
        done.append(ok(subprocess.CompletedProcess(cmd, proc.returncode, out, err)))
    return where / "run", done[1]


@pytest.mark.parametrize("case", list(CASES))
def test_each_optimizer_is_torch_optims_run_to_the_bit(case: str, tmp_path: Path, default_kernels):
    run, reference = both(tmp_path, default_kernels, case)
    expected = {"sgd": "SGD", "sgd-momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}[case]
    assert f"REFERENCE {expected}\n" in reference.stdout
    assert_bitwise(run, tmp_path / "torch")
    assert run_history(run)[-1]["val_acc"] > 0.85, "it trains"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if case == "sgd":  # the tutorial's: config.yaml, ids and fingerprints as before the key existed
        assert "optimizer" not in saved
    else:
        assert {k: saved["optimizer"][k] for k in CASES[case][0]} == CASES[case][0]


def test_adams_state_resumes_mid_epoch_exactly(tmp_path: Path, data_env: dict[str, str]):
    """Its moments and step counts (in the checkpoint's optimizer state), stopped mid-epoch; the
    packed sweep below resumes SGD's momentum at an epoch's end."""
    out = tmp_path / "drill"
    proc = train(out, data_env, "adam", "--simulate-preemption-at", "2:150")
    assert proc.returncode == 75, proc.stderr[-2000:]
    ok(train(out, data_env, "adam"))
    ok(train(tmp_path / "uninterrupted", data_env, "adam"))
    assert_bitwise(out, tmp_path / "uninterrupted")


# Two optimizers, each with two settings (they share a pack), and two seeds: 4 packs of 2 in 2 processes.
SPEC = """
name: optimizers
method: grid
parameters:
  optimizer:
    values:
      - {name: sgd, momentum: 0.9}
      - {name: sgd, momentum: 0.5, nesterov: true, weight_decay: 0.001}
      - {name: adam}
      - {name: adam, betas: [0.8, 0.99], eps: 1.0e-6, weight_decay: 0.0001}
  seed: {values: [0, 1]}
"""
PHASES = ("--phases", "2x0.02,1x0.005")


def test_members_of_different_optimizers_pack_each_bitwise_its_run_through_a_kill(tmp_path: Path, data_env):
    (tmp_path / "sweep.yaml").write_text(SPEC)
    spec = tmp_path / "sweep.yaml"
    ok(sweep(spec, tmp_path / "alone", data_env, *PHASES, "--pack", "off"))
    alone = member_dirs(tmp_path / "alone")
    assert len(alone) == 8

    out = tmp_path / "packed"
    kill_once_packs_saved(spec, out, data_env, *PHASES)
    assert not all((d / "history.json").exists() for d in member_dirs(out).values()), "killed mid-way"
    again = ok(sweep(spec, out, data_env, *PHASES))
    assert "resuming from" in again.stdout and "0 failed" in again.stdout

    packs: dict[str, set[str]] = {}
    for member, run_dir in member_dirs(out).items():
        assert_bitwise(run_dir, alone[member])
        pack = load_json(run_dir / "run.json")["pack"]["dir"]
        optimizer = yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]
        packs.setdefault(pack, set()).add(json.dumps(optimizer, sort_keys=True))
    assert len(packs) == 4 and all(len(settings) == 2 for settings in packs.values()), packs

    member = next(m for m, d in alone.items() if "nesterov: true" in (d / "config.yaml").read_text())
    again = tmp_path / "again"
    ok(
        run_cli(
            "train", "--config", out / "members" / member / "config.yaml", "--output-dir", again, env=data_env
        )
    )
    assert_bitwise(again, alone[member])


def _pack(settings: list[dict], seeds: list[int]):
    from mnist_dist.train.member_optimizer import MemberOptimizer
    from mnist_dist.train.model import MnistPack

    pack = MnistPack.seeded(seeds, 16)
    lrs = [0.01 * (i + 1) for i in range(len(seeds))]
    per, start = [], 0
    for size in pack.sizes:
        per.append(torch.tensor(lrs[start : start + size]))
        start += size
    opt = MemberOptimizer(pack.member_parameters(), per, settings)
    opt.set_lrs(lrs)
    return pack, opt, lrs


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_survivors_keep_their_state_when_members_leave_and_a_frozen_ones_stays(name: str):
    """MnistPack.keep + MemberOptimizer.regroup with momentum / Adam's moments, no training data: the
    survivors of a pack of 4 step on bitwise as a pack of only them trained from the start; a frozen
    member's weights and state do not move."""
    from mnist_dist.config import OptimizerConfig

    torch.set_num_threads(1)
    x, y = torch.rand(5, 784), torch.randint(0, 10, (5,))
    kw = (
        [{"momentum": 0.9}, {"momentum": 0.5, "nesterov": True}]
        if name == "sgd"
        else [{}, {"betas": [0.5, 0.9]}]
    )
    settings = [OptimizerConfig(name=name, **kw[i % 2]).model_dump() for i in range(4)]

    def step(pack, opt, alive=None) -> None:
        loss = pack.training_step(pack(x), y)
        loss.backward(alive if alive is not None else torch.ones(len(pack)))
        opt.update()
        opt.clear()

    pack, opt, lrs = _pack(settings, [0, 0, 1, 1])
    survivors, survivors_opt, _ = _pack([settings[1], settings[2]], [0, 1])
    survivors_opt.set_lrs([lrs[1], lrs[2]])
    for _ in range(2):
        step(pack, opt), step(survivors, survivors_opt)
    carried = [opt.member_state(i) for i in (1, 2)]
    pack.keep([1, 2])
    opt.regroup(pack.member_parameters(), pack.sizes, [settings[1], settings[2]], carried)
    for _ in range(2):
        step(pack, opt), step(survivors, survivors_opt)
    for i in range(2):
        mine, theirs = pack.member_state_dict(i), survivors.member_state_dict(i)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"survivor {i}'s weights"
        assert opt.member_state(i)["step"] == 4.0
        assert all(
            torch.equal(opt.member_state(i)[p][n], survivors_opt.member_state(i)[p][n])
            for p in range(4)
            for n in opt.member_state(i)[p]
        ), f"survivor {i}'s state"

    alive = torch.tensor([0.0, 1.0])  # member 0 frozen: lr 0, its loss's gradient 0
    opt.set_lrs([lrs[1], lrs[2]], alive)
    before, state = pack.member_state_dict(0), opt.member_state(0)
    before = {k: v.clone() for k, v in before.items()}
    step(pack, opt, alive)
    after = pack.member_state_dict(0)
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen member's weights stay"
    assert opt.member_state(0)["step"] == state["step"]
    assert all(torch.equal(opt.member_state(0)[p][n], state[p][n]) for p in range(4) for n in state[p])


def test_the_optimizer_is_swept_by_w_and_bs_names(tmp_path: Path):
    """W&B's guide's `optimizer: {values: [adam, sgd]}`, dotted keys and the nested form: each member's
    config gets the optimizer it names (no training)."""
    from mnist_dist.sweep import spec as sweeps

    texts = {
        "flat": "  optimizer: {values: [adam, sgd]}\n",
        "dotted": "  optimizer.name: {values: [adam, sgd]}\n",
        "nested": "  optimizer:\n    parameters:\n      name: {values: [adam, sgd]}\n",
    }
    for form, text in texts.items():
        (tmp_path / f"{form}.yaml").write_text(f"name: {form}\nparameters:\n  seed: {{values: [0]}}\n{text}")
        spec = sweeps.read_spec(tmp_path / f"{form}.yaml")
        found = sweeps.members(spec, tmp_path / form, {}, None)
        assert sorted(m.cfg.optimizer.name for m in found) == ["adam", "sgd"], form
    momentum = "  optimizer.momentum: {values: [0.0, 0.9]}\n  optimizer.nesterov: {values: [false, true]}\n"
    (tmp_path / "m.yaml").write_text(f"name: m\nparameters:\n{momentum}")
    spec = sweeps.read_spec(tmp_path / "m.yaml")
    with pytest.raises(UserError, match="nesterov needs momentum > 0"):  # nesterov at momentum 0
        sweeps.members(spec, tmp_path / "m", {}, None)


HYPERBAND = """
name: momentum-hyperband
method: grid
metric: {name: val_acc, goal: maximize}
parameters:
  optimizer.momentum: {values: [0.5, 0.9]}
  phases.0.lr: {values: [0.003, 0.3]}
  seed: {values: [0, 1]}
"""


def test_members_with_momentum_leave_a_pack_at_a_band_and_the_survivors_are_their_runs(tmp_path, data_env):
    """Hyperband stops members while their packs train: the packs shrink with each survivor's momentum
    buffer carried over; every survivor is bitwise its full `--pack off` run, every stopped member's
    history the start of its full run's."""
    phases = ("--phases", "2x0.1,2x0.01")
    (tmp_path / "full.yaml").write_text(HYPERBAND)
    (tmp_path / "early.yaml").write_text(
        HYPERBAND + "early_terminate: {type: hyperband, min_iter: 1, eta: 3}\n"
    )
    ok(sweep(tmp_path / "full.yaml", tmp_path / "full", data_env, *phases, "--pack", "off"))
    proc = ok(sweep(tmp_path / "early.yaml", tmp_path / "early", data_env, *phases))
    assert "early termination after epoch 1 stopped" in proc.stdout
    full, survivors = member_dirs(tmp_path / "full"), 0
    for member, run_dir in member_dirs(tmp_path / "early").items():
        info = load_json(run_dir / "run.json")
        if info["status"] == "completed":
            survivors += 1
            assert_bitwise(run_dir, full[member])
            assert info["pack"]["sizes"][-1]["members"] < info["pack"]["sizes"][0]["members"], info["pack"]
        else:
            assert info["status"] == "terminated"
            history = run_history(run_dir)
            assert history == run_history(full[member])[: len(history)], member
    assert 1 <= survivors < 8


def test_adams_lerp_form_is_chosen_as_torchs_kernel_chooses_it():
    """torch's lerp picks its form by the float32 weight: 1 - beta1 just under 0.5 in double is 0.5 in
    float32 (the large form). A member with such a beta1 is the same alone and beside a member of the
    other form (no training data)."""
    from mnist_dist.config import OptimizerConfig
    from mnist_dist.train.member_optimizer import MemberOptimizer

    torch.manual_seed(0)
    edge, other = (OptimizerConfig(name="adam", betas=[b, 0.999]).model_dump() for b in (0.5 + 2**-30, 0.2))
    base = [torch.randn(64, 50), torch.randn(64)]
    alone = [torch.nn.Parameter(p.clone()) for p in base]
    packed = [torch.nn.Parameter(torch.cat([p.clone(), p.clone()])) for p in base]
    one = MemberOptimizer([alone], [torch.tensor([1e-3])], [edge])
    two = MemberOptimizer([packed], [torch.tensor([1e-3, 1e-3])], [edge, other])
    one.set_lrs([1e-3]), two.set_lrs([1e-3, 1e-3])
    for _ in range(6):
        grads = [torch.randn_like(p) for p in base]
        for p, g in zip(alone, grads, strict=True):
            p.grad = g.clone()
        for p, g in zip(packed, grads, strict=True):
            p.grad = torch.cat([g, g])
        one.update(), two.update()
    assert all(torch.equal(p.view(2, -1)[0], q.view(-1)) for p, q in zip(packed, alone, strict=True))
