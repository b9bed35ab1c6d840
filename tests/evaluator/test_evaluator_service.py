"""The shared evaluator service on local Ray with the tiny CLIP: one model for many clients,
batching, the reference cache, errors (bad input, timeout, a dead or missing service)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import ray

from evaluator import TINY_CLIP_ID, ClipModel, evaluate_suite, expand_suite, load_suite, score_images
from evaluator.remote import (
    EvaluatorError,
    EvaluatorGone,
    EvaluatorTimeout,
    MissingReference,
    connect_evaluator,
    embed_remote,
    ensure_reference,
    evaluator_stats,
    has_reference,
    put_reference,
    reference_key,
    score_remote,
    score_suite_remote,
    start_evaluator,
    stop_evaluator,
)
from toyworld.world import render_shapes

NAME = "test-evaluator"
DEMO_SUITE = Path(__file__).resolve().parents[2] / "examples" / "suites" / "demo.yaml"


@pytest.fixture(scope="module")
def service(ray_local):
    # Long max_wait so that concurrent requests in the tests surely share batches.
    handle = start_evaluator(NAME, TINY_CLIP_ID, None, num_cpus=0.5, max_batch_size=16,
                             max_wait_ms=100.0)  # detached, as in a sweep
    yield handle
    stop_evaluator(NAME)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return ClipModel.load(TINY_CLIP_ID, None, device="cpu")


def test_remote_scores_equal_local_scores(service, clip):
    images, caps = render_shapes(6, seed=31, size=80)
    remote = score_remote(service, images, caps)
    local = score_images(clip, images, caps)
    assert remote["clip_score"] == pytest.approx(local["clip_score"], abs=1e-3)
    assert remote["per_image"] == pytest.approx(local["per_image"], abs=1e-3)
    np.testing.assert_allclose(embed_remote(service, images), clip.embed_images(images).numpy(),
                               atol=1e-5)


def test_concurrent_clients_each_get_their_own_results(service, clip):
    before = evaluator_stats(service)
    requests = [render_shapes(4 + i % 3, seed=100 + i) for i in range(8)]
    results: list = [None] * 8

    def client(i: int) -> None:
        h = connect_evaluator(NAME, timeout_s=30)
        results[i] = score_remote(h, *requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (images, caps), got in zip(requests, results):
        want = score_images(clip, images, caps)["per_image"]
        assert got["per_image"] == pytest.approx(want, abs=1e-3)
    after = evaluator_stats(service)
    served = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert served == 8 and batches < served  # requests shared model forwards
    assert max(after["batch_sizes"][before["batches"]:]) > 6


@ray.remote(num_cpus=0.25)
def _trial_like(seed: int) -> tuple[dict, int]:
    images, caps = render_shapes(3, seed=seed)
    h = connect_evaluator(NAME, timeout_s=30)
    info = ray.get(h.info.remote())
    return score_remote(h, images, caps), info["pid"]


def test_model_loaded_once_for_every_client(service, clip):
    info = ray.get(service.info.remote())
    # the same name again: gets the running replica, creates nothing
    again = start_evaluator(NAME, TINY_CLIP_ID, None, num_cpus=0.5, detached=False)
    assert ray.get(again.info.remote())["pid"] == info["pid"]
    out = ray.get([_trial_like.remote(s) for s in (201, 202)])
    for seed, (scores, pid) in zip((201, 202), out):
        assert pid == info["pid"]
        assert scores["per_image"] == pytest.approx(
            score_images(clip, *render_shapes(3, seed=seed))["per_image"], abs=1e-3)
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(NAME)]
    assert len(names) == 1 and names[0]["name"].startswith(f"{NAME}@")  # one per node
    assert evaluator_stats(service)["model_loads"] == 1
    with pytest.raises(EvaluatorError, match=r"already serves model 'builtin:tiny-clip'"):
        start_evaluator(NAME, "ViT-B-32", None, num_cpus=0.5, detached=False)


def test_reference_cache_is_hit_and_suite_scores_match_local(service, clip):
    items = expand_suite(load_suite(DEMO_SUITE), "lswsks", "circle")
    images, _ = render_shapes(len(items), seed=41)
    train, _ = render_shapes(5, seed=42)
    base = images[[i for i, it in enumerate(items) if it.kind == "no_concept"]][:, ::-1].copy()
    tkey, bkey = reference_key(train, "train"), reference_key(base, "base")
    assert tkey == reference_key(train.copy(), "train") != reference_key(train, "other")
    before = evaluator_stats(service)
    assert not has_reference(service, tkey)
    assert put_reference(service, tkey, train) == 5
    assert put_reference(service, tkey, train) == 5  # cached: not embedded again
    calls = []
    assert ensure_reference(service, bkey, lambda: calls.append(1) or base) == len(base)
    assert ensure_reference(service, bkey, lambda: calls.append(1) or base) == len(base)
    assert calls == [1]  # the second time the images were neither made nor sent
    remote = score_suite_remote(service, items, images, trigger="lswsks", base_key=bkey,
                                train_key=tkey)
    after = evaluator_stats(service)
    assert after["reference_misses"] - before["reference_misses"] == 2
    assert after["reference_hits"] - before["reference_hits"] >= 4
    assert after["images"] - before["images"] == 5 + len(base) + len(items)
    local = evaluate_suite(clip, items, images, trigger="lswsks", base_images=base,
                           train_images=train)
    for key in ("clip_score", "clip_i", "prior_preservation", "trigger_effect", "objective"):
        assert remote[key] == pytest.approx(local[key], abs=1e-3), key
    with pytest.raises(MissingReference, match=r"training reference 'nope'.*put_reference"):
        score_suite_remote(service, items, images, trigger="lswsks", train_key="nope")


@pytest.mark.parametrize("images, prompts, error, words", [
    (np.zeros((0, 64, 64, 3), np.uint8), [], ValueError, "no images"),
    (np.zeros((2, 64, 64, 3), np.float32), ["a", "b"], ValueError, "dtype uint8"),
    (np.zeros((2, 3, 64, 64), np.uint8), ["a", "b"], ValueError, "NCHW"),
    (np.zeros((2, 64, 64, 3), np.uint8), ["a"], ValueError, "2 images and 1 prompts"),
    (np.zeros((2, 64, 64, 3), np.uint8), "a b", TypeError, "list of strings"),
])
def test_bad_input_is_refused_clearly(service, images, prompts, error, words):
    with pytest.raises(error, match=words):
        score_remote(service, images, prompts)


def test_bad_input_that_reaches_the_service_comes_back_as_itself(service):
    ref = service.score.remote(np.zeros((2, 64, 64, 3), np.float32), ["a", "b"])
    from evaluator.remote import _call
    with pytest.raises(ValueError, match="dtype uint8") as info:
        _call(service, ref, 30)
    assert "RayTaskError" not in type(info.value).__name__


def test_timeout_says_what_to_do(service):
    images, caps = render_shapes(16, seed=51)
    with pytest.raises(EvaluatorTimeout, match=r"did not answer within 0.001 s.*timeout_s"):
        score_remote(service, images, caps, timeout_s=0.001)
    assert score_remote(service, images[:2], caps[:2])["per_image"]  # still serving


@pytest.mark.slow  # starts and kills a second service
def test_dead_or_missing_service_says_how_to_restart(ray_local):
    handle = start_evaluator("doomed", TINY_CLIP_ID, None, replicas=1, num_cpus=0.25,
                             max_restarts=0, detached=False)
    images, caps = render_shapes(2, seed=61)
    assert score_remote(handle, images, caps)["clip_score"] > 0
    assert stop_evaluator("doomed") == 1
    with pytest.raises(EvaluatorGone, match=r"'doomed#0' is gone.*start_evaluator\(name='doomed'"):
        score_remote(handle, images, caps, timeout_s=30)
    with pytest.raises(EvaluatorGone, match=r"no evaluator named 'doomed'.*start_evaluator"):
        connect_evaluator("doomed", timeout_s=0.5)
    with pytest.raises(ValueError, match="replicas must be"):
        start_evaluator("doomed", TINY_CLIP_ID, None, replicas=0)


@pytest.mark.slow  # starts two more services
def test_a_client_waits_for_its_nodes_replica_then_falls_back_to_another_saying_so(ray_local, caplog):
    from evaluator.remote import replica_name

    node = ray.get_runtime_context().get_node_id()
    start_evaluator("elsewhere", TINY_CLIP_ID, None, replicas=1, num_cpus=0, detached=False)  # on no node of its own
    try:
        with caplog.at_level("WARNING", logger="evaluator.remote"):
            handle = connect_evaluator("elsewhere", timeout_s=60, local_wait_s=0.5)
        assert replica_name(handle) == "elsewhere#0"
        assert f"no replica of elsewhere answers on this node ({node[:12]}); using elsewhere#0" in caplog.text
        assert score_remote(handle, *render_shapes(2, seed=5))["clip_score"] > 0
        # A node's own replica that appears while the client waits is the one it gets, without a warning.
        caplog.clear()
        late = threading.Timer(1.0, lambda: start_evaluator("elsewhere", TINY_CLIP_ID, None, num_cpus=0,
                                                            detached=False, nodes=[node]))
        late.start()
        with caplog.at_level("WARNING", logger="evaluator.remote"):
            handle = connect_evaluator("elsewhere", timeout_s=60, local_wait_s=50)
        late.join()
        assert replica_name(handle) == f"elsewhere@{node}" and "using" not in caplog.text
    finally:
        assert stop_evaluator("elsewhere") == 2
