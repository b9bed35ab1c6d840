"""LoRA export: kohya + diffusers layouts load in diffusers and reproduce the trained model."""

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config import TrainConfig, build_train_config
from trainer.export import fuse_lora_into_checkpoint, kohya_metadata, save_lora_diffusers, save_lora_kohya
from trainer.loop import LoraTrainer
from trainer.model_loading import load_sd_components
from trainer.sampling import sample_images

PROMPTS = ["lswsks, a red circle on a white background", "lswsks, a red circle on a blue background"]
SEEDS = [0, 1]
RANK, ALPHA = 4, 2.0
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Image agreement between the in-memory model and a reloaded file, in [0, 1] pixel units.
TOLERANCE = 3 / 255

REQUIRED_SS = [
    "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_clip_skip",
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler", "ss_max_train_steps", "ss_steps",
    "ss_resolution", "ss_dataset_dirs", "ss_tag_frequency", "ss_seed", "ss_sd_model_name", "ss_sd_model_hash",
    "ss_output_name",
]
REQUIRED_MODELSPEC = [
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date",
]


def _cfg(tiny_sd_dir, demo_dataset, **over):
    values = dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=2,
        max_train_steps=8, learning_rate=1e-2, rank=RANK, alpha=ALPHA, seed=0, clip_skip=2,
        sampling={"steps": 4},
    )
    values.update(over)
    return build_train_config(values)


def _add_text_encoder_lora(trainer):
    """Use the trainer's own text-encoder LoRA when the config has one, else add and perturb one."""
    te = trainer.models.text_encoder
    if "default" in getattr(te, "peft_config", {}):
        return te
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return te


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, demo_dataset):
    torch.set_num_threads(2)
    extra = {"train_text_encoder": True} if "train_text_encoder" in TrainConfig.model_fields else {}
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, **extra), device="cpu")
    trainer.train()
    te = _add_text_encoder_lora(trainer)
    return trainer, te


@pytest.fixture(scope="module")
def reference_images(trained):
    trainer, _ = trained
    return trainer.sample(PROMPTS, SEEDS).astype(np.float32) / 255


@pytest.fixture(scope="module")
def kohya_full(trained, tiny_sd_dir, tmp_path_factory):
    """The kohya export at scale 1 and what a fresh pipeline renders with it."""
    trainer, te = trained
    path = save_lora_kohya(trainer.models.unet, tmp_path_factory.mktemp("kohya") / "full.safetensors",
                           text_encoder=te, metadata=kohya_metadata(trainer.cfg))
    return path, _render_loaded(tiny_sd_dir, trainer.cfg, path)


def _render_loaded(tiny_sd_dir, cfg, lora_path=None, adapter_weight=None, base=None):
    comps = load_sd_components(base or tiny_sd_dir)
    if lora_path is not None:
        pipe = comps.to_pipeline()
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="x")
        if adapter_weight is not None:
            pipe.set_adapters(["x"], adapter_weights=[adapter_weight])
    return sample_images(comps, PROMPTS, SEEDS, cfg.clip_skip, cfg.resolution, cfg.sampling).astype(np.float32) / 255


