"""The optional judges with tiny models the tests build: DINO/DINOv2 (dino_i) and the LAION
aesthetic head (aesthetic), checked against the transformers model and the head applied by hand;
their file errors; and the evaluator service (asyncio, then a Ray actor) reporting them."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluator import TINY_CLIP_ID, ClipModel, SuiteItem, evaluate_suite, expand_suite, load_suite
from evaluator.aesthetic import AestheticError, AestheticHead
from evaluator.dino import DinoEmbedder, DinoError
from evaluator.judge_metrics import JUDGE_METRICS, JudgeInputs, judge_metrics
from evaluator.judges import Judges, clip_width, judge_problems
from tests.evaluator.judge_builders import DINO_SIZE, IMAGENET, dino_cls, head_by_hand, tiny_dino, tiny_head
from toyworld.world import render_shapes

DEMO_SUITE = Path(__file__).resolve().parents[2] / "examples" / "suites" / "demo.yaml"


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return ClipModel.load(TINY_CLIP_ID, None, device="cpu")


@pytest.fixture(scope="module")
def suite_images():
    items = expand_suite(load_suite(DEMO_SUITE), "lswsks", "circle")
    images, _ = render_shapes(len(items), seed=51)
    train, _ = render_shapes(5, seed=52)
    return items, images, train


def _cos_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() / a.double().norm(dim=-1, keepdim=True)
    b = b.double() / b.double().norm(dim=-1, keepdim=True)
    return float(np.mean([[float(x @ y) for y in b] for x in a]))


# ---------------------------------------------------------------- the pure metrics

def test_judge_metrics_equal_independent_computation():
    rng = np.random.default_rng(7)
    kinds = ["natural"] * 2 + ["new_setting"] + ["no_concept"] * 2 + ["trigger_on"] * 2 + ["trigger_off"] * 2
    items = [SuiteItem(k, f"p{i}", i) for i, k in enumerate(kinds)]
    concept = [0, 1, 2, 5, 6]
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    dino, train, scores = rng.normal(size=(5, 8)), rng.normal(size=(3, 8)), rng.normal(5, 1, size=9)
    out = judge_metrics(items, JudgeInputs(t(dino), t(train), t(scores)))
    assert set(out) == set(JUDGE_METRICS)
    assert out["dino_i"] == pytest.approx(_cos_mean(t(dino), t(train)), abs=1e-6)
    assert out["aesthetic"] == pytest.approx(np.mean(scores[:5]), abs=1e-5)  # natural, new_setting, no_concept
    assert len(concept) == len(dino)
    # Only what was measured is reported; a judge without its references reports None, as clip_i.
    assert judge_metrics(items, None) == {}
    assert set(judge_metrics(items, JudgeInputs(aesthetic_scores=t(scores)))) == {"aesthetic"}
    assert judge_metrics(items, JudgeInputs(t(dino), None)) == {"dino_i": None}
    only_off = [SuiteItem("trigger_off", "x", 0)]
    assert judge_metrics(only_off, JudgeInputs(torch.zeros((0, 8)), t(train), t(scores[:1]))) == {
        "dino_i": None, "aesthetic": pytest.approx(scores[0])}
    with pytest.raises(ValueError, match="one DINO embedding per concept item: got 4 for 5"):
        judge_metrics(items, JudgeInputs(t(dino[:4]), t(train)))
    with pytest.raises(ValueError, match="one aesthetic score per item: got 8 for 9"):
        judge_metrics(items, JudgeInputs(aesthetic_scores=t(scores[:8])))


# ---------------------------------------------------------------- DINO

@pytest.mark.parametrize("kind, processor", [("dinov2", True), ("vit", True), ("dinov2", False)])
def test_dino_i_equals_the_transformers_model_on_the_same_images(tmp_path, clip, suite_images, kind, processor):
    items, images, train = suite_images
    folder, model, proc = tiny_dino(tmp_path / "dino", kind, processor)
    judges = Judges.load(str(folder), None, clip)
    assert isinstance(judges.dino, DinoEmbedder) and judges.aesthetic is None
    assert (judges.dino.processor is not None) == processor
    out = evaluate_suite(clip, items, images, trigger="lswsks", train_images=train, judges=judges)
    assert "aesthetic" not in out

    concept = [i for i, it in enumerate(items) if it.kind in ("natural", "new_setting", "trigger_on")]
    if processor:  # the folder's own image processor, as transformers applies it
        def pixels(x):
            return proc(images=list(x), return_tensors="pt")["pixel_values"]
    else:  # no preprocessor config: ImageNet normalisation at the model's size (images drawn at that size)
        images = render_shapes(len(items), seed=51, size=DINO_SIZE)[0]
        train = render_shapes(5, seed=52, size=DINO_SIZE)[0]
        out = evaluate_suite(clip, items, images, trigger="lswsks", train_images=train, judges=judges)

        def pixels(x):
            mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
            return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    want = _cos_mean(dino_cls(model, pixels(images[concept])), dino_cls(model, pixels(train)))
    assert out["dino_i"] == pytest.approx(want, abs=1e-5)
    # The training images' embeddings precomputed once (as the scorers keep them) give the same.
    again = evaluate_suite(clip, items, images, trigger="lswsks", train_images=train, judges=judges,
                           train_dino_emb=judges.reference(train))
    assert again["dino_i"] == pytest.approx(out["dino_i"], abs=1e-6)
    # A different model (other random weights) scores the same images differently: the test can fail.
    other = Judges.load(str(tiny_dino(tmp_path / "other", kind, processor, seed=1)[0]), None, clip)
    assert evaluate_suite(clip, items, images, trigger="lswsks", train_images=train,
                          judges=other)["dino_i"] != pytest.approx(want, abs=1e-4)


def test_unusable_dino_folders_say_path_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DinoError, match=r"nope: not found; give the folder of a local Hugging Face DINO/DINOv2"):
        DinoEmbedder.load(missing)
    folder = tiny_dino(tmp_path / "dino")[0]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DinoError, match="unreadable safetensors file"):
        DinoEmbedder.load(bad)
    problem = judge_problems(str(bad), None, TINY_CLIP_ID)["dino"]
    assert str(bad / "model.safetensors") in problem and "unreadable safetensors" in problem
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    assert "pytorch_model.bin is a pickle, refused" in judge_problems(str(bad), None, TINY_CLIP_ID)["dino"]
    clipcfg = tmp_path / "clipcfg"
    shutil.copytree(folder, clipcfg)
    (clipcfg / "config.json").write_text('{"model_type": "clip"}')
    assert "model_type 'clip' is not a DINO model" in judge_problems(str(clipcfg), None, TINY_CLIP_ID)["dino"]
    (clipcfg / "config.json").write_text("{oops")
    assert "config.json: unreadable" in judge_problems(str(clipcfg), None, TINY_CLIP_ID)["dino"]
    assert judge_problems(str(folder), None, TINY_CLIP_ID) == {}


# ---------------------------------------------------------------- aesthetic head

@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_equals_the_head_applied_by_hand(tmp_path, clip, suite_images, kind, suffix):
    items, images, _ = suite_images
    width = clip_width(clip)
    state = tiny_head(tmp_path / f"head{suffix}", kind, width)
    judges = Judges.load(None, str(tmp_path / f"head{suffix}"), clip)
    assert judges.aesthetic.kind == kind and judges.aesthetic.input_width == width and judges.dino is None
    out = evaluate_suite(clip, items, images, trigger="lswsks", judges=judges)
    assert "dino_i" not in out
    prompt_kinds = [i for i, it in enumerate(items) if it.kind in ("natural", "new_setting", "no_concept")]
    want = head_by_hand(state, clip.embed_images(images))[prompt_kinds].mean()
    assert out["aesthetic"] == pytest.approx(float(want), abs=1e-4)
    # Unnormalised embeddings give the same scores: the head normalises, as both projects do.
    emb = clip.embed_images(images[:3])
    torch.testing.assert_close(judges.aesthetic(emb * 7.0), judges.aesthetic(emb))
    other = tiny_head(tmp_path / f"other{suffix}", kind, width, seed=1)
    assert float(head_by_hand(other, clip.embed_images(images))[prompt_kinds].mean()) != pytest.approx(
        out["aesthetic"], abs=1e-3)


def test_head_of_another_width_names_file_widths_and_fix(tmp_path, clip):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    tiny_head(path, "mlp", 768)
    with pytest.raises(AestheticError) as err:
        Judges.load(None, str(path), clip)
    text = str(err.value)
    for words in (str(path), "768-wide", f"{clip_width(clip)}-wide", TINY_CLIP_ID, "ViT-L-14"):
        assert words in text, text
    # The spec checks find it without loading a model (the tiny CLIP's config gives its width).
    assert "768-wide" in judge_problems(None, str(path), TINY_CLIP_ID)["aesthetic"]
    assert judge_problems(None, str(path), "ViT-L-14") == {}
    assert judge_problems(None, str(path), "hf-hub:someone/clip") == {}  # only loading tells: checked then


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing.pth", ["missing.pth: not found", "improved-aesthetic-predictor"]),
    (lambda p: (p / "head.ckpt").write_bytes(b"x") and p / "head.ckpt", ["unknown file type '.ckpt'"]),
    (lambda p: (p / "head.safetensors").write_bytes(b"garbage") and p / "head.safetensors", ["head.safetensors: unreadable"]),
    (lambda p: torch.save({"fc.weight": torch.zeros(1, 4)}, p / "h.pth") or p / "h.pth",
     ["keys [fc.weight] are neither", "layers.0.weight"]),
    (lambda p: torch.save({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, p / "h.pth") or p / "h.pth",
     ["is not one Linear(D, 1)"]),
    (lambda p: torch.save([1, 2], p / "h.pth") or p / "h.pth", ["not a state dict of tensors"]),
])
def test_unusable_head_files_say_file_and_fix(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(AestheticError) as err:
        AestheticHead.load(path)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert judge_problems(None, str(path), TINY_CLIP_ID)["aesthetic"] == str(err.value)


def test_a_truncated_mlp_layer_is_refused(tmp_path):
    path = tmp_path / "h.safetensors"
    state = tiny_head(path, "mlp", 32)
    state["layers.2.weight"] = state["layers.2.weight"][:64].contiguous()
    from safetensors.torch import save_file
    save_file(state, str(path))
    with pytest.raises(AestheticError, match=r"layers.2 has shape \(64, 1024\), the improved-aesthetic-predictor MLP has "
                                             r"\(128, 1024\)"):
        AestheticHead.load(path)


# ---------------------------------------------------------------- the evaluator service

@pytest.fixture(scope="module")
def judge_files(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("judges")
    folder = tiny_dino(root / "dino")[0]
    tiny_head(root / "head.safetensors", "mlp", clip_width(clip))
    return str(folder), str(root / "head.safetensors")


def test_service_body_scores_the_judges_like_the_local_scorer(clip, suite_images, judge_files):
    from evaluator.evaluator_service import EvaluatorService

    items, images, train = suite_images
    dino, head = judge_files

    async def run():
        svc = EvaluatorService("local", TINY_CLIP_ID, None, "cpu", max_batch_size=8, max_wait_ms=5,
                               torch_threads=1, dino=dino, aesthetic=head)
        await svc.put_reference("train", train)
        with_judges = await svc.score_suite([tuple(it) for it in items], images, trigger="lswsks", train_key="train")
        return with_judges, await svc.info()

    remote, info = asyncio.run(run())
    local = evaluate_suite(clip, items, images, trigger="lswsks", train_images=train,
                           judges=Judges.load(dino, head, clip))
    assert info["dino"] == dino and info["aesthetic"] == head
    for key in ("dino_i", "aesthetic", "clip_i", "objective"):
        assert remote[key] == pytest.approx(local[key], abs=1e-4), key
    # No judges configured: their metrics are absent, not zero.
    assert not set(JUDGE_METRICS) & set(evaluate_suite(clip, items, images, trigger="lswsks", train_images=train))


def test_the_ray_actor_loads_the_judges_once_and_reports_them(ray_local, clip, suite_images, judge_files):
    from evaluator.remote import (
        EvaluatorError,
        evaluator_stats,
        put_reference,
        score_suite_remote,
        start_evaluator,
        stop_evaluator,
    )

    items, images, train = suite_images
    dino, head = judge_files
    handle = start_evaluator("judges-test", TINY_CLIP_ID, None, replicas=1, num_cpus=0, detached=False,
                             dino=dino, aesthetic=head)
    try:
        put_reference(handle, "train", train)
        remote = score_suite_remote(handle, items, images, trigger="lswsks", train_key="train")
        stats = evaluator_stats(handle)
        with pytest.raises(EvaluatorError, match="already serves the judges"):
            start_evaluator("judges-test", TINY_CLIP_ID, None, replicas=1, num_cpus=0, detached=False)
    finally:
        stop_evaluator("judges-test")
    local = evaluate_suite(clip, items, images, trigger="lswsks", train_images=train,
                           judges=Judges.load(dino, head, clip))
    assert stats["model_loads"] == 1
    for key in ("dino_i", "aesthetic"):
        assert remote[key] == pytest.approx(local[key], abs=1e-4), key
