"""The package boundaries (README, "Layout"): trainer/ knows nothing of Ray or W&B, evaluator/
keeps Ray to its one thin service module, toyworld/ is a leaf and nothing imports pretrain/."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_ALLOWED = {"evaluator.remote"}


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)]) if m.name != "__main__"]


@pytest.mark.parametrize("package", ["trainer", "evaluator"])
def test_importing_the_package_does_not_pull_in_ray(package):
    # Only Ray here: open_clip imports timm, whose timm.utils.summary imports wandb whenever it
    # is installed. Our own sources are checked for both by the next test.
    modules = [m for m in _modules(package) if m not in RAY_ALLOWED]
    assert len(modules) > 5, modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] == 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_source_file_outside_the_service_names_ray_or_wandb():
    offenders = []
    for package in ("trainer", "evaluator"):
        for path in (ROOT / package).glob("*.py"):
            if f"{package}.{path.stem}" in RAY_ALLOWED:
                continue
            for line in path.read_text().splitlines():
                words = line.strip().split()
                if words[:1] in (["import"], ["from"]) and words[1].split(".")[0] in ("ray", "wandb"):
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []


def _imported_top_packages(package: str) -> set[str]:
    """First names of every module that `package`'s own sources import (read, not run)."""
    import ast

    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_toyworld_is_a_leaf_and_nothing_imports_pretrain():
    """The toy world is used by trainer/, evaluator/ and sweeps/ and uses none of them; the
    pretraining scripts sit above trainer/ and evaluator/, and no package imports them."""
    ours = {"trainer", "evaluator", "sweeps", "toyworld", "pretrain"}
    assert _imported_top_packages("toyworld") & ours == {"toyworld"}
    for package in ("trainer", "evaluator", "sweeps", "toyworld"):
        assert "pretrain" not in _imported_top_packages(package), package
    assert "evaluator" not in _imported_top_packages("trainer")
    assert "trainer" not in _imported_top_packages("evaluator")


# What each package's modules may import from the project (module level and inside functions).
ALLOWED = {
    "common": set(),
    "toyworld": {"common"},
    "trainer": {"common", "toyworld"},
    "evaluator": {"common", "toyworld"},
    "sweeps": {"common", "toyworld", "trainer", "evaluator"},
    "pretrain": {"common", "toyworld", "trainer", "evaluator"},
}


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (functions included)."""
    import ast

    modules = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod when that is a module of ours
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_packages_import_only_what_their_layer_allows():
    offenders = [f"{m} imports {t}" for m, targets in _import_graph().items() for t in targets
                 if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert offenders == []


def test_the_import_graph_has_no_cycles():
    """Not even through imports inside functions: those only hide a cycle, they do not remove it.
    Package `__init__` modules that re-export lazily (evaluator) count as their package."""
    graph = _import_graph()
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in ALLOWED:  # a package's __init__: importing it does not import its modules here
                visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert cycles == []


def test_the_code_passes_ruff():
    """The lint rules in pyproject.toml ([tool.ruff]) hold for every Python file of the repository."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
