"""The shared CLIP evaluator: one Ray actor per node that loads the model once and serves every
trial of a sweep, batching their concurrent requests. The only evaluator module importing Ray.

    start_evaluator(name=..., model=..., pretrained=...)   # the sweep driver, once per sweep
    h = connect_evaluator(name=..., local_wait_s=...)       # each trial: the replica on its node
    score_remote(h, images_uint8, prompts)                  # {"clip_score", "per_image"}
    put_reference(h, key, training_images)                  # embedded once, cached by key
    score_suite_remote(h, items, images, trigger=..., train_key=key, base_key=...)
    score_ground_truth_remote(h, images, captions, truth_key=key)  # FD, KID, CMMD, CLIP-T vs truth
    stop_evaluator(name=...)                                # the sweep driver, at the end

Replicas are named `<name>@<node id>` (one per node, pinned with NodeAffinitySchedulingStrategy;
`nodes=` chooses which, e.g. only the nodes that run trials) or `<name>#<i>` (`replicas=k`), in the
Ray namespace `NAMESPACE`, detached so that they outlive a crashed driver and serve a resumed
sweep; `stop_evaluator` removes them, `stop_replica` one of them. A client uses the replica on its
own node and, when there is none (or it does not answer), another one, logging that it does.
Images travel as uint8 arrays (4x smaller than float32) through Ray's object store.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from evaluator.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, TORCHMETRICS_SCALE
from evaluator.evaluator_service import EvaluatorService, MissingReference, _check_prompts
from evaluator.image_checks import validate_images
from evaluator.suites import SuiteItem, check_items

# torch, open_clip and the model wrapper are imported inside the actor only (evaluator.evaluator_service):
# clients (trials, benchmarks) talk to the service with numpy and Ray alone.
__all__ = ["NAMESPACE", "DEFAULT_NAME", "EvaluatorError", "EvaluatorGone", "EvaluatorTimeout",
           "MissingReference", "start_evaluator", "connect_evaluator", "stop_evaluator",
           "score_remote", "score_suite_remote", "score_ground_truth_remote", "embed_remote", "put_reference",
           "has_reference", "ensure_reference", "reference_key", "evaluator_stats", "replica_name", "replica_nodes",
           "stop_replica"]

log = logging.getLogger(__name__)

NAMESPACE = "lorasweep"
DEFAULT_NAME = "lorasweep-evaluator"


class EvaluatorError(RuntimeError):
    """The evaluator service could not answer."""


class EvaluatorGone(EvaluatorError):
    """No evaluator under that name, or its actor died."""


class EvaluatorTimeout(EvaluatorError, TimeoutError):
    """The evaluator did not answer in time."""


_NAMES: dict[str, str] = {}  # actor id -> replica name, for error messages in this process
_OWNED: dict[str, ray.actor.ActorHandle] = {}  # non-detached replicas live while the driver does


def _restart_hint(name: str) -> str:
    return (f"restart it with evaluator.remote.start_evaluator(name={name!r}, model=..., "
            "pretrained=...) (the sweep driver does this at the start of a sweep), then "
            f"reconnect with connect_evaluator(name={name!r})")


class _RayEvaluator(EvaluatorService):
    async def info(self) -> dict:
        return {**await super().info(), "node_id": ray.get_runtime_context().get_node_id()}


_Actor = ray.remote(_RayEvaluator)



def reference_key(images: np.ndarray, tag: str = "") -> str:
    """A content key for reference images: the same images always map to the same key."""
    validate_images(images)
    h = hashlib.sha256(str(images.shape).encode() + tag.encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:24]


def _need_ray() -> None:
    if not ray.is_initialized():
        raise EvaluatorError("Ray is not initialized: call ray.init(...) (or run inside a Ray "
                             "task/trial) before using the evaluator service")


def _replica_names(name: str, namespace: str) -> list[str]:
    found = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in found if a["namespace"] == namespace
                  and (a["name"].startswith(f"{name}@") or a["name"].startswith(f"{name}#")))


def replica_nodes(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> dict[str, str]:
    """Node id -> replica name of every per-node replica of `name` that Ray lists now."""
    _need_ray()
    return {n.split("@", 1)[1]: n for n in _replica_names(name, namespace) if "@" in n}


def replica_name(handle) -> str | None:
    """The name of a replica that this process started or connected to."""
    return _NAMES.get(handle._actor_id.hex())


def _target_nodes(num_cpus: float, num_gpus: float) -> list[str]:
    """Alive nodes with room for one replica (a CPU-less head node gets none)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = [n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) >= num_cpus
           and n["Resources"].get("GPU", 0) >= num_gpus]
    if not fit:
        raise EvaluatorError(f"no Ray node can host an evaluator replica needing {num_cpus} CPU "
                             f"and {num_gpus} GPU: lower num_cpus/num_gpus of start_evaluator")
    return sorted(fit)


