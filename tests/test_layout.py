"""The package's shape, read from its source: folders as layers that import one way, no import cycle
(imports inside functions count), short functions, classes and modules, Accelerate imported in one
module only, a model that knows nothing of devices."""

from __future__ import annotations

import ast
import graphlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mnist_dist"


def dotted(path) -> str:
    """mnist_dist/train/run.py -> train.run; a package's __init__ is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "mnist_dist"


MODULES = {dotted(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
LINES = {dotted(p): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}

# What each folder may import, in the one-way flow cli -> sweep -> slurm -> train -> track -> store.
FOUNDATION = {"config", "errors", "yamlfile"}
MAY_IMPORT = {
    "store": FOUNDATION | {"store"},
    "track": FOUNDATION | {"store", "track"},
    "train": FOUNDATION | {"store", "track", "train"},
    "slurm": FOUNDATION | {"store", "track", "train", "slurm"},
    "sweep": FOUNDATION | {"store", "track", "train", "slurm", "sweep"},
    "cli": FOUNDATION | {"store", "track", "train", "slurm", "sweep", "cli"},
}


def imported_modules(tree: ast.Module) -> set[str]:
    """The package's modules this module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_dist"):
            base = node.module.removeprefix("mnist_dist").lstrip(".")
            for a in node.names:
                name = f"{base}.{a.name}" if base else a.name
                found.add(name if name in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("mnist_dist.") for a in node.names if a.name.startswith("mnist_dist.")
            }
    return found & MODULES.keys()


def layer(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycle():
    graph = {name: imported_modules(tree) - {name} for name, tree in MODULES.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_folders_import_one_way():
    """Each folder imports only the layers after it; config, errors and yamlfile only each other and
    the stdlib-level data files (for the one list of MNIST sources). `python -m mnist_dist.train` is
    the CLI's `train`."""
    wrong = []
    for name, tree in MODULES.items():
        if name == "train.__main__":
            assert imported_modules(tree) == {"cli"}
            continue
        foundation = {"config": {"errors", "store.datafiles", "yamlfile"}, "yamlfile": {"errors"}}
        allowed = MAY_IMPORT.get(layer(name), foundation.get(name, set()))
        wrong += [
            f"{name} -> {dep}"
            for dep in imported_modules(tree)
            if layer(dep) not in allowed and dep not in allowed
        ]
    assert not wrong, "imports against the flow: " + "; ".join(wrong)


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for folder in MAY_IMPORT:
        doc = ast.get_docstring(MODULES[folder]) or ""
        assert "May import" in doc, folder
        assert not [p for p in (PACKAGE / folder).iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_modules_are_at_most_400_lines():
    assert not {name: n for name, n in LINES.items() if n > 400}


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


def test_accelerate_is_imported_in_one_place():
    """train/accelerator.py imports it, the engine uses what that module gives it, nothing else
    touches it."""
    users = set()
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "accelerate" or n.startswith("accelerate.") for n in names):
                users.add(name)
    # provenance reads accelerate.__version__ for run.json; nothing else touches it.
    assert users == {"train.accelerator", "store.provenance"}
    takers = {name for name, tree in MODULES.items() if "train.accelerator" in imported_modules(tree)}
    assert takers == {"train.engine"}


@pytest.mark.parametrize("module", ["train.model", "train.member_linear"])
def test_the_model_knows_nothing_of_devices_ranks_or_trackers(module: str):
    """The model and its layer (member_linear) import nothing of the package but that layer."""
    tree = MODULES[module]
    assert imported_modules(tree) <= {"train.member_linear"} - {module}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for word in ("cuda", "device", "rank", "accelerat", "distributed", "wandb", "world"):
        assert not [n for n in names if word in n.lower()], word


def test_run_module_shows_the_step_within_two_hops():
    """run.py calls Engine.fit, which calls _train_epoch, where backward and the optimizer step are."""
    run_src = (PACKAGE / "train" / "run.py").read_text()
    assert "engine.fit(" in run_src
    engine = MODULES["train.engine"]
    methods = {n.name: n for n in ast.walk(engine) if isinstance(n, ast.FunctionDef)}
    assert "self._train_epoch(" in ast.unparse(methods["fit"])
    epoch = ast.unparse(methods["_train_epoch"])
    assert "backward(" in epoch and "optimizer_step()" in epoch
