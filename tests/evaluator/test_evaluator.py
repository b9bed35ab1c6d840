"""Tests for evaluator/: CLIP-score math, the tiny CLIP builder, ClipModel, score_images."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evaluator import (
    HESSEL_SCALE,
    TINY_CLIP_ID,
    TINY_CLIP_NAME,
    ClipModel,
    clip_t,
    ensure_tiny_clip,
    mean_clip_t,
    score_images,
    tiny,
)
from toyworld.world import all_classes, caption, render_shapes


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A private cache with the tiny CLIP built once for the whole session."""
    root = tmp_path_factory.mktemp("lorasweep-cache")
    ensure_tiny_clip(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_cache) -> ClipModel:
    # LORASWEEP_CACHE only while loading, so the session's other tests see the usual env.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASWEEP_CACHE", str(tiny_cache))
        return ClipModel.load(TINY_CLIP_ID, device="cpu")


# ---------------------------------------------------------------- metrics (no model)

def _by_hand(img: np.ndarray, txt: np.ndarray, scale: float) -> np.ndarray:
    out = []
    for a, b in zip(img.astype(np.float64), txt.astype(np.float64)):
        cos = float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
        out.append(scale * max(cos, 0.0))
    return np.array(out)


def test_clip_t_equals_independent_computation():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(32, 16)) * rng.uniform(0.1, 10, size=(32, 1))  # not unit norm
    txt = rng.normal(size=(32, 16))
    txt[:8] = -img[:8] * 3.0  # cosine -1: must clamp to 0
    got = clip_t(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32))
    want = _by_hand(img, txt, 100.0)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    assert (got[:8] == 0).all()
    assert (want < 0.5).sum() > 8  # random pairs gave some negative cosines too
    assert got.dtype == torch.float32 and got.shape == (32,)
    # numpy in, same answer
    np.testing.assert_allclose(clip_t(img, txt).numpy(), want, atol=1e-4)


def test_clip_t_hessel_scale_and_mean():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
    hessel = clip_t(img, txt, scale=HESSEL_SCALE)
    assert HESSEL_SCALE == 2.5
    np.testing.assert_allclose(hessel.numpy(), _by_hand(img, txt, 2.5), atol=1e-5)
    np.testing.assert_allclose(hessel.numpy(), clip_t(img, txt).numpy() * 0.025, atol=1e-5)
    assert mean_clip_t(img, txt, scale=2.5) == pytest.approx(float(hessel.mean()))


