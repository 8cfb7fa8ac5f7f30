"""W&B's sweep engine, wrapped thinly: the `sweeps` package (what `pip install wandb[sweeps]` brings,
and what W&B's local controller runs on) defines what a sweep file means, so it is used here rather
than a parser of our own.

- `check_file`: the engine's schema of a whole sweep file (its messages, one line).
- `parameters`: each parameter as the engine reads it (`HyperParameter`: the implicit distributions
  filled in, e.g. `{min: 0.05, max: 0.8}` is uniform and `{min: 1, max: 8}` int_uniform), nested
  `parameters:` flattened to the dotted config keys (`model: {parameters: {hidden_size: ...}}` is
  `model.hidden_size`), in the file's order.
- `grid`: the engine's grid rule (values, a constant, int_uniform and q_uniform enumerated).
- `draw`: one member of a random sweep, each value drawn by the engine's own sampler (`sample()`: its
  ppf of a uniform draw), from random states seeded by the sweep's name and the member's index.
- `propose`: one member of a bayes sweep, the engine's `next_run` (a Gaussian process over the
  finished members, the pending ones given as running runs, as W&B's controller does), seeded alike.

Rough edges of sweeps 0.2.0 met here: its schema refuses `run_cap` and hyperband's `strict` (W&B's
current keys; wandb/sweeps main has both) and our `base`: they are taken off before it validates.
Under pydantic 2 its SweepRun drops `summary_metrics=` and `history=` given by those names (its v1
`allow_population_by_field_name` is not honoured): every run then looks metric-less, bayes fits a
flat Gaussian process and falls back to random samples ("kernel ... close to their bounds"). So runs
are given by the aliases, `summaryMetrics` and `sampledHistory`. Bayes over a categorical with
probabilities raises IndexError in its cdf: refused. numpy, scipy and scikit-learn come with it:
imported only here, by sweep commands.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import warnings
from collections.abc import Iterator
from typing import Any

ENGINE = "sweeps"  # the package; its version is pinned in pyproject.toml
CONSTANT, CATEGORICAL = "param_single_value", "param_categorical"
GRID_KINDS = {CONSTANT, CATEGORICAL, "param_int_uniform", "param_quniform"}


def load_engine() -> None:
    """Import the engine without its import-time warnings (0.2.0's pydantic v1 config keys under
    pydantic 2): a sweep command's stderr is for the user's problems."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps  # noqa: F401


class Parameter:
    """One swept key: its dotted config key, the engine's kind and filled-in config."""

    def __init__(self, key: str, kind: str, config: dict[str, Any]) -> None:
        self.key, self.kind, self.config = key, kind, config

    @property
    def swept(self) -> bool:
        return self.kind != CONSTANT and not (self.kind == CATEGORICAL and len(self.config["values"]) < 2)

    @property
    def distribution(self) -> str:
        return "constant" if self.kind == CONSTANT else self.config.get("distribution", "categorical")


def check_file(raw: dict[str, Any]) -> str | None:
    """The engine's first objection to the sweep file `raw` (our keys taken off), naming the key, or
    None. (Each parameter is checked by `parameters`, in words of our own where the schema's say only
    "not valid under any of the given schemas".)"""
    load_engine()
    from jsonschema.exceptions import best_match
    from sweeps.config.schema import validator

    engine_view = {k: v for k, v in raw.items() if k not in ("run_cap", "count", "base")}
    engine_view.setdefault("method", "grid")
    stopping = engine_view.get("early_terminate")
    if isinstance(stopping, dict) and "strict" in stopping:  # W&B's current hyperband key; 0.2.0's refuses it
        if not isinstance(stopping["strict"], bool):
            return f"'early_terminate.strict': {stopping['strict']!r} is not true or false"
        engine_view["early_terminate"] = {k: v for k, v in stopping.items() if k != "strict"}
    error = best_match(validator.iter_errors(engine_view))
    if error is None:
        return None
    where = ".".join(map(str, error.absolute_path))
    said = " ".join(error.message.split())
    if where == "early_terminate":
        said += " (W&B's hyperband: type hyperband, and min_iter or max_iter with s; eta, strict optional)"
    return f"'{where}': {said}" if where else said


def parameters(params: dict[str, Any], prefix: str = "") -> list[Parameter]:
    """Each parameter as the engine reads it; ValueError naming the dotted key for one it cannot."""
    load_engine()
    from sweeps.config import ParamValidationError
    from sweeps.config.schema import check_for_deprecated_distributions, validate_categorical_prob
    from sweeps.params import HyperParameter

    out = []
    for name, p in params.items():
        key = f"{prefix}{name}"
        if not isinstance(p, dict):
            raise ValueError(
                f"parameter '{key}': write {{values: [...]}}, {{value: x}} or a distribution, not {p!r}"
            )
        if set(p) == {"parameters"}:
            if not isinstance(p["parameters"], dict) or not p["parameters"]:
                raise ValueError(f"parameter '{key}': nested 'parameters' must map keys to parameters")
            out += parameters(p["parameters"], f"{key}.")
            continue
        try:
            validate_categorical_prob(key, p)
            check_for_deprecated_distributions(key, dict(p))
            hp = HyperParameter(key, dict(p))
        except ParamValidationError:
            raise ValueError(f"parameter '{key}': 'parameters' goes alone (nested keys)") from None
        except Exception as e:  # jsonschema.ValidationError, ValueError: the engine's words
            raise ValueError(_engine_words(key, p, e)) from None
        out.append(Parameter(key, hp.type, hp.config))
    return out


