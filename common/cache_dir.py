"""The one cache folder for built models, datasets, latent/text caches and class images."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORASWEEP_CACHE"
DEFAULT_CACHE = "~/.cache/lorasweep"


def cache_root() -> Path:
    """`$LORASWEEP_CACHE`, else ~/.cache/lorasweep. Point it at shared storage on a cluster."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser()
