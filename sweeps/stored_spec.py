"""The spec a sweep was started with, kept in its storage, so that a sweep never answers a
different question than the one asked.

`<sweep>/spec.json` holds the validated spec, the prompts and seeds its suite expanded to (a suite
file may change under the same path) and a sha256 of both. A later start with the same name and
storage compares against it: a difference is an error unless it only touches keys that are safe
to continue with (a larger trial budget, concurrency, tracking, export).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sweeps import storage
from sweeps.results import sweep_uri
from sweeps.spec import SpecError, parse_spec
from sweeps.spec_schema import SweepSpec

SPEC_FILE = "spec.json"
FORMAT = "lorasweep-sweep-spec/1"
# Dotted prefixes whose change leaves every trial's question as it was. `storage` names where the
# record was found, so it is the same place; a suite file's path may change while its expanded
# prompts (compared as eval_prompts/eval_seeds) stay the same.
SAFE_PREFIXES = ("search.max_concurrent", "tracking", "export", "resources.start_timeout_s", "storage",
                 "evaluator.placement")


def spec_record(spec: SweepSpec) -> dict[str, Any]:
    """What is stored and compared: the spec as validated plus its expanded prompts."""
    prompts, seeds = spec.eval_prompts()
    body = {"spec": spec.model_dump(mode="json"), "eval_prompts": prompts, "eval_seeds": seeds}
    suite = spec.prompt_suite()
    if suite is not None and (suite.guidance_scales or suite.img2img):
        # A suite file's guidance scales and img2img items change what every evaluation measures too.
        body["eval_variants"] = {"guidance_scales": suite.guidance_scales,
                                 "img2img": [p.model_dump(mode="json") for p in suite.img2img]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "sha256": digest, **body}


def read_stored(spec: SweepSpec) -> dict | None:
    path = storage.join(sweep_uri(spec), SPEC_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def store(spec: SweepSpec) -> None:
    storage.write_text(storage.join(sweep_uri(spec), SPEC_FILE), json.dumps(spec_record(spec), indent=2, sort_keys=True))


def stored_spec(spec: SweepSpec) -> SweepSpec | None:
    """The spec stored with the sweep that `spec` names (same name and storage), or None."""
    record = read_stored(spec)
    return parse_spec(record["spec"], storage.join(sweep_uri(spec), SPEC_FILE)) if record else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, new value) for every key that differs between two records."""
    keys = ("spec", "eval_prompts", "eval_seeds", "eval_variants")  # eval_variants: absent without them
    a, b = _flat({k: old.get(k) for k in keys}), _flat({k: new.get(k) for k in keys})
    return [(k.removeprefix("spec."), a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_safe_change(key: str, old: Any, new: Any) -> bool:
    """Whether changing `key` from `old` to `new` leaves every trial's question as it was."""
    if key == "search.num_trials":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    if key == "eval.suite":
        return isinstance(old, str) and isinstance(new, str)
    return any(key == p or key.startswith(p + ".") for p in SAFE_PREFIXES)


def check_against_stored(spec: SweepSpec, source: str) -> list[str]:
    """Compare `spec` with the stored one. Returns notes on safe changes (and records the new spec);
    raises SpecError listing the differing keys and the ways on when a change is not safe."""
    old = read_stored(spec)
    new = spec_record(spec)
    if old is None or old["sha256"] == new["sha256"]:
        return []
    diffs = differences(old, new)
    unsafe = [d for d in diffs if not is_safe_change(*d)]
    if unsafe:
        where = storage.join(sweep_uri(spec), SPEC_FILE)
        lines = [f"{key}: the stored sweep has {_show(a)}, this spec {_show(b)}" for key, a, b in unsafe]
        lines.append(f"the sweep {spec.name!r} in {spec.storage_uri} was started with another spec ({where}). "
                     "Either give this spec a new `name` (a new sweep), or run with --resume to continue the "
                     f"stored spec as it was, or remove {sweep_uri(spec)} to start over")
        raise SpecError(source, lines)
    store(spec)
    return [f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in diffs]


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