def test_kohya_file_keys_shapes_alpha_and_metadata(trained, tmp_path, tiny_sd_dir):
    trainer, te = trained
    meta = kohya_metadata(trainer.cfg, steps=trainer.global_step, output_name="circles", lorasweep_trial="t1",
                          epoch=3, ss_training_comment={"a": 1})
    path = save_lora_kohya(trainer.models.unet, tmp_path / "circles.safetensors", text_encoder=te, metadata=meta)
    tensors = load_file(str(path))
    unet_sd = get_peft_model_state_dict(trainer.models.unet)
    te_sd = get_peft_model_state_dict(te)

    expected = set()
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_text_model_", te_sd)):
        for key, value in sd.items():
            module, kind = key.split(".lora_")
            name = prefix + module.replace(".", "_")
            kohya_kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            expected |= {f"{name}.{kohya_kind}", f"{name}.alpha"}
            assert torch.equal(tensors[f"{name}.{kohya_kind}"], value), name
    assert set(tensors) == expected
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert not any(k.startswith("lora_te1_") for k in tensors)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert all(v.ndim == 0 and v.dtype == torch.float32 and v.item() == ALPHA for v in alphas.values())

    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
    assert all(isinstance(v, str) for v in stored.values())
    assert set(REQUIRED_SS + REQUIRED_MODELSPEC) <= set(stored)
    assert stored["ss_base_model_version"] == "sd_v1" and stored["ss_network_module"] == "networks.lora"
    assert stored["ss_network_dim"] == "4" and float(stored["ss_network_alpha"]) == ALPHA
    assert stored["ss_clip_skip"] == "2" and stored["ss_steps"] == "8" and stored["ss_seed"] == "0"
    assert stored["ss_output_name"] == "circles" == stored["modelspec.title"]
    assert stored["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert stored["modelspec.resolution"] == "64x64"
    assert stored["lorasweep_trial"] == "t1" and stored["ss_epoch"] == "3"
    assert json.loads(stored["ss_training_comment"]) == {"a": 1}
    unet_file = tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert stored["ss_sd_model_hash"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()[:10]
    tags = json.loads(stored["ss_tag_frequency"])
    # The demo's captions have no commas: each is one tag; all 18 concept captions carry the trigger.
    assert sum(n for tag, n in tags["5_lswsks shape"].items() if "lswsks" in tag) == 18
    assert not any("lswsks" in tag for tag in tags["2_shape"])
    assert json.loads(stored["ss_dataset_dirs"]) == {"5_lswsks shape": {"n_repeats": 5, "img_count": 18},
                                                     "2_shape": {"n_repeats": 2, "img_count": 15}}


def test_wrapper_fixes_what_diffusers_converter_gets_wrong(trained, tmp_path):
    trainer, te = trained
    raw = convert_state_dict_to_kohya(
        {**{f"unet.{k}": v for k, v in get_peft_model_state_dict(trainer.models.unet).items()},
         **{f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te).items()}}
    )
    ours = load_file(str(save_lora_kohya(trainer.models.unet, tmp_path / "l.safetensors", text_encoder=te)))
    raw_alphas = {v.item() for k, v in raw.items() if k.endswith(".alpha")}
    assert raw_alphas == {RANK}, "diffusers writes alpha = rank"
    assert {v.item() for k, v in ours.items() if k.endswith(".alpha")} == {ALPHA}
    assert any(k.startswith("lora_te1_encoder_") for k in raw)
    raw_renamed = {k.replace("lora_te1_", "lora_te_text_model_"): v for k, v in raw.items()}
    assert set(raw_renamed) == set(ours)


def test_both_layouts_reproduce_the_trained_model(trained, reference_images, kohya_full, tmp_path, tiny_sd_dir):
    trainer, te = trained
    base = _render_loaded(tiny_sd_dir, trainer.cfg)
    assert np.abs(base - reference_images).mean() > 1e-2, "the LoRA must visibly change the samples"
    _, kohya_images = kohya_full
    assert np.abs(kohya_images - reference_images).max() < TOLERANCE, "kohya layout"
    diff = save_lora_diffusers(trainer.models.unet, tmp_path / "d" / "pytorch_lora_weights.safetensors",
                               text_encoder=te)
    loaded = _render_loaded(tiny_sd_dir, trainer.cfg, diff)
    assert np.abs(loaded - reference_images).max() < TOLERANCE, "diffusers layout"


def test_text_encoder_lora_is_exported_and_matters(trained, reference_images, tmp_path, tiny_sd_dir):
    trainer, _ = trained
    unet_only = save_lora_kohya(trainer.models.unet, tmp_path / "u.safetensors")
    assert not any(k.startswith("lora_te") for k in load_file(str(unet_only)))
    loaded = _render_loaded(tiny_sd_dir, trainer.cfg, unet_only)
    assert np.abs(loaded - reference_images).max() > TOLERANCE, "without the text-encoder LoRA the images differ"


def test_export_scale_halves_the_lora(trained, kohya_full, tmp_path, tiny_sd_dir):
    trainer, te = trained
    full, full_at_one = kohya_full
    half = save_lora_kohya(trainer.models.unet, tmp_path / "half.safetensors", text_encoder=te, scale=0.5)
    a, b = load_file(str(full)), load_file(str(half))
    for key in a:
        expect = a[key] * 0.5 if key.endswith("lora_up.weight") else a[key]
        assert torch.allclose(b[key], expect, rtol=0, atol=1e-7), key
    with_half = _render_loaded(tiny_sd_dir, trainer.cfg, half)
    full_at_half = _render_loaded(tiny_sd_dir, trainer.cfg, full, adapter_weight=0.5)
    assert np.abs(with_half - full_at_half).max() < TOLERANCE
    assert np.abs(with_half - full_at_one).max() > TOLERANCE
    with pytest.raises(ValueError, match="scale"):
        save_lora_kohya(trainer.models.unet, tmp_path / "nan.safetensors", scale=float("nan"))


@pytest.mark.slow
def test_conv_targets_export_4d_and_load(tiny_sd_dir, demo_dataset, tmp_path):
    torch.set_num_threads(2)
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, target_modules="all", max_train_steps=2), device="cpu")
    trainer.train()
    path = save_lora_kohya(trainer.models.unet, tmp_path / "conv.safetensors",
                           metadata=kohya_metadata(trainer.cfg))
    tensors = load_file(str(path))
    unet = trainer.models.unet
    base_layers = {n: getattr(m, "base_layer", m) for n, m in unet.named_modules()}
    one_by_one = [n for n, m in base_layers.items() if isinstance(m, torch.nn.Conv2d)
                  and m.kernel_size == (1, 1) and n.endswith(("conv_shortcut", "proj_in", "proj_out"))]
    assert one_by_one, "the tiny UNet has 1x1 convs (conv_shortcut, proj_in/proj_out)"
    for module in one_by_one:
        name = "lora_unet_" + module.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.ndim == 4 and down.shape[0] == RANK and down.shape[2:] == (1, 1), name
        assert up.ndim == 4 and up.shape[1] == RANK and up.shape[2:] == (1, 1), name
    conv3 = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv3.shape[2:] == (3, 3), "3x3 convs keep their kernel on lora_down (kohya LoCon layout)"
    assert json.loads(kohya_metadata(trainer.cfg)["ss_network_args"])["conv_dim"] == str(RANK)
    reference = trainer.sample(PROMPTS, SEEDS).astype(np.float32) / 255
    loaded = _render_loaded(tiny_sd_dir, trainer.cfg, path)
    assert np.abs(loaded - reference).max() < TOLERANCE


