"""The tiny SD 1.x model the project builds, its two saved layouts, and base-model loading."""

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from trainer import tiny
from trainer.model_loading import BaseModelError, BaseModelNotFoundError, load_sd_components
from trainer.tiny import (
    TINY_SD_FILE_ID,
    TINY_SD_ID,
    TINY_SD_RANDOM_ID,
    build_tiny_sd_pipeline,
    ensure_tiny_sd,
    ensure_tiny_sd_single_file,
    load_toy_sd_pipeline,
    shipped_weights_info,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b) -> None:
    """Every tensor equal, bit for bit (meta tensors, i.e. weights a loader skipped, fail)."""
    for name in MODELS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sb[key].device.type != "meta", f"{name}.{key} was not loaded"
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs"


@pytest.fixture(scope="session")
def tiny_sd_file(tiny_sd_dir) -> Path:
    return ensure_tiny_sd_single_file()


@pytest.fixture(scope="session")
def folder_pipe(tiny_sd_dir) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir)


def test_builder_is_deterministic():
    a, b = build_tiny_sd_pipeline(seed=0), build_tiny_sd_pipeline(seed=0)
    assert_same_weights(a, b)
    other = build_tiny_sd_pipeline(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, other.unet.conv_in.weight)


def test_sizes_and_sd_shape():
    pipe = build_tiny_sd_pipeline()
    total = sum(p.numel() for name in MODELS for p in getattr(pipe, name).parameters())
    assert total < 5_000_000
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.num_hidden_layers == 4  # clip skip 2 leaves 3 layers


