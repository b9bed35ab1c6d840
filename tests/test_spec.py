from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def _base(**over):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(over)
    return data


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + sorted(ROOT.glob("search*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.searched(), f"{path.name} searches nothing"
    spec.train_config({k: p.extremes()[0] for k, p in spec.searched().items()})


def test_all_problems_reported_together_with_paths():
    data = _base(
        space={
            "learning_rate": {"type": "loguniform", "low": 0, "high": 1e-3},
            "rank": {"type": "choice", "values": [4, 0]},
            "not_a_field": {"type": "uniform", "low": 0, "high": 1},
            "lr_scheduler": {"type": "choice", "values": ["linear", "cosine_typo"]},
        },
        train={"resolution": 64, "max_train_steps": 0, "extra_knob": 3},
        search={"num_trials": 0},
    )
    with pytest.raises(SpecError) as err:
        parse_spec(data, "search.yaml")
    text = str(err.value)
    assert text.startswith("search.yaml:")
    for expected in ("search.num_trials:", "space.learning_rate.low: must be > 0", "train.extra_knob: unknown key"):
        assert expected in text, text


def test_space_and_train_problems_reported_together():
    data = _base(
        space={
            "learning_rate": {"type": "loguniform", "low": 0, "high": 1e-3},
            "rank": {"type": "choice", "values": [4, 0]},
            "not_a_field": {"type": "uniform", "low": 0, "high": 1},
            "lr_scheduler": {"type": "choice", "values": ["linear", "cosine_typo"]},
        },
        train={"resolution": 64, "max_train_steps": 0, "extra_knob": 3},
    )
    with pytest.raises(SpecError) as err:
        parse_spec(data, "search.yaml")
    text = str(err.value)
    for expected in (
        "space.learning_rate.low: must be > 0",
        "space.rank: value 0 is invalid",
        "space.not_a_field: not a training field",
        "space.lr_scheduler: value 'cosine_typo' is invalid",
        "train.max_train_steps:",
        "train.extra_knob: unknown key",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_overrides_and_trigger_substitution(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text((ROOT / "examples" / "demo.yaml").read_text())
    spec = load_spec(path, ["search.num_trials=3", "train.max_train_steps=7"])
    assert spec.search.num_trials == 3 and spec.train["max_train_steps"] == 7
    prompts, seeds = spec.eval_prompts()
    assert all(p.startswith("lswsks, ") for p in prompts)
    assert len(prompts) == len(seeds) == len(spec.eval.prompts) * len(spec.eval.seeds)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