def test_clip_t_rejects_mismatched_or_bad_embeddings():
    with pytest.raises(ValueError, match=r"3 image embeddings and 4 text embeddings"):
        clip_t(torch.ones(3, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match=r"images 8, texts 6"):
        clip_t(torch.ones(3, 8), torch.ones(3, 6))
    with pytest.raises(ValueError, match="2-D"):
        clip_t(torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="NaN"):
        clip_t(torch.full((2, 4), float("nan")), torch.ones(2, 4))
    with pytest.raises(ValueError, match="scale"):
        clip_t(torch.ones(2, 4), torch.ones(2, 4), scale=0)


# ---------------------------------------------------------------- tiny CLIP builder

def test_tiny_clip_build_is_deterministic(tiny_cache, tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    second = ensure_tiny_clip(tmp_path)
    assert torch.rand(1) == before  # the caller's RNG is untouched
    assert torch.get_num_threads() == threads
    first = tiny_cache / "models" / "tiny-clip.safetensors"
    assert second == tmp_path / "models" / "tiny-clip.safetensors"
    assert _sha256(first) == _sha256(second)


def test_tiny_clip_training_is_bit_identical_across_runs():
    a, b = tiny.build_tiny_clip_state(steps=3), tiny.build_tiny_clip_state(steps=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = tiny.build_tiny_clip_state(steps=0)
    assert not torch.equal(a["visual.conv1.weight"], init["visual.conv1.weight"])  # it trained


def test_shipped_tiny_clip_matches_its_hash_and_judges_the_whole_world():
    from pretrain.tiny_clip import zero_shot_accuracy

    state = tiny.shipped_tiny_clip_state()  # None unless recipe and sha256 match
    assert state is not None
    acc, per_class = zero_shot_accuracy(state)
    assert acc >= 0.95, per_class
    assert min(per_class.values()) >= 0.85, per_class  # the held-out colour included
    assert json.loads(tiny.SHIPPED_INFO.read_text())["zero_shot_accuracy"] == pytest.approx(acc, abs=0.01)


def _fake_state() -> dict:
    return {"w": torch.zeros(2)}


def test_ensure_builds_once_under_concurrency_and_rebuilds_stale(monkeypatch, tmp_path):
    calls = []

    def slow_build():
        calls.append(1)
        time.sleep(0.3)  # long enough for the other threads to pile up on the lock
        return _fake_state()

    monkeypatch.setattr(tiny, "build_tiny_clip_state", slow_build)
    monkeypatch.setattr(tiny, "shipped_tiny_clip_state", lambda: None)  # as when no shipped file fits
    threads = [threading.Thread(target=ensure_tiny_clip, args=(tmp_path,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "models" / "tiny-clip.safetensors"
    assert len(calls) == 1 and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    ensure_tiny_clip(tmp_path)  # present and current: no rebuild
    assert len(calls) == 1

    save_file(_fake_state(), str(path), metadata={tiny._META_KEY: '{"recipe": "old"}'})
    ensure_tiny_clip(tmp_path)  # another recipe: rebuilt
    assert len(calls) == 2
    path.write_bytes(b"truncated")
    ensure_tiny_clip(tmp_path)  # unreadable: rebuilt
    assert len(calls) == 3
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[tiny._META_KEY])["recipe"] == tiny.TINY_CLIP_RECIPE


# ---------------------------------------------------------------- ClipModel on the tiny CLIP

def test_tiny_clip_registered_and_loaded_from_safetensors(tiny_cache, tiny_model):
    assert TINY_CLIP_NAME in open_clip.list_models()
    assert open_clip.get_model_config(TINY_CLIP_NAME)["embed_dim"] == 32
    path = tiny_cache / "models" / "tiny-clip.safetensors"
    saved = load_file(str(path))
    loaded = tiny_model.model.state_dict()
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), k
    assert not tiny_model.model.training
    assert not any(p.requires_grad for p in tiny_model.model.parameters())
    # an explicit checkpoint path for the builtin is honoured too
    again = ClipModel.load(TINY_CLIP_ID, pretrained=str(path), device="cpu")
    assert torch.equal(again.model.visual.conv1.weight, tiny_model.model.visual.conv1.weight)


def test_embeddings_unit_norm_and_batch_invariant(tiny_model):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 96, 80, 3), dtype=np.uint8)
    one = tiny_model.embed_images(images, batch_size=1)
    four = tiny_model.embed_images(images, batch_size=4)
    assert one.shape == (6, 32) and one.dtype == torch.float32 and one.device.type == "cpu"
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0)

    texts = ["a red circle", "a blue square", "", "a green triangle on grey"]
    t1 = tiny_model.embed_texts(texts, batch_size=1)
    t4 = tiny_model.embed_texts(texts, batch_size=4)
    torch.testing.assert_close(t1, t4, atol=1e-5, rtol=0)
    torch.testing.assert_close(t1.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(3, 64, 64, 3), (2, 512, 512, 3), (2, 100, 150, 3),
                                   (2, 300, 200, 3), (2, 37, 41, 3)])
def test_tensor_preprocess_matches_open_clip_pil(tiny_model, shape):
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
    shapes, _ = render_shapes(shape[0], seed=4, size=max(shape[1:3]))
    for images in (noise, np.ascontiguousarray(shapes[:, :shape[1], :shape[2]])):
        ours = tiny_model.preprocess(images)
        theirs = torch.stack([tiny_model.pil_preprocess(Image.fromarray(im)) for im in images])
        assert ours.shape == theirs.shape == (shape[0], 3, 64, 64)
        # within ~2 uint8 levels anywhere (rounding inside the resize), ~0 on average
        assert (ours - theirs).abs().max() < 2.5 / 255 / 0.26
        assert (ours - theirs).abs().mean() < 2e-3
        with torch.inference_mode():
            a = tiny_model.model.encode_image(ours, normalize=True)
            b = tiny_model.model.encode_image(theirs, normalize=True)
        assert ((a * b).sum(-1) > 0.999).all()


