"""Ground-truth evaluation: the pairs folder and its errors, LPIPS through the `lpips` package (a random
backbone, or torchvision-format weights from a local file), and the scores of images against truth."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from evaluator import ClipModel
from evaluator.ground_truth import GroundTruthError, ground_truth_scores, load_truth_images, read_ground_truth
from evaluator.lpips_judge import BACKBONE_FILES, LpipsWeightsMissing, backbone_file, load_lpips, lpips_distances
from evaluator.tiny import TINY_CLIP_ID
from toyworld.world import render_shapes


def write_pairs(folder, images, captions):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (im, cap) in enumerate(zip(images, captions)):
        Image.fromarray(im).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": cap}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    return load_lpips("alex", random_backbone=True)


def test_pairs_are_read_and_bad_folders_named(tmp_path):
    images, captions = render_shapes(3, seed=0)
    folder = write_pairs(tmp_path / "gt", images, captions)
    pairs = read_ground_truth(folder)
    assert [p.caption for p in pairs] == captions
    assert load_truth_images(pairs, 32).shape == (3, 32, 32, 3)
    with pytest.raises(GroundTruthError, match="metadata.jsonl does not exist"):
        read_ground_truth(tmp_path)
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": "9.png", "text": "b"}\n')
    with pytest.raises(GroundTruthError, match=r"metadata.jsonl:2: image .*9.png does not exist"):
        read_ground_truth(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(GroundTruthError, match="metadata.jsonl:1: not a JSON object with file_name and text"):
        read_ground_truth(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n')
    with pytest.raises(GroundTruthError, match="need at least 2"):
        read_ground_truth(folder)


def test_lpips_is_zero_for_the_same_image_and_grows_with_change(lpips_model):
    images, _ = render_shapes(4, seed=1)
    same = lpips_distances(lpips_model, images, images)
    assert np.allclose(same, 0, atol=1e-6)
    noisy = np.clip(images.astype(int) + np.random.default_rng(0).integers(-60, 60, images.shape), 0, 255).astype(np.uint8)
    other = lpips_distances(lpips_model, images, noisy)
    assert other.shape == (4,) and (other > same + 1e-4).all()


def test_backbone_weights_come_from_a_local_torchvision_file(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / BACKBONE_FILES["alex"])
    model = load_lpips("alex", tmp_path / BACKBONE_FILES["alex"])
    assert torch.equal(model.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(model.net.slice5._modules["10"].weight, tv.features[10].weight)
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(LpipsWeightsMissing, match="not torchvision's alex weights"):
        load_lpips("alex", tmp_path / "wrong.pth")


def test_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(LpipsWeightsMissing, match=rf"vgg16-397923af.pth: {tmp_path}/hub/checkpoints/vgg16-397923af.pth"):
        backbone_file("vgg")
    with pytest.raises(LpipsWeightsMissing, match="nowhere.pth does not exist"):
        backbone_file("alex", tmp_path / "nowhere.pth")


def test_scores_against_truth(lpips_model):
    clip = ClipModel.load(TINY_CLIP_ID, None)
    truth, captions = render_shapes(6, seed=2)
    other, _ = render_shapes(6, seed=7)
    same = ground_truth_scores(clip, lpips_model, truth, truth, captions)
    apart = ground_truth_scores(clip, lpips_model, other, truth, captions)
    assert same["gt_lpips"] == pytest.approx(0, abs=1e-6) and same["gt_lpips_items"] == pytest.approx([0] * 6, abs=1e-6)
    assert abs(same["gt_fd"]) < 1e-3  # (CMMD and KID are unbiased estimates: below 0 for one set against itself)
    for name in ("gt_lpips", "gt_fd", "gt_cmmd", "gt_kid"):
        assert apart[name] > same[name] + 1e-4, name
    assert same["gt_clip_t"] > 0 and len(apart["gt_lpips_items"]) == 6


def test_the_service_scores_ground_truth_on_its_clip_features_as_in_process(lpips_model):
    """The evaluator service's body (no Ray): the truth put once as a reference, then the same gt_fd,
    gt_kid, gt_cmmd and gt_clip_t as the in-process scorer of the same images."""
    import asyncio

    from evaluator.evaluator_service import EvaluatorService, MissingReference

    truth, captions = render_shapes(6, seed=2)
    generated, _ = render_shapes(6, seed=7)

    async def run():
        svc = EvaluatorService("local", TINY_CLIP_ID, None, "cpu", max_batch_size=4, max_wait_ms=5.0, torch_threads=1)
        with pytest.raises(MissingReference, match="ground-truth reference 'gt' is not in"):
            await svc.score_ground_truth(generated, captions, "gt")
        await svc.put_reference("gt", truth)
        with pytest.raises(ValueError, match="holds 6 images, got 3 generated"):
            await svc.score_ground_truth(generated[:3], captions[:3], "gt")
        return await svc.score_ground_truth(generated, captions, "gt"), await svc.stats()

    served, stats = asyncio.run(run())
    local = ground_truth_scores(ClipModel.load(TINY_CLIP_ID, None), lpips_model, generated, truth, captions)
    assert set(served) == {"gt_fd", "gt_kid", "gt_cmmd", "gt_clip_t"}
    for name, value in served.items():
        assert value == pytest.approx(local[name], rel=1e-4, abs=1e-6), name
    assert stats["ground_truth_calls"] == 1 and stats["reference_misses"] == 1


def test_the_toy_worlds_test_split_is_held_out_pairs_of_the_demo_concept(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    from evaluator.ground_truth import TOY_WORLD_TEST_ID
    from trainer.train_data import resolve_dataset

    pairs = read_ground_truth(TOY_WORLD_TEST_ID)
    assert len(pairs) == 6 and all(p.caption.startswith("a lswsks ") for p in pairs)
    assert read_ground_truth(TOY_WORLD_TEST_ID) == pairs  # written once
    train = {np.asarray(Image.open(p)).tobytes() for p in resolve_dataset("builtin:demo").rglob("*.png")}
    assert not any(np.asarray(Image.open(p.image_path)).tobytes() in train for p in pairs)  # none trained on


def test_the_random_backbone_is_the_same_network_in_every_process():
    from evaluator.lpips_judge import RANDOM_BACKBONE

    torch.manual_seed(1)
    a = load_lpips("alex", RANDOM_BACKBONE)
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = load_lpips("alex", RANDOM_BACKBONE)
    assert torch.equal(a.net.slice1[0].weight, b.net.slice1[0].weight)
    torch.manual_seed(1)
    load_lpips("alex", RANDOM_BACKBONE)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    assert backbone_file("alex", RANDOM_BACKBONE) is None