def test_metadata_must_be_strings(trained, tmp_path):
    trainer, _ = trained
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora_kohya(trainer.models.unet, tmp_path / "x.safetensors", metadata={"ss_network_dim": 4})
    assert not (tmp_path / "x.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_diffusers_file_lists_targets_in_one_order(trained, tmp_path):
    """peft keeps target_modules as a set, whose order changes with each process's string-hash seed;
    the file lists them sorted, so the same trial gives the same file in any process."""
    trainer, _ = trained
    path = save_lora_diffusers(trainer.models.unet, tmp_path / "d.safetensors", text_encoder=trainer.models.text_encoder)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    for prefix in ("unet", "text_encoder"):
        targets = meta[f"{prefix}.target_modules"]
        assert isinstance(targets, list) and targets == sorted(targets) and len(targets) > 1


@pytest.mark.slow
def test_fused_checkpoint_equals_lora_loaded(kohya_full, tmp_path, tiny_sd_dir, trained):
    cfg = trained[0].cfg
    lora, with_lora = kohya_full
    folder = fuse_lora_into_checkpoint(tiny_sd_dir, lora, tmp_path / "fused")
    assert (folder / "model_index.json").is_file()
    fused = _render_loaded(tiny_sd_dir, cfg, base=folder)
    assert np.abs(fused - with_lora).max() < TOLERANCE
    single = fuse_lora_into_checkpoint(tiny_sd_dir, lora, tmp_path / "fused.safetensors")
    comps = load_sd_components(single, config=tiny_sd_dir)
    from_file = sample_images(comps, PROMPTS, SEEDS, cfg.clip_skip, cfg.resolution, cfg.sampling)
    assert np.abs(from_file.astype(np.float32) / 255 - with_lora).max() < TOLERANCE


def test_dataset_summary_for_imagefolder_and_dreambooth(tmp_path):
    from PIL import Image

    from trainer.train_data import dataset_summary, load_train_data

    imf = tmp_path / "imf"
    imf.mkdir()
    rows = [{"file_name": "a.png", "text": "sks, dress, red"}, {"file_name": "b.png", "text": "sks, dress"}]
    (imf / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(imf / name)
    summary = dataset_summary(load_train_data(TrainConfig(base_model="x", dataset=str(imf))))
    assert summary["dirs"] == {"imf": {"n_repeats": 1, "img_count": 2}}
    assert summary["tag_frequency"] == {"imf": {"dress": 2, "red": 1, "sks": 2}}
    db = tmp_path / "db"
    db.mkdir()
    for name in ("x.png", "y.jpg"):
        Image.new("RGB", (8, 8)).save(db / name)
    cfg = TrainConfig(base_model="x", dataset=str(db), instance_prompt="a photo of sks dog", num_repeats=5)
    summary = dataset_summary(load_train_data(cfg))
    assert summary["dirs"] == {"db": {"n_repeats": 5, "img_count": 2}}
    assert summary["tag_frequency"] == {"db": {"a photo of sks dog": 2}}


def test_kohya_dataset_summary_has_one_dir_per_folder(demo_dataset):
    from trainer.train_data import dataset_summary, load_train_data

    summary = dataset_summary(load_train_data(TrainConfig(base_model="x", dataset=str(demo_dataset)), verify=False))
    concept = {k: v for k, v in summary["dirs"].items() if k.startswith("5_")}
    assert sorted(summary["dirs"]) == ["2_shape", "5_lswsks shape"]
    assert concept == {"5_lswsks shape": {"n_repeats": 5, "img_count": 18}}
    assert summary["tag_frequency"]["5_lswsks shape"]["a lswsks circle"] >= 1
