"""The training engine: the one place that talks to Accelerate (device, processes, precision),
through the Accelerator that accelerator.py makes.

The tutorial's `evaluate` and `fit` live here, written once for every topology: one CPU process, one
GPU, N processes on a node, N nodes. Per step there is no host sync: metrics are accumulated on the
device and read once per epoch.

Processes holds the Accelerator and what it says of this process; Engine(Processes) trains what is
given to it: a factory for a pack of members (model.MnistPack; a single run is a pack of one) whose
`training_step` and `validation_step` turn logits into each member's loss and evaluation sums. Every
number it reports is one per member: lrs in, losses and metrics out. It yields an EpochResult per
epoch and leaves history rows, printing, failures and the run's files to run_state.py.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store import checkpoint, datafiles, provenance
from mnist_dist.store.checkpoint import ResumePoint
from mnist_dist.track import trackers as tracking
from mnist_dist.train import cuda_graphs, data, threads
from mnist_dist.train.accelerator import (
    gather_object,
    make_accelerator,
    set_seed,
    step_functions,
    unwrap,
)
from mnist_dist.train.member_optimizer import MemberOptimizer
from mnist_dist.train.member_scaler import MemberGradScaler
from mnist_dist.train.model import MnistPack
from mnist_dist.train.stopping import Preempted, StopFlag


@dataclass(frozen=True)
class EpochResult:
    """One trained epoch, per member: validation metrics after it, the mean of its step losses; and
    the epoch's duration."""

    epoch: int
    metrics: list[dict[str, Any]]
    train_loss: list[float]
    seconds: float


