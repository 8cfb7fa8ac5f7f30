"""Bad input, over the whole command line: every row is one `mnist-dist` command that must fail at
validation with exit code 2, exactly one line on stderr starting with `error: `, no traceback, nothing
written under the row's directory and, for Slurm rows, nothing submitted. (A Slurm `--dry-run` whose
real submit would be refused prints the script and that one line as `warning: `, exit 2.)

One table, one test: a new command (or a new bound) is a new row. A row is a command line (shlex
syntax; `{tmp}` is the row's own directory, which is also its cwd and holds its $HOME and
$MNIST_DIST_STATE_DIR), the part of the message the one line must contain, and optionally the files
the row needs first (written before the "nothing written" snapshot).

No row may train or download: `train` and `submit` rows get `--source dir --data-dir {tmp}/no-data
--tracker none` (and `--allow-local` for submit: the row dirs are under /tmp) placed before the row's
own options, which win. A row whose bad value were accepted would stop at the missing data dir, having
written its run dir, and fail here; it never reaches a model or the network.

The rows run as subprocesses, four at a time, once per module (only the selected ones under -k);
each parametrized test then checks its own row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import env_with, run_cli

Files = dict[str, str | bytes]  # relative path -> content ("{tmp}" replaced); a path ending in / is a folder


@dataclass(frozen=True)
class Row:
    id: str
    command: str  # after `mnist-dist`, shlex syntax; {tmp} is the row's directory
    message: str = ""  # what the one error line must contain ({tmp} replaced)
    files: Files = field(default_factory=dict)  # written before the snapshot
    heavy: bool = False  # imports torch or matplotlib before it fails: started first, kept few

    @property
    def slurm(self) -> bool:
        """Rows that ask Slurm (sbatch, sinfo, scancel): skipped without a cluster, checked for jobs."""
        words = self.command.split()
        return words[0] in ("submit", "cancel") or words[:2] in (["sweep", "submit"], ["sweep", "cancel"])


# --- fixtures the rows share (plain data: the table stays readable) ------------------------------

MINIMAL_CONFIG = "tracker: none\n"  # the seed config otherwise; enough for read_run
RUN = {"run/config.yaml": MINIMAL_CONFIG, "run/history.json": "[]\n"}  # a run dir read_run accepts
RECORD = {  # a job mnist-dist remembers (one task); its folder has no logs
    "state/jobs/424242.json": json.dumps(
        {
            "job_id": "424242",
            "run_dir": "{tmp}/run",
            "folder": "{tmp}/run/submitit",
            "partition": None,
            "nodes": 1,
            "tasks_per_node": 1,
            "name": "seed",
        }
    ),
}
OLDER_CHECKPOINT_FILES = {  # a single run's progress.json before every run had one layout
    "progress.json": json.dumps({"epochs_done": 1, "step": 0, "loss_sum": 0.0, "history": [], "files": {}}),
    "model.safetensors": b"weights",
}
OLDER_CHECKPOINT = {"ckpt/" + name: body for name, body in OLDER_CHECKPOINT_FILES.items()}
CORRUPT_CHECKPOINT = {  # progress.json lists a file whose hash does not match
    "ckpt/progress.json": json.dumps({"epochs_done": 1, "files": {"model.safetensors": "0" * 64}}),
    "ckpt/model.safetensors": b"not the recorded bytes",
}
TRUNCATED_IDX = {"mnist/MNIST/raw/train-images-idx3-ubyte": b"\x00\x00\x08\x03" + b"\x00" * 12}
A_FILE = {"afile": "keep me\n"}
PROBS = "{values: [1, 2], probabilities: [1, 1]}\n"
BAYES = "name: b\nmethod: bayes\nrun_cap: 2\nmetric: {name: val_acc}\nparameters:\n  seed: {min: 0, max: 3}\n"
SPEC = "name: s\nparameters:\n  seed: {values: [0, 1]}\n"  # a valid sweep: the row's option is the bad part
MANIFEST = json.dumps(
    {"name": "s", "metric": {"name": "val_acc", "goal": "maximize"}, "swept": [], "members": []}
)


ROWS = [
    # The command line itself (click's usage errors go through the same one-line path).
    Row("no-such-command", "trian", "No such command 'trian'"),
    Row("no-such-option", "train --epochs 5", "No such option: --epochs"),
    Row("missing-argument", "status", "Missing argument 'job'"),
    # train: config bounds (the seed feeds 32-bit RNGs; sizes and counts are capped).
    Row("train-seed-too-big", "train --seed 99999999999999999999999", "'seed' = 99999999999999999999999"),
    Row("train-seed-negative", "train --seed -1", "'seed' = -1"),
    Row(
        "train-split-seed-2pow32",
        "train --set data.split_seed=4294967296",
        "'data.split_seed' = 4294967296",
    ),
    Row("train-epochs-1e9", "train --phases 1000000000x0.1", "'phases[0].epochs' = 1000000000"),
    Row("train-lr-inf", "train --phases 1xinf", "'phases[0].lr' = inf: must be a finite number > 0"),
    Row("train-hidden-1e9", "train --set model.hidden_size=1000000000", "'model.hidden_size' = 1000000000"),
    Row("train-val-batch-1e9", "train --val-batch-size 1000000000", "'val_batch_size' = 1000000000"),
    Row("train-keep-0", "train --set checkpoint.keep=0", "'checkpoint.keep' = 0"),
    Row(
        "train-every-epochs-negative",
        "train --set checkpoint.every_epochs=-1",
        "'checkpoint.every_epochs' = -1",
    ),
    Row("train-threads-0", "train --threads 0", "'threads' = 0"),
    Row("train-optimizer-unknown", "train --set optimizer=rmsprop", "'optimizer.name' = 'rmsprop'"),
    Row("train-optimizer-momentum-1", "train --set optimizer.momentum=1", "'optimizer.momentum' = 1"),
    Row(
        "train-optimizer-beta-1",
        "train --set optimizer.name=adam --set optimizer.betas=[0.9,1.0]",
        "'optimizer.betas' = [0.9, 1.0]: each beta must be a number in [0, 1)",
    ),
    Row(
        "train-optimizer-momentum-of-adam",
        "train --config {tmp}/bad.yaml",
        "momentum and nesterov are SGD's, not adam's",
        {"bad.yaml": "optimizer: {name: adam, momentum: 0.9}\n"},
    ),
    Row("train-max-requeues-negative", "train --set max_requeues=-1", "'max_requeues' = -1"),
    # train: values of another shape.
    Row("train-name-path", "train --name ../evil", "'name' = '../evil'"),
    Row("train-set-index-out-of-list", "train --set phases.5.lr=0.1", "'5' is not an index of a 2-item list"),
    Row("train-set-without-value", "train --set seed", "--set 'seed': write KEY=VALUE"),
    Row("train-preemption-at-0", "train --simulate-preemption-at 0", "--simulate-preemption-at '0'"),
    # train: files.
    Row("train-config-is-a-dir", "train --config {tmp}", "config file {tmp} not found"),
    Row(
        "train-config-bad-key",
        "train --config {tmp}/bad.yaml",
        "unknown key 'optimiser'",
        {"bad.yaml": "optimiser: adam\n"},
    ),
    Row(
        "train-config-not-text",
        "train --config {tmp}/bad.yaml",
        "{tmp}/bad.yaml",
        {"bad.yaml": b"\xff\xfe\x00\x81seed: 1\n"},
    ),
    Row(
        "train-resume-corrupt-checkpoint",
        "train --resume {tmp}/ckpt --output-dir {tmp}/run",
        "checkpoint {tmp}/ckpt is corrupt",
        CORRUPT_CHECKPOINT,
        heavy=True,
    ),
    Row(
        "train-resume-older-checkpoint",
        "train --resume {tmp}/ckpt --output-dir {tmp}/run",
        "checkpoint {tmp}/ckpt was written by an older mnist-dist",
        OLDER_CHECKPOINT,
    ),
    Row(  # found by --resume auto: refused, not skipped (training over it would start from scratch)
        "train-over-an-older-checkpoint",
        "train --output-dir {tmp}/run",
        "checkpoint {tmp}/run/checkpoints/epoch-0001 was written by an older mnist-dist",
        {"run/checkpoints/epoch-0001/" + name: body for name, body in OLDER_CHECKPOINT_FILES.items()},
        heavy=True,
    ),
    # evaluate
    Row("evaluate-a-file", "evaluate {tmp}/afile", "{tmp}/afile", A_FILE),
    Row(
        "evaluate-no-history",
        "evaluate {tmp}/run",
        "history.json is missing",
        {"run/config.yaml": MINIMAL_CONFIG},
    ),
    Row(
        "evaluate-config-bad-key",
        "evaluate {tmp}/run --json",
        "unknown key 'optimiser'",
        {**RUN, "run/config.yaml": "optimiser: adam\n"},
    ),
    # plot
    Row(
        "plot-corrupt-history",
        "plot {tmp}/run",
        "history.json is not valid JSON",
        {**RUN, "run/history.json": '[{"epoch": 0,'},
    ),
    Row(
        "plot-history-not-a-list",
        "plot {tmp}/run",
        "history.json",
        {**RUN, "run/history.json": '{"epoch": 0}\n'},
        heavy=True,
    ),
    Row(
        "plot-malformed-config", "plot {tmp}/run", "malformed YAML", {**RUN, "run/config.yaml": "phases: [\n"}
    ),
    # data prepare (every row names its data dir: none may fetch)
    Row(
        "data-source-unknown", "data prepare --source ftp --data-dir {tmp}/d", "data source 'ftp' is unknown"
    ),
    Row(
        "data-dir-missing",
        "data prepare --source dir --data-dir {tmp}/absent",
        "data dir {tmp}/absent does not exist",
    ),
    Row(
        "data-dir-is-a-file",
        "data prepare --data-dir {tmp}/afile",
        "data dir {tmp}/afile is not writable",
        A_FILE,
    ),
    Row("data-file-truncated", "data prepare --data-dir {tmp}/mnist", "is truncated", TRUNCATED_IDX),
    # submit: Slurm options (bounds), with and without --dry-run
    Row("submit-nodes-0", "submit --nodes 0", "--nodes 0"),
    Row("submit-nodes-100000", "submit --nodes 100000", "--nodes 100000"),
    Row("submit-time-0", "submit --time 0", "--time '0'"),
    Row("submit-time-garbage-dry-run", "submit --time 1h --dry-run", "--time '1h'"),
    Row("submit-cpus-0", "submit --cpus-per-task 0", "--cpus-per-task 0"),
    Row("submit-mem-unit", "submit --mem 16GiB", "--mem '16GiB'"),
    Row("submit-qos-subshell", "submit --qos '$(id)'", "--qos '$(id)'"),
    Row("submit-job-name-empty", "submit --job-name ''", "--job-name ''"),
    Row(
        "submit-partition-unknown-dry-run",
        "submit --partition nosuch --dry-run",
        "partition 'nosuch' does not exist",
    ),
    # submit: the training config, checked before Slurm is asked anything
    Row("submit-epochs-0-dry-run", "submit --phases 0x0.1 --dry-run", "'phases[0].epochs' = 0"),
    Row("submit-threads-0-json", "submit --threads 0 --json", "'threads' = 0"),
    Row(
        "submit-output-dir-is-a-file-dry-run",
        "submit --output-dir {tmp}/afile --dry-run",
        "output dir {tmp}/afile exists and is not a directory",
        A_FILE,
    ),
    # status / logs / cancel / history: ids, records and run dirs that are not what they claim
    Row("status-missing-dir", "status {tmp}/nowhere", "is neither a job id"),
    Row("status-corrupt-job-json", "status {tmp}/run", "job.json", {"run/job.json": '{"job_id": '}),
    Row("status-corrupt-record", "status 424242 --json", "424242", {"state/jobs/424242.json": "{"}),
    Row("logs-task-negative", "logs 424242 --task -1", "--task -1", RECORD),
    Row("logs-task-out-of-range", "logs 424242 --task 5", "--task 5: job 424242 has tasks 0..0", RECORD),
    Row("cancel-dir-without-job", "cancel {tmp}/run", "is neither a job id", RUN),
    Row("history-corrupt-json", "history {tmp}/run", "history.json", {"run/history.json": "[{"}),
    Row(
        "history-corrupt-metrics",
        "history {tmp}/run --json",
        "metrics.jsonl",
        {"run/metrics.jsonl": "{oops\n"},
    ),
    Row("history-empty-dir", "history {tmp}/run", "has no history.json or metrics.jsonl", {"run/": ""}),
    # sync
    Row("sync-timeout-0", "sync {tmp} --timeout 0", "--timeout 0"),
    Row("sync-timeout-inf", "sync {tmp} --timeout inf", "--timeout inf"),
    Row("sync-missing-dir", "sync {tmp}/nowhere --dry-run", "{tmp}/nowhere"),
    # sweep (the spec's own cases are in test_sweeps.py)
    Row("sweep-run-missing-spec", "sweep run {tmp}/nope.yaml", "sweep file {tmp}/nope.yaml not found"),
    Row("sweep-run-list-spec", "sweep run {tmp}/s.yaml", "expected a mapping", {"s.yaml": "- 1\n"}),
    Row(
        "sweep-run-bayes",
        "sweep run {tmp}/s.yaml",
        "method bayes needs a metric to learn from",
        {"s.yaml": SPEC + "method: bayes\n"},
    ),
    Row(
        "sweep-run-unknown-method",
        "sweep run {tmp}/s.yaml",
        "'method': 'hyperopt' is not one of",
        {"s.yaml": SPEC + "method: hyperopt\n"},
    ),
    Row(
        "sweep-run-distribution-without-its-keys",
        "sweep run {tmp}/s.yaml",
        "parameter 'phases.0.lr': {'distribution': 'q_uniform', 'min': 0.1} is none of W&B's parameters",
        {"s.yaml": SPEC + "  phases.0.lr: {distribution: q_uniform, min: 0.1}\n"},
    ),
    Row(
        "sweep-run-nested-unknown-key",
        "sweep run {tmp}/s.yaml",
        "unknown key 'model.depth'",
        {"s.yaml": SPEC + "  model: {parameters: {depth: {values: [1, 2]}}}\n"},
    ),
    Row("submit-more-nodes-than-the-partition", "submit --nodes 64", "--nodes 64: partition 'gpu' has"),
    Row("submit-partition-list-unknown", "submit --partition cpu,nosuch", "partition 'nosuch' does not"),
    Row(
        "sweep-submit-workers-0",
        "sweep submit {tmp}/s.yaml --partition cpu --workers 0",
        "--workers 0: from 1 to 1024",
        {"s.yaml": BAYES},
    ),
    Row(  # a grid whose combinations include one no optimizer has: refused before anything trains
        "sweep-run-momentum-of-adam",
        "sweep run {tmp}/s.yaml",
        "momentum and nesterov are SGD's, not adam's",
        {"s.yaml": SPEC + "  optimizer.name: {values: [sgd, adam]}\n  optimizer.momentum: {values: [0.9]}\n"},
    ),
    Row(
        "sweep-run-hyperband-past-the-last-epoch",
        "sweep run {tmp}/s.yaml --phases 1x0.5,1x0.1",
        "early_terminate: its bands (2, 6, 18, ...) are not before the members' last epoch (2)",
        {"s.yaml": SPEC + "early_terminate: {type: hyperband, min_iter: 2}\n"},
    ),
    Row(
        "sweep-run-hyperband-train-loss",
        "sweep run {tmp}/s.yaml",
        "early_terminate with metric train_loss",
        {"s.yaml": SPEC + "metric: {name: train_loss}\nearly_terminate: {type: hyperband, min_iter: 1}\n"},
    ),
    Row(
        "sweep-run-deprecated-log-uniform",
        "sweep run {tmp}/s.yaml",
        "parameter 'phases.0.lr': uses log_uniform, where min/max specify base-e exponents",
        {"s.yaml": SPEC + "  phases.0.lr: {distribution: log_uniform, min: -3, max: 0}\n"},
    ),
    Row(
        "sweep-run-target-not-a-number",
        "sweep run {tmp}/s.yaml",
        "'metric.target': 'high' is not of type 'number'",
        {"s.yaml": SPEC + "metric: {name: val_acc, target: high}\n"},
    ),
    Row(
        "sweep-run-bad-hyperband",
        "sweep run {tmp}/s.yaml",
        "'early_terminate.type': 'asha' is not one of ['hyperband']",
        {"s.yaml": SPEC + "early_terminate: {type: asha, min_iter: 1}\n"},
    ),
    Row(
        "sweep-run-probabilities-not-1",
        "sweep run {tmp}/s.yaml",
        "Probabilities [1, 1] do not sum to 1",
        {"s.yaml": "name: p\nmethod: random\nrun_cap: 2\nparameters:\n  seed: " + PROBS},
    ),
    Row(
        "sweep-run-bad-member",
        "sweep run {tmp}/s.yaml --set batch_size=-3",
        "(seed=0): 'batch_size' = -3",
        {"s.yaml": SPEC},
    ),
    Row("sweep-run-no-data", "sweep run {tmp}/s.yaml", "{tmp}/no-data", {"s.yaml": SPEC}),
    Row("sweep-run-name", "sweep run {tmp}/s.yaml --name x", "--name", {"s.yaml": SPEC}),
    Row("sweep-run-phases", "sweep run {tmp}/s.yaml --phases 5", "not EPOCHSxLR", {"s.yaml": SPEC}),
    Row(
        "sweep-submit-per-task-0",
        "sweep submit {tmp}/s.yaml --members-per-task 0",
        "--members-per-task 0",
        {"s.yaml": SPEC},
    ),
    Row(
        "sweep-submit-parallelism-0",
        "sweep submit {tmp}/s.yaml --array-parallelism 0",
        "--array-parallelism 0",
        {"s.yaml": SPEC},
    ),
    Row(
        "sweep-submit-bad-partition",
        "sweep submit {tmp}/s.yaml --partition nosuch",
        "partition 'nosuch'",
        {"s.yaml": SPEC},
    ),
    Row("sweep-submit-time", "sweep submit {tmp}/s.yaml --time 0", "--time '0'", {"s.yaml": SPEC}),
    Row("sweep-status-no-sweep", "sweep status {tmp}/run", "is not a sweep dir", {"run/": ""}),
    Row("sweep-status-unknown-job", "sweep status 999999991", "job 999999991 is not known"),
    Row("sweep-status-not-a-sweep-job", "sweep status 424242", "is not a sweep's array", RECORD),
    Row(
        "sweep-results-corrupt",
        "sweep results {tmp}/sw",
        "sweep.json is unreadable",
        {"sw/sweep.json": "{oops"},
    ),
    Row("sweep-board-no-dir", "sweep board {tmp}/nosuch", "is not a directory; pass a sweep dir"),
    Row(
        "sweep-board-no-tensorboard-files",
        "sweep board {tmp}/sw",
        "has no TensorBoard files: the sweep did not write any; train with --tracker tensorboard",
        {"sw/sweep.json": MANIFEST, "sw/members/abc/run.json": "{}"},
    ),
    Row("sweep-board-port", "sweep board {tmp} --port 70000", "Invalid value for '--port'"),
    Row(
        "sweep-board-host",
        "sweep board {tmp}/sw --host 192.0.2.1",
        "--host 192.0.2.1: cannot listen there",
        {"sw/events.out.tfevents.0.hparams-config": ""},
    ),
    Row(
        "sweep-cancel-never-submitted",
        "sweep cancel {tmp}/sw",
        "was never submitted",
        {"sw/sweep.json": MANIFEST},
    ),
]

assert len({row.id for row in ROWS}) == len(ROWS), "row ids must be unique"

# Placed right after the command, before the row's own options (click takes the last of a repeat).
GUARDS = {
    "train": "--source dir --data-dir {tmp}/no-data --tracker none",
    "submit": "--source dir --data-dir {tmp}/no-data --tracker none --allow-local",
    "sweep run": "--source dir --data-dir {tmp}/no-data --tracker none",
    "sweep submit": "--source dir --data-dir {tmp}/no-data --tracker none --allow-local",
}


def argv(row: Row, tmp: Path) -> list[str]:
    words = [w.replace("{tmp}", str(tmp)) for w in shlex.split(row.command)]
    n = 2 if words[0] == "sweep" else 1
    guard = [w.replace("{tmp}", str(tmp)) for w in shlex.split(GUARDS.get(" ".join(words[:n]), ""))]
    return [*words[:n], *guard, *words[n:]]


def write_files(tmp: Path, files: Files) -> None:
    for rel, content in files.items():
        path = tmp / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content.replace("{tmp}", str(tmp)))
        else:
            path.write_bytes(content)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: (mode, size, mtime, sha256) for files, (mode,) for folders."""
    found: dict[str, tuple] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
            else:
                found[rel] = (st.st_mode,)
    return found


