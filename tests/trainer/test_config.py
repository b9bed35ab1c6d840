"""TrainConfig reports every problem at once, each at its field's location."""

import pytest

from trainer.config import TrainConfigError, build_train_config

BASE = {"base_model": "builtin:tiny-sd", "dataset": "builtin:demo"}


def test_a_field_error_does_not_hide_the_combination_checks():
    with pytest.raises(TrainConfigError) as err:
        build_train_config({**BASE, "train_batch_size": 0, "resolution": 65, "center_crop": False})
    fields = [path for path, _ in err.value.problems]
    assert fields == ["train_batch_size", "resolution", "cache_latents"]
    assert "resolution: 65 is not a multiple of 8" in str(err.value)


def test_nested_combination_problems_carry_their_location():
    with pytest.raises(TrainConfigError) as err:
        build_train_config({**BASE, "sampling": {"prompts": ["a"], "seeds": [1, 2]}, "rank": -1})
    assert dict(err.value.problems).keys() == {"rank", "sampling.seeds"}
    assert dict(err.value.problems)["sampling.seeds"] == "2 seeds for 1 prompts; give one per prompt or none"


def test_a_combination_on_a_failing_field_is_not_reported_twice():
    with pytest.raises(TrainConfigError) as err:
        build_train_config({**BASE, "resolution": "big", "enable_bucket": True})
    assert [p for p, _ in err.value.problems] == ["resolution"]  # no bucket complaint about the default resolution
