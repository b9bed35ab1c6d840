"""CLIP-based scoring: pure metrics, an open_clip wrapper, and the project's tiny CLIP.

Names are imported lazily so that `evaluator.metrics` (pure math, used by the sweep driver)
does not pull in open_clip and torchvision.
"""

from importlib import import_module

_EXPORTS = {
    "ClipModel": "clip_model", "DEFAULT_MODEL": "clip_model", "DEFAULT_PRETRAINED": "clip_model",
    "validate_images": "clip_model",
    "clip_t": "metrics", "mean_clip_t": "metrics", "HESSEL_SCALE": "metrics",
    "TORCHMETRICS_SCALE": "metrics",
    "score_images": "score",
    "TINY_CLIP_ID": "tiny", "TINY_CLIP_NAME": "tiny", "cache_root": "tiny",
    "ensure_tiny_clip": "tiny", "register_tiny_clip": "tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evaluator' has no attribute {name!r}")
    value = getattr(import_module(f"evaluator.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value
