"""A sweep looked at offline: TensorBoard's HParams view of its members (`mnist-dist sweep board`),
read back through the endpoints TensorBoard's page uses and, in headless Chromium, from the page.

The sweep: a 2 x 2 grid (phase-1 lr 0.05/0.5 x seeds 0/1) with W&B's hyperband over 3 epochs, so that
some members are stopped at band 1 and the others finish; `--tracker tensorboard`. A single run that
diverges, tracked by W&B and TensorBoard at once, is a Failure session with the config's main keys.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import f32, load_json, metric_entries, ok, run_cli, start_cli, sweep_members

PHASES = ["--phases", "1x0.5,2x0.1"]  # bands 1 (and 3, the last epoch)
SPEC = """name: board
method: grid
metric: {name: val_acc, goal: maximize}
early_terminate: {type: hyperband, min_iter: 1, eta: 3}
parameters:
  phases.0.lr: {values: [0.05, 0.5]}
  seed: {values: [0, 1]}
"""
METRICS = ["val_acc", "val_loss", "best_val_acc", "best_val_loss", "epoch"]
STATUS = {"done": "STATUS_SUCCESS", "terminated": "STATUS_UNKNOWN", "failed": "STATUS_FAILURE"}
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
# As the device notes say Chromium must start here: no background connections on a closed network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# The text of every cell of the HParams table (vaadin-grid cells, inside the dashboard's shadow roots).
TABLE_CELLS = """() => {
  const cells = (root) => [...root.querySelectorAll("*")].flatMap((el) => [
    ...(el.shadowRoot ? cells(el.shadowRoot) : []),
    ...(el.tagName === "VAADIN-GRID-CELL-CONTENT" ? [el.textContent.trim()] : []),
  ]);
  return cells(document);
}"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_env: dict) -> Path:
    where = tmp_path_factory.mktemp("board")
    (where / "board.yaml").write_text(SPEC)
    root = where / "board"
    args = ["sweep", "run", where / "board.yaml", *PHASES, "--tracker", "tensorboard", "--output-dir", root]
    out = ok(run_cli(*args, env=data_env)).stdout
    assert "terminated" in out and "2 trained" in out, "the lr-0.05 members stop at band 1, the others finish"
    return root


