"""The sweep benchmark: a sweep's members packed (one stacked model per process) against the same
members one after another (`--pack off`) and as separate `mnist-dist train` processes.

    python bench/sweep.py                       # configs/sweeps/lr-seeds.yaml: 64 members, seed phases
    python bench/sweep.py --quick               # configs/sweeps/tiny.yaml, 2 short phases (tests)
    python bench/sweep.py --device cuda --spec S --max-pack 1024 --only packed,one   # bench/gpu.sh

Contenders alternate (packed, off, separate, ... then again) so drift hits all alike:
- packed: `mnist-dist sweep run SPEC` (packs, one process per CPU or GPU);
- off: `mnist-dist sweep run SPEC --pack off` (members one after another in one process);
- separate: `mnist-dist train --config members/<id>/config.yaml` for every member, one process after
  another (as a shell loop runs them), and `separate x2`: two at a time (both cores busy);
- one: a single member alone (`mnist-dist train` of the first member's config): what a pack costs
  next to one run;
- hyperband: packed, with the sweep file's `early_terminate` (W&B's hyperband, min_iter 1, eta 3, added
  when the file has none): stopped members leave their packs. Against packed: its training time, the
  member-epochs it trained, and whether packed's best member survives with a bitwise equal history.
Per contender: training seconds (from the members' run.json: packs running at once count once, by the
slowest; members and processes one after another add up), whole wall time, and the peak memory of
the whole process tree (PSS and RSS summed over its processes, sampled every 0.1 s). Also: how many
members of the packed sweep equal their `--pack off` run bitwise (history and weights), and whether
one of them (`--solo`) equals the `mnist-dist train` command of its values. Writes sweep.json and
SWEEP.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONTENDERS = ("packed", "hyperband", "off", "separate", "separate x2", "one")
SWEPT = ("packed", "hyperband", "off")  # contenders that are `sweep run`s
EARLY = {"type": "hyperband", "min_iter": 1, "eta": 3}


def tree_memory_mib(root: int) -> tuple[float, float]:
    """(RSS, PSS) of root and all its descendants, summed (MiB), from /proc. Summed RSS counts the
    pages of shared libraries (libtorch) once per process; PSS splits them between the processes
    that share them, so its sum is the memory the tree takes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def measured(commands: list[list[str]], at_once: int = 1) -> dict[str, float]:
    """Run the commands, `at_once` at a time; wall seconds and the peaks of summed RSS and PSS."""
    peak, peak_pss, running = 0.0, 0.0, []
    waiting = list(commands)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    while waiting or running:
        while waiting and len(running) < at_once:
            cmd = waiting.pop(0)
            running.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
            proc = running[-1]
            proc.output = []  # type: ignore[attr-defined]
            threading.Thread(target=lambda p=proc: p.output.extend(p.stdout), daemon=True).start()
        memory = [tree_memory_mib(p.pid) for p in running]
        peak = max(peak, sum(m[0] for m in memory))
        peak_pss = max(peak_pss, sum(m[1] for m in memory))
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode != 0:
                tail = b"".join(proc.output)[-3000:].decode(errors="replace")
                raise RuntimeError(f"{proc.args} failed ({proc.returncode}):\n{tail}")
        time.sleep(0.1)
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_mib": peak, "peak_pss_mib": peak_pss}


def sweep_cmd(args: argparse.Namespace, out: Path, *extra: str, spec: Path | None = None) -> list[str]:
    cmd = [PY, "-m", "mnist_dist.cli", "sweep", "run", str(spec or args.spec), "--output-dir", str(out)]
    cmd += [
        "--tracker",
        "none",
        "--progress",
        "off",
        "--data-dir",
        str(args.data_dir),
        "--device",
        args.device,
    ]
    if args.phases:
        cmd += ["--phases", args.phases]
    if args.max_pack:
        cmd += ["--max-pack", str(args.max_pack)]
    return [*cmd, "--yes", *extra]


def train_cmd(config: Path, out: Path, device: str) -> list[str]:
    cmd = [PY, "-m", "mnist_dist.cli", "train", "--config", str(config), "--output-dir", str(out)]
    return [*cmd, "--device", device]


def members(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in (sweep_dir / "members").iterdir() if p.is_dir())


