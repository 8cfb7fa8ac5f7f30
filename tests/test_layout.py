"""The package's shape, read from its source: no import cycle (imports inside functions count), short
functions and classes, Accelerate imported in one module only, a model that knows nothing of devices.
These hold the structure the next changes (sweeps, packs) build on."""

from __future__ import annotations

import ast
import graphlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mnist_dist"
MODULES = {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def imported_modules(tree: ast.Module) -> set[str]:
    """The package's modules this module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "mnist_dist":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_dist."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mnist_dist.")}
    return found & MODULES.keys()


def test_no_import_cycle():
    graph = {name: imported_modules(tree) - {name} for name, tree in MODULES.items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    # The data flow: what trains never imports the command line, the entry point or the SLURM job.
    assert order.index("run") < order.index("slurm") and order.index("run") < order.index("cli")
    assert not graph["engine"] & {"run", "cli", "slurm", "train", "outputs"}


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its signature and docstring not counted."""
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
    return fn.end_lineno - body[1 if has_doc else 0].lineno + 1


def test_functions_and_classes_are_short():
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and body_lines(node) > 60:
                long.append(f"{name}.{node.name}: body {body_lines(node)} lines")
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                long.append(f"{name}.{node.name}: class {node.end_lineno - node.lineno + 1} lines")
    assert not long, "over 60 lines (functions) or 250 (classes): " + "; ".join(long)


def test_accelerate_is_imported_by_the_engine_only():
    users = set()
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "accelerate" or n.startswith("accelerate.") for n in names):
                users.add(name)
    # provenance reads accelerate.__version__ for run.json; nothing else touches it.
    assert users == {"engine", "provenance"}


@pytest.mark.parametrize("module", ["model", "member_linear"])
def test_the_model_knows_nothing_of_devices_ranks_or_trackers(module: str):
    """The model and its layer (member_linear) import nothing of the package but that layer."""
    tree = MODULES[module]
    assert imported_modules(tree) <= {"member_linear"} - {module}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for word in ("cuda", "device", "rank", "accelerat", "distributed", "wandb", "world"):
        assert not [n for n in names if word in n.lower()], word


def test_run_module_shows_the_step_within_two_hops():
    """run.py calls Engine.fit, which calls _train_epoch, where backward and the optimizer step are."""
    run_src = (PACKAGE / "run.py").read_text()
    assert "engine.fit(" in run_src
    engine = MODULES["engine"]
    methods = {n.name: n for n in ast.walk(engine) if isinstance(n, ast.FunctionDef)}
    assert "self._train_epoch(" in ast.unparse(methods["fit"])
    epoch = ast.unparse(methods["_train_epoch"])
    assert "backward(" in epoch and "optimizer_step()" in epoch
