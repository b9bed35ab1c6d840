"""Checkpoints: 2N steps == N steps + save + a new trainer + load + N steps; no pickle; clear errors."""

import json

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    decode_state,
    encode_state,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from trainer.config import build_train_config
from trainer.loop import LoraTrainer

N = 3  # steps before and after the checkpoint


def _cfg(tiny_sd_dir, demo_dataset):
    # Warmup + cosine, random flips, caption dropout, accumulation and a trained text encoder put
    # state in the scheduler, the numpy RNGs, the data order and the optimizer's second param
    # group, so a restore that misses any of them changes the second half.
    return build_train_config(dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=2,
        gradient_accumulation_steps=2, max_train_steps=2 * N, learning_rate=1e-2, rank=4, alpha=2,
        lr_scheduler="cosine", lr_warmup_steps=2, random_flip=True, caption_dropout_rate=0.3, noise_offset=0.05,
        train_text_encoder=True,
        seed=3,
    ))


@pytest.fixture(scope="module")
def straight(tiny_sd_dir, demo_dataset):
    torch.set_num_threads(2)
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    history = trainer.train(2 * N)
    return history, trainer.lora_state_dict(), trainer.text_encoder_lora_state_dict()


@pytest.fixture(scope="module")
def halfway(tiny_sd_dir, demo_dataset, tmp_path_factory):
    torch.set_num_threads(2)
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    first = trainer.train(N)
    folder = save_checkpoint(trainer, tmp_path_factory.mktemp("ckpt") / f"step-{N}")
    return first, folder


def test_resume_reproduces_the_uninterrupted_run(straight, halfway, tiny_sd_dir, demo_dataset):
    full_history, full_lora, full_te = straight
    first, folder = halfway
    # Disturb every global RNG that the restore must put back.
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    load_checkpoint(resumed, folder)
    assert resumed.global_step == N
    second = resumed.train(N)
    losses = [h["loss"] for h in first + second]
    expected = [h["loss"] for h in full_history]
    assert np.allclose(losses, expected, rtol=0, atol=1e-6), (losses, expected)
    assert [h["lr"] for h in first + second] == pytest.approx([h["lr"] for h in full_history], abs=1e-12)
    lora = resumed.lora_state_dict()
    assert lora.keys() == full_lora.keys()
    for key in lora:
        assert torch.allclose(lora[key], full_lora[key], rtol=0, atol=1e-6), key
    te_lora = resumed.text_encoder_lora_state_dict()
    assert te_lora and all(torch.allclose(te_lora[k], full_te[k], rtol=0, atol=1e-6) for k in te_lora)


def test_checkpoint_folder_holds_no_pickle(halfway):
    _, folder = halfway
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted([STATE_FILE, META_FILE]), files
    assert not [p for p in folder.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"}]
    for path in folder.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["global_step"] == N and meta["format"].startswith("lorasweep-trainer-checkpoint/")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_FILE))
    assert any(t.dtype == torch.uint8 for t in tensors.values()), "RNG states are stored as uint8 tensors"
    assert any("lora" in k for k in tensors) and any("optimizer" in k for k in tensors)


def test_truncated_tensor_file_gives_clear_error(halfway, tmp_path):
    _, folder = halfway
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (folder / STATE_FILE).read_bytes()
    (broken / STATE_FILE).write_bytes(data[: len(data) // 2])
    (broken / META_FILE).write_text((folder / META_FILE).read_text())
    with pytest.raises(CheckpointError, match=f"{broken}.*corrupt or incomplete"):
        read_checkpoint(broken)
    # Also when the header no longer parses and no sha256 is recorded to catch it first.
    meta = json.loads((broken / META_FILE).read_text())
    (broken / STATE_FILE).write_bytes(data[:20])
    meta["tensors_sha256"] = __import__("hashlib").sha256(data[:20]).hexdigest()
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{broken}.*cannot read {STATE_FILE}"):
        read_checkpoint(broken)


def test_missing_or_unreadable_checkpoint_errors_name_the_folder(halfway, tmp_path):
    _, folder = halfway
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        read_checkpoint(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / STATE_FILE).write_bytes((folder / STATE_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=f"{partial} holds no complete checkpoint"):
        read_checkpoint(partial)
    (partial / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{partial}.*unreadable"):
        read_checkpoint(partial)


def test_checkpoint_of_another_config_is_rejected(halfway, tiny_sd_dir, demo_dataset):
    _, folder = halfway
    cfg = _cfg(tiny_sd_dir, demo_dataset).model_copy(update={"rank": 8})
    other = LoraTrainer.build(cfg, device="cpu")
    with pytest.raises(CheckpointError, match=f"{folder} does not fit this trainer"):
        load_checkpoint(other, folder)


def test_resave_replaces_atomically_and_keeps_other_files(halfway, tmp_path):
    _, folder = halfway
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "lora.safetensors").write_bytes(b"kept")

    class Fake:
        global_step = 7

        def state_dict(self):
            return {"step": 7, "t": torch.arange(3)}

    save_checkpoint(Fake(), target)
    save_checkpoint(Fake(), target)
    assert sorted(p.name for p in target.iterdir()) == sorted(["lora.safetensors", STATE_FILE, META_FILE])
    assert read_checkpoint(target)["step"] == 7


def test_state_encoding_round_trips_types():
    state = {
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
                "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]},
        "np": {"bit_generator": "PCG64", "state": {"state": 2**127 + 5, "inc": 7}},
        "arr": np.arange(4, dtype=np.int64),
        "nan": float("inf"),
        "__weird": None,
    }
    tensors = {}
    tree = json.loads(json.dumps(encode_state(state, tensors)))
    back = decode_state(tree, tensors)
    assert back["opt"]["state"][0]["exp_avg"].equal(torch.ones(2, 2))
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["np"]["state"]["state"] == 2**127 + 5
    assert back["arr"].tolist() == [0, 1, 2, 3] and back["nan"] == float("inf") and back["__weird"] is None
    with pytest.raises(CheckpointError, match="/bad"):
        encode_state({"bad": object()}, {})