def train_seconds(sweep_dir: Path, packs_at_once: int) -> float:
    """Packs that ran at once count by the slowest; members trained alone add up."""
    by_pack: dict[str, float] = {}
    alone = 0.0
    for run_dir in members(sweep_dir):
        info = json.loads((run_dir / "run.json").read_text())
        if "pack" in info:  # a pack's time is its last member's (stopped members end earlier)
            by_pack[info["pack"]["dir"]] = max(by_pack.get(info["pack"]["dir"], 0.0), info["train_seconds"])
        else:
            alone += info["train_seconds"]
    packs = sorted(by_pack.values(), reverse=True)
    if len(packs) <= packs_at_once:
        return alone + (packs[0] if packs else 0.0)
    return alone + sum(packs) / packs_at_once


def identical(a: Path, b: Path) -> bool:
    """Same history (but for seconds) and bitwise the same weights."""
    import torch
    from safetensors.torch import load_file

    def history(d: Path) -> list[dict]:
        return [
            {k: v for k, v in e.items() if k != "seconds"}
            for e in json.loads((d / "history.json").read_text())
        ]

    if history(a) != history(b):
        return False
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def member_epochs(sweep_dir: Path) -> int:
    """Epochs trained, summed over the members (epoch 0, the evaluation before training, not counted)."""
    return sum(len(json.loads((d / "history.json").read_text())) - 1 for d in members(sweep_dir))


def hyperband_spec(spec: Path, tmp: Path) -> Path:
    """The sweep file with W&B's hyperband (EARLY) when it has no early_terminate; its base absolute."""
    import yaml

    raw = yaml.safe_load(spec.read_text())
    raw.setdefault("early_terminate", EARLY)
    if raw.get("base"):
        base = Path(raw["base"])
        raw["base"] = str(base if base.is_absolute() or base.is_file() else (spec.parent / base).resolve())
    out = tmp / f"hyperband-{spec.name}"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run_once(name: str, args: argparse.Namespace, tmp: Path, rep: int, workers: int) -> dict[str, Any]:
    out = tmp / f"{name.replace(' ', '-')}-{rep}"
    if name in SWEPT:
        spec = hyperband_spec(args.spec, tmp) if name == "hyperband" else None
        m = measured([sweep_cmd(args, out, *(["--pack", "off"] if name == "off" else []), spec=spec)])
        m["train_seconds"] = train_seconds(out, 1 if name == "off" else workers)
        m["members"] = len(members(out))
        m["member_epochs"] = member_epochs(out)
        return {**m, "dir": str(out)}
    configs = [d / "config.yaml" for d in members(args.reference)]
    if name == "one":
        configs = configs[:1]
    at_once = 2 if name == "separate x2" else 1
    m = measured([train_cmd(c, out / c.parent.name, args.device) for c in configs], at_once)
    runs = [json.loads((out / c.parent.name / "run.json").read_text()) for c in configs]
    m["train_seconds"] = sum(r["train_seconds"] for r in runs) / at_once
    m["members"] = len(runs)
    return {**m, "dir": str(out)}


def solo_check(args: argparse.Namespace, packed: Path, tmp: Path) -> dict[str, Any] | None:
    """The packed member whose config has `args.solo`'s values (`seed=3,phases.0.lr=1.0`) against
    `mnist-dist train --seed 3 --set phases.0.lr=1.0 --threads 1` (the spec's base being the embedded
    defaults, as lr-seeds.yaml's is): a member is bitwise the run a user would type."""
    import yaml

    wanted = dict(pair.split("=", 1) for pair in args.solo.split(",") if pair)

    def value(cfg: dict[str, Any], dotted: str) -> str | None:
        for part in dotted.split("."):
            try:
                cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
            except (KeyError, IndexError):  # a key at its default is left out (the optimizer's)
                return None
        return str(cfg)

    for run_dir in members(packed):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        if all(value(cfg, k) == v for k, v in wanted.items()):
            break
    else:
        return None
    out = tmp / "solo"
    cmd = [PY, "-m", "mnist_dist.cli", "train", "--output-dir", str(out), "--threads", "1"]
    cmd += ["--tracker", "none", "--progress", "off", "--data-dir", str(args.data_dir)]
    cmd += ["--device", args.device]
    if args.phases:
        cmd += ["--phases", args.phases]
    for key, v in wanted.items():
        cmd += ["--seed", v] if key == "seed" else ["--set", f"{key}={v}"]
    measured([cmd])
    command = "mnist-dist train " + " ".join(cmd[cmd.index("--threads") :])
    return {"member": run_dir.name, "command": command, "identical": identical(run_dir, out)}


