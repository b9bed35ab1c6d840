"""Exact save/restore of a LoraTrainer as safetensors + JSON: no pickle, nothing runs code on load.

A checkpoint folder holds two files:

- `trainer_state.safetensors`: every tensor of `trainer.state_dict()` (LoRA weights, optimizer
  moments, torch RNG and generator states as uint8 tensors), keyed by its path in the state;
- `trainer_state.json`: everything else (step, lr scheduler, data order, numpy RNG, optimizer
  param groups) and the structure that puts the tensors back into the nested state.

Each file is written to a temporary name and renamed; the JSON goes last and names the tensor
file's sha256, so it is the commit marker: a save interrupted at any point leaves either the
previous checkpoint or one that `load_checkpoint` rejects with a clear error, never a silent mix.
Other files in the folder (a LoRA export, sample images) are left alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.files import atomic_write, sha256_file

STATE_FILE = "trainer_state.safetensors"
META_FILE = "trainer_state.json"
FORMAT = "lorasweep-trainer-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored; the message names the folder."""


# --------------------------------------------------------------------------- state <-> (tree, tensors)


def _is_plain_key(key) -> bool:
    return isinstance(key, str) and not key.startswith("__")


def encode_state(obj, tensors: dict[str, torch.Tensor], path: str = "") -> object:
    """A JSON-able tree of `obj`; tensors (and numpy arrays) go into `tensors`, keyed by path.

    Dicts with non-string keys (optimizer state is keyed by parameter index) and tuples are
    tagged so that `decode_state` rebuilds the same types.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": path}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no inf/nan; keep them exact as tagged strings.
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(_is_plain_key(k) for k in obj):
            return {k: encode_state(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} at {path or '/'}")
            items.append([k, encode_state(v, tensors, f"{path}/{k}")])
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        encoded = [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": encoded} if isinstance(obj, tuple) else encoded
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at {path or '/'} in a checkpoint without pickle; "
        "state_dict() may hold only tensors, numpy arrays, numbers, strings, lists, tuples and dicts"
    )


def decode_state(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of `encode_state`."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, value), = tree.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__ndarray__":
            return tensors[value].numpy()
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(decode_state(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: decode_state(v, tensors) for k, v in value}
    return {k: decode_state(v, tensors) for k, v in tree.items()}


# --------------------------------------------------------------------------- files


def save_checkpoint(trainer, folder: str | Path) -> Path:
    """Write `trainer.state_dict()` into `folder` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(trainer.state_dict(), tensors)
    atomic_write(folder / STATE_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "global_step": getattr(trainer, "global_step", None),
        "tensors_sha256": sha256_file(folder / STATE_FILE),
        "num_tensors": len(tensors),
        "state": tree,
    }
    atomic_write(folder / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8"))
    return folder


def read_checkpoint(folder: str | Path) -> dict:
    """The trainer state stored in `folder`, checked for completeness and integrity."""
    folder = Path(folder)
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{folder} holds no complete checkpoint: {META_FILE} is missing (an interrupted save, "
            "or not a checkpoint folder); use an earlier checkpoint"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is unreadable ({err}); use an earlier checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} has format {found!r}, expected {FORMAT!r}")
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {STATE_FILE} is missing")
    if sha256_file(state_path) != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"checkpoint {folder} is corrupt or incomplete: {STATE_FILE} does not match the sha256 "
            f"recorded in {META_FILE} (truncated, altered, or from another save); use an earlier checkpoint"
        )
    try:
        tensors = load_file(str(state_path))
        return decode_state(meta["state"], tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: cannot read {STATE_FILE} ({type(err).__name__}: {err})") from None


def load_checkpoint(trainer, folder: str | Path) -> None:
    """Restore `trainer` (built with the same config) to the state saved in `folder`."""
    state = read_checkpoint(folder)
    try:
        trainer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this trainer ({type(err).__name__}: {err}); "
            "was it saved with another config (rank, target modules, dataset, optimizer)?"
        ) from err
