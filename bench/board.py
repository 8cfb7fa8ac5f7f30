"""How soon `mnist-dist sweep board` serves (issue 25: "prints a URL that serves within 10 s"): the
64-member lr-seeds sweep with hyperband, trained with `--tracker tensorboard` (skipped when --sweep
names one already trained), then the board started `--reps` times: seconds from the command's start
to the URL on its stdout, and to the HParams session groups of every member answered from that URL.
Writes BOARD.md and board.json to --out.

    python bench/board.py --out /tmp/board                      # trains the sweep first (about 30 s)
    python bench/board.py --sweep runs/sweeps/lr-seeds-hyperband --out /tmp/board
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def groups(base: str) -> int:
    body = {
        "experimentName": "",
        "allowedStatuses": STATUSES,
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 10**4,
    }
    request = urllib.request.Request(
        f"{base}data/plugin/hparams/session_groups",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return len(json.loads(reply.read())["sessionGroups"])


def once(sweep: Path) -> dict[str, float]:
    start = time.monotonic()
    command = [sys.executable, "-m", "mnist_dist.cli", "sweep", "board", str(sweep), "--port", "0"]
    board = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = board.stdout.readline()
        url_s = time.monotonic() - start
        base = line.split(": ", 1)[1].split("#")[0]
        found = groups(base)
        return {"url_s": round(url_s, 3), "sessions_s": round(time.monotonic() - start, 3), "sessions": found}
    finally:
        board.send_signal(signal.SIGTERM)
        board.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", type=Path, help="A sweep dir trained with --tracker tensorboard.")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = args.sweep
    if sweep is None:
        sweep = args.out / "lr-seeds-hyperband"
        spec = ROOT / "configs" / "sweeps" / "lr-seeds-hyperband.yaml"
        train = [
            sys.executable,
            "-m",
            "mnist_dist.cli",
            "sweep",
            "run",
            str(spec),
            "--tracker",
            "tensorboard",
        ]
        subprocess.run([*train, "--output-dir", str(sweep)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    runs = [once(sweep) for _ in range(args.reps)]
    median = {k: statistics.median(r[k] for r in runs) for k in ("url_s", "sessions_s")}
    from mnist_dist.store import provenance

    cpu = provenance.cpu()
    result = {"sweep": str(sweep), "runs": runs, "median": median, "cpu": cpu}
    (args.out / "board.json").write_text(json.dumps(result, indent=1) + "\n")
    each = {k: ", ".join(f"{r[k]:.2f}" for r in runs) for k in ("url_s", "sessions_s")}
    command = f"python bench/board.py --reps {args.reps} --out {args.out}"
    command += f" --sweep {args.sweep}` (trained by `python bench/board.py`)" if args.sweep else "`"
    lines = [
        "# `mnist-dist sweep board`: seconds until it serves (issue 25)",
        "",
        f"{cpu['model']} ({cpu['vendor']}), medians of {args.reps}; sweep {sweep.name} "
        f"({runs[0]['sessions']} members, trained with --tracker tensorboard)",
        "",
        "| from the command's start to | median s | each run s |",
        "|---|---|---|",
        f"| the URL printed | {median['url_s']:.2f} | {each['url_s']} |",
        f"| every member's session from that URL | {median['sessions_s']:.2f} | {each['sessions_s']} |",
        "",
        f"- URL serving within 10 s (target): {'met' if median['sessions_s'] <= 10 else 'MISSED'}",
        "",
        f"Command: `{command}",
    ]
    (args.out / "BOARD.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
