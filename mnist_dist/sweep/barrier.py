"""Where the packs of one wave of `sweep run` meet at each hyperband band, and the judge that a pack
calls after every epoch (hyperband.py has the rule).

A wave is the packs one runner starts together (every worker busy); with early termination the next
wave starts once the last one has ended, so which values a decision sees never depends on timing.
Each pack's home (its pack dir, or a pack of one's run dir) holds `bands/`:

    bands/band-0003.json        its live members' metric at epochs 0..3 (written on arrival at band 3)
    bands/band-0003.kept.json   the members it keeps after band 3's decision, whether it can give
                                and take members (a pack of several on one process), and its
                                packing key (only packs of one key share members)
    bands/band-0003.moves.json  the moves the wave made at band 3, as this pack computed them
    bands/ended                 it trains no more (written by the pack, and by the runner for one killed)

A pack that arrives at a band writes its file and waits for every peer of its wave to have written
the same band or to have ended, then judges. Band files stay and are never written again: a rerun
after a kill finds a peer's band it passed already (the same values: the same members train bitwise
the same), its own as it was (even once members it had then have moved on), and nobody waits for a
band a peer will not reach again. A peer that is alive but never arrives ends the wait after
MNIST_DIST_BAND_TIMEOUT seconds (default 600) with an error that names it.

Then the packs balance their survivors: each writes its kept file, waits for its peers' (or their
end), and every pack computes the same moves from the same files (`moves`), so that the wave's
packs go on with member counts that differ by at most one: the run takes the sum over bands of its
slower pack, and hyperband's survivors rarely fall evenly (bench/results/SWEEP-hyperband.md). The
moves are written too, and a pack that reaches the band later (a rerun after a stop or a kill, its
peers past the band) follows the moves a peer made there instead of computing its own: those that
went on without it made none with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from mnist_dist.errors import BandTimeout, UserError
from mnist_dist.sweep import hyperband
from mnist_dist.sweep.layout import SweepDir

PEERS = "MNIST_DIST_PEERS"  # a pack process's environment: the homes of its wave, os.pathsep-joined
TIMEOUT = "MNIST_DIST_BAND_TIMEOUT"
ENDED = "ended"


def bands_dir(home: Path) -> Path:
    return home / "bands"


def band_file(home: Path, band: int) -> Path:
    return bands_dir(home) / f"band-{band:04d}.json"


def kept_file(home: Path, band: int) -> Path:
    return bands_dir(home) / f"band-{band:04d}.kept.json"


def mark_ended(home: Path) -> None:
    with contextlib.suppress(OSError):
        bands_dir(home).mkdir(parents=True, exist_ok=True)
        (bands_dir(home) / ENDED).write_text(f"{os.getpid()}\n")


def clear_ended(home: Path) -> None:
    (bands_dir(home) / ENDED).unlink(missing_ok=True)


def timeout() -> float:
    text = os.environ.get(TIMEOUT, "600")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{TIMEOUT}={text!r}: a number of seconds above 0")
    return value


class Judge:
    """Called by the training loop after each epoch with its live members' histories; at a band, meets
    the wave and returns the members to stop, each with its hyperband.Decision's record."""

    def __init__(self, manifest: dict[str, Any], sweep: SweepDir, home: Path, peers: list[Path], cfg: Any):
        from mnist_dist.sweep.packing import key

        self.key, epochs = key(cfg), cfg.total_epochs  # what members that may move here share
        self.early_terminate = manifest["early_terminate"]
        self.metric = manifest.get("metric") or {"name": "val_acc", "goal": "maximize"}
        self.sweep, self.home, self.peers = sweep, home, [p for p in peers if p != home]
        self.at = set(hyperband.reachable(self.early_terminate, epochs))
        self.wait = timeout()

    @classmethod
    def for_pack(cls, home: Path, cfg: Any, peers: list[Path]) -> Judge | None:
        """The judge of a pack (its checkpoints in `home`; `cfg`, a member's TrainConfig) of the sweep
        that member belongs to, meeting `peers` at each band; None without early termination (in
        sweep.json)."""
        from mnist_dist.sweep.spec import read_manifest

        sweep = SweepDir.of_member(cfg.run_dir())
        if not sweep.manifest.is_file():
            return None
        manifest = read_manifest(sweep.root)
        if not manifest.get("early_terminate"):
            return None
        return cls(manifest, sweep, home, peers, cfg)

    @classmethod
    def from_environment(cls, home: Path, cfg: Any) -> Judge | None:
        """A pack process's judge: with early termination, its runner names the wave in $MNIST_DIST_PEERS
        (unset: this runner does not terminate early, e.g. it retries terminated members)."""
        if PEERS not in os.environ:
            return None
        peers = [Path(p) for p in os.environ[PEERS].split(os.pathsep) if p]
        return cls.for_pack(home, cfg, peers)

    def __call__(self, epoch: int, histories: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        if epoch not in self.at or not histories:
            return {}
        name = self.metric["name"]
        values = {mid: _values(h, name, epoch) for mid, h in histories.items()}
        mine = _written(band_file(self.home, epoch), values)
        at_band = {**self._meet(epoch, band_file), **mine}
        others = [values for mid, values in at_band.items() if mid not in mine]
        others += [v for v in self._ledger(epoch, skip=set(at_band)) if v]
        decided = hyperband.decide(self.early_terminate, self.metric, epoch, mine, others)
        return {mid: d.record() for mid, d in decided.items()}

    def balance(self, band: int, kept: list[tuple[str, Path]], movable: bool) -> list[dict[str, str]]:
        """After a band's decision: the moves (`moves`) that even out the members the wave's packs
        keep (`kept`: this pack's, id and run dir, in its model's order; `movable`: whether this pack
        can give and take members)."""
        if band not in self.at:
            return []
        record = {
            "members": [[mid, str(run_dir)] for mid, run_dir in kept],
            "movable": movable,
            "key": self.key,
        }
        packs = {str(self.home): _written(kept_file(self.home, band), record)}
        packs.update(self._meet(band, kept_file, by_peer=True))
        made = [moves_file(Path(home), band) for home in packs if moves_file(Path(home), band).is_file()]
        found = _written(moves_file(self.home, band), _read_json(made[0]) if made else moves(packs))
        planned = {m["id"] for m in found}
        return found + [m for m in self._handed_here(band) if m["id"] not in planned]

    def _handed_here(self, band: int) -> list[dict[str, str]]:
        """The moves into this pack at `band` that a run before this one made (a handover in the
        member's run dir): taken again, whoever the wave is now (its giver may have been planned
        anew after losing its checkpoints, and the member is this pack's since: local.resumable)."""
        from mnist_dist.store import handover

        out = []
        run_dirs = sorted(self.sweep.members.iterdir()) if self.sweep.members.is_dir() else []
        for run_dir in run_dirs:
            record = handover.record(run_dir, band)
            if record is not None and record.get("to") == str(self.home):
                out.append(
                    {"id": run_dir.name, "run_dir": str(run_dir), "from": record["from"], "to": record["to"]}
                )
        return out

    def receive(self, move: dict[str, str], band: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The handover (record, weights) of a member that `move`s into this pack at `band`, once its
        giver wrote it; BandTimeout once the giver ended without it, or after the band's wait."""
        from mnist_dist.store import handover

        giver, ended = Path(move["from"]), bands_dir(Path(move["from"])) / ENDED
        return handover.wait(Path(move["run_dir"]), band, giver, self.home, self.wait, ended.is_file)

    def _meet(self, band: int, file: Any, by_peer: bool = False) -> dict[str, Any]:
        """Wait for every peer's `file` at `band` (or its end); their contents merged (`by_peer`: by
        the peer's home)."""
        deadline = time.monotonic() + self.wait
        found: dict[str, Any] = {}
        waiting = list(self.peers)
        while waiting:
            for peer in list(waiting):
                path = file(peer, band)
                if path.is_file():
                    with contextlib.suppress(OSError, ValueError):
                        content = json.loads(path.read_text())
                        found.update({str(peer): content} if by_peer else content)
                        waiting.remove(peer)
                elif (bands_dir(peer) / ENDED).is_file():
                    waiting.remove(peer)
            if waiting and time.monotonic() > deadline:
                raise BandTimeout(
                    f"hyperband band {band}: waited {self.wait:g} s for the pack(s) "
                    f"{', '.join(str(p) for p in waiting)}, which did not arrive ({TIMEOUT} sets the wait); "
                    "run the sweep again"
                )
            if waiting:
                time.sleep(0.05)
        return found

    def _ledger(self, band: int, skip: set[str]) -> list[list[float]]:
        """The metric at epochs 0..band of every other member of the sweep with a history on disk."""
        from mnist_dist.store.outputs import read_entries

        name, out = self.metric["name"], []
        run_dirs = sorted(self.sweep.members.iterdir()) if self.sweep.members.is_dir() else []
        for run_dir in run_dirs:
            if run_dir.name in skip:
                continue
            try:
                entries = read_entries(run_dir)
            except UserError:  # a damaged file: no values, as W&B's engine skips invalid ones
                continue
            if entries:
                out.append(_values(entries, name, band))
        return out


def moves(packs: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Members to move between a wave's packs (by home: its kept record) so that their counts differ
    by at most one among the packs of each packing key: a pure function of the records, so every pack
    computes the same."""
    keys = sorted({r.get("key", "") for r in packs.values()})
    return [m for k in keys for m in _even_out({h: r for h, r in packs.items() if r.get("key", "") == k})]


def _even_out(packs: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Those that can move members and keep some take part, by home; the larger shares go to the
    fullest packs (ties: by home), and each pack over its share gives its last members, in order, to
    those under theirs. Nothing moves while the counts already differ by one at most. Each move: id,
    run_dir, from, to."""
    homes = sorted(h for h, r in packs.items() if r.get("movable") and r.get("members"))
    counts = {h: len(packs[h]["members"]) for h in homes}
    if len(homes) < 2 or max(counts.values()) - min(counts.values()) < 2:
        return []
    base, extra = divmod(sum(counts.values()), len(homes))
    fullest = sorted(homes, key=lambda h: (-counts[h], h))
    share = {h: base + (1 if i < extra else 0) for i, h in enumerate(fullest)}
    given = [(m, h) for h in homes for m in packs[h]["members"][share[h] :]]
    out = []
    for to in homes:
        for _ in range(share[to] - counts[to]):
            (mid, run_dir), frm = given.pop(0)
            out.append({"id": mid, "run_dir": run_dir, "from": frm, "to": to})
    return out


def moves_file(home: Path, band: int) -> Path:
    return bands_dir(home) / f"band-{band:04d}.moves.json"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _written(path: Path, content: Any) -> Any:
    """What `path` holds, once written: `content` the first time, never rewritten after (a rerun
    arrives at the band with the same values; a member that moved on since is still counted)."""
    from mnist_dist.store.atomic import write_atomic

    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(content) + "\n")
    return content


def _values(history: list[dict[str, Any]], name: str, through: int) -> list[float]:
    """The metric of each epoch 0..through, in order (a value that is not a number ends it)."""
    out = []
    for entry in history:
        if entry.get("epoch", 0) > through:
            break
        value = entry.get(name)
        if not isinstance(value, (int, float)):
            break
        out.append(float(value))
    return out
