"""The XYZ grids that need new images, sampled once at export for the exported LoRAs.

LoRA strength 0 / 0.5 / 1 (what a UI's `<lora:name:w>` gives) is no evaluation a trial made, and
neither is the trigger word left out when the suite has no `trigger_test`. At export, on the
driver, the base model is loaded once and each exported LoRA file (diffusers layout, or kohya's)
is loaded into it with diffusers' own `load_lora_weights`, as a UI loads it; `set_adapters`
scales it, on the UNet and the text encoder alike. A few items are sampled (sweeps.xyz_grids
.pick_items: the concept prompts and one prior prompt, first seed each).

`<sweep>/report/xyz/strength-rank<K>.png` (and `trigger-rank<K>.png`) hold the grids;
`sampled.json` beside them says which trial and step each rank's grids show, so a second export
of the same winners samples nothing.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np

from evaluator.suites import drop_word
from sweeps import storage
from sweeps.results import sweep_uri
from sweeps.spec_schema import SweepSpec
from sweeps.xyz_grids import ROW_ITEMS, pick_items, strength_grid, trigger_grid

STRENGTHS = (0.0, 0.5, 1.0)
SAMPLED_GRIDS = {"strength": "LoRA strength 0 / 0.5 / 1", "trigger": "with and without the trigger word"}
STAMP = "sampled.json"
XYZ_DIR = "xyz"


def sample_export_grids(spec: SweepSpec, report_root: str) -> list[str]:
    """Sample the grids of every exported rank (up to export.top_k) not sampled yet; returns the
    problems met, one line each (a grid that cannot be sampled never fails the export)."""
    from sweeps.export import read_manifest

    try:
        manifest = read_manifest(sweep_uri(spec))
    except FileNotFoundError as err:
        return [str(err)]
    stamp_uri = storage.join(report_root, XYZ_DIR, STAMP)
    stamp = json.loads(storage.read_text(stamp_uri)) if storage.exists(stamp_uri) else {}
    todo = [e for e in manifest["entries"][: spec.export.top_k] if stamp.get(f"rank{e['rank']}") != _key(e)]
    problems, models = [], None
    with _trial_threads(spec):
        for entry in todo:
            try:
                models = models or _load_base(spec)
                for kind, grid in sample_entry(spec, entry, models).items():
                    storage.write_bytes(storage.join(report_root, XYZ_DIR, f"{kind}-rank{entry['rank']}.png"),
                                        _png(grid.image()))
                stamp[f"rank{entry['rank']}"] = _key(entry)
            except Exception as err:  # a broken LoRA file or a base model that cannot load: say so and go on
                problems.append(f"rank{entry['rank']}: the strength grid was not sampled ({type(err).__name__}: {err})")
    if todo:
        storage.write_text(stamp_uri, json.dumps(stamp, indent=2, sort_keys=True))
    return problems


@contextlib.contextmanager
def _trial_threads(spec: SweepSpec):
    """Sample on a CPU with a trial's threads (`resources.cpus_per_trial`), as the evaluations were:
    torch's default, one per core, spins waiting for descheduled threads on a busy machine (a
    tiny-SD sample took 10 s instead of 0.3 s beside other jobs)."""
    import torch

    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _key(entry: dict) -> dict:
    return {"trial_id": entry["trial_id"], "step": entry.get("step")}


def _load_base(spec: SweepSpec):
    import diffusers
    import transformers

    from trainer.model_loading import load_sd_components

    # the driver's console shows the sweep's lines, not a progress bar or load notes per model part
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return load_sd_components(spec.base_model)


def sample_entry(spec: SweepSpec, entry: dict, models, limit: int = ROW_ITEMS) -> dict:
    """The strength grid (and, when the suite has no trigger test, the trigger grid) of one
    exported LoRA, over at most `limit` items."""
    from sweeps.report_data import suite_kinds
    from trainer.preparation import default_device, place_base_models
    from trainer.sampling import make_pipeline, sample_images

    root = sweep_uri(spec)
    info = json.loads(storage.read_text(storage.join(root, entry["files"]["info"])))
    cfg = spec.train_config(info["params"])
    if cfg.method == "full":  # no LoRA to scale: the export is a whole model
        return {}
    place_base_models(models, cfg, default_device())
    prompts, seeds = info["prompts"], info["seeds"]
    kinds = suite_kinds(spec, prompts, seeds)
    picked = pick_items(prompts, seeds, kinds, limit)
    items = ([prompts[i] for i in picked], [seeds[i] for i in picked])
    sample = lambda ps, ss: sample_images(models, ps, ss, cfg.clip_skip, cfg.resolution, cfg.sampling)
    pipe = make_pipeline(models, cfg.sampling.sampler)
    rel = entry["files"].get("diffusers") or entry["files"]["kohya"]
    name = f"rank{entry['rank']}"
    with tempfile.TemporaryDirectory() as tmp:
        storage.copy_file(storage.join(root, rel), Path(tmp) / "lora.safetensors")
        pipe.load_lora_weights(tmp, weight_name="lora.safetensors", adapter_name=name)
    try:
        by_strength = {}
        for weight in STRENGTHS:
            pipe.set_adapters([name], adapter_weights=[weight])
            by_strength[weight] = sample(*items)
        title = f"rank {entry['rank']} ({entry['trial_id']}, step {entry.get('step')}): LoRA strength"
        grids = {"strength": strength_grid(by_strength, *items, title)}
        if spec.trigger_word and not (kinds and "trigger_on" in kinds):
            pipe.set_adapters([name], adapter_weights=[1.0])
            grids["trigger"] = _trigger_off(spec, entry, items, by_strength[1.0], sample)
    finally:
        pipe.unload_lora_weights()  # the base model as it was, for the next rank
    return {k: g for k, g in grids.items() if g is not None}


def _trigger_off(spec, entry, items, with_trigger: np.ndarray, sample):
    """The concept prompts sampled again without the trigger word (the suite had no trigger test)."""
    prompts, seeds = items
    concept = [i for i, p in enumerate(prompts) if spec.trigger_word in p.split()]
    if not concept:
        return None
    on_prompts, on_seeds = [prompts[i] for i in concept], [seeds[i] for i in concept]
    off = sample([drop_word(p, spec.trigger_word) for p in on_prompts], on_seeds)
    n = len(concept)
    return trigger_grid(np.concatenate([with_trigger[concept], off]), on_prompts * 2, on_seeds * 2,
                        ["trigger_on"] * n + ["trigger_off"] * n, spec.trigger_word,
                        f"rank {entry['rank']} ({entry['trial_id']}): with and without the trigger word")


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