def _engine_words(key: str, p: dict[str, Any], e: Exception) -> str:
    said = " ".join(str(getattr(e, "message", e)).split())
    if said.startswith("invalid hyperparameter configuration"):
        said = (
            f"{p} is none of W&B's parameters (values, value, min/max, or a distribution with its "
            "keys: e.g. {distribution: q_uniform, min: 0, max: 1, q: 0.1})"
        )
    for prefix in (f"{key}: ", f"Parameter {key}: ", f"{key} "):
        said = said.removeprefix(prefix)
    return f"parameter '{key}': {said}"


def grid(params: list[Parameter]) -> list[dict[str, Any]]:
    """Every combination, the first parameter slowest; ValueError for a kind grid cannot take."""
    axes = []
    for p in params:
        if p.kind not in GRID_KINDS:
            raise ValueError(
                f"parameter '{p.key}': grid takes values, a value, int_uniform or q_uniform, not "
                f"{p.distribution}{' with probabilities' if 'probabilities' in p.config else ''}; "
                "use method random"
            )
        axes.append(_grid_values(p))
    keys = [p.key for p in params]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def _grid_values(p: Parameter) -> list[Any]:
    c = p.config
    if p.kind == CONSTANT:
        return [c["value"]]
    if p.kind == CATEGORICAL:
        return list(c["values"])
    if p.kind == "param_int_uniform":
        return list(range(c["min"], c["max"] + 1))
    # q_uniform: min, min + q, ..., max, the values its draws take. Re-implemented: 0.2.0's grid takes
    # numpy.arange(min, max, q), which leaves max out or keeps it by rounding (0.1..0.4 by 0.1 gives
    # 0.1, 0.2, 0.30000000000000004, 0.4).
    steps = int((c["max"] - c["min"]) / c["q"] + 1e-9)
    return [_on_grid(c["min"] + k * c["q"], c["q"]) for k in range(steps + 1)]


def draw(params: list[Parameter], sweep: str, index: int) -> dict[str, Any]:
    """Member `index` of a random sweep: each value the engine's sample, the same on every rerun."""
    from sweeps.params import HyperParameter

    with _seeded(f"{sweep}:{index}"):
        drawn = {p.key: _plain(HyperParameter(p.key, dict(p.config)).sample()) for p in params}
    return {p.key: _on_grid(drawn[p.key], p.config.get("q")) for p in params}


def _on_grid(value: Any, q: Any) -> Any:
    """A value of a q distribution without the float noise of k * q (0.30000000000000004 is 0.3)."""
    return round(value, 12) if q is not None and isinstance(value, float) else value


@contextlib.contextmanager
def _seeded(text: str) -> Iterator[None]:
    """Python's and numpy's global random states (the engine draws from both) seeded by `text`,
    and put back afterwards."""
    import numpy as np

    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _plain(value: Any) -> Any:
    """numpy scalars as Python's (configs and JSON take those)."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def propose(
    params: list[Parameter],
    metric: dict[str, Any],
    finished: list[tuple[dict[str, Any], list[float]]],
    pending: list[dict[str, Any]],
    sweep: str,
    index: int,
) -> dict[str, Any]:
    """Member `index` of a bayes sweep over `params`, for `metric` (name, goal, impute), given the finished
    members (their values and each epoch's metric; none for a member that failed) and the pending
    ones: the engine's next_run, the same for the same inputs."""
    load_engine()
    import logging

    from sweeps import RunState, SweepRun, next_run

    config = {
        "method": "bayes",
        "metric": metric,
        "parameters": {p.key: dict(p.config) for p in params},
    }

    def run(values: dict[str, Any], state: Any, curve: list[float] | None = None) -> Any:
        history = [{metric["name"]: v} for v in curve or []]
        summary = {metric["name"]: curve[-1]} if curve else {}
        config_values = {k: {"value": v} for k, v in values.items()}
        return SweepRun(config=config_values, state=state, summaryMetrics=summary, sampledHistory=history)

    runs = [run(v, RunState.finished if curve else RunState.failed, curve) for v, curve in finished]
    runs += [run(v, RunState.running) for v in pending]
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the engine logs a warning for each odd value
    try:
        with _seeded(f"{sweep}:bayes:{index}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proposed = next_run(config, runs)
    finally:
        logging.getLogger().setLevel(quiet)
    return {p.key: _on_grid(_plain(proposed.config[p.key]["value"]), p.config.get("q")) for p in params}
