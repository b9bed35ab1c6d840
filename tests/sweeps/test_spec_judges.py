"""The optional judges in a sweep spec (`evaluator.dino`, `evaluator.aesthetic`): checked with the
other problems before any training, their metrics objectives only with the judge configured."""

from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, parse_spec
from sweeps.trial_plan import build_plan, input_problems
from tests.evaluator.judge_builders import tiny_dino, tiny_head

ROOT = Path(__file__).resolve().parents[2]


def _base(**over):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data["eval"]["suite"] = str(ROOT / "examples" / data["eval"]["suite"])
    data.update(over)
    return data


def _problems(**over) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(_base(**over), "spec.yaml")
    return err.value.problems


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    tiny_dino(root / "dino")
    tiny_head(root / "head.pth", "linear", 32)  # the tiny CLIP's width
    tiny_head(root / "l14.pth", "mlp", 768)
    return root


def test_configured_judges_make_their_metrics_objectives(files, tmp_path, monkeypatch):
    ev = {"model": "builtin:tiny-clip", "pretrained": None, "dino": str(files / "dino"), "aesthetic": str(files / "head.pth")}
    for metric in ("dino_i", "aesthetic"):
        spec = parse_spec(_base(evaluator=ev, objective={"metric": metric, "mode": "max"}))
        assert spec.primary.metric == metric
    # Relative paths are the working directory's, made absolute for the Ray workers.
    monkeypatch.chdir(files)
    spec = parse_spec(_base(evaluator={**ev, "dino": "dino", "aesthetic": "head.pth"}))
    assert spec.evaluator.judge_paths() == {"dino": str(files / "dino"), "aesthetic": str(files / "head.pth")}
    assert parse_spec(_base()).evaluator.judge_paths() == {"dino": None, "aesthetic": None}


def test_judge_files_are_checked_with_the_other_inputs(files):
    """Like the base model and the dataset: before any model is loaded (build_plan, the dry run),
    not when a stored spec is read back on a machine without them (--status)."""
    ev = {"model": "builtin:tiny-clip", "pretrained": None, "dino": str(files / "missing"), "aesthetic": str(files / "l14.pth")}
    spec = parse_spec(_base(evaluator=ev, base_model="/nonexistent/model"))
    problems = input_problems(spec, local=False)
    text = "\n".join(problems)
    assert any(p.startswith(f"evaluator.dino: {files / 'missing'}: not found") for p in problems), text
    assert any(p.startswith(f"evaluator.aesthetic: {files / 'l14.pth'}: the aesthetic head takes 768-wide") for p in problems)
    assert "ViT-L-14" in text and any(p.startswith("base_model:") for p in problems)
    with pytest.raises(SpecError) as err:
        build_plan(spec, "spec.yaml", local=False)
    assert "evaluator.dino:" in str(err.value) and "evaluator.aesthetic:" in str(err.value)
    good = {**ev, "dino": str(files / "dino"), "aesthetic": str(files / "head.pth")}
    assert input_problems(parse_spec(_base(evaluator=good)), local=False) == []


def test_judge_metrics_need_their_judge_and_a_suite(files):
    text = "\n".join(_problems(objective={"metric": "aesthetic", "mode": "max"}))
    assert "objective.metric: 'aesthetic' comes from an optional judge that is not configured; set evaluator.aesthetic" in text
    two = [{"metric": "objective", "mode": "max"}, {"metric": "dino_i", "mode": "max"}]
    text = "\n".join(_problems(objective=two, search={"sampler": "nsga2"}, pruner={"type": "none"}))
    assert "objective[1].metric: 'dino_i' comes from an optional judge" in text and "evaluator.dino" in text
    plain = {"interval": 10, "prompts": ["a lswsks circle"]}
    ev = {"model": "builtin:tiny-clip", "pretrained": None, "dino": str(files / "dino")}
    text = "\n".join(_problems(eval=plain, evaluator=ev, objective={"metric": "clip_score", "mode": "max"}))
    assert "evaluator.dino: the judges score a prompt suite's images; set eval.suite" in text