def start_evaluator(name: str = DEFAULT_NAME, model: str = DEFAULT_MODEL,
                    pretrained: str | None = DEFAULT_PRETRAINED, *, max_batch_size: int = 64,
                    max_wait_ms: float = 10.0, replicas: int | str = "per_node",
                    num_cpus: float = 1.0, num_gpus: float = 0.0, device: str | None = None,
                    torch_threads: int | None = None, namespace: str = NAMESPACE,
                    detached: bool = True, max_restarts: int = 1,
                    timeout_s: float = 600.0, dino: str | None = None,
                    aesthetic: str | None = None,
                    nodes: list[str] | None = None) -> ray.actor.ActorHandle:
    """Get or create the evaluator replicas and wait until they have loaded the model.

    replicas: "per_node" (one per node with room, pinned there) or an int (that many, spread).
    max_batch_size: most images per model forward; max_wait_ms: how long a batch's first
    request waits for others (ms). num_cpus/num_gpus: Ray resources each replica holds (a
    fraction of a GPU, e.g. 0.25, puts it on the GPU beside the trials); device: default CUDA
    when the replica sees a GPU. torch_threads: intra-op threads (default: num_cpus, >= 1).
    detached: the replicas outlive the driver (a resumed sweep finds them); `stop_evaluator`
    ends them. max_restarts: Ray restarts a crashed replica (reloading the model, with an empty
    reference cache) this many times. dino / aesthetic: paths of the optional judges
    (`evaluator.judges`), loaded once per replica beside the CLIP model. Returns the replica on
    the caller's node. nodes: with "per_node", the node ids to place replicas on (default:
    every alive node with room). An existing replica serving another model or other judges is an
    error (stop it, or use another name).
    """
    _need_ray()
    if replicas == "per_node":
        placements = [(f"{name}@{nid}", NodeAffinitySchedulingStrategy(nid, soft=False))
                      for nid in (_target_nodes(num_cpus, num_gpus) if nodes is None else nodes)]
        if not placements:
            raise ValueError("nodes: give at least one node id (or None for every node with room)")
    elif isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1:
        placements = [(f"{name}#{i}", "SPREAD") for i in range(replicas)]
    else:
        raise ValueError(f"replicas must be 'per_node' or an int >= 1, got {replicas!r}")
    threads = torch_threads or max(1, int(num_cpus))
    handles = []
    for actor_name, strategy in placements:
        handles.append(_Actor.options(
            name=actor_name, namespace=namespace, get_if_exists=True,
            lifetime="detached" if detached else None, num_cpus=num_cpus, num_gpus=num_gpus,
            scheduling_strategy=strategy, max_restarts=max_restarts,
            max_concurrency=1000).remote(actor_name, model, pretrained, device, max_batch_size,
                                         max_wait_ms, threads, dino, aesthetic))
    infos = [_call(h, h.info.remote(), timeout_s, n) for (n, _), h in zip(placements, handles)]
    _NAMES.update({h._actor_id.hex(): n for (n, _), h in zip(placements, handles)})
    if not detached:  # Ray ends a non-detached actor once no handle to it is left
        _OWNED.update({n: h for (n, _), h in zip(placements, handles)})
    for info in infos:
        if (info["model"], info["pretrained"]) != (model, pretrained):
            raise EvaluatorError(
                f"evaluator {info['name']!r} already serves model {info['model']!r} "
                f"(pretrained {info['pretrained']!r}), not {model!r} ({pretrained!r}): "
                f"stop it with stop_evaluator(name={name!r}) or choose another name")
        if (info.get("dino"), info.get("aesthetic")) != (dino, aesthetic):
            raise EvaluatorError(
                f"evaluator {info['name']!r} already serves the judges dino={info.get('dino')!r}, "
                f"aesthetic={info.get('aesthetic')!r}, not dino={dino!r}, aesthetic={aesthetic!r}: "
                f"stop it with stop_evaluator(name={name!r}) or choose another name")
    return _pick(list(zip([n for n, _ in placements], handles)))


