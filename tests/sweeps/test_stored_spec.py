"""A sweep's storage records its spec; another spec under the same name and storage is refused."""

from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, parse_spec
from sweeps.stored_spec import SPEC_FILE, check_against_stored, store, stored_spec

ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path, **over):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data["eval"]["suite"] = str(ROOT / "examples" / data["eval"]["suite"])
    data["storage"] = str(tmp_path)
    for dotted, value in over.items():
        node, *path = dotted.split("__")
        target = data
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
        target[[node, *path][-1]] = value
    return parse_spec(data, "demo.yaml")


def test_same_spec_continues_and_nothing_changes(tmp_path):
    spec = _spec(tmp_path)
    assert check_against_stored(spec, "demo.yaml") == []  # nothing stored yet
    store(spec)
    record = (tmp_path / "demo" / SPEC_FILE).read_text()
    assert check_against_stored(_spec(tmp_path), "demo.yaml") == []
    assert (tmp_path / "demo" / SPEC_FILE).read_text() == record
    assert stored_spec(spec) == spec


def test_a_changed_space_is_refused_with_the_keys_and_the_ways_on(tmp_path):
    store(_spec(tmp_path))
    with pytest.raises(SpecError) as err:
        check_against_stored(_spec(tmp_path, space__rank={"type": "choice", "values": [16, 32]}), "demo.yaml")
    text = str(err.value)
    assert "space.rank.values: the stored sweep has [2, 4, 8], this spec [16, 32]" in text
    assert "new `name`" in text and "--resume" in text and f"remove {tmp_path / 'demo'}" in text
    assert stored_spec(_spec(tmp_path)).space["rank"]["values"] == [2, 4, 8]  # the record is untouched


@pytest.mark.parametrize("change, key", [
    ({"dataset": "/elsewhere/data"}, "dataset"),
    ({"base_model": "builtin:tiny-sd-random"}, "base_model"),
    ({"objective": {"metric": "clip_score", "mode": "max"}}, "objective.metric"),
    ({"resources": {"cpus_per_trial": 2, "gpus_per_trial": 0}}, "resources.cpus_per_trial"),
    ({"search": {"sampler": "tpe", "num_trials": 4, "max_concurrent": 2, "seed": 0}}, "search.num_trials"),
    ({"eval__interval": 50}, "eval.interval"),
])
def test_every_other_change_is_refused(tmp_path, change, key):
    store(_spec(tmp_path))
    with pytest.raises(SpecError, match=rf"  {key}: the stored sweep has"):
        check_against_stored(_spec(tmp_path, **change), "demo.yaml")


def test_safe_changes_continue_and_are_recorded(tmp_path):
    store(_spec(tmp_path))
    more = _spec(tmp_path, search={"sampler": "tpe", "num_trials": 20, "max_concurrent": 1, "seed": 0},
                 export={"top_k": 3}, tracking={"wandb": {"enabled": True}})
    notes = check_against_stored(more, "demo.yaml")
    assert "search.num_trials: 10 -> 20" in notes and "search.max_concurrent: 2 -> 1" in notes
    assert "export.top_k: 1 -> 3" in notes and "tracking.wandb.enabled: false -> true" in notes
    assert stored_spec(more).search.num_trials == 20


def test_a_changed_suite_file_is_a_changed_question(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text((ROOT / "examples" / "suites" / "demo.yaml").read_text())
    store(_spec(tmp_path, eval__suite=str(suite)))
    suite.write_text(suite.read_text().replace("seeds: [", "seeds: [99, "))
    with pytest.raises(SpecError, match="eval_seeds"):
        check_against_stored(_spec(tmp_path, eval__suite=str(suite)), "demo.yaml")
    # The same prompts from a suite file at another path: the same question, so it continues.
    original = (ROOT / "examples" / "suites" / "demo.yaml").read_text()
    suite.write_text(original)
    moved = tmp_path / "moved.yaml"
    moved.write_text(original)
    notes = check_against_stored(_spec(tmp_path, eval__suite=str(moved)), "demo.yaml")
    assert [n.split(":")[0] for n in notes] == ["eval.suite"]
