"""Every Slurm command this project runs (sinfo, squeue, scontrol, scancel; sbatch through submitit),
with a bounded wait. A client whose controller does not answer waits for its MessageTimeout and
retries (a login node during maintenance, a laptop with the client installed): a hang, a missing
binary and "unable to contact the controller" each become one line that names the command and the
cause (`Unreachable`, a UserError: exit 2), never a traceback after half a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_dist.errors import UserError

TIMEOUT_S = 10.0  # what one Slurm command may take (MNIST_DIST_SLURM_TIMEOUT); a controller answers in ms
CONF = Path("/etc/slurm/slurm.conf")
ON_A_LOGIN_NODE = "run this on a Slurm login node (or start one: slurm/cluster.sh start)"
# What Slurm's clients say when the controller is not there (22.05 and later).
UNREACHABLE = re.compile(
    r"unable to contact slurm controller|socket timed out|connection refused|"
    r"could not establish a configuration source|zero bytes were transmitted",
    re.IGNORECASE,
)
DROPPED = re.compile(r"zero bytes were transmitted", re.IGNORECASE)  # transient: asked again


class Unreachable(UserError):
    """The Slurm controller did not answer, or Slurm's commands are not here."""


def controller() -> str | None:
    """The controller slurm.conf names (SLURM_CONF or /etc/slurm/slurm.conf); None without one."""
    try:
        text = _conf().read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


def _conf() -> Path:
    return Path(os.environ.get("SLURM_CONF") or CONF)


def _nobody() -> str:
    host = controller()
    if host is not None:
        return f"Slurm controller {host} not reachable"
    return f"no Slurm controller configured here ({_conf()} names none)"


def _then() -> str:
    if controller() is None:
        return ON_A_LOGIN_NODE
    return "check `scontrol ping`, or try again later"


def timeout_s() -> float:
    """TIMEOUT_S, or MNIST_DIST_SLURM_TIMEOUT's seconds (a slow controller, a test)."""
    text = os.environ.get("MNIST_DIST_SLURM_TIMEOUT", "").strip()
    if not text:
        return TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise UserError(f"MNIST_DIST_SLURM_TIMEOUT {text!r}: seconds from 0 to 3600, e.g. 10")
    return value


def run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """`cmd`'s answer, whatever its exit code; Unreachable when it is missing, hangs (past
    `timeout`, default timeout_s()), or says the controller cannot be contacted."""
    timeout = timeout_s() if timeout is None else timeout
    for attempt in range(3):
        proc = _answer(cmd, timeout)
        said = (proc.stderr or "").strip()
        # A connection the controller dropped (it is starting, or was busy): asked again, twice.
        if proc.returncode == 0 or not DROPPED.search(said) or attempt == 2:
            break
        time.sleep(1.0)
    if proc.returncode != 0 and UNREACHABLE.search(said):
        first = said.splitlines()[0].removeprefix(f"{cmd[0]}: ").strip()
        raise Unreachable(f"{_nobody()} ({cmd[0]}: {first}); {_then()}")
    return proc


def _answer(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise Unreachable(f"{cmd[0]} not found: {ON_A_LOGIN_NODE}") from None
    except subprocess.TimeoutExpired:
        raise Unreachable(f"{_nobody()} ({cmd[0]} timed out after {timeout:g} s); {_then()}") from None
    except OSError as e:
        raise Unreachable(f"{cmd[0]} could not be run: {e}") from None


@dataclass(frozen=True)
class Partition:
    total_nodes: int
    max_nodes: int | None  # a job's most (MaxNodes); None: unlimited
    default: bool
    gpus_per_node: int | None  # the most any of its nodes has (sinfo's GRES); None: not reported

    @property
    def most_nodes(self) -> int:
        """The most nodes a job may have here."""
        return min(self.total_nodes, self.max_nodes or self.total_nodes)


def partitions() -> dict[str, Partition]:
    """The partitions the controller knows, with their node counts and GPUs (Unreachable without it)."""
    proc = run(["scontrol", "-a", "-o", "show", "partition"])  # -a: hidden ones too
    if proc.returncode != 0:
        raise Unreachable(f"scontrol show partition failed: {(proc.stderr or proc.stdout).strip()[:200]}")
    gpus = gpus_per_node(run(["sinfo", "-a", "-h", "-o", "%P|%G"]).stdout)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "PartitionName" not in fields:
            continue
        most = fields.get("MaxNodes", "UNLIMITED")
        out[fields["PartitionName"]] = Partition(
            total_nodes=int(fields.get("TotalNodes", "0") or 0),
            max_nodes=int(most) if most.isdigit() else None,
            default=fields.get("Default") == "YES",
            gpus_per_node=gpus.get(fields["PartitionName"]),
        )
    return out


def gpus_per_node(sinfo: str) -> dict[str, int]:
    """The most GPUs a node of each partition has, from `sinfo -h -o %P|%G` lines (`gpu*|gpu:4`,
    `gpu|gpu:a100:8(S:0-1)`, `cpu|(null)`); partitions whose nodes report no GPU are left out."""
    gpus: dict[str, int] = {}
    for line in sinfo.splitlines():
        name, _, gres = line.partition("|")
        name = name.strip().rstrip("*")  # the default partition's mark
        counts = [int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
        if counts:
            gpus[name] = max(*counts, gpus.get(name, 0))
    return gpus
