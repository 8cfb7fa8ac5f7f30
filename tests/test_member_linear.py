"""A member's arithmetic in a pack is its arithmetic alone, bitwise, on a CPU with one thread: the
forward, the loss, the validation sums, every gradient and the SGD update of a group of k members
(k = 1, 2, 4, 7; one group, and two groups with their own inputs) against each member as a pack of
one, and a pack of one against MnistModel trained by plain autograd (F.linear).

The batch shapes are the ones the engine uses: full training and validation batches (128, 256), the
short last ones (80 of 50,000; 16 of 10,000), a 2-process share of each (64, 40, 128, 8), and odd
sizes (7, 1) whose outputs start off a 64-byte boundary; hidden size 32 and 20 (a member's second
layer then starts off one too).

Which kernels a CPU's BLAS takes depends on the CPU: a batched matmul's weight gradient rounded like
F.linear's on an Intel Xeon's AVX-512 path and not on an AMD EPYC's (nor on MKL's AVX2 path of the
same Xeon). So the comparison runs in every MKL code path this machine can take, each in its own
process (MKL reads its settings at start): the default, MKL_ENABLE_INSTRUCTIONS=AVX2, and
MKL_CBWR=COMPATIBLE. Without MKL (another BLAS) the variables do nothing and each run is the default.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mnist_dist.train.member_optimizer import MemberOptimizer
from mnist_dist.train.model import MnistModel, MnistPack

from conftest import ROOT, env_with

BATCHES = (256, 128, 80, 64, 40, 16, 8, 7, 1)
PACK_SIZES = (1, 2, 4, 7)
HIDDEN = (32, 20)
PATHS = {
    "default": {},
    "MKL AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL compatible": {"MKL_CBWR": "COMPATIBLE"},
}


def _members(count: int, hidden: int, first_seed: int) -> list[MnistModel]:
    out = []
    for seed in range(first_seed, first_seed + count):
        torch.manual_seed(seed)
        out.append(MnistModel(hidden))
    return out


NAMES = ("w1", "b1", "w2", "b2")


def _step(pack: MnistPack, xs: list[torch.Tensor], ys: list[torch.Tensor], lrs: list[float]) -> list[dict]:
    """Everything a training step and an evaluation compute, per member, flattened."""
    x, y = (xs, ys) if len(xs) > 1 else (xs[0], ys[0])  # one group: one batch, as the engine passes it
    out = pack(x)
    losses = pack.training_step(out, y)
    val_loss, correct = pack.validation_step(out.detach(), y)
    groups = pack.member_parameters()
    starts = [sum(pack.sizes[:g]) for g in range(len(groups))]
    sgd = MemberOptimizer(
        groups, [torch.tensor(lrs[a : a + n]) for a, n in zip(starts, pack.sizes, strict=True)]
    )
    (losses.sum() * 0.5).backward()  # a loss weight, as a short batch or a process share has
    grads = [[p.grad.clone() for p in params] for params in groups]
    sgd.update()
    found = []
    for i in range(len(pack)):
        g = max(j for j, a in enumerate(starts) if a <= i)
        at, size = i - starts[g], pack.sizes[g]
        found.append(
            {
                "logits": out.reshape(len(pack), -1)[i],
                "loss": losses.reshape(-1)[i],
                "val_loss": val_loss.reshape(-1)[i],
                "correct": correct.reshape(-1)[i],
                **{f"grad {n}": _of(t, size, at) for n, t in zip(NAMES, grads[g], strict=True)},
                **{f"stepped {n}": _of(t, size, at) for n, t in zip(NAMES, groups[g], strict=True)},
            }
        )
    return found


def _of(t: torch.Tensor, members: int, at: int) -> torch.Tensor:
    """Member `at`'s part of a group's parameter (or gradient), flattened: its block of rows."""
    return t.detach().reshape(members, -1)[at]


def _inputs(rows: int, groups: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(rows * 10 + groups)
    xs = [(torch.rand(rows, 1, 28, 28, generator=gen) - 0.1307) / 0.3081 for _ in range(groups)]
    ys = [torch.randint(0, 10, (rows,), generator=gen) for _ in range(groups)]
    return xs, ys


def _plain_autograd(member: MnistModel, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
    """The run as a newcomer writes it: nn.Linear, autograd, p -= grad * lr."""
    out = member(x)
    loss = F.cross_entropy(out, y, reduction="none").mean()
    (loss * 0.5).backward()
    params = [member.linear1.weight, member.linear1.bias, member.linear2.weight, member.linear2.bias]
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.sub_(p.grad * torch.tensor(lr))
    return {
        "logits": out.reshape(-1),
        "loss": loss,
        **{f"grad {n}": g.reshape(-1) for n, g in zip(NAMES, grads, strict=True)},
        **{f"stepped {n}": p.detach().reshape(-1) for n, p in zip(NAMES, params, strict=True)},
    }


def _case(hidden: int, rows: int, k: int, groups: int) -> list[str]:
    """The differences of one pack (k members in `groups` groups, each with its own input)."""
    sizes = [k] if groups == 1 else [k // 2, k - k // 2]
    seeds = [g for g, size in enumerate(sizes) for _ in range(size)]
    xs, ys = _inputs(rows, groups)
    members = _members(k, hidden, first_seed=0)
    lrs = [0.5 + 0.25 * i for i in range(k)]
    packed = _step(MnistPack([_copy(m) for m in members], seeds), xs, ys, lrs)
    bad = []
    for i, member in enumerate(members):
        x, y = xs[seeds[i]], ys[seeds[i]]
        alone = _step(MnistPack([_copy(member)], [0]), [x], [y], [lrs[i]])[0]
        case = f"hidden {hidden}, batch {rows}, member {i} of {k} in {groups} group(s)"
        bad += [f"{case}: {q}" for q in alone if not torch.equal(packed[i][q], alone[q])]
        if k == 1:
            plain = _plain_autograd(_copy(member), x, y, lrs[i])
            bad += [f"{case}: {q}, F.linear" for q in plain if not torch.equal(plain[q], alone[q])]
    return bad


def differences() -> list[str]:
    """Every (case, quantity) where a member in a pack is not bitwise its pack of one, or a pack of one
    not plain autograd's run; empty when all agree."""
    torch.set_num_threads(1)
    bad = []
    for hidden in HIDDEN:
        for rows in BATCHES:
            for k in PACK_SIZES:
                for groups in (1, 2) if k > 1 else (1,):
                    bad += _case(hidden, rows, k, groups)
    return bad


