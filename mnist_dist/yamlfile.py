"""YAML as config and sweep files are read and written here: YAML 1.2's booleans and floats (PyYAML
follows YAML 1.1), safe loading, and one line for a file that is missing, unreadable or malformed.
No torch, no pydantic: config.py and sweep/spec.py read through it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mnist_dist.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML follows YAML 1.1, where on/off/yes/no are booleans,
    so `cuda_graphs: off` or `--set precision=no` would reach the schema as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats too: YAML 1.1 wants a dot and a signed exponent, so `lr: 1e-3` would be a string.
FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_1_2, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or _Loader would read as something else (`no`, or a member
    id such as 61770e5363, a float to YAML 1.2), so config.yaml reads back the same anywhere."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_1_2, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file, e.g. configs/seed.yaml")
    try:
        data = parse_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read as text ({e}); pass a YAML file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: malformed YAML{line}; fix the syntax (see configs/seed.yaml)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
