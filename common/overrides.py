"""`--set key.sub=value` overrides, shared by `python -m trainer` and `sweeps/run.py`."""

from __future__ import annotations

from typing import Any

import yaml

from common.yaml_files import parse_scalar


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply each `dotted.key=value` to `data` in place; returns one problem line per bad item.

    Values are read as YAML scalars, so `--set search.num_trials=4` sets an int.
    """
    problems = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set search.num_trials=4")
            continue
        parts = key.split(".")
        node = data
        try:
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set {key}: {part} is not a section")
            node[parts[-1]] = parse_scalar(raw)
        except ValueError as err:
            problems.append(str(err))
        except yaml.YAMLError as err:
            problems.append(f"--set {key}: the value is not valid YAML ({' '.join(str(err).split())})")
    return problems
