"""LPIPS (Zhang et al., 2018) with the `lpips` package, its backbone read from this machine.

The package ships its calibrated linear heads but fetches its AlexNet/VGG/SqueezeNet backbone from
torchvision's download URL, which cannot be reached here. The backbone is therefore built randomly
initialised by the package (`pnet_rand=True`) and its torchvision weights are loaded from a local
file: the given path, or torch's hub cache (`<torch hub dir>/checkpoints/<file>`, where
torchvision itself would have put them). A missing file is a clear error naming it.

`RANDOM_BACKBONE` (`lpips_weights: builtin:random`) keeps the package's random initialisation, drawn
at a fixed seed so that every process builds the same network: its distances are not the calibrated
LPIPS (the heads were fitted to the pretrained backbone), but they are 0 for equal images and grow
with change. It is for the toy world and tests, where no torchvision weights exist.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

# torchvision's file name of each backbone, as its download would store it in the torch cache.
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
RANDOM_BACKBONE = "builtin:random"
_RANDOM_SEED = 0


class LpipsWeightsMissing(FileNotFoundError):
    """The backbone's weights are not on this machine; the message names the file and where to put it."""


def backbone_file(net: str, weights: str | Path | None = None) -> Path | None:
    """The backbone weights file to read: `weights`, or torchvision's file in the torch cache; None
    for `RANDOM_BACKBONE` (no file)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; one of {sorted(BACKBONE_FILES)}")
    if weights == RANDOM_BACKBONE:
        return None
    path = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]
    if not path.is_file():
        raise LpipsWeightsMissing(
            f"LPIPS ({net}) needs its torchvision backbone weights, {BACKBONE_FILES[net]}: {path} does not exist. "
            f"Copy that file there (from a machine with internet: torchvision's {net} download), or give its path "
            f"(eval.ground_truth.lpips_weights; {RANDOM_BACKBONE}: an uncalibrated random backbone, for tests)")
    return path


def load_lpips(net: str = "alex", weights: str | Path | None = None, random_backbone: bool = False):
    """An `lpips.LPIPS` model (eval mode, CPU) with the package's linear heads; the backbone from
    `backbone_file` unless `random_backbone` or `weights` is RANDOM_BACKBONE (the package's own random
    initialisation, at a fixed seed: the same network in every process)."""
    import lpips

    path = None if random_backbone else backbone_file(net, weights)
    # A forked RNG: the caller's global torch RNG (training noise) is left as it was.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, from inside the package
        torch.manual_seed(_RANDOM_SEED)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors: nothing runs on load
        for stage in model.net.children():  # slices that hold torchvision's `features[i]` under the name i
            for index, layer in stage.named_children():
                own = layer.state_dict()
                missing = [f"features.{index}.{k}" for k in own if f"features.{index}.{k}" not in state]
                if missing:
                    raise LpipsWeightsMissing(f"{path} is not torchvision's {net} weights (no {missing[0]})")
                layer.load_state_dict({k: state[f"features.{index}.{k}"] for k in own})
    return model.eval()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float in [-1, 1], LPIPS's input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def lpips_distances(model, generated: np.ndarray, truth: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """LPIPS between image i of each set (NHWC uint8, same shape), one float per pair (0 = identical)."""
    if generated.shape != truth.shape:
        raise ValueError(f"LPIPS compares pairs of equal size: generated {generated.shape}, truth {truth.shape}")
    out = []
    for start in range(0, len(generated), batch_size):
        a = _to_tensor(generated[start:start + batch_size])
        b = _to_tensor(truth[start:start + batch_size])
        out.append(model(a, b).flatten())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
