"""The prepare phase: a picklable Prepared that lets a trainer start without the dataset, with
the same losses and the same kohya metadata as a run that prepares for itself."""

import dataclasses
import pickle
import shutil

import numpy as np
import pytest
from builders import small_kohya_dataset

from trainer.config import TrainConfigError, build_train_config
from trainer.dataset_layouts import DatasetError
from trainer.export import kohya_metadata
from trainer.loop import LoraTrainer
from trainer.preparation import prepare

TIMESTAMPS = ("ss_training_finished_at", "modelspec.date")


def _cfg(tiny_sd_dir, dataset, cache, **over):
    values = dict(base_model=str(tiny_sd_dir), dataset=str(dataset), resolution=64, train_batch_size=2,
                  max_train_steps=2, learning_rate=1e-3, rank=2, seed=3, cache_dir=str(cache), random_flip=True)
    return build_train_config({**values, **over})


@pytest.fixture(scope="module")
def prepared_run(tiny_sd_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = _cfg(tiny_sd_dir, small_kohya_dataset(tmp / "data"), tmp / "cache")
    return cfg, prepare(cfg, device="cpu")


def test_prepared_round_trips_through_pickle(prepared_run, tiny_sd_dir):
    cfg, prepared = prepared_run
    back = pickle.loads(pickle.dumps(prepared))
    assert back == prepared
    assert back.base_model == str(tiny_sd_dir.resolve()) and len(back.base_model_sha256) == 64
    assert len(back.data.examples) == 6 and back.data.target_sizes(cfg) == prepared.data.target_sizes(cfg)
    assert back.dataset_summary["dirs"] == {"2_sks circle": {"n_repeats": 2, "img_count": 3}}


def test_same_losses_with_and_without_prepared(prepared_run):
    cfg, prepared = prepared_run
    given = LoraTrainer.build(cfg, device="cpu", prepared=prepared)
    own = LoraTrainer.build(cfg, device="cpu")
    assert given.latent_cache.folder == own.latent_cache.folder, "the cache prepare built is found"
    assert given.text_cache.folder == own.text_cache.folder
    assert [h["loss"] for h in given.train()] == [h["loss"] for h in own.train()]


def test_trainer_from_prepared_never_reads_the_dataset(tiny_sd_dir, tmp_path):
    cfg = _cfg(tiny_sd_dir, small_kohya_dataset(tmp_path / "data"), tmp_path / "cache")
    prepared = prepare(cfg, device="cpu")
    # Cache keys come from the prepared fingerprints, not from fingerprinting the modules again.
    other = dataclasses.replace(prepared, vae_fingerprint="0" * 64, text_encoder_fingerprint="1" * 64)
    rekeyed = LoraTrainer.build(cfg, device="cpu", prepared=other)
    own = LoraTrainer.build(cfg, device="cpu", prepared=prepared)
    assert rekeyed.latent_cache.folder != own.latent_cache.folder
    assert rekeyed.text_cache.folder != own.text_cache.folder
    shutil.rmtree(tmp_path / "data")
    trainer = LoraTrainer.build(cfg, device="cpu", prepared=prepared)
    assert np.isfinite(trainer.step()["loss"])
    with pytest.raises(DatasetError, match="does not exist"):
        LoraTrainer.build(cfg, device="cpu")  # without the Prepared the dataset is needed


def test_prepared_for_other_data_settings_is_refused(prepared_run):
    cfg, prepared = prepared_run
    with pytest.raises(TrainConfigError, match="num_repeats: None there, 1 here"):
        LoraTrainer.build(cfg.model_copy(update={"num_repeats": 1}), device="cpu", prepared=prepared)


def test_kohya_metadata_from_prepared_equals_metadata_from_scratch(prepared_run):
    cfg, prepared = prepared_run
    with_prepared = kohya_metadata(cfg, prepared, steps=2, output_name="x")
    from_scratch = kohya_metadata(cfg, steps=2, output_name="x")
    for key in TIMESTAMPS:
        with_prepared.pop(key), from_scratch.pop(key)
    assert with_prepared == from_scratch
    assert with_prepared["ss_new_sd_model_hash"] == prepared.base_model_sha256
    assert with_prepared["ss_num_train_images"] == "6"
