"""Every YAML file the repository ships loads through the loader that will read it.

Shipped = every *.yaml / *.yml under the repository root, except in hidden folders (.git, .venv,
...) and folders that .gitignore names (runs/, .cache/, ...): examples/ and its suites, search.yaml,
the cluster configs, and any YAML a package carries (evaluator/, trainer/, ...). Each file is
classified by what it holds, and by where it lies:

- a Ray cluster config (`cluster_name` and `provider`): only as cluster*.yaml at the root, where
  tests/test_cluster_config.py runs Ray's own validation on it; here it must parse;
- a sweep spec (a key only a sweep spec has: `space`, `storage`, `search`, ...): `load_spec`,
  which resolves a relative `eval.suite` against the file, and its prompts must expand;
- a prompt suite (`natural`, `new_setting`, `no_concept`, `trigger_test`, ...): `load_suite`; a
  file in a `suites/` folder must be one;
- a training config for `python -m trainer --config` (TrainConfig fields plus `output:`):
  `trainer.__main__.read_run_config`.

A YAML file that is none of these fails: ship no file that nothing checks.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest
import yaml

from evaluator.suites import PromptSuite, expand_suite, load_suite
from sweeps.spec import load_spec
from sweeps.spec_schema import SweepSpec
from trainer.__main__ import read_run_config
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".yaml", ".yml")

SWEEP_KEYS = set(SweepSpec.model_fields)
TRAIN_KEYS = set(TrainConfig.model_fields) | {"output", "caption"}  # read_run_config's layout
SUITE_KEYS = set(PromptSuite.model_fields)
SWEEP_ONLY = SWEEP_KEYS - TRAIN_KEYS - SUITE_KEYS
TRAIN_ONLY = TRAIN_KEYS - SWEEP_KEYS - SUITE_KEYS
SUITE_ONLY = SUITE_KEYS - SWEEP_KEYS - TRAIN_KEYS
CLUSTER_KEYS = {"cluster_name", "provider"}


def _ignored(root: Path) -> tuple[list[str], list[str]]:
    """The .gitignore patterns of folders and of files (no negations in this repo's file)."""
    path = root / ".gitignore"
    lines = [line.strip() for line in path.read_text().splitlines()] if path.is_file() else []
    lines = [line.lstrip("/") for line in lines if line and not line.startswith(("#", "!"))]
    return [line.rstrip("/") for line in lines], [line for line in lines if not line.endswith("/")]


def shipped_yaml(root: Path = ROOT) -> list[Path]:
    dir_patterns, file_patterns = _ignored(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not any(fnmatch.fnmatch(d, p) for p in dir_patterns))
        for name in sorted(files):
            if name.endswith(SUFFIXES) and not any(fnmatch.fnmatch(name, p) for p in file_patterns):
                found.append(Path(folder) / name)
    return sorted(found)


def classify(path: Path, data: object, root: Path = ROOT) -> str:
    """`cluster`, `sweep`, `suite` or `train`; raises AssertionError for a file it cannot place."""
    rel = path.relative_to(root)
    assert isinstance(data, dict) and data, f"{rel}: not a YAML mapping, so no loader of this project reads it"
    keys = set(data)
    if CLUSTER_KEYS <= keys:
        assert path.parent == root and fnmatch.fnmatch(path.name, "cluster*.yaml"), (
            f"{rel}: a Ray cluster config must be <repo root>/cluster*.yaml, where tests/test_cluster_config.py checks it")
        return "cluster"
    if keys & SWEEP_ONLY:
        kind = "sweep"
    elif keys & SUITE_ONLY and not keys & TRAIN_ONLY:
        kind = "suite"
    elif keys & TRAIN_ONLY and not keys & SUITE_ONLY:
        kind = "train"
    else:
        raise AssertionError(
            f"{rel}: cannot tell what this YAML is (top-level keys {sorted(keys)}): not a sweep spec, prompt "
            "suite, training config or cluster config. Give it a loader in tests/test_shipped_yaml.py or do not ship it")
    if "suites" in rel.parts[:-1]:
        assert kind == "suite", f"{rel}: lies in a suites/ folder but reads as a {kind}, not a prompt suite"
    return kind


def check_file(path: Path, root: Path = ROOT) -> str:
    """Load `path` with its own loader (raises on any problem); returns its kind."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    kind = classify(path, data, root)
    if kind == "cluster":
        assert isinstance(data["cluster_name"], str) and isinstance(data["provider"], dict)
        assert data["provider"].get("type"), f"{path.name}: provider.type is missing"
    elif kind == "sweep":
        spec = load_spec(path)
        prompts, _seeds = spec.eval_prompts()
        assert prompts, f"{path}: no eval prompts"
    elif kind == "suite":
        suite = load_suite(path)
        assert expand_suite(suite, "sks", "thing")
    else:
        read_run_config(str(path), [], None, None)
    return kind


SHIPPED = shipped_yaml()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_loads(path):
    check_file(path)


def test_the_known_files_are_found_and_classified():
    kinds = {str(p.relative_to(ROOT)): check_file(p) for p in SHIPPED}
    expected = {
        "search.yaml": "sweep", "examples/demo.yaml": "sweep", "examples/pareto_demo.yaml": "sweep",
        "examples/finetune.yaml": "sweep", "examples/finetune_sd15.yaml": "sweep",
        "examples/train.yaml": "train", "examples/suites/default.yaml": "suite", "examples/suites/demo.yaml": "suite",
        "examples/suites/clothing.yaml": "suite", "cluster.yaml": "cluster", "cluster-onprem.yaml": "cluster",
    }
    assert {k: kinds.get(k) for k in expected} == expected
    # Every bundled YAML of the packages (none today) is in the list too.
    for package in ("evaluator", "trainer", "sweeps", "toyworld"):
        for path in (ROOT / package).rglob("*"):
            if path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                assert path in SHIPPED, path


# --- the checks themselves --------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_discovery_skips_hidden_and_ignored_folders(tmp_path):
    root = _tree(tmp_path, {
        ".gitignore": "runs/\n*.egg-info/\n.cache/\nscratch.yaml\n",
        "examples/new.yaml": "{}", "examples/suites/x.yml": "{}", "evaluator/suites/bundled.yaml": "{}",
        "top.yaml": "{}", "notes.txt": "", "scratch.yaml": "{}",
        ".venv/lib/site.yaml": "{}", ".cache/c.yaml": "{}", "runs/demo/params.yaml": "{}", "x.egg-info/y.yaml": "{}",
    })
    assert [str(p.relative_to(root)) for p in shipped_yaml(root)] == [
        "evaluator/suites/bundled.yaml", "examples/new.yaml", "examples/suites/x.yml", "top.yaml",
    ]


DEMO = (ROOT / "examples" / "demo.yaml").read_text()


@pytest.mark.parametrize(
    ("rel", "text", "error"),
    [
        ("examples/bad.yaml", DEMO + "output: runs\n", "output: unknown key"),  # the docs' old mistake
        ("examples/bad.yaml", DEMO.replace("suite: suites/demo.yaml", "suite: suites/missing.yaml"), "suite file not found"),
        ("examples/suites/bad.yaml", "natural: ['a {trigger} {colour} circle']\n", "unknown placeholder"),
        ("examples/suites/spec.yaml", DEMO, "not a prompt suite"),
        ("examples/bad_train.yaml", "base_model: builtin:tiny-sd\ndataset: builtin:demo\nrank: 0\n", "rank"),
        ("examples/what.yaml", "foo: 1\nbar: [2]\n", "cannot tell what this YAML is"),
        ("examples/list.yaml", "- a\n- b\n", "not a YAML mapping"),
        ("examples/cluster.yaml", "cluster_name: x\nprovider: {type: local}\n", "must be <repo root>/cluster*.yaml"),
        ("examples/broken.yaml", "space: [unclosed\n", "while parsing"),
    ],
    ids=["unknown-spec-key", "missing-suite-file", "bad-suite", "spec-in-suites", "bad-train-config",
         "unclassifiable", "not-a-mapping", "cluster-config-elsewhere", "invalid-yaml"],
)
def test_a_bad_shipped_file_fails(tmp_path, rel, text, error):
    root = _tree(tmp_path, {rel: text, "examples/suites/demo.yaml": (ROOT / "examples/suites/demo.yaml").read_text()})
    with pytest.raises(Exception) as err:
        check_file(root / rel, root)
    assert error in str(err.value), str(err.value)


def test_good_copies_pass_in_another_tree(tmp_path):
    root = _tree(tmp_path, {
        "examples/demo.yaml": DEMO, "examples/suites/demo.yaml": (ROOT / "examples/suites/demo.yaml").read_text(),
        "examples/train.yaml": (ROOT / "examples/train.yaml").read_text(),
        "cluster-x.yaml": "cluster_name: x\nprovider: {type: local}\n",
    })
    assert [check_file(p, root) for p in shipped_yaml(root)] == ["cluster", "sweep", "suite", "train"]