def survivors(full: Path, early: Path) -> dict[str, Any]:
    """Early termination against the full grid: member-epochs trained, terminated members, members
    moved between packs at a band, whether the full grid's best member (final val_acc) survived with a
    bitwise equal history and weights, and the best survivor's final val_acc."""

    def final(d: Path) -> float:
        return json.loads((d / "history.json").read_text())[-1]["val_acc"]

    best = max(members(full), key=final)
    runs = {d: json.loads((d / "run.json").read_text()) for d in members(early)}
    status = runs[early / "members" / best.name]["status"]
    stopped = sum(r["status"] == "terminated" for r in runs.values())
    completed = [d for d, r in runs.items() if r["status"] == "completed"]
    return {
        "moved": sum(bool(r.get("moves")) for r in runs.values()),
        "best_survivor_val_acc": max(map(final, completed)) if completed else None,
        "member_epochs": member_epochs(early),
        "of": member_epochs(full),
        "terminated": stopped,
        "members": len(members(early)),
        "best": best.name,
        "best_val_acc": final(best),
        "best_survived": status == "completed",
        "best_identical": status == "completed" and identical(best, early / "members" / best.name),
    }


def markdown(results: dict[str, Any]) -> str:
    from bench.run import machine_line

    rows = results["medians"]
    off = rows.get("off", {})
    lines = [
        f"# Sweep benchmark: {results['members']} members of {Path(results['spec']).name}"
        + (f" (phases {results['phases']})" if results["phases"] else " (seed phases)"),
        "",
        f"{machine_line(results['machine'])}; {results['workers']} pack process(es) at once; medians of "
        + ", ".join(f"{n} {name}" for name, n in results["repetitions"].items()),
        "",
        "| contender | training s | wall s | peak memory MiB, PSS (RSS) | training / off | wall / separate |",
        "|---|---|---|---|---|---|",
    ]
    sep = rows.get("separate", {}).get("wall_seconds")
    for name in CONTENDERS:
        if name not in rows:
            continue
        r = rows[name]
        ratio = f"{r['train_seconds'] / off['train_seconds']:.2f}" if off else "-"
        wall = f"{r['wall_seconds'] / sep:.3f}" if sep else "-"
        lines.append(
            f"| {name} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | "
            f"{r['peak_pss_mib']:.0f} ({r['peak_rss_mib']:.0f}) "
            f"| {ratio} | {wall} |"
        )
    if "identical" in results:
        lines += ["", f"Packed members bitwise equal to their `--pack off` run: {results['identical']}."]
    hb = results.get("hyperband")
    if hb:
        verdict = (
            "survived, bitwise equal"
            if hb["best_identical"]
            else "survived"
            if hb["best_survived"]
            else "STOPPED"
        )
        lines += [
            f"Hyperband (`{json.dumps(EARLY)}` unless the file has its own): {hb['terminated']} of "
            f"{hb['members']} members stopped, {hb['member_epochs']} member-epochs trained of {hb['of']}, "
            f"{hb.get('moved', 0)} moved between packs at a band; the full grid's best member `{hb['best']}` "
            f"(final val_acc {hb['best_val_acc']:.4f}): {verdict}"
            + (
                f"; the best survivor's final val_acc {hb['best_survivor_val_acc']:.4f}."
                if hb.get("best_survivor_val_acc") is not None
                else "."
            )
        ]
    solo = results.get("solo")
    if solo:
        verdict = "bitwise equal" if solo["identical"] else "NOT equal"
        lines += [f"Packed member `{solo['member']}` {verdict} to `{solo['command']}`."]
    for t in results.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: ""}[t["met"]]
        lines.append(f"- {t['what']}: {t['value']:.3f} (target {t['target']}) {verdict}".rstrip())
    return "\n".join(lines) + "\n"