class Processes:
    """The Accelerator and what it says of this process: rank, world, device, whether it is the main
    one; printing once, agreeing, MNIST loaded once per node, the states a checkpoint holds saved by
    every process, trackers, the process group's end. What trains on them is the Engine."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.threads = threads.use(cfg.threads)  # before any parallel work
        self.accelerator = make_accelerator(cfg, run_dir)
        # A CPU process group without OMP_NUM_THREADS makes Accelerate set physical cores / local
        # processes threads: put the decided count back.
        torch.set_num_threads(self.threads.count)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def print(self, *args: Any) -> None:
        # Global rank 0 only: accelerator.print prints once per node, so N nodes would repeat each line.
        if self.is_main:
            print(*args, flush=True)

    def load_data(self, train: bool = True) -> data.MnistSplit:
        """MNIST prepared once per node (the others wait), loaded onto this process's device."""
        failure: UserError | None = None
        with self.accelerator.local_main_process_first():
            try:
                root = datafiles.prepare(self.cfg.data_dir(), self.cfg.data.source, log=self.print)
            except UserError as e:
                failure = e  # raised after the barrier, so the waiting processes are released
        if failure is not None:
            raise failure
        return data.load(root, train=train).to(self.device)

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (one tiny all-reduce with > 1 process)."""
        if self.world == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum").item())

    def facts(self, train: data.ShardedBatches) -> dict[str, Any]:
        """World size, device, precision and where each rank ran: gathered from all ranks, for run.json."""
        per_rank = gather_object([{"host": provenance.host(), "train_samples": train.samples_per_process()}])
        return {
            "world_size": self.world,
            "distributed_type": str(self.accelerator.distributed_type).split(".")[-1],
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "cpu": provenance.cpu(),  # the main process's: its kernels are what a bitwise claim holds for
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "precision": self.accelerator.mixed_precision,
            # What torch runs with now, after Accelerate's set-up: it must still be the decided count.
            "threads": {"count": torch.get_num_threads(), "source": self.threads.source},
            "hosts": sorted({r["host"] for r in per_rank}),
            "train_samples_per_process": [r["train_samples"] for r in per_rank],
        }

    def save_checkpoint(self, progress: checkpoint.Progress, keep: int) -> None:
        """Every process saves its part (Accelerate's save_state: weights, optimizer, RNGs, the member
        scaler) into the checkpoint folder that store/checkpoint.py seals and publishes."""

        def write_states(tmp: Path) -> None:
            self.accelerator.save_state(str(tmp), safe_serialization=True)

        checkpoint.save(
            self.run_dir, progress, keep, self.is_main, write_states, self.accelerator.wait_for_everyone
        )

    def tracker(self, cfg: TrainConfig, run_dir: Path) -> tracking.Tracker | tracking.NullTracker:
        """A run's (a member's) tracker, built by the Accelerator: real on the main process only."""
        if not self.is_main:
            return tracking.NullTracker()
        return tracking.Tracker(cfg, run_dir, self.accelerator, self.print)

    def close(self) -> None:
        """End trackers still open and destroy the process group, on every exit path."""
        with contextlib.suppress(Exception):
            self.accelerator.end_training()


class Engine(Processes):
    """The prepared model, its optimizer and the step, on the processes, from construction on."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        build_model: Callable[[], MnistPack],
        stop: StopFlag | None = None,
        optimizers: list[dict[str, Any]] | None = None,
    ) -> None:
        """`optimizers`: each member's optimizer settings (OptimizerConfig's dump); None: cfg's."""
        super().__init__(cfg, run_dir)
        try:
            self._prepare(build_model, stop, optimizers)
        except BaseException:
            self.close()  # the process group, if one was built
            raise

    def _prepare(self, build_model: Callable[[], MnistPack], stop: StopFlag | None, optimizers: Any) -> None:
        """The world checked against the config; the model (after seeding), its optimizer and the
        step functions."""
        cfg = self.cfg
        cfg.check_processes(
            self.world,
            f"the {self.world} processes",
            f"use a multiple of {self.world} so every process takes an equal share",
        )
        self.stop = stop or StopFlag(cfg.checkpoint.stop_check_steps)
        set_seed(cfg.seed)  # before the model is built: its initial weights follow the seed
        model = build_model()
        lrs = [torch.full((size,), cfg.phases[0].lr) for size in model.sizes]
        settings = optimizers or [cfg.optimizer.model_dump()] * len(model)
        optimizer = MemberOptimizer(model.member_parameters(), lrs, settings)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core: MnistPack = unwrap(self.model)  # its steps, its members
        # A GPU needs a pack's members in one batched matmul per product; on a CPU each member makes
        # its own products, bitwise its run alone (member_linear.py).
        self.core.batched = self.device.type == "cuda" and len(self.core) > 1
        # d total / d loss_i per member: 1, or 0 once frozen (so also who is alive). Backward takes it
        # as the losses' gradient: each member's gradient is its own loss's, a frozen member's none.
        self.loss_grad = torch.ones(len(self.core), device=self.device)
        self.scaler = MemberGradScaler.in_place_of(self.accelerator, self.optimizer, len(self.core))
        self.optimizer_step, self.zero_grad, self.backward = step_functions(
            self.accelerator, self.optimizer, self.scaler
        )
        self.graphs = cuda_graphs.StepGraphs(cuda_graphs.applies(cfg, self.device, self.world), self.print)

    def batches(self, split: data.MnistSplit, batch_size: int, shuffle: bool = False) -> data.ShardedBatches:
        """The split's global batches, each cut into this process's share; shuffled, each group of
        the pack draws its own order from its seed.

        Not Accelerate's prepared DataLoader: its split_batches mode pads the last global batch, so
        2 processes would train on 25,024 samples an epoch instead of 25,000 and drift from 1 process.
        """
        return data.ShardedBatches(
            split, batch_size, rank=self.rank, world=self.world, shuffle=shuffle, seeds=self.core.group_seeds
        )

    @torch.no_grad()
    def evaluate(self, val: data.ShardedBatches) -> list[dict[str, float]]:
        """Per member, exact mean loss and accuracy over every validation sample, whatever the
        process count."""
        self.model.eval()
        # Per member: loss sum, correct, samples.
        totals = torch.zeros(3, len(self.core), dtype=torch.float64, device=self.device)
        for xb, yb, _ in val:
            loss, correct = self.core.validation_step(self.model(xb), yb)
            totals[0] += loss
            totals[1] += correct
            totals[2] += yb.shape[0]
        sums, correct, n = self.accelerator.reduce(totals, reduction="sum").tolist()
        return [
            {"val_loss": s / k, "val_acc": c / k, "n_val_samples": int(k)}
            for s, c, k in zip(sums, correct, n, strict=True)
        ]

    def set_lrs(self, lrs: list[float]) -> None:
        """Each member's lr for the next steps; a frozen member's stays 0."""
        self.optimizer.optimizer.set_lrs(lrs, self.loss_grad)

    def freeze(self, members: list[int]) -> None:
        """Stop training these members (their loss went non-finite): lr 0 and out of the loss, so
        the others go on exactly as without them."""
        self.loss_grad[members] = 0.0
        self.set_lrs(self.optimizer.optimizer.host_lrs)
        self.graphs.reset()  # the optimizer's step selects members out now: captured without that

    @property
    def can_shrink(self) -> bool:
        """Whether members can leave the model (one process, no fp16 scaler): with several processes
        the wrapped model's parameters are fixed, so members that stop are frozen instead."""
        return self.world == 1 and self.scaler is None

    @property
    def can_move(self) -> bool:
        """Whether members can move to another pack: only with all they carry in their weights."""
        return self.can_shrink and not self.optimizer.optimizer.stateful

    def rearrange(
        self,
        members: list[int | dict[str, torch.Tensor]],
        seeds: list[int],
        optimizers: list[dict[str, Any]],
        *batches: data.ShardedBatches,
    ) -> None:
        """The pack becomes these members, in this order (MnistPack.relayout), with the optimizer and
        the loss: each the position of a member in it now (its weights, its lr and whether it is
        frozen carry over, and its optimizer state), or the weights (MnistModel's layout) of one that
        joins from another pack (alive, its lr set with the others' by the next `set_lrs`); `seeds`
        and `optimizers` (their settings) are theirs, and `batches` draw for the new groups. Each
        member is computed as before. Only where `can_shrink`."""
        optim = self.optimizer.optimizer
        states, alive, carried = [], [], []
        for at in members:
            if isinstance(at, int):
                states.append(self.core.member_state_dict(at))
                alive.append(self.loss_grad[at])
                carried.append(optim.member_state(at))
            else:
                states.append({k: v.to(self.device) for k, v in at.items()})
                alive.append(torch.ones((), device=self.device))
                carried.append(None)
        self.core.relayout(states, seeds)
        self.loss_grad = torch.stack(alive) if alive else torch.ones(0, device=self.device)
        optim.regroup(self.core.member_parameters(), self.core.sizes, optimizers, carried)
        for b in batches:
            b.seeds = tuple(self.core.group_seeds)
        self.graphs.reset()  # captured for the old shapes

    def fit(
        self,
        epochs: int,
        lrs: list[float],
        train: data.ShardedBatches,
        val: data.ShardedBatches,
        *,
        first_epoch: int,
        resume_at: ResumePoint = ResumePoint(),
    ) -> Iterator[EpochResult]:
        """`epochs` epochs at `lrs` (one per member) from `first_epoch` (entered at
        `resume_at`), yielding each. A member whose train_loss is not finite is for the caller to
        `freeze`.

        Raises Preempted at a step boundary when a stop was requested.
        """
        self.set_lrs(lrs)
        for epoch in range(first_epoch, first_epoch + epochs):
            start = time.perf_counter()
            train.set_epoch(epoch)
            train_loss = self._train_epoch(train, epoch, resume_at if epoch == first_epoch else ResumePoint())
            metrics = self.evaluate(val)
            yield EpochResult(epoch, metrics, train_loss, round(time.perf_counter() - start, 4))

    def _train_epoch(self, train: data.ShardedBatches, epoch: int, start: ResumePoint) -> list[float]:
        """One epoch of steps from `start`; returns each member's mean of its step losses (each a
        batch mean)."""
        model, core = self.model, self.core
        backward, optimizer_step, zero_grad = self.backward, self.optimizer_step, self.zero_grad
        model.train()
        k = self.cfg.grad_accum
        weights = train.loss_weights(k)
        last = len(weights) - 1
        graph = self.graphs.step_for(self.graph_buffers(), lambda: self._capture(train))
        losses: list[torch.Tensor] = []  # stacked once at the end: cheaper than an add per step
        check = self.stop.every if self.world > 1 else 1
        for i, (rows, size) in enumerate(data.epoch_steps(train, epoch, self.cfg.progress, self.is_main)):
            if i < start.step:  # resuming mid-epoch: same permutation, these steps are done
                continue
            if i > start.step and i % check == 0 and self._stop_agreed(epoch, i):
                # The mean of the processes' sums: what each of any number of them adds back on resume.
                so_far = self.accelerator.reduce(self._loss_sum(losses, graph, start), reduction="sum")
                raise Preempted(epoch, ResumePoint(i, tuple((so_far / self.world).tolist())))
            if graph is not None and size == train.batch_size:
                graph.replay(rows)
                continue
            if graph is not None:  # grads of the graph's last replay must not leak into this step
                zero_grad()
            steps_now = k == 1 or (i + 1) % k == 0 or i == last
            xb, yb = train.batch(rows)
            # Skip the gradient all-reduce on micro-batches that do not end an optimizer step.
            with contextlib.nullcontext() if steps_now else self.accelerator.no_sync(model):
                loss = core.training_step(model(xb), yb)
                backward(loss, gradient=self.loss_grad if weights[i] == 1.0 else self.loss_grad * weights[i])
            losses.append(loss.detach())
            if steps_now:
                optimizer_step()
                zero_grad()
        totals = self.accelerator.reduce(self._loss_sum(losses, graph, start), reduction="sum")
        return (totals / (len(weights) * self.world)).tolist()

    def _capture(self, train: data.ShardedBatches) -> cuda_graphs.CapturedStep:
        """The full-batch step, captured (cuda_graphs.py): no host sync in it (frozen members are left
        out by the device's `loss_grad`, not by asking which they are)."""

        def step(rows: torch.Tensor) -> torch.Tensor:  # one process, full batch: the loss weight is 1
            xb, yb = train.batch(rows)
            loss = self.core.training_step(self.model(xb), yb)
            self.backward(loss, gradient=self.loss_grad)
            self.optimizer_step()
            return loss.detach()

        shape = (len(self.core.group_seeds), train.batch_size)
        restored = [*self.model.parameters(), *self.optimizer.optimizer.tensors()]
        return cuda_graphs.CapturedStep(
            step, shape, len(self.core), self.graph_buffers(), restored, self.zero_grad, self.device
        )

    def graph_buffers(self) -> list[torch.Tensor]:
        """The tensors a captured step reads by address that the engine may replace: the lrs and the
        optimizer's other tensors (a checkpoint load brings new ones). `loss_grad` and the weights are
        only ever changed in place."""
        groups = self.optimizer.param_groups
        return [t for group in groups for key, t in group.items() if key != "params" and torch.is_tensor(t)]

    def _loss_sum(
        self, losses: list[torch.Tensor], graph: cuda_graphs.CapturedStep | None, start: ResumePoint
    ) -> torch.Tensor:
        """Per member, the epoch's step losses so far, summed in float64 on the device, with those
        before `start`."""
        n = len(self.core)
        total = torch.tensor(start.loss_sums or [0.0] * n, dtype=torch.float64).to(self.device)
        if losses:  # [steps, members]
            total = total + torch.stack(losses).double().sum(0)
        if graph is not None:
            total = total + graph.take_loss_sum()
        return total

    def _stop_agreed(self, epoch: int, step: int) -> bool:
        """True on every process once any process was asked to stop."""
        return self.any_process(self.stop.poll(epoch, step))

    def end_facts(self) -> list[dict[str, Any]]:
        """Per member, for run.json at the end: whether the CUDA-graph step was captured and how often it
        replayed (a graph that silently never captured runs eagerly and looks like a pass), and with fp16
        the member's loss scale and skipped steps."""
        graphs = self.graphs.report()
        if self.scaler is None:
            return [{"cuda_graphs": graphs} for _ in range(len(self.core))]
        return [{"cuda_graphs": graphs, "grad_scaler": s} for s in self.scaler.report()]

    def load_checkpoint(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.accelerator.load_state(str(path))
        self.graphs.reset()  # captured against the old weights and state: capture again

    def state_dict(self, member: int = 0) -> dict[str, torch.Tensor]:
        """One member's weights, in MnistModel's layout (model.safetensors)."""
        return self.core.member_state_dict(member)