def test_vae_costs_what_sd15s_does_next_to_its_unet():
    """SD 1.5's VAE encoder at 512 px does 1.39x the work of one UNet forward; the cache
    benchmark is only representative when the tiny model keeps that proportion."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = build_tiny_sd_pipeline()
    assert pipe.vae.config.layers_per_block == pipe.unet.config.layers_per_block == 2  # as in SD 1.5
    with torch.no_grad(), FlopCounterMode(display=False) as vae_count:
        pipe.vae.encode(torch.zeros(1, 3, 64, 64))
    with torch.no_grad(), FlopCounterMode(display=False) as unet_count:
        pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.zeros(1, 77, 32))
    assert 1.2 < vae_count.get_total_flops() / unet_count.get_total_flops() < 1.6


def test_folder_round_trip_and_sampling(tiny_sd_dir, folder_pipe):
    assert (tiny_sd_dir / "model_index.json").is_file()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_sd_dir / "tokenizer").iterdir()}
    assert_same_weights(folder_pipe, load_toy_sd_pipeline())
    assert folder_pipe.safety_checker is None
    folder_pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = folder_pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert (image >= 0).all() and (image <= 1).all()


def test_scheduler_folder_loads_as_training_and_sampling_schedulers(tiny_sd_dir):
    for cls in (DDPMScheduler, DDIMScheduler):
        sched = cls.from_pretrained(tiny_sd_dir, subfolder="scheduler")
        assert sched.config.beta_schedule == "scaled_linear"
        assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
        assert sched.config.num_train_timesteps == 1000
        assert sched.config.prediction_type == "epsilon"
        assert sched.config.clip_sample is False
        assert sched.config.steps_offset == 1


def test_tokenizer_matches_open_clip(folder_pipe):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tok = folder_pipe.tokenizer
    texts = ["a photo of a cat", "nosnjaoutfit, a woman in traditional clothing!", "sks dog 2024 naïve café"]
    for text in texts:
        expected = [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]
        assert tok(text).input_ids == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77 and len(tok) == 49408
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert len(tok(" ".join(["cat"] * 200), truncation=True).input_ids) == 77


def test_single_file_has_sd15_layout(tiny_sd_file):
    with safe_open(str(tiny_sd_file), framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    # names as in v1-5-pruned-emaonly.safetensors
    for key in [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight",
    ]:
        assert key in keys, key
    assert len(q_shape) == 4  # LDM's VAE attention is 1x1 convolutions


def test_single_file_round_trip(tiny_sd_dir, tiny_sd_file, folder_pipe):
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_sd_file),
        config=str(tiny_sd_dir),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    assert_same_weights(pipe, folder_pipe)


def test_load_sd_components_builtins(folder_pipe):
    folder, single = load_sd_components(TINY_SD_ID), load_sd_components(TINY_SD_FILE_ID)
    assert_same_weights(single, folder_pipe)
    assert_same_weights(folder, folder_pipe)
    for comps, source in ((folder, "tiny-sd-toy"), (single, "tiny-sd-toy.safetensors")):
        assert Path(comps.source).name == source
        assert isinstance(comps.noise_scheduler, DDPMScheduler)
        assert comps.noise_scheduler.config.prediction_type == "epsilon"
        for name in MODELS:
            model = getattr(comps, name)
            assert not model.training
            assert not any(p.requires_grad for p in model.parameters())
            assert next(model.parameters()).dtype == torch.float32
    pipe = single.to_pipeline()
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.unet is single.unet
    image = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_local_folder_and_file_paths(tiny_sd_dir, tiny_sd_file):
    comps = load_sd_components(str(tiny_sd_dir))
    assert comps.source == str(tiny_sd_dir.resolve())
    comps = load_sd_components(tiny_sd_file, config=tiny_sd_dir)
    assert comps.source == str(tiny_sd_file.resolve())


@pytest.fixture
def no_hub(monkeypatch):
    # As on the cluster: nothing may be fetched, whatever the environment says.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_failure_says_what_to_do(no_hub):
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(BaseModelError) as err:
        load_sd_components(repo)
    message = str(err.value)
    assert repo in message and "local" in message and "model_index.json" in message


def test_single_file_without_config_needs_local_config(no_hub, tiny_sd_file):
    with pytest.raises(BaseModelError, match="config="):
        load_sd_components(tiny_sd_file)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' own call
def test_hub_id_loads_from_local_hf_cache_when_offline(
    no_hub, monkeypatch, tmp_path, tiny_sd_dir, tiny_sd_file, folder_pipe
):
    # A cluster with a pre-filled HF cache and HF_HUB_OFFLINE=1: hub ids still work, from the cache.
    repo, commit = "lorasweep/tiny-sd", "0" * 40
    repo_cache = tmp_path / "models--lorasweep--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from_hub_id = load_sd_components(repo)
    assert from_hub_id.source == repo
    assert_same_weights(from_hub_id, folder_pipe)
    assert_same_weights(load_sd_components(tiny_sd_file, config=repo), folder_pipe)


@pytest.mark.parametrize("name", ["/no/such/dir/model.safetensors", "./missing/tiny-sd", "~/nowhere/x/y"])
def test_missing_local_path_is_named(name):
    with pytest.raises(BaseModelNotFoundError) as err:
        load_sd_components(name)
    assert name in str(err.value) and "not found" in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_pickle_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    with pytest.raises(BaseModelError, match=r"(?s)pickle.*safetensors"):
        load_sd_components(str(ckpt))


def test_folder_without_model_index_and_unknown_builtin(tmp_path):
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_sd_components(str(tmp_path))
    with pytest.raises(BaseModelError, match=TINY_SD_ID):
        load_sd_components("builtin:tiny-sdxl")


def test_concurrent_builds_do_not_corrupt(tmp_path):
    """Two processes enter ensure_tiny_sd together on an empty cache (and a crashed build left a
    temporary folder): both get the same complete folder."""
    models = tmp_path / "models"
    (models / ".tiny-sd-toy.crashed.tmp").mkdir(parents=True)
    code = (
        "import sys; from trainer.tiny import ensure_tiny_sd; print('ready', flush=True); "
        "print(ensure_tiny_sd(sys.argv[1]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(models / "tiny-sd-toy.lock", "a") as lock:
        # Hold the build lock until both have imported, so that they really race for it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        cmd = [sys.executable, "-c", code, str(tmp_path)]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    folder = models / "tiny-sd-toy"
    assert outs == [str(folder)] * 2
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["tiny-sd-toy"]
    assert_same_weights(StableDiffusionPipeline.from_pretrained(folder), load_toy_sd_pipeline())
    assert ensure_tiny_sd(tmp_path) == folder  # found, not rebuilt


def test_shipped_weights_match_their_recorded_hashes_and_are_small():
    info = shipped_weights_info()  # raises on any mismatch
    files = [tiny.SHIPPED_WEIGHTS / name for name in info["sha256"]]
    assert len(files) == 3 and sum(f.stat().st_size for f in files) < 20 * 2**20
    assert info["recipe"]["world"]["held_out"] not in info["recipe"]["world"]["colors"]


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "tiny-sd"
    shutil.copytree(tiny.SHIPPED_WEIGHTS, copy)
    target = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    target.write_bytes(bytes(data))
    monkeypatch.setattr(tiny, "SHIPPED_WEIGHTS", copy)
    with pytest.raises(RuntimeError, match=r"unet/diffusion_pytorch_model.safetensors: sha256 .* does not match"):
        ensure_tiny_sd(tmp_path / "cache")


def test_random_builtin_is_the_seeded_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    comps = load_sd_components(TINY_SD_RANDOM_ID)
    random = build_tiny_sd_pipeline()
    for name in MODELS:
        for key, value in getattr(random, name).state_dict().items():
            assert torch.equal(getattr(comps, name).state_dict()[key], value), f"{name}.{key}"
    pretrained = load_toy_sd_pipeline()
    assert not torch.equal(pretrained.unet.conv_in.weight, random.unet.conv_in.weight)
    assert pretrained.vae.config.scaling_factor != random.vae.config.scaling_factor