def test_untensorizable_preprocess_falls_back_to_open_clip(tiny_model):
    # A config the tensor path does not reproduce ("longest" pads) must use open_clip's transform.
    model = copy.copy(tiny_model)
    model.preprocess_cfg = {**tiny_model.preprocess_cfg, "resize_mode": "longest"}
    images = np.random.default_rng(5).integers(0, 256, size=(2, 50, 90, 3), dtype=np.uint8)
    want = torch.stack([model.pil_preprocess(Image.fromarray(im)) for im in images])
    assert torch.equal(model.preprocess(images), want)


def test_tiny_clip_prefers_matching_captions(tiny_model):
    # Held out: a seed the builder never used, drawn at 128 px so the resize path runs too.
    images, captions = render_shapes(45, seed=777, size=128)
    names = [caption(*c) for c in all_classes()]
    img = tiny_model.embed_images(images)
    txt = tiny_model.embed_texts(names)
    wins = total = 0
    for i, right in enumerate(captions):
        scores = clip_t(img[i].expand(len(names), -1), txt)
        r = names.index(right)
        wins += int((scores[r] > torch.cat([scores[:r], scores[r + 1:]])).sum())
        total += len(names) - 1
    assert wins / total >= 0.7, f"matching caption won only {wins}/{total}"

    # the same through score_images: every image against another class's caption
    wrong = [names[(names.index(c) + 1) % len(names)] for c in captions]
    matched = score_images(tiny_model, images, captions)["clip_score"]
    mismatched = score_images(tiny_model, images, wrong)["clip_score"]
    assert matched > mismatched + 10


def test_score_images_equals_clip_t_of_embeddings(tiny_model):
    images, captions = render_shapes(6, seed=8)
    prompts = [captions[0]] * 3 + captions[3:]  # repeated prompts are embedded once
    out = score_images(tiny_model, images, prompts)
    want = clip_t(tiny_model.embed_images(images), tiny_model.embed_texts(prompts))
    assert set(out) == {"clip_score", "per_image"}
    np.testing.assert_allclose(out["per_image"], want.numpy(), atol=1e-5)
    assert out["clip_score"] == pytest.approx(float(want.mean()), abs=1e-5)
    hessel = score_images(tiny_model, images, prompts, scale=HESSEL_SCALE)
    assert hessel["clip_score"] == pytest.approx(out["clip_score"] * 0.025, abs=1e-5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("images, error, words", [
    (np.zeros((0, 64, 64, 3), np.uint8), ValueError, ["no images", "N == 0"]),
    (np.zeros((2, 64, 64, 3), np.float32), ValueError, ["uint8", "float32", "* 255"]),
    (np.zeros((64, 64, 3), np.uint8), ValueError, ["4-D", "(64, 64, 3)"]),
    (np.zeros((2, 64, 64, 4), np.uint8), ValueError, ["3 RGB channels", "alpha"]),
    (np.zeros((2, 3, 64, 64), np.uint8), ValueError, ["3 RGB channels", "NCHW"]),
    ([[0]], TypeError, ["numpy array"]),
])
def test_bad_images_raise_clear_errors(tiny_model, images, error, words):
    for call in (lambda: tiny_model.embed_images(images),
                 lambda: score_images(tiny_model, images, ["x"] * 2)):
        with pytest.raises(error) as info:
            call()
        for w in words:
            assert w in str(info.value)


def test_count_mismatch_and_bad_texts(tiny_model):
    images, _ = render_shapes(2, seed=9)
    with pytest.raises(ValueError, match=r"2 images and 3 prompts"):
        score_images(tiny_model, images, ["a", "b", "c"])
    with pytest.raises(TypeError, match="single string"):
        score_images(tiny_model, images, "a red circle")
    with pytest.raises(ValueError, match="no texts"):
        tiny_model.embed_texts([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny_model.embed_texts(["ok", 3])


def test_unknown_models_and_tags_raise_clear_errors():
    with pytest.raises(ValueError) as info:
        ClipModel.load("ViT-Nope-14", device="cpu")
    msg = str(info.value)
    assert "ViT-Nope-14" in msg and "open_clip.list_models()" in msg and TINY_CLIP_ID in msg
    with pytest.raises(ValueError, match="Did you mean"):
        ClipModel.load("ViT-L-14-quickgelo", device="cpu")
    with pytest.raises(ValueError, match=r"builtin:tiny-clip"):
        ClipModel.load("builtin:huge-clip", device="cpu")
    with pytest.raises(ValueError, match=r"known tag.*openai"):
        ClipModel.load("ViT-L-14-quickgelu", pretrained="no-such-tag", device="cpu")