@contextmanager
def board(target: Path, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mnist-dist sweep board TARGET --port 0` as a user starts it: (the URL it printed, the process)."""
    proc = start_cli("sweep", "board", target, "--port", "0", env=env)
    try:
        line = proc.stdout.readline()
        assert "http://" in line, f"no URL: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield line.split(": ", 1)[1].split("#")[0], proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}data/plugin/hparams/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def sessions(base: str) -> tuple[dict, list[dict]]:
    """(the experiment, its session groups with their metrics), as the HParams dashboard asks."""
    experiment = post(base, "experiment", {"experimentName": ""})
    columns = [{"hparam": h["name"], "includeInResult": True} for h in experiment["hparamInfos"]]
    columns += [{"metric": m["name"], "includeInResult": True} for m in experiment["metricInfos"]]
    body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": columns}
    groups = post(base, "session_groups", {**body, "startIndex": 0, "sliceSize": 100})["sessionGroups"]
    return experiment, groups


def expected_rows(root: Path) -> dict[str, dict]:
    """Each member's TensorBoard run (by label), what its row must say: hparams, metrics, status."""
    rows = {}
    for mid in sweep_members(root):
        run_dir = root / "members" / mid
        history, run = load_json(run_dir / "history.json"), load_json(run_dir / "run.json")
        params = next(m["params"] for m in load_json(root / "sweep.json")["members"] if m["id"] == mid)
        status = "done" if run["status"] == "completed" else run["status"]
        rows[f"{Path(run['tracking']['tensorboard']).name} {mid}"] = {  # the Trial ID
            "hparams": params,  # seed among them: it is swept
            "metrics": {
                "val_acc": f32(history[-1]["val_acc"]),
                "val_loss": f32(history[-1]["val_loss"]),
                "best_val_acc": f32(max(e["val_acc"] for e in history)),
                "best_val_loss": f32(min(e["val_loss"] for e in history)),
                "epoch": float(history[-1]["epoch"]),
            },
            "status": STATUS[status],
        }
    return rows


def test_the_hparams_view_lists_each_member_by_its_swept_values_with_its_metrics_and_status(sweep: Path):
    expected = expected_rows(sweep)
    assert sorted(r["status"] for r in expected.values()) == ["STATUS_SUCCESS"] * 2 + ["STATUS_UNKNOWN"] * 2
    started = time.monotonic()
    with board(sweep) as (base, _):
        ready = time.monotonic() - started
        experiment, groups = sessions(base)
    print(f"sweep board: URL serving after {ready:.1f} s")
    assert [h["name"] for h in experiment["hparamInfos"]] == ["phases.0.lr", "seed"], "the swept keys only"
    assert [h["domainDiscrete"] for h in experiment["hparamInfos"]] == [[0.05, 0.5], [0.0, 1.0]]
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == METRICS
    assert len(groups) == 4 and {g["name"] for g in groups} == set(expected)
    for group in groups:
        want = expected[group["name"]]
        (session,) = group["sessions"]
        assert group["hparams"] == want["hparams"], group["name"]
        got = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert got == want["metrics"], group["name"]
        assert session["status"] == want["status"], group["name"]
        label, mid = group["name"].split(" ")
        assert session["name"] == f"members/{mid}/tensorboard/{label}", (
            "the member's run, named by its values"
        )


def test_the_hparams_table_in_chromium(sweep: Path, tmp_path: Path):
    """The page itself, in headless Chromium: the table's rows are the members, its columns the swept
    keys and the metrics, and the values are the histories'; a screenshot of it is taken."""
    if not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed in CI (.ci/run installs it)")
        pytest.skip("no chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    expected = expected_rows(sweep)
    with board(sweep) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 520})
        answers: list = []
        page.on("response", lambda r: answers.append(r) if r.url.endswith("/session_groups") else None)
        page.goto(f"{base}#hparams")
        rows_shown = f"() => ({TABLE_CELLS})().filter(t => t.startsWith('phases.0.lr=')).length === 4"
        page.wait_for_function(rows_shown, timeout=30_000)
        texts = page.evaluate(TABLE_CELLS)
        page.screenshot(path=str(tmp_path / "hparams.png"))
        pages_answers = [r.json() for r in answers if r.status == 200]
        browser.close()
    assert (tmp_path / "hparams.png").read_bytes()[:4] == b"\x89PNG"
    rows = [t for t in texts if t.startswith("phases.0.lr=")]
    assert sorted(rows) == sorted(expected), "one row per member, named by its swept values"
    for column in ["Trial ID", "phases.0.lr", "seed", *METRICS]:
        assert column in texts, column
    for want in expected.values():
        for value in want["metrics"].values():
            assert f"{value:#.5g}" in texts, (value, want)
    with_metrics = [a for a in pages_answers if any(g["metricValues"] for g in a["sessionGroups"])]
    assert with_metrics and len(with_metrics[-1]["sessionGroups"]) == 4, "the page's own request"


def test_a_single_run_that_diverges_is_a_failure_session_beside_its_wandb_run(tmp_path: Path, data_env: dict):
    """`--tracker wandb,tensorboard`: W&B's offline run and TensorBoard's files side by side; the
    session's hparams are the config's main keys and its status is Failure."""
    out = tmp_path / "nan"
    args = ["--phases", "1x1e38", "--tracker", "wandb,tensorboard", "--output-dir", out]
    proc = run_cli("train", *args, env={**data_env, "WANDB_MODE": "offline"})
    assert proc.returncode == 1, proc.stderr
    run = load_json(out / "run.json")
    assert run["status"] == "failed" and run["tracking"]["tracker"] == "wandb,tensorboard"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B offline run"
    with board(out) as (base, _):
        _, groups = sessions(base)
    (group,) = groups
    assert group["name"].startswith("seed ") and group["sessions"][0]["status"] == "STATUS_FAILURE"
    assert group["hparams"] == {
        "seed": 42.0,
        "phases": "1x1e+38",
        "batch_size": 128.0,
        "optimizer": "sgd",
        "precision": "no",
    }
    metrics = {m["name"]["tag"]: m["value"] for m in group["sessions"][0]["metricValues"]}
    assert metrics["epoch"] == metric_entries(out)[-1]["epoch"], "the last epoch it logged"


def running(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_board_stops_tensorboard_with_it_and_refuses_a_port_in_use(sweep: Path):
    for how, code in ((signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)):
        with board(sweep) as (_, proc):
            children = (Path(f"/proc/{proc.pid}/task/{proc.pid}/children")).read_text().split()
            assert children, "TensorBoard runs under the board"
            os.kill(proc.pid, how)  # the board alone, not its group
            assert proc.wait(30) == code
            deadline = time.monotonic() + 15
            while alive := [c for c in children if running(c)]:
                assert time.monotonic() < deadline, f"TensorBoard ({alive}) outlived the board ({how.name})"
                time.sleep(0.1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = run_cli("sweep", "board", sweep, "--port", str(port))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --port {port}: in use on 127.0.0.1; pass another, or --port 0 for a free one"
    ]
