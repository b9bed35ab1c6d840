"""The evaluator's defaults (plain constants: Ray clients of the service import them without torch)."""

from __future__ import annotations

# For real scoring: ViT-L/14 with OpenAI's weights, the CLIP that SD 1.x's text encoder comes
# from and the one most CLIP-score numbers in papers use. OpenAI trained it with QuickGELU, so
# the `-quickgelu` config is the one that matches those weights.
DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"
TORCHMETRICS_SCALE = 100.0  # CLIP-T scale; see evaluator.metrics
