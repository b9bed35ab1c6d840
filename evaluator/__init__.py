"""CLIP-based scoring: pure metrics, prompt suites, an open_clip wrapper, the project's tiny
CLIP, and (in `evaluator.remote`, the only module importing Ray) the shared scoring service.

Names are imported lazily so that `evaluator.metrics` (pure math, used by the sweep driver)
does not pull in open_clip and torchvision.
"""

from importlib import import_module

_EXPORTS = {
    "ClipModel": "clip_model", "DEFAULT_MODEL": "defaults", "DEFAULT_PRETRAINED": "defaults",
    "validate_images": "image_checks",
    "clip_t": "metrics", "mean_clip_t": "metrics", "HESSEL_SCALE": "metrics",
    "TORCHMETRICS_SCALE": "defaults", "clip_i": "metrics", "clip_i_per_image": "metrics",
    "paired_cosine": "metrics", "prior_preservation": "metrics", "trigger_effect": "metrics",
    "composite_objective": "metrics", "DEFAULT_OBJECTIVE_WEIGHTS": "metrics",
    "OBJECTIVE_COMPONENTS": "metrics", "ObjectiveWeights": "metrics",
    "cmmd": "distribution_metrics", "clip_fd": "distribution_metrics", "clip_kid": "distribution_metrics",
    "diversity": "distribution_metrics",
    "score_images": "score", "suite_metrics": "score", "evaluate_suite": "score",
    "PromptSuite": "suites", "SuiteItem": "suites", "SuiteError": "suites", "KINDS": "suites",
    "DEFAULT_SUITE": "suites", "default_suite": "suites", "load_suite": "suites",
    "parse_suite": "suites", "expand_suite": "suites", "clip_texts": "suites",
    "score_folder": "folder",
    "TINY_CLIP_ID": "tiny", "TINY_CLIP_NAME": "tiny",
    "ensure_tiny_clip": "tiny", "register_tiny_clip": "tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evaluator' has no attribute {name!r}")
    value = getattr(import_module(f"evaluator.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value
