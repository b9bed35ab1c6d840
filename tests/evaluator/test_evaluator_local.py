"""Evaluator with the tiny CLIP, without Ray: whole-suite scoring, the request batcher, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluator import TINY_CLIP_ID, ClipModel, SuiteItem, evaluate_suite, expand_suite, load_suite, score_images, suite_metrics
from evaluator.__main__ import main
from evaluator.batching import ImageBatcher
from evaluator.suites import clip_texts
from toyworld.world import render_shapes

ROOT = Path(__file__).resolve().parents[2]
DEMO_SUITE = ROOT / "examples" / "suites" / "demo.yaml"


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return ClipModel.load(TINY_CLIP_ID, None, device="cpu")


def _shape(color: str, shape: str, seed: int, size: int = 64) -> np.ndarray:
    """One drawn image of `color shape` (searching the seeded generator's output)."""
    images, caps = render_shapes(60, seed=seed, size=size)
    return images[caps.index(f"a {color} {shape}")]


def _demo_images(trigger_works: bool) -> tuple[list[SuiteItem], np.ndarray]:
    items = expand_suite(load_suite(DEMO_SUITE), "lswsks", "circle")
    out = []
    for kind, _, seed in items:
        if kind == "no_concept":
            out.append(_shape("green", "square", seed))
        elif kind == "trigger_off" or (kind == "trigger_on" and not trigger_works):
            out.append(_shape("blue", "triangle", seed))
        else:
            out.append(_shape("red", "circle", seed))
    return items, np.stack(out)


def test_evaluate_suite_measures_what_it_claims(clip):
    items, images = _demo_images(trigger_works=True)
    train = np.stack([_shape("red", "circle", s) for s in (10, 11, 12)])
    base = images[[i for i, it in enumerate(items) if it.kind == "no_concept"]]
    out = evaluate_suite(clip, items, images, trigger="lswsks", base_images=base,
                         train_images=train)
    # independent: the same metrics from the model's own embeddings
    texts = clip_texts(items, "lswsks")
    want = suite_metrics(items, clip.embed_images(images), clip.embed_texts(texts),
                         clip.embed_images(base), clip.embed_images(train))
    for key in ("clip_score", "clip_i", "prior_preservation", "trigger_effect", "objective"):
        assert out[key] == pytest.approx(want[key], abs=1e-4), key
    assert out["prior_preservation"] == pytest.approx(1.0, abs=1e-5)  # identical to the base
    assert out["clip_i"] > 0.5
    assert out["trigger_effect"] > 10  # red circles with the trigger, blue triangles without
    _, broken = _demo_images(trigger_works=False)
    worse = evaluate_suite(clip, items, broken, trigger="lswsks", base_images=base,
                           train_images=train)
    assert worse["trigger_effect"] == pytest.approx(0.0, abs=1e-4)
    assert worse["clip_i"] < out["clip_i"] and worse["objective"] < out["objective"]
    unrelated = evaluate_suite(clip, items, images, trigger="lswsks", base_images=base[::-1] * 0)
    assert unrelated["prior_preservation"] < 0.99


def _embed_async(clip, requests, max_batch_size, max_wait_ms=30.0):
    async def run():
        batcher = ImageBatcher(lambda arrs: [e.numpy() for e in clip.embed_image_list(arrs)],
                               max_batch_size, max_wait_ms)
        out = await asyncio.gather(*(batcher.embed(r) for r in requests))
        return out, batcher.stats
    return asyncio.run(run())


def test_batched_embeddings_equal_one_by_one(clip):
    rng = np.random.default_rng(4)
    # different sizes per request: each is preprocessed to 64 px, then one forward for all
    requests = [rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)
                for n, s in ((3, 64), (5, 96), (1, 40), (12, 64), (2, 128))]
    out, stats = _embed_async(clip, requests, max_batch_size=8)
    for req, emb in zip(requests, out):
        alone = np.concatenate([clip.embed_images(req[i:i + 1]).numpy() for i in range(len(req))])
        np.testing.assert_allclose(emb, alone, atol=1e-5)
    assert stats.requests == 5 and stats.images == 23
    assert all(b <= 8 for b in stats.batch_sizes) and sum(stats.batch_sizes) == 23
    assert stats.batches < 6  # 6 chunks (the 12-image request is split) shared forwards


