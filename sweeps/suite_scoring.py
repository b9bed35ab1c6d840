"""Scoring a trial's samples on a prompt suite: CLIP-T per kind, CLIP-I, prior preservation,
trigger effect and the composite objective (weighted by the spec's `objective.weights`), and the
optional judges' dino_i and aesthetic when the spec configures them (`evaluator.judges`).

The references are made once and kept in the shared evaluator: the training images, and the base
model's images of the `no_concept` items. The latter depend on everything that changes what the
base model draws (the model, the prompts and seeds, clip skip, resolution, the sampling settings,
precision...), so they are keyed by a hash of those (`base_reference_key`): two trials with
different searched clip skips get two references. They are rendered with the LoRA adapters
disabled (the base model itself, whatever the trial's step: a resumed trial gets the same
reference as a fresh one) and persisted under `<sweep>/references/`, so that an evaluator restart
or a resumed trial reads them back instead of rendering them again. A suite with `guidance_scales`
has one reference per scale (the scorer takes the `guidance` its images were sampled at); LoRA
strengths share them (the base model has no LoRA to scale).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
from collections.abc import Callable

import numpy as np

from evaluator.remote import MissingReference, ensure_reference, score_suite_remote
from sweeps import storage
from sweeps.evaluator_placement import connect_replica, served_locally
from sweeps.trial_plan import TrialPlan
from trainer.images import load_image
from trainer.loop import LoraTrainer

Scorer = Callable[[np.ndarray, list[str]], dict]
REFERENCES = "references"  # <sweep>/references/base-<hash>.npz


def training_images(trainer: LoraTrainer, limit: int = 64) -> np.ndarray:
    """The distinct training images of the concept as the trainer sees them (center crop, no flip),
    uint8 NHWC: those whose caption holds the trigger word when some do (a dataset may keep other
    pictures beside the concept's, e.g. regularisation folders), else all. CLIP-I compares to these."""
    cfg, seen, out = trainer.cfg, set(), []
    rng = np.random.default_rng(0)
    examples = trainer.data.examples
    if cfg.trigger_word and any(cfg.trigger_word in e.caption for e in examples):
        examples = [e for e in examples if cfg.trigger_word in e.caption]
    for example in examples:
        if example.image_path in seen or len(out) >= limit:
            continue
        seen.add(example.image_path)
        size = trainer.target_sizes.get(example.image_path, cfg.resolution)
        x = load_image(example.image_path, size, True, False, rng)  # CHW in [-1, 1]
        out.append(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
    if len({im.shape for im in out}) > 1:  # bucketed sizes: keep the most common one for one batch
        shapes = [im.shape for im in out]
        common = max(set(shapes), key=shapes.count)
        out = [im for im in out if im.shape == common]
    return np.stack(out)


def sampling_at(trainer: LoraTrainer, guidance: float | None):
    """The trainer's sampling settings at `guidance` (None: as configured)."""
    s = trainer.cfg.sampling
    return s if guidance is None else s.model_copy(update={"guidance_scale": float(guidance)})


def base_reference_inputs(plan: TrialPlan, trainer: LoraTrainer, guidance: float | None = None) -> dict:
    """Everything that changes the base model's images of the no_concept items (no LoRA setting),
    sampled at `guidance` (None: the sampling's own scale)."""
    cfg, items = trainer.cfg, [it for it in plan.suite_items or [] if it.kind == "no_concept"]
    s = sampling_at(trainer, guidance)
    return {
        "base_model": plan.prepared.base_model, "base_model_sha256": plan.prepared.base_model_sha256,
        "prompts": [it.prompt for it in items], "seeds": [it.seed for it in items],
        "sampling": {"steps": s.steps, "guidance_scale": s.guidance_scale, "sampler": s.sampler,
                     "negative_prompt": s.negative_prompt},
        "clip_skip": cfg.clip_skip, "resolution": cfg.resolution, "prediction_type": cfg.prediction_type,
        "mixed_precision": cfg.mixed_precision, "attention": cfg.attention,
    }


def base_reference_key(plan: TrialPlan, trainer: LoraTrainer, guidance: float | None = None) -> str:
    """`<sweep>/base/<16 hex digits>`: a stable hash of `base_reference_inputs`."""
    blob = json.dumps(base_reference_inputs(plan, trainer, guidance), sort_keys=True, default=str).encode()
    return f"{plan.sweep}/base/{hashlib.sha256(blob).hexdigest()[:16]}"


def reference_path(plan: TrialPlan, key: str) -> str:
    return storage.join(plan.sweep_uri, REFERENCES, f"base-{key.rsplit('/', 1)[-1]}.npz")


@contextlib.contextmanager
def adapters_disabled(trainer: LoraTrainer):
    """The base model: every LoRA adapter of the trainer off (peft's `disable_adapters`), and every
    parameter's requires_grad as it was afterwards (peft switches the adapters' off). A full
    fine-tune has no adapters: its base weights are put in instead (trainer.full_finetune)."""
    if trainer.cfg.method == "full":
        from trainer.full_finetune import base_model_weights

        with base_model_weights(trainer):
            yield
        return
    modules = [trainer.models.unet] + ([trainer.models.text_encoder] if trainer.cfg.train_text_encoder else [])
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for m in modules:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in modules:
            m.enable_adapters()
        for p, flag in grads:
            p.requires_grad_(flag)


def base_images(plan: TrialPlan, trainer: LoraTrainer, key: str | None = None,
                guidance: float | None = None) -> np.ndarray:
    """The base model's images of the no_concept items at `guidance`: read from the sweep's storage
    when a trial made them already, else rendered with the adapters disabled and stored (atomically)."""
    key = key or base_reference_key(plan, trainer, guidance)
    path = reference_path(plan, key)
    if storage.exists(path):
        with np.load(io.BytesIO(storage.read_bytes(path))) as f:
            return f["images"]
    items = [it for it in plan.suite_items if it.kind == "no_concept"]
    with adapters_disabled(trainer):
        images = trainer.sample([it.prompt for it in items], [it.seed for it in items], sampling_at(trainer, guidance))
    buf = io.BytesIO()
    inputs = json.dumps(base_reference_inputs(plan, trainer, guidance), sort_keys=True, default=str)
    np.savez_compressed(buf, images=images, inputs=np.array(inputs))
    storage.write_bytes(path, buf.getvalue())
    return images


def make_suite_scorer(plan: TrialPlan, trainer: LoraTrainer) -> Scorer | None:
    """A scorer for the plan's prompt suite, or None when the spec lists plain prompts. It is called
    as `score(images, prompts)`, or `score(images, prompts, guidance=g)` for images sampled at
    guidance scale g (`sweeps.variant_sampling`), whose base-model reference it then uses; each
    scale's reference is made at its first use."""
    if plan.suite_items is None:
        return None
    has_base = any(it.kind == "no_concept" for it in plan.suite_items)
    key_of = functools.cache(lambda g: base_reference_key(plan, trainer, g) if has_base else None)
    first = plan.eval_variants.pairs()[0][0] if plan.eval_variants else None  # the first scale sampled
    if plan.evaluator_actor:
        return _remote(plan, trainer, key_of, first)
    return _local(plan, trainer, key_of, first)


def _remote(plan, trainer, key_of, first) -> Scorer:
    handle = connect_replica(plan.evaluator_actor, plan.evaluator_local_wait_s)
    local = float(served_locally(handle))  # reported: 1 when this node's own replica scored
    train_key = f"{plan.sweep}/train"
    put: set[str] = set()  # base-model keys put since the evaluator was last found empty

    def base_key(guidance: float | None) -> str | None:
        key = key_of(guidance)
        if key and key not in put:
            ensure_reference(handle, key, lambda: base_images(plan, trainer, key, guidance))
            put.add(key)
        return key

    def put_references() -> None:
        put.clear()
        ensure_reference(handle, train_key, lambda: training_images(trainer))
        base_key(first)

    put_references()

    def score(images: np.ndarray, prompts: list[str], guidance: float | None = None) -> dict:
        def call():
            return score_suite_remote(handle, plan.suite_items, images, trigger=plan.trigger_word,
                                      base_key=base_key(guidance), train_key=train_key,
                                      weights=plan.objective_weights, timeout_s=600)
        try:
            scores = call()
        except MissingReference:  # the evaluator restarted with an empty cache: put them again
            put_references()
            scores = call()
        return {**scores, "evaluator_local": local}

    return score


@functools.lru_cache(maxsize=1)
def local_clip(model: str, pretrained: str | None):
    """The in-process CLIP model (no shared evaluator), loaded once per process: the suite's scorer
    and the img2img scorer (`sweeps.variant_sampling`) share it."""
    from evaluator import ClipModel  # torch and open_clip: only where the model runs

    return ClipModel.load(model, pretrained)


def _local(plan, trainer, key_of, first) -> Scorer:
    from evaluator.judges import Judges
    from evaluator.score import evaluate_suite

    clip = local_clip(plan.evaluator_model, plan.evaluator_pretrained)
    judges = Judges.load(plan.evaluator_dino, plan.evaluator_aesthetic, clip)
    train = training_images(trainer)
    train_emb = clip.embed_images(train)
    train_dino = judges.reference(train) if judges else None  # once per trial, as train_emb
    base = functools.cache(lambda g: base_images(plan, trainer, key_of(g), g) if key_of(g) else None)
    base(first)

    def score(images: np.ndarray, prompts: list[str], guidance: float | None = None) -> dict:
        return evaluate_suite(clip, plan.suite_items, images, trigger=plan.trigger_word, base_images=base(guidance),
                              train_emb=train_emb, weights=plan.objective_weights, judges=judges,
                              train_dino_emb=train_dino)

    return score
