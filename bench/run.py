"""Benchmark mnist-dist against the tutorial as written, a bare PyTorch loop and Lightning's Trainer.

    python bench/run.py                     # 5 alternating repetitions of each contender, 5 accuracy seeds
    python bench/run.py --quick             # 1 repetition, 2 epochs: proves the benchmark runs (CI)
    python bench/run.py --device cuda       # the same on a GPU (see bench/gpu.sh)

Contenders run as separate processes, alternating (A B C D A B C D ...) so drift in the machine hits
all of them alike. Per contender: training time (initial evaluation + all epochs, measured inside the
process), whole-process wall time and peak RSS (measured here, from os.wait4), final val_acc; then
medians and ratios to the fastest. Also `mnist-dist --help` start-up against `python -c "import
torch"`, 2 gloo processes against 1, two jobs at once on the cores against one alone (locally and,
when a Slurm cluster answers, as 1-task jobs), and the final val_acc over several seeds. Writes
results.json and RESULTS.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable


def run_wait4(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd; wall seconds, peak RSS in MiB (os.wait4: this process and the children it waited for)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "wall_seconds": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": proc.returncode,
            "stdout": out.read(),
            "stderr": err.read(),
        }


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line")


def train_args(
    args: argparse.Namespace, out: Path, *extra: str, device: str | None = None, tracker: str = "none"
) -> list[str]:
    """`python` arguments of one `mnist-dist train` of the seed config."""
    return [
        "-m",
        "mnist_dist.cli",
        "train",
        "-c",
        str(ROOT / "configs/seed.yaml"),
        "--phases",
        args.phases,
        "--tracker",
        tracker,
        "--progress",
        "off",
        "--data-dir",
        str(args.data_dir),
        "--device",
        device or args.device,
        "--output-dir",
        str(out),
        *extra,
    ]


class Contender:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))

    def command(self, rep: int) -> tuple[list[str], dict[str, str]]:
        a = self.args
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        ref = ["--data-dir", str(a.data_dir), "--phases", a.phases, "--device", a.device]
        if self.name.startswith("mnist-dist"):
            full = self.name == "mnist-dist+wandb+ckpt"
            tracker = "wandb" if full else "none"
            out = self.tmp / f"run{rep}"
            # The plain row: tracker and checkpoints off; the full row: W&B offline, a checkpoint
            # every epoch (the default).
            cmd = [
                PY,
                *train_args(a, out, "--set", f"checkpoint.every_epochs={int(full)}", tracker=tracker),
            ]
            return cmd, env
        script = {"tutorial": "tutorial.py", "bare loop": "bare_loop.py", "lightning": "lightning_mnist.py"}
        return [PY, str(BENCH / script[self.name]), *ref], env

    def result(self, rep: int, measured: dict[str, Any]) -> dict[str, Any]:
        if measured["returncode"] != 0:
            raise RuntimeError(
                f"{self.name} failed ({measured['returncode']}):\n{measured['stderr'][-3000:]}"
            )
        if self.name.startswith("mnist-dist"):
            run_dir = self.tmp / f"run{rep}"
            run = json.loads((run_dir / "run.json").read_text())
            history = json.loads((run_dir / "history.json").read_text())
            inner = {"train_seconds": run["train_seconds"], "val_acc": history[-1]["val_acc"]}
        else:
            inner = last_json(measured["stdout"])
        return {
            "train_seconds": inner["train_seconds"],
            "wall_seconds": measured["wall_seconds"],
            "peak_rss_mib": measured["peak_rss_mib"],
            "val_acc": inner["val_acc"],
        }


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def machine() -> dict[str, Any]:
    import torch

    from mnist_dist.store import provenance

    cpu = provenance.cpu()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "cpu_capability": cpu["capability"],
        "blas": cpu["blas"],
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """The CPU (vendor, torch's capability, BLAS), cores, GPU and torch, in one line."""
    kernels = f"{m.get('cpu_vendor', '?')}, {m.get('cpu_capability', '?')}, BLAS {m.get('blas', '?')}"
    cpu = f"{m['cpu']} ({kernels})"
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{cpu}, {m['cores']} cores{gpu}, torch {m['torch']}"


def startup(reps: int) -> dict[str, float]:
    script = Path(PY).with_name("mnist-dist")
    # Where the package is on PYTHONPATH but not installed (the GPU machine), time the module instead.
    cli = [str(script)] if script.exists() else [PY, "-m", "mnist_dist.cli"]
    times: dict[str, list[float]] = {"mnist-dist --help": [], 'python -c "import torch"': []}
    for _ in range(reps):
        times["mnist-dist --help"].append(run_wait4([*cli, "--help"])["wall_seconds"])
        times['python -c "import torch"'].append(run_wait4([PY, "-c", "import torch"])["wall_seconds"])
    return {k: statistics.median(v) for k, v in times.items()}


def two_processes(args: argparse.Namespace) -> dict[str, Any]:
    """1 process vs 2 gloo processes on this CPU, same config: time and history difference."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-2proc-"))
    launch = str(Path(PY).with_name("accelerate"))
    one = run_wait4([PY, *train_args(args, tmp / "one", device="cpu")])
    two = run_wait4(
        [
            launch,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            *train_args(args, tmp / "two", device="cpu"),
        ]
    )
    for r in (one, two):
        if r["returncode"]:
            raise RuntimeError(r["stderr"][-3000:])
    h1 = json.loads((tmp / "one/history.json").read_text())
    h2 = json.loads((tmp / "two/history.json").read_text())
    diff = max(abs(a[k] - b[k]) for a, b in zip(h1, h2, strict=True) for k in ("val_loss", "val_acc"))
    runs = [json.loads((tmp / d / "run.json").read_text()) for d in ("one", "two")]
    return {
        "1 process train_seconds": runs[0]["train_seconds"],
        "2 processes train_seconds": runs[1]["train_seconds"],
        "1 process wall_seconds": one["wall_seconds"],
        "2 processes wall_seconds": two["wall_seconds"],
        "max history difference": diff,
    }


def _train_seconds(run_dir: Path) -> float:
    run = json.loads((run_dir / "run.json").read_text())
    if run["status"] != "completed":
        raise RuntimeError(f"{run_dir}: {run['status']} {run.get('error', '')}")
    return run["train_seconds"]


def _at_once(commands: list[list[str]]) -> None:
    """Start the commands together and wait for all; if one fails, stop the others and raise."""
    with tempfile.TemporaryDirectory() as logs:
        errs = [Path(logs) / f"{i}.err" for i in range(len(commands))]
        procs = [
            subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=e.open("w"))
            for c, e in zip(commands, errs, strict=True)
        ]
        try:
            for proc, err in zip(procs, errs, strict=True):
                if proc.wait():
                    raise RuntimeError(err.read_text()[-3000:])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _overlapped(run_dirs: list[Path]) -> bool:
    """Whether the runs' start-to-end spans (run.json, to the second) share a moment."""
    spans = [json.loads((d / "run.json").read_text()) for d in run_dirs]
    return max(s["start_time"] for s in spans) <= min(s["end_time"] for s in spans)


def _slurm_jobs(args: argparse.Namespace, outs: list[Path]) -> list[float]:
    """1-task jobs with `mnist-dist submit`'s default options, submitted together: their training
    seconds. Run dirs under /tmp (--allow-local): this is for a one-machine cluster such as
    slurm/cluster.sh's. Jobs still queued or running when this fails are cancelled."""
    cli = [PY, "-m", "mnist_dist.cli"]
    ids: list[str] = []
    try:
        for out in outs:
            cmd = [*cli, "submit", *train_args(args, out, device="cpu")[3:], "--allow-local", "--json"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            ids.append(json.loads(proc.stdout)["job_id"])
        deadline = time.monotonic() + 900
        for job in ids:
            while True:
                cmd = [*cli, "status", job, "--json"]
                status = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if json.loads(status.stdout or "{}").get("finished"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Slurm job {job} did not finish in 900 s")
                time.sleep(1)
        return [_train_seconds(out) for out in outs]
    except BaseException:
        subprocess.run(["scancel", *ids], capture_output=True)
        raise


def shared_cores(args: argparse.Namespace) -> dict[str, Any]:
    """Two jobs at once on this machine's cores against one alone: each job's training seconds.

    Locally, `mnist-dist train` takes the cores of its affinity mask, so two at once ask for twice the
    cores (and `--threads 1` is what a user sharing them would pass). On Slurm, 1-task jobs ask for
    `--cpus-per-task` (1 by default on CPU) and their threads follow it."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    run = [PY, *train_args(args, tmp / "alone", device="cpu")]
    if run_wait4(run)["returncode"]:
        raise RuntimeError("the lone local run failed")
    out: dict[str, Any] = {"local, alone": [_train_seconds(tmp / "alone")]}
    pairs = [("local, 2 at once", ()), ("local, 2 at once, --threads 1", ("--threads", "1"))]
    for label, extra in pairs[1:] if args.quick else pairs:  # --quick: the pair a user sharing cores runs
        dirs = [tmp / f"{label}-{i}".replace(" ", "").replace(",", "") for i in range(2)]
        _at_once([[PY, *train_args(args, d, *extra, device="cpu")] for d in dirs])
        out[label] = [_train_seconds(d) for d in dirs]
    out["local, 2 at once, overlapped"] = _overlapped(dirs)
    if shutil.which("sbatch") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        out["slurm 1-task job, alone"] = _slurm_jobs(args, [tmp / "job-alone"])
        pair = [tmp / "job-a", tmp / "job-b"]
        out["slurm, 2 1-task jobs at once"] = _slurm_jobs(args, pair)
        # Slurm may run them one after the other (no free CPU): then "at once" is not what was measured.
        out["slurm, 2 at once, overlapped"] = _overlapped(pair)
    return out


def seeds(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-seeds-"))
    accs = []
    for seed in range(args.seeds):
        out = tmp / f"s{seed}"
        r = run_wait4([PY, *train_args(args, out, "--seed", str(seed))])
        if r["returncode"]:
            raise RuntimeError(r["stderr"][-3000:])
        accs.append(json.loads((out / "history.json").read_text())[-1]["val_acc"])
    return {
        "seeds": list(range(args.seeds)),
        "final_val_acc": accs,
        "median": statistics.median(accs),
        "min": min(accs),
    }


def markdown(results: dict[str, Any]) -> str:
    m, rows = results["machine"], results["contenders"]
    fastest_train = min(r["train_seconds"] for r in rows.values())
    fastest_wall = min(r["wall_seconds"] for r in rows.values())
    lines = [
        f"# Benchmark ({results['mode']}, {results['reps']} repetitions, phases {results['phases']}, "
        f"device {results['device']})",
        "",
        f"Machine: {machine_line(m)}; Python {m['python']}; {results['date']}.",
        "",
        "| contender | training s (median) | x fastest | whole process s | x fastest | peak RSS MiB "
        "| final val_acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['train_seconds']:.3f} | {r['train_seconds'] / fastest_train:.2f} | "
            f"{r['wall_seconds']:.2f} | {r['wall_seconds'] / fastest_wall:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['val_acc']:.4f} |"
        )
    s = results.get("startup", {})
    lines += ["", "| start-up | median s |", "|---|---|"] + [f"| `{k}` | {v:.3f} |" for k, v in s.items()]
    if results.get("skipped"):
        lines += ["", "Not run, for the time budget: " + "; ".join(results["skipped"]) + "."]
    if "two_processes" in results:
        t = results["two_processes"]
        lines += ["", "| 1 vs 2 gloo processes | value |", "|---|---|"] + [
            f"| {k} | {v:.3g} |" for k, v in t.items()
        ]
    if "shared_cores" in results:
        shared = results["shared_cores"]
        alone = shared["local, alone"][0]
        lines += ["", "| jobs on the same cores | training s of each | x one local job alone |"]
        lines += ["|---|---|---|"]
        lines += [
            f"| {k} | {', '.join(f'{x:.2f}' for x in v)} | {max(v) / alone:.2f} |"
            for k, v in shared.items()
            if isinstance(v, list)
        ]
        overlap = {k: v for k, v in shared.items() if isinstance(v, bool)}
        said = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in overlap.items())
        lines += ["", f"Ran at the same time: {said}."]
    if "seeds" in results:
        a = results["seeds"]
        lines += [
            "",
            f"Final val_acc over seeds {a['seeds']}: {', '.join(f'{x:.4f}' for x in a['final_val_acc'])} "
            f"(median {a['median']:.4f}, min {a['min']:.4f}).",
        ]
    if "targets" in results:
        lines += ["", "| target | value | met |", "|---|---|---|"] + [
            f"| {k} | {v['value']:.3f} | {'yes' if v['met'] else 'NO'} |"
            for k, v in results["targets"].items()
        ]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> dict[str, Any]:
    c = results["contenders"]
    md, bare = c["mnist-dist"], c["bare loop"]
    out = {
        "training / bare loop (≤ 1.10)": (md["train_seconds"] / bare["train_seconds"], 1.10, "le"),
        "whole process / bare loop (≤ 1.3)": (md["wall_seconds"] / bare["wall_seconds"], 1.3, "le"),
        "peak RSS GiB (≤ 1.0)": (md["peak_rss_mib"] / 1024, 1.0, "le"),
        "--help / import torch (< 0.333)": (
            results["startup"]["mnist-dist --help"] / results["startup"]['python -c "import torch"'],
            1 / 3,
            "lt",
        ),
    }
    if "lightning" in c:
        out["training / lightning (< 1)"] = (md["train_seconds"] / c["lightning"]["train_seconds"], 1.0, "lt")
    if "tutorial" in c:
        out["tutorial / training (≥ 10)"] = (c["tutorial"]["train_seconds"] / md["train_seconds"], 10.0, "ge")
    shared = results.get("shared_cores", {})
    if "slurm, 2 1-task jobs at once" in shared:
        alone = shared["local, alone"][0]
        out["slurm: 2 jobs at once / one local job (≤ 2)"] = (
            max(shared["slurm, 2 1-task jobs at once"]) / alone,
            2.0,
            "le",
        )
        lone_job = shared["slurm 1-task job, alone"][0]
        out["slurm: 1-task job / one local job (≤ 1.2)"] = (lone_job / alone, 1.2, "le")
    if "seeds" in results:
        out["median val_acc over seeds (≥ 0.962)"] = (results["seeds"]["median"], 0.962, "ge")
        out["min val_acc over seeds (≥ 0.955)"] = (results["seeds"]["min"], 0.955, "ge")
    ops = {"le": lambda v, t: v <= t, "lt": lambda v, t: v < t, "ge": lambda v, t: v >= t}
    return {k: {"value": v, "target": t, "met": ops[op](v, t)} for k, (v, t, op) in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, 1 epoch per phase, 1 seed, start-up once, two jobs at once only with --threads 1",
    )
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DIST_DATA_DIR", "data")))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    p.add_argument("--no-two-processes", action="store_true")
    p.add_argument("--no-shared-cores", action="store_true", help="skip two jobs at once on the cores")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--budget", type=float, help="seconds: start no run that would end after them")
    p.add_argument("--if-time", default="", help="contenders run once at the end, if the budget holds them")
    args = p.parse_args()
    args.phases = "1x0.5,1x0.1" if args.quick else "5x0.5,5x0.1"
    if args.quick:
        args.reps, args.seeds = 1, 1

    subprocess.run(
        [PY, "-m", "mnist_dist.cli", "data", "prepare", "--data-dir", str(args.data_dir)],
        check=True,
        cwd=ROOT,
    )
    names = ["mnist-dist", "mnist-dist+wandb+ckpt", "bare loop", "lightning", "tutorial"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    later = [n for n in args.if_time.split(",") if n and n not in names]
    clock = Budget(args.budget)
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "reps": args.reps,
        "phases": args.phases,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "skipped": [],
    }
    for rep in range(args.reps):
        for c in [Contender(n, args) for n in names]:
            measure(c, rep, rows, results, clock, args)
    for name in later:  # one run each, after the others, if the time left holds one
        rows[name] = []
        measure(Contender(name, args), 0, rows, results, clock, args)
    if clock.left() > 60 or args.budget is None:
        results["startup"] = startup(1 if args.quick else 7)
    if not args.no_two_processes and args.device != "cuda":
        results["two_processes"] = two_processes(args)
    if not args.no_shared_cores and args.device != "cuda":
        results["shared_cores"] = shared_cores(args)
    if args.seeds > 1:
        results["seeds"] = seeds(args)
    write(results, rows, args.out)
    print(markdown(results))


class Budget:
    """Seconds from now within which the benchmark must end (None: no limit): a run is started only
    when one like the longest seen so far still fits."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds
        self.longest = 0.0

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def fits(self, guess: float) -> bool:
        return self.left() > max(guess, self.longest) * 1.2


def measure(
    c: Contender,
    rep: int,
    rows: dict[str, list[dict[str, Any]]],
    results: dict[str, Any],
    clock: Budget,
    args,
) -> None:
    """One run of a contender, when the budget holds it; the results so far written after it."""
    guess = rows[c.name][-1]["wall_seconds"] if rows[c.name] else 0.0
    if not clock.fits(guess):
        results["skipped"].append(f"{c.name} rep {rep + 1}: {clock.left():.0f} s left")
        return
    cmd, env = c.command(rep)
    rows[c.name].append(c.result(rep, run_wait4(cmd, env)))
    r = rows[c.name][-1]
    clock.longest = max(clock.longest, r["wall_seconds"])
    print(
        f"rep {rep + 1}/{args.reps} {c.name:18s} train {r['train_seconds']:7.3f}s  wall "
        f"{r['wall_seconds']:6.2f}s  rss {r['peak_rss_mib']:5.0f} MiB  val_acc {r['val_acc']:.4f}",
        flush=True,
    )
    write(results, rows, args.out)


def write(results: dict[str, Any], rows: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """results.json and RESULTS.md from the runs so far: a benchmark cut off keeps what it measured."""
    results["contenders"] = {
        n: {k: median_of(rs, k) for k in rs[0]} | {"runs": rs} for n, rs in rows.items() if rs
    }
    names = set(results["contenders"])
    if {"mnist-dist", "bare loop"} <= names and "startup" in results:
        results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["contenders"]:
        (out / "RESULTS.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