def slurm_jobs() -> list[tuple[str, str]]:
    """(job id, working dir) of every job in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=60).stdout
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()]


@dataclass
class Outcome:
    tmp: Path
    argv: list[str]
    proc: subprocess.CompletedProcess
    before: dict[str, tuple]
    after: dict[str, tuple]
    jobs_before: int | None
    jobs_after: int | None
    ours: list[str]  # jobs whose working dir is the row's (cancelled at once)
    seconds: float


def launch(row: Row, tmp: Path, mpl_dir: Path) -> Outcome:
    env = env_with(
        HOME=str(tmp / "home"),
        MNIST_DIST_STATE_DIR=str(tmp / "state"),
        MPLCONFIGDIR=str(mpl_dir),  # matplotlib's font cache is not the row's writing
    )
    args = argv(row, tmp)
    before = snapshot(tmp)
    jobs_before = len(slurm_jobs()) if row.slurm else None
    start = time.monotonic()
    try:
        proc = run_cli(*args, env=env, cwd=tmp, timeout=180)
    except subprocess.TimeoutExpired as e:  # a row that hangs fails alone, not the whole table
        text = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        proc = subprocess.CompletedProcess(args, -9, text[0], text[1] + "\n[killed after 180 s]")
    seconds = time.monotonic() - start
    jobs_after, ours = None, []
    if row.slurm:
        queue = slurm_jobs()
        jobs_after = len(queue)
        ours = [job for job, workdir in queue if Path(workdir) == tmp or tmp in Path(workdir).parents]
        if ours:  # submitted by this row: ours to cancel
            subprocess.run(["scancel", *ours], capture_output=True, timeout=60)
    return Outcome(tmp, args, proc, before, snapshot(tmp), jobs_before, jobs_after, ours, seconds)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Run every selected row once, four at a time."""
    selected = {
        item.callspec.params["row"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")
    }
    have_slurm = shutil.which("sbatch") is not None and shutil.which("squeue") is not None
    rows = [r for r in ROWS if r.id in selected and (have_slurm or not r.slurm)]
    rows.sort(key=lambda r: not r.heavy)  # the long ones first, the short ones fill in beside them
    mpl_dir = tmp_path_factory.mktemp("mplconfig")
    dirs: dict[str, Path] = {}
    for row in rows:
        tmp = tmp_path_factory.mktemp(row.id, numbered=True)
        (tmp / "home").mkdir()
        (tmp / "state").mkdir()
        write_files(tmp, row.files)
        dirs[row.id] = tmp
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {row.id: pool.submit(launch, row, dirs[row.id], mpl_dir) for row in rows}
        return {rid: f.result() for rid, f in futures.items()}


def _report(out: Outcome) -> str:
    return (
        f"mnist-dist {shlex.join(out.argv)}\nexit {out.proc.returncode} after {out.seconds:.1f} s\n"
        f"STDOUT:\n{out.proc.stdout[-3000:]}\nSTDERR:\n{out.proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, outcomes: dict[str, Outcome]):
    if row.id not in outcomes:
        pytest.skip("no Slurm here (sbatch/squeue not on PATH)")
    out = outcomes[row.id]
    proc = out.proc
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, _report(out)
    assert proc.returncode == 2, _report(out)
    lines = proc.stderr.splitlines()
    # A Slurm dry run prints the script and, as a warning, what would refuse the real submit.
    said = ("error: ", "warning: ") if row.slurm and "--dry-run" in row.command else ("error: ",)
    assert len(lines) == 1 and lines[0].startswith(said), _report(out)
    assert row.message.replace("{tmp}", str(out.tmp)) in lines[0], _report(out)
    written = {
        path: ("created" if path not in out.before else "deleted" if path not in out.after else "changed")
        for path in out.before.keys() | out.after.keys()
        if out.before.get(path) != out.after.get(path)
    }
    assert not written, f"written: {written}\n{_report(out)}"
    if row.slurm:
        assert not out.ours, f"submitted (cancelled since): {out.ours}\n{_report(out)}"
        assert out.jobs_after <= out.jobs_before, f"squeue: {out.jobs_before} -> {out.jobs_after} jobs"