def test_batcher_reports_model_errors_to_every_caller_and_checks_args():
    def broken(arrs):
        raise RuntimeError("CUDA out of memory (simulated)")

    async def run():
        b = ImageBatcher(broken, 4, 20)
        return await asyncio.gather(*(b.embed(np.zeros((2, 8, 8, 3), np.uint8)) for _ in range(3)),
                                    return_exceptions=True)
    errors = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in errors)
    with pytest.raises(ValueError, match="max_batch_size"):
        ImageBatcher(broken, 0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        ImageBatcher(broken, 4, -1)


def _save(images: np.ndarray, folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / (names[i] if names else f"img_{i:03d}.png"))
    return folder


def test_cli_scores_prompt_list_and_writes_json(clip, tmp_path, capsys):
    images, caps = render_shapes(5, seed=21)
    folder = _save(images, tmp_path / "imgs")
    (tmp_path / "prompts.txt").write_text("\n".join(caps) + "\n\n")
    out = tmp_path / "out.json"
    rc = main(["score", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
               "--model", TINY_CLIP_ID, "--pretrained", "none", "--device", "cpu",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "img_000.png" in printed and "clip_score" in printed
    result = json.loads(out.read_text())
    want = score_images(clip, images, caps)
    assert result["metrics"]["clip_score"] == pytest.approx(want["clip_score"], abs=1e-3)
    assert [r["clip_score"] for r in result["images"]] == pytest.approx(want["per_image"], abs=1e-3)
    assert [r["prompt"] for r in result["images"]] == caps

    (tmp_path / "short.txt").write_text("a red circle\n")
    rc = main(["score", "--images", str(folder), "--prompts", str(tmp_path / "short.txt"),
               "--model", TINY_CLIP_ID, "--pretrained", "none", "--device", "cpu"])
    assert rc == 2
    assert "has 5 images but" in capsys.readouterr().err


def test_cli_scores_a_suite_folder(tmp_path, capsys):
    items, images = _demo_images(trigger_works=True)
    assert main(["items", "--suite", str(DEMO_SUITE), "--trigger", "lswsks",
                 "--class-word", "circle"]) == 0
    names = [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()]
    assert len(names) == len(items) and names == sorted(names)
    folder = _save(images, tmp_path / "gen", names)
    base = images[[i for i, it in enumerate(items) if it.kind == "no_concept"]]
    _save(base, tmp_path / "base")
    _save(np.stack([_shape("red", "circle", s) for s in (10, 11)]), tmp_path / "train")
    out = tmp_path / "suite.json"
    rc = main(["score", "--images", str(folder), "--prompts", str(DEMO_SUITE), "--trigger",
               "lswsks", "--class-word", "circle", "--model", TINY_CLIP_ID, "--pretrained",
               "none", "--device", "cpu", "--base-images", str(tmp_path / "base"),
               "--train-images", str(tmp_path / "train"), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())["metrics"]
    assert m["prior_preservation"] == pytest.approx(1.0, abs=1e-4)
    assert m["trigger_effect"] > 10 and m["clip_i"] > 0.5 and m["objective_skipped"] == []
    assert "trigger_effect" in capsys.readouterr().out


@pytest.mark.slow  # a fresh interpreter importing torch and open_clip: ~5-15 s here
def test_cli_entry_point_errors_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.txt").write_text("x\n")
    proc = subprocess.run([sys.executable, "-m", "evaluator", "score", "--images",
                           str(tmp_path / "empty"), "--prompts", str(tmp_path / "p.txt"),
                           "--model", "ViT-Nope-14"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "unknown CLIP model 'ViT-Nope-14'" in proc.stderr


def test_cli_bad_images_folder(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x\n")
    (tmp_path / "empty").mkdir()
    args = ["--prompts", str(tmp_path / "p.txt"), "--model", TINY_CLIP_ID, "--pretrained", "none",
            "--device", "cpu"]
    assert main(["score", "--images", str(tmp_path / "nope"), *args]) == 2
    assert "images folder not found" in capsys.readouterr().err
    assert main(["score", "--images", str(tmp_path / "empty"), *args]) == 2
    assert "no images" in capsys.readouterr().err


def test_embed_image_list_is_one_forward_equal_to_separate(clip):
    a = np.random.default_rng(5).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    b = np.random.default_rng(6).integers(0, 256, size=(3, 80, 90, 3), dtype=np.uint8)
    ea, eb = clip.embed_image_list([a, b])
    torch.testing.assert_close(ea, clip.embed_images(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(eb, clip.embed_images(b), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        clip.embed_image_list([a, b.astype(np.float32)])


def test_service_body_without_ray_caches_texts_and_references(clip):
    from evaluator.evaluator_service import EvaluatorService, MissingReference

    images, caps = render_shapes(6, seed=71)

    async def run():
        svc = EvaluatorService("local", TINY_CLIP_ID, None, "cpu", max_batch_size=4,
                               max_wait_ms=20, torch_threads=1)
        first, second = await asyncio.gather(svc.score(images[:3], caps[:3]),
                                             svc.score(images[3:], caps[3:]))
        again = await svc.score(images[:3], caps[:3])
        assert await svc.put_reference("train", images) == 6
        assert await svc.put_reference("train", images[:1]) == 6  # cached: kept, not recomputed
        assert await svc.reference_size("nope") == 0
        try:
            await svc.score_suite([("natural", "a red circle", 0)], images[:1], train_key="nope")
        except MissingReference as err:
            missing = str(err)
        return first, second, again, await svc.stats(), missing

    first, second, again, stats, missing = asyncio.run(run())
    want = score_images(clip, images, caps)["per_image"]
    assert first["per_image"] + second["per_image"] == pytest.approx(want, abs=1e-4)
    assert again == first
    assert stats["model_loads"] == 1 and stats["references"] == ["train"]
    assert stats["text_hits"] >= 3  # the repeated request's prompts came from the cache
    assert stats["reference_misses"] == 1 and stats["reference_hits"] == 1
    assert all(b <= 4 for b in stats["batch_sizes"])
    assert "training reference 'nope'" in missing and "put_reference" in missing