def targets(rows: dict[str, Any], device: str) -> list[dict[str, Any]]:
    out = []
    if "packed" in rows and "off" in rows:
        value = rows["packed"]["train_seconds"] / rows["off"]["train_seconds"]
        out.append({"what": "packed training / --pack off training", "value": value, "target": "<= 0.4"})
        out[-1]["met"] = value <= 0.4
    if "packed" in rows and "separate" in rows:
        value = rows["packed"]["wall_seconds"] / rows["separate"]["wall_seconds"]
        out.append({"what": "packed wall / separate processes wall", "value": value, "target": "<= 0.15"})
        out[-1]["met"] = value <= 0.15
    if "packed" in rows:
        value = rows["packed"]["peak_pss_mib"] / 1024
        what = "packed peak memory (PSS of all its processes), GiB"
        out.append({"what": what, "value": value, "target": "<= 1.5", "met": value <= 1.5})
    if "packed" in rows and "hyperband" in rows:
        value = rows["hyperband"]["train_seconds"] / rows["packed"]["train_seconds"]
        what = "hyperband training / packed training (the full grid)"
        out.append({"what": what, "value": value, "target": "<= 0.35", "met": value <= 0.35})
    if "packed" in rows and "one" in rows:
        value = rows["packed"]["train_seconds"] / rows["one"]["train_seconds"]
        what, gpu = "packed training / one member's training", device == "cuda"
        out.append({"what": what, "value": value, "target": "<= 10 on a GPU" if gpu else "none on a CPU"})
        out[-1]["met"] = value <= 10 if gpu else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=ROOT / "configs/sweeps/lr-seeds.yaml")
    p.add_argument("--phases", default="", help="override the phases (default: the spec's)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of packed and off")
    p.add_argument("--separate-reps", type=int, default=1, help="repetitions of the separate contenders")
    p.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    p.add_argument("--max-pack", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny.yaml, 2 short phases, 1 repetition")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DIST_DATA_DIR", "data")))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    p.add_argument(
        "--solo",
        default="seed=3,phases.0.lr=1.0",
        help="the packed member (its config's values) to compare with `mnist-dist train` of the same values",
    )
    args = p.parse_args()
    if args.quick:
        args.spec, args.phases, args.reps = ROOT / "configs/sweeps/tiny.yaml", "1x0.5,1x0.1", 1
        args.solo = args.solo if "--solo" in sys.argv else "seed=1,phases.0.lr=0.5"
    only = [c.strip() for c in args.only.split(",") if c.strip()] or list(CONTENDERS)
    sys.path.insert(0, str(ROOT))
    from bench.run import machine
    from mnist_dist.config import TrainConfig
    from mnist_dist.sweep.local import local_workers

    workers = local_workers(TrainConfig(device=args.device))[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in only}
    results: dict[str, Any] = {
        "spec": str(args.spec),
        "phases": args.phases,
        "device": args.device,
        "workers": workers,
        "machine": machine(),
        "runs": rows,
    }
    for rep in range(max(args.reps, args.separate_reps)):
        for name in only:
            if rep >= (args.reps if name in SWEPT else args.separate_reps):
                continue
            if name not in SWEPT:  # member configs from the first packed sweep
                args.reference = Path(rows["packed"][0]["dir"]) if rows.get("packed") else None
                if args.reference is None:
                    args.reference = tmp / "reference"
                    measured([sweep_cmd(args, args.reference, "--pack", "off")])
            print(f"rep {rep + 1}: {name} ...", flush=True)
            rows[name].append(run_once(name, args, tmp, rep, workers))
            print(
                f"  {json.dumps({k: round(v, 2) for k, v in rows[name][-1].items() if k != 'dir'})}",
                flush=True,
            )
            write(results, rows, args)  # a benchmark cut off keeps what it measured
    if rows.get("packed") and rows.get("off"):
        packed, off = Path(rows["packed"][0]["dir"]), Path(rows["off"][0]["dir"])
        same = sum(identical(a, off / "members" / a.name) for a in members(packed))
        results["identical"] = f"{same} of {len(members(packed))}"
    if rows.get("packed") and rows.get("hyperband"):
        results["hyperband"] = survivors(Path(rows["packed"][0]["dir"]), Path(rows["hyperband"][0]["dir"]))
    if rows.get("packed") and args.solo and args.device == "cpu":
        results["solo"] = solo_check(args, Path(rows["packed"][0]["dir"]), tmp)
    write(results, rows, args)
    print(markdown(results))


def write(results: dict[str, Any], rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """sweep.json and SWEEP.md from the runs so far."""
    keys = ("train_seconds", "wall_seconds", "peak_rss_mib", "peak_pss_mib")
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rows.items() if runs
    }
    results["medians"] = medians
    results["members"] = next((r[0]["members"] for r in rows.values() if r and r[0]["members"] > 1), 1)
    results["repetitions"] = {name: len(runs) for name, runs in rows.items() if runs}
    results["targets"] = targets(medians, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "SWEEP.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