def _copy(member: MnistModel) -> MnistModel:
    twin = MnistModel(member.linear1.out_features)
    twin.load_state_dict(member.state_dict())
    return twin


@pytest.mark.parametrize("path", PATHS)
def test_a_member_in_a_pack_is_bitwise_the_member_alone(path: str):
    code = "import json, test_member_linear as t; print(json.dumps(t.differences()))"
    env = env_with(PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}", OMP_NUM_THREADS="1", **PATHS[path])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads(proc.stdout.splitlines()[-1])
    assert not bad, f"{len(bad)} differences in the {path} path, the first: {bad[:5]}"


@pytest.mark.parametrize(("k", "groups"), [(2, 1), (4, 2), (7, 2)])
def test_the_batched_kernels_compute_the_same_step_to_rounding(k: int, groups: int):
    """`batched` (what a GPU runs: one batched matmul per product) is the same arithmetic up to
    rounding: every quantity of a step within float32 rounding of the per-member kernels'."""
    torch.set_num_threads(1)
    sizes = [k] if groups == 1 else [k // 2, k - k // 2]
    seeds = [g for g, size in enumerate(sizes) for _ in range(size)]
    xs, ys = _inputs(128, groups)
    members = _members(k, 32, first_seed=0)
    lrs = [0.5 + 0.25 * i for i in range(k)]
    exact = _step(MnistPack([_copy(m) for m in members], seeds), xs, ys, lrs)
    fused_pack = MnistPack([_copy(m) for m in members], seeds)
    fused_pack.batched = True
    fused = _step(fused_pack, xs, ys, lrs)
    for i in range(k):
        for q, value in exact[i].items():
            assert torch.allclose(fused[i][q].double(), value.double(), rtol=1e-4, atol=1e-6), (i, q)


def test_a_bf16_member_in_a_pack_is_bitwise_the_member_alone():
    """Under bf16 autocast of the forward (a sweep of `precision: bf16`: Accelerate wraps the model's
    forward, the loss and backward run outside it), each member's products are autocast's bf16 ones,
    alone and packed alike, and the backward multiplies what the forward did."""
    torch.set_num_threads(1)

    def bf16(pack: MnistPack) -> MnistPack:
        pack.forward = torch.autocast("cpu", dtype=torch.bfloat16)(pack.forward)
        return pack

    for rows in (128, 80, 8):
        xs, ys = _inputs(rows, 1)
        members = _members(3, 32, first_seed=0)
        packed = _step(bf16(MnistPack([_copy(m) for m in members], [0, 0, 0])), xs, ys, [0.5, 0.75, 1.0])
        assert packed[0]["logits"].dtype == torch.bfloat16
        for i, member in enumerate(members):
            alone = _step(bf16(MnistPack([_copy(member)], [0])), xs, ys, [0.5 + 0.25 * i])[0]
            bad = [q for q in alone if not torch.equal(packed[i][q], alone[q])]
            assert not bad, (rows, i, bad)
