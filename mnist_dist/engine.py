"""The training engine: the one place that talks to Accelerate (device, processes, precision, trackers).

The tutorial's `evaluate` and `fit` live here, written once for every topology: one CPU process, one
GPU, N processes on a node, N nodes. Per step there is no host sync: metrics are accumulated on the
device and read once per epoch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed

from mnist_dist import checkpoint, data, tracking
from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.model import MnistModel


class Preempted(Exception):
    """Training stopped at a step boundary because a stop was requested (SIGUSR2/SIGTERM, drill)."""

    def __init__(self, epoch: int, step: int, losses_sum: float) -> None:
        super().__init__(f"stopped in epoch {epoch} before step {step}")
        self.epoch, self.step, self.losses_sum = epoch, step, losses_sum


class StopFlag:
    """Set from a signal handler (only a flag: the save happens at the next step boundary), or at a
    chosen (epoch, step) for the preemption drill. With several processes it is all-reduced every
    `every` steps, so all of them stop at the same step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.requested = False
        self.at: tuple[int, int] | None = None

    def request(self, *_: Any) -> None:
        self.requested = True

    def poll(self, epoch: int, step: int) -> bool:
        if self.at is not None and (epoch, step) >= self.at:
            self.requested = True
        return self.requested


def _accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no GPU is visible; use --device auto or cpu")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("precision 'fp16' needs a GPU (no fp16 autocast on CPU); use --precision bf16 or no")
    log_with = [] if cfg.tracker == "none" else [cfg.tracker]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Accelerator(
            # Without cpu=True, a CPU-only `accelerate launch --multi_gpu` run would report 1 process.
            cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
            mixed_precision=cfg.precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
            ),
        )