def _pick(named: list[tuple[str, ray.actor.ActorHandle]]) -> ray.actor.ActorHandle:
    """The replica on this node if there is one, else a stable choice by node id."""
    node = ray.get_runtime_context().get_node_id()
    for n, h in named:
        if n.endswith(f"@{node}"):
            return h
    return named[zlib.crc32(node.encode()) % len(named)][1]


def connect_evaluator(name: str = DEFAULT_NAME, timeout_s: float = 60.0,
                      namespace: str = NAMESPACE, local_wait_s: float = 0.0) -> ray.actor.ActorHandle:
    """The running evaluator replica for this node (waiting up to `timeout_s` for one to appear
    and answer). local_wait_s: how long to wait for this node's own replica (one that a driver
    is starting on a node that just joined) before using another node's; that fallback, and a
    replica that does not answer, are logged. Raises EvaluatorGone when none answers in time."""
    _need_ray()
    node = ray.get_runtime_context().get_node_id()
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        names = _replica_names(name, namespace)
        own = f"{name}@{node}" in names
        waited = time.monotonic() - start
        if names and (own or waited >= min(local_wait_s, timeout_s)):
            break
        if time.monotonic() >= deadline:
            raise EvaluatorGone(f"no evaluator named {name!r} in Ray namespace {namespace!r}: "
                                + _restart_hint(name))
        time.sleep(0.2)
    named = []
    for n in _by_preference(names, node):
        try:
            named.append((n, ray.get_actor(n, namespace=namespace)))
        except ValueError:  # it died between the listing and the look-up
            continue
    if not named:
        raise EvaluatorGone(f"evaluator {name!r} vanished while connecting: " + _restart_hint(name))
    _NAMES.update({h._actor_id.hex(): n for n, h in named})
    return _first_answering(named, node, deadline)


def _by_preference(names: list[str], node: str) -> list[str]:
    """This node's replica first, then the others in a stable order that differs between nodes
    (so that the clients of a node without a replica spread over the others)."""
    own = [n for n in names if n.endswith(f"@{node}")]
    others = [n for n in names if n not in own]
    if others:
        k = zlib.crc32(node.encode()) % len(others)
        others = others[k:] + others[:k]
    return own + others


def _first_answering(named: list, node: str, deadline: float) -> ray.actor.ActorHandle:
    """The first replica of `named` that answers; each but the last gets a share of the time left."""
    for i, (n, handle) in enumerate(named):
        left = max(1.0, deadline - time.monotonic())
        try:
            _call(handle, handle.info.remote(), left if i == len(named) - 1 else min(left, 30.0), n)
        except (EvaluatorGone, EvaluatorTimeout) as err:
            if i == len(named) - 1:
                raise
            log.warning("evaluator replica %s did not answer (%s); trying %s", n, err, named[i + 1][0])
            continue
        if not n.endswith(f"@{node}"):
            log.warning("evaluator: no replica of %s answers on this node (%s); using %s",
                        n.split("@")[0].split("#")[0], node[:12], n)
        return handle
    raise EvaluatorGone("no evaluator replica to connect to")  # unreachable: `named` is never empty


def stop_replica(replica: str, namespace: str = NAMESPACE) -> bool:
    """Kill one replica by its name (e.g. that of a node which left); False when it is not there."""
    _need_ray()
    _OWNED.pop(replica, None)
    try:
        ray.kill(ray.get_actor(replica, namespace=namespace), no_restart=True)
    except ValueError:
        return False
    return True


