"""The one YAML reader for sweep specs, training configs and prompt suites.

`yaml.safe_load` keeps the last of two equal keys silently (a second `space:` block would drop
the first); this loader refuses them with the file, line and key. Tabs in indentation and other
syntax errors come back as one line that names the file, line and column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that cannot be read as data; the message names the file and the place."""


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # Checked before `<<:` merges are flattened in: an explicit key may override a merged one.
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (first at line {first + 1}); YAML keeps only the last one, "
                "so merge the two into one",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
# YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, source: str = "<yaml>") -> Any:
    """The data in `text`; YamlFileError naming `source`, line and problem on bad YAML."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = err.problem or str(err)
        if "\t" in what or "found character '\\t'" in what:
            what += " (YAML indents with spaces; replace the tabs)"
        raise YamlFileError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise YamlFileError(f"{source}: not valid YAML ({err})") from None


def read_yaml(path: str | Path) -> Any:
    """`parse_yaml` of a file; YamlFileError when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise YamlFileError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    return parse_yaml(text, str(path))


def parse_scalar(text: str) -> Any:
    """A `--set` value: read as a YAML scalar (`4` -> 4, `true` -> True, `[2, 4]` -> a list)."""
    return yaml.load(text, Loader=_UniqueKeyLoader) if text != "" else ""