class Engine:
    """Owns the Accelerator; everything that depends on the device or the process count goes through it."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.accelerator = _accelerator(cfg, run_dir)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if cfg.batch_size % self.world:
            raise UserError(
                f"batch_size {cfg.batch_size} is not divisible by the {self.world} processes; "
                f"use a multiple of {self.world} so every process takes an equal share"
            )
        self.wandb_mode: str | None = None
        self._graph: _CapturedStep | None = None
        self._graphs_failed = False
        self.stop = StopFlag(cfg.checkpoint.stop_check_steps)
        self.logged_through = -1  # last epoch the tracker has
        set_seed(cfg.seed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args: Any) -> None:
        # Global rank 0 only: accelerator.print prints once per node, so N nodes would repeat each line.
        if self.is_main:
            print(*args, flush=True)

    # --- data and model ---------------------------------------------------------------------------

    def load_data(self, train: bool = True) -> data.MnistSplit:
        """MNIST prepared once per node (the others wait), loaded onto this process's device."""
        data_dir = self.cfg.data_dir()
        failure: UserError | None = None
        with self.accelerator.local_main_process_first():
            try:
                root = data.prepare(data_dir, self.cfg.data.source, log=self.print)
            except UserError as e:
                failure = e  # raised after the barrier, so the waiting processes are released
        if failure is not None:
            raise failure
        return data.load(root, train=train).to(self.device)

    def loaders(
        self, train: data.MnistSplit, val: data.MnistSplit
    ) -> tuple[data.ShardedBatches, data.ShardedBatches]:
        """Training and validation batches, each global batch cut into this process's share.

        Not Accelerate's prepared DataLoader: its split_batches mode pads the last global batch, so
        2 processes would train on 25,024 samples an epoch instead of 25,000 and drift from 1 process.
        """
        train_batches = data.ShardedBatches(
            train, self.cfg.batch_size, rank=self.rank, world=self.world, shuffle=True, seed=self.cfg.seed
        )
        val_batches = data.ShardedBatches(val, self.cfg.val_batch_size, rank=self.rank, world=self.world)
        return train_batches, val_batches

    @property
    def _foreach(self) -> bool:
        # What torch's default (None) picks: multi-tensor kernels on a GPU, a loop over the tensors on
        # a CPU. Left at None it decides again on every step, ~20 us (4% of this model's CPU step).
        return self.device.type == "cuda"

    def prepare(self, model: MnistModel, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, foreach=self._foreach)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core: MnistModel = self.accelerator.unwrap_model(self.model)
        # AcceleratedOptimizer.step() searches sys.path for the lomo_optim package twice per call,
        # zero_grad() inspects a signature and Accelerator.backward() divides the loss by 1: ~0.3 ms
        # a step, more than half this model's whole step on a CPU. Without a grad scaler (fp16) they
        # add nothing else, so call what they wrap.
        plain = self.optimizer.scaler is None and self.accelerator.distributed_type != DistributedType.XLA
        stepper = self.optimizer.optimizer if plain else self.optimizer
        self.optimizer_step = stepper.step
        self.zero_grad = functools.partial(stepper.zero_grad, set_to_none=True)
        self.backward = torch.Tensor.backward if plain else self.accelerator.backward
        return self.model, self.optimizer

    # --- the tutorial's evaluate and fit --------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, val: data.ShardedBatches) -> dict[str, float]:
        """Exact mean loss and accuracy over every validation sample, whatever the process count."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, samples
        for xb, yb, _ in val:
            loss, correct = self.core.validation_step(self.model(xb), yb)
            totals[0] += loss
            totals[1] += correct
            totals[2] += yb.shape[0]
        loss_sum, correct, n = self.accelerator.reduce(totals, reduction="sum").tolist()
        return {"val_loss": loss_sum / n, "val_acc": correct / n, "n_val_samples": int(n)}

    def fit(
        self,
        epochs: int,
        lr: float,
        train: data.ShardedBatches,
        val: data.ShardedBatches,
        *,
        phase: int,
        first_epoch: int,
        resume_at: tuple[int, float] = (0, 0.0),
    ) -> Iterator[dict[str, Any]]:
        """`epochs` epochs of SGD at `lr`, yielding one history entry per epoch.

        resume_at = (step, sum of the step losses before it) continues the first epoch mid-way.
        Raises Preempted at a step boundary when a stop was requested, FloatingPointError on a
        non-finite loss (before the entry is yielded, so no checkpoint of it is written).
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for epoch in range(first_epoch, first_epoch + epochs):
            start = time.perf_counter()
            train.set_epoch(epoch)
            train_loss = self._train_epoch(train, epoch, *(resume_at if epoch == first_epoch else (0, 0.0)))
            entry = {
                "phase": phase,
                "epoch": epoch,
                "lr": lr,
                **self.evaluate(val),
                "train_loss": train_loss,
                "seconds": round(time.perf_counter() - start, 4),
            }
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"training loss is {train_loss} in phase {phase + 1}, epoch {epoch}, lr {lr:g}"
                )
            yield entry

    def _train_epoch(
        self, train: data.ShardedBatches, epoch: int, start_step: int, prior_sum: float
    ) -> float:
        model, core, accelerator = self.model, self.core, self.accelerator
        backward, optimizer_step, zero_grad = self.backward, self.optimizer_step, self.zero_grad
        model.train()
        k = self.cfg.grad_accum
        sizes = train.global_sizes()
        # Each process's loss is the mean over its share; weighting it by world x share / (samples in
        # the optimizer step) makes the gradient averaged across processes the exact mean over the
        # global batch, short or full. With equal shares and no accumulation the weight is 1.
        window = [sum(sizes[i - i % k : i - i % k + k]) for i in range(len(sizes))]
        weights = [
            self.world * (stop - start) / w
            for (start, stop), w in zip(
                (data.share(n, self.rank, self.world) for n in sizes), window, strict=True
            )
        ]
        last = len(sizes) - 1
        graph = self._captured_step(train)
        losses: list[torch.Tensor] = []  # stacked once at the end: cheaper than an add per step

        def losses_so_far() -> torch.Tensor:
            """Sum of this epoch's per-step losses so far (float64, on the device)."""
            if graph is not None:
                losses.append(graph.take_loss_sum())
            total = torch.stack(losses).double().sum() if losses else torch.zeros((), dtype=torch.float64)
            return total.to(self.device) + prior_sum

        check = self.stop.every if self.world > 1 else 1
        for i, (rows, size) in enumerate(self._progress(train.indices(), len(train), epoch)):
            if i < start_step:  # resuming mid-epoch: same permutation, these steps are done
                continue
            if i > start_step and i % check == 0 and self._stop_agreed(epoch, i):
                raise Preempted(epoch, i, float(losses_so_far()))
            if graph is not None and size == train.batch_size:
                graph.replay(rows)
                continue
            if graph is not None:  # grads of the graph's last replay must not leak into this step
                zero_grad()
            steps_now = k == 1 or (i + 1) % k == 0 or i == last
            xb, yb = train.batch(rows)
            # Skip the gradient all-reduce on micro-batches that do not end an optimizer step.
            with contextlib.nullcontext() if steps_now else accelerator.no_sync(model):
                loss = core.training_step(model(xb), yb)
                backward(loss if weights[i] == 1.0 else loss * weights[i])
            losses.append(loss.detach())
            if steps_now:
                optimizer_step()
                zero_grad()
        # The mean of the per-step losses (each the mean over a batch), as the tutorial would average them.
        totals = accelerator.reduce(losses_so_far(), reduction="sum")
        return totals.item() / (len(sizes) * self.world)

    def _stop_agreed(self, epoch: int, step: int) -> bool:
        """True on every process once any process was asked to stop (all-reduced with > 1 process)."""
        flag = self.stop.poll(epoch, step)
        if self.world == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum").item())

    def save_checkpoint(self, run_dir: Path, progress: checkpoint.Progress, keep: int) -> None:
        """Every process saves its part (Accelerate's save_state) into a temporary folder; the main
        process seals it with hashes and renames it into place."""
        tmp = checkpoint.temporary(run_dir, progress)
        if self.is_main:
            checkpoint.folder(run_dir).mkdir(mode=0o700, exist_ok=True)  # weights, RNG states: owner only
            checkpoint.clear_temporaries(run_dir)
            tmp.mkdir(mode=0o700)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpoint.seal(tmp, progress)
            checkpoint.publish(tmp, run_dir, progress, keep)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.accelerator.load_state(str(path))
        for group in self.optimizer.param_groups:  # the saved groups bring the saving device's choice
            group["foreach"] = self._foreach
        self._graph = None  # captured against the old lr and state: capture again

    def _captured_step(self, train: data.ShardedBatches) -> _CapturedStep | None:
        """The CUDA-graph step for this lr, captured on first use; None where graphs do not apply."""
        if self._graphs_failed or not self._graphs_apply():
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        if self._graph is None or self._graph.lr != lr:
            try:
                self._graph = _CapturedStep(self, train, lr)
            except RuntimeError as e:  # a capture this stack cannot do: train eagerly, same numbers
                self.print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
                self._graphs_failed = True
                return None
        return self._graph

    def _graphs_apply(self) -> bool:
        """One process on a GPU, full precision, no accumulation: a full step is then one graph."""
        cfg = self.cfg
        return (
            cfg.cuda_graphs == "auto"
            and self.device.type == "cuda"
            and self.world == 1
            and cfg.precision == "no"
            and cfg.grad_accum == 1
        )

    def _progress(self, steps: Any, total: int, epoch: int) -> Any:
        show = {"on": True, "off": False, "auto": sys.stdout.isatty()}[self.cfg.progress]
        if not (show and self.is_main):
            return steps
        from tqdm.auto import tqdm

        return tqdm(steps, total=total, desc=f"epoch {epoch}", leave=False, mininterval=0.5)

    # --- facts, trackers, cleanup -----------------------------------------------------------------

    def facts(self, train: data.ShardedBatches) -> dict[str, Any]:
        """World size, device, precision and where each rank ran: computed on all ranks, for run.json."""
        # Under Slurm the node's name, not the machine's: test clusters run several nodes on one host.
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        per_rank = gather_object([{"host": host, "train_samples": train.samples_per_process()}])
        return {
            "world_size": self.world,
            "distributed_type": str(self.accelerator.distributed_type).split(".")[-1],
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": self.accelerator.mixed_precision,
            "hosts": sorted({r["host"] for r in per_rank}),
            "train_samples_per_process": [r["train_samples"] for r in per_rank],
        }

    def start_tracking(self, run_id: str | None = None) -> dict[str, Any]:
        """Start the configured tracker on the main process; any failure degrades, never aborts."""
        cfg = self.cfg
        if cfg.tracker == "none" or not self.is_main:
            return {"tracker": cfg.tracker if self.is_main else None}
        mode = tracking.wandb_mode(cfg.wandb.mode) if cfg.tracker == "wandb" else "local"
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self.accelerator.trackers = []
                self.accelerator.init_trackers(
                    cfg.wandb.project,
                    config=tracking.tracker_config(cfg),
                    init_kwargs=tracking.init_kwargs(cfg, self.run_dir, attempt, run_id),
                )
                self.wandb_mode = attempt if cfg.tracker == "wandb" else None
                info = self._tracker_info()
                self.logged_through = self._last_logged_epoch(info.get("run_id"))
                return info
            except Exception as e:
                self.print(f"warning: {cfg.tracker} tracker ({attempt}) did not start: {e}".splitlines()[0])
        self.accelerator.trackers = []
        self.accelerator.log_with = []
        return {"tracker": "none", "tracker_failed": cfg.tracker}

    def _tracker_info(self) -> dict[str, Any]:
        if self.cfg.tracker != "wandb":
            return {"tracker": self.cfg.tracker, "dir": str(self.run_dir / "tensorboard")}
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        return {
            "tracker": "wandb",
            "mode": self.wandb_mode,
            "run_id": run.id,
            "dir": str(Path(run.dir).parent),
        }

    def _last_logged_epoch(self, run_id: str | None) -> int:
        """The last epoch this W&B run already has (resumed runs): from its earlier offline files, or
        from the summary an online run resumes with."""
        if self.cfg.tracker != "wandb" or run_id is None:
            return -1
        last = tracking.last_logged_epoch(self.run_dir, run_id)
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        with contextlib.suppress(Exception):
            last = max(last, int(run.summary.get("epoch", -1)))
        return last

    def log(self, entry: dict[str, Any]) -> None:
        """Send an entry to the tracker, once: epochs it already has (before a resume) are skipped."""
        if not self.accelerator.trackers or entry["epoch"] <= self.logged_through:
            return
        try:
            self.accelerator.log(tracking.entry_metrics(entry), step=entry["epoch"])
            self.logged_through = entry["epoch"]
        except Exception as e:
            self.print(f"warning: tracker log failed: {e}".splitlines()[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.model)

    def close(self) -> None:
        """End trackers and destroy the process group, on every exit path."""
        with contextlib.suppress(Exception):
            self.accelerator.end_training()


class _CapturedStep:
    """One full-batch training step (gather, forward, backward, SGD update, loss sum) captured once as
    a CUDA graph and replayed. For a model this small a step is ~25 tiny kernels, and launching them
    one by one from Python costs more than running them; a replay launches them all at once.
    The lr is baked into the graph, so each phase captures its own.
    """

    def __init__(self, engine: Engine, train: data.ShardedBatches, lr: float) -> None:
        self.lr = lr
        model, core = engine.model, engine.core
        self.rows = torch.zeros(train.batch_size, dtype=torch.long, device=engine.device)
        # float64, as the eager path sums its step losses, so both give the same train_loss.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)

        def step() -> None:
            xb, yb = train.batch(self.rows)
            loss = core.training_step(model(xb), yb)
            engine.backward(loss)  # one process, full batch: the weight is 1
            engine.optimizer_step()
            self.loss_sum += loss.detach().double()

        # The warm-up trains, so put the weights back afterwards, also when capture fails and the
        # engine falls back to eager steps.
        saved = [p.detach().clone() for p in model.parameters()]
        try:
            self._replay = _capture(step, engine.zero_grad)
        finally:
            with torch.no_grad():
                for p, v in zip(model.parameters(), saved, strict=True):
                    p.copy_(v)
            self.loss_sum.zero_()

    def replay(self, rows: torch.Tensor) -> None:
        self.rows.copy_(rows)
        self._replay()

    def take_loss_sum(self) -> torch.Tensor:
        total = self.loss_sum.clone()
        self.loss_sum.zero_()
        return total


def _capture(step: Callable[[], None], zero_grad: Callable[[], None]) -> Callable[[], None]:
    """Warm `step` up on a side stream (capture requires it), capture one call of it as a CUDA graph
    and return the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            zero_grad()
            step()
    torch.cuda.current_stream().wait_stream(side)
    # Grads set to None, so backward allocates them in the graph's pool and each replay overwrites them.
    zero_grad()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def evaluate_weights(
    cfg: TrainConfig, state_dict: dict[str, torch.Tensor], train: bool = False
) -> dict[str, float]:
    """Loss and accuracy of saved weights on the MNIST test set (train=False), in this one process."""
    engine = Engine(cfg.model_copy(update={"tracker": "none"}), Path("."))
    try:
        split = engine.load_data(train=train)
        model = MnistModel(cfg.model.hidden_size)
        model.load_state_dict(state_dict)
        engine.prepare(model, lr=cfg.phases[0].lr)
        batches = data.ShardedBatches(split, cfg.val_batch_size, rank=engine.rank, world=engine.world)
        metrics = engine.evaluate(batches)
    finally:
        engine.close()
    return {"loss": metrics["val_loss"], "acc": metrics["val_acc"], "n_samples": metrics["n_val_samples"]}