def stop_evaluator(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> int:
    """Kill every replica of `name` (no restart); returns how many there were."""
    _need_ray()
    names = _replica_names(name, namespace)
    for n in names:
        _OWNED.pop(n, None)
        try:
            ray.kill(ray.get_actor(n, namespace=namespace), no_restart=True)
        except ValueError:
            pass
    return len(names)


def _call(handle, ref, timeout_s: float, name: str | None = None):
    """ray.get with the service's errors: timeout and a dead/unavailable actor say what to do."""
    known = name or _NAMES.get(handle._actor_id.hex())
    label = known or f"actor {handle._actor_id.hex()[:12]}"
    base = known.split("@")[0].split("#")[0] if known else DEFAULT_NAME
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        try:
            ray.cancel(ref)  # the request's coroutine stops; its batch slot is skipped
        except Exception:  # already finished or the actor is gone: nothing to cancel
            pass
        raise EvaluatorTimeout(f"evaluator {label!r} did not answer within {timeout_s} s "
                               "(overloaded, or stuck loading the model?): raise timeout_s, or "
                               "look at it with `ray list actors` / the Ray dashboard") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvaluatorGone(f"evaluator {label!r} is gone ({first}): "
                            + _restart_hint(base)) from err
    except ray.exceptions.RayTaskError as err:
        # The service refused the request (bad input, unknown reference key): re-raise the
        # original exception, whose message says what to fix, not Ray's wrapper.
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, Exception) else err) from None


def score_remote(handle, images_uint8: np.ndarray, prompts: list[str], timeout_s: float = 120.0,
                 scale: float = TORCHMETRICS_SCALE) -> dict:
    """CLIP-T of each image against its prompt on the service: {"clip_score", "per_image"}.
    Bad input is rejected here, before anything is sent."""
    _check_prompts(images_uint8, prompts)
    return _call(handle, handle.score.remote(images_uint8, list(prompts), scale), timeout_s)


def score_suite_remote(handle, items: list[SuiteItem], images_uint8: np.ndarray,
                       trigger: str | None = None, base_key: str | None = None,
                       train_key: str | None = None, weights: dict | None = None,
                       keep_trigger: bool = False, timeout_s: float = 120.0,
                       scale: float = TORCHMETRICS_SCALE) -> dict:
    """`evaluator.score.suite_metrics` on the service; references by the keys of `put_reference`
    (base_key: base-model images of the no_concept items; train_key: training images)."""
    validate_images(images_uint8)
    check_items(items, len(images_uint8))
    ref = handle.score_suite.remote([tuple(it) for it in items], images_uint8, trigger, base_key,
                                    train_key, weights, keep_trigger, scale)
    return _call(handle, ref, timeout_s)


def score_ground_truth_remote(handle, images_uint8: np.ndarray, captions: list[str], truth_key: str,
                              timeout_s: float = 120.0) -> dict:
    """`evaluator.ground_truth.clip_ground_truth_scores` on the service: image i against the truth
    images put under `truth_key` (`put_reference`) and caption i."""
    _check_prompts(images_uint8, captions)
    return _call(handle, handle.score_ground_truth.remote(images_uint8, list(captions), truth_key), timeout_s)


def embed_remote(handle, images_uint8: np.ndarray, timeout_s: float = 120.0) -> np.ndarray:
    validate_images(images_uint8)
    return _call(handle, handle.embed.remote(images_uint8), timeout_s)


def put_reference(handle, key: str, images_uint8: np.ndarray, timeout_s: float = 300.0) -> int:
    """Embed reference images once under `key` (a hit when the key is already cached; see
    `reference_key`). Returns the number of cached embeddings."""
    validate_images(images_uint8)
    return _call(handle, handle.put_reference.remote(key, images_uint8), timeout_s)


def has_reference(handle, key: str, timeout_s: float = 30.0) -> bool:
    return _call(handle, handle.reference_size.remote(key), timeout_s) > 0


def ensure_reference(handle, key: str, make_images, timeout_s: float = 300.0) -> int:
    """Like put_reference, but `make_images()` is only called (and its images only sent) when
    the service lacks `key` (e.g. base-model images, costly to sample). Returns the count."""
    size = _call(handle, handle.reference_size.remote(key), timeout_s)
    return size or put_reference(handle, key, make_images(), timeout_s)


def evaluator_stats(handle, timeout_s: float = 30.0) -> dict:
    """model_loads, batches, batch_sizes, requests, images, references, cache hit counts."""
    return _call(handle, handle.stats.remote(), timeout_s)
