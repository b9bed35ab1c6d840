"""`AestheticHead`: a LAION-style aesthetic predictor, a small head on L2-normalised CLIP image
embeddings that predicts how much people like an image (about 1-10, the AVA rating scale).

Two published formats, told apart by the state dict's keys:
- `mlp`: the improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor, e.g.
  `sac+logos+ava1-l14-linearMSE.pth`): `layers.{0,2,4,6,7}.{weight,bias}` of Linear(D, 1024),
  Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1),
  with no activations between them (as published);
- `linear`: the original LAION-AI/aesthetic-predictor (`sa_0_4_vit_l_14_linear.pth`): `weight`
  and `bias` of one Linear(D, 1).
D is the CLIP model's embedding width (768 for ViT-L/14, the published heads' model). Files are
a `.pth`/`.pt` state dict (read with `torch.load(weights_only=True)`: tensors only, no code) or
`.safetensors`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

MLP_WIDTHS = (1024, 128, 64, 16, 1)  # output width of each Linear of the improved predictor
_MLP_LINEARS = (0, 2, 4, 6, 7)  # their indices in its nn.Sequential (1, 3, 5 are Dropouts)
_MLP_DROPOUTS = (0.2, 0.2, 0.1)  # inactive in eval mode; kept so the module is the published one
MLP_KEYS = frozenset(f"layers.{i}.{p}" for i in _MLP_LINEARS for p in ("weight", "bias"))
LINEAR_KEYS = frozenset({"weight", "bias"})
SUFFIXES = (".pth", ".pt", ".safetensors")
FIX = ("give a LAION aesthetic head file: the improved-aesthetic-predictor MLP (e.g. sac+logos+ava1-l14-linearMSE.pth) "
       "or the original linear head (e.g. sa_0_4_vit_l_14_linear.pth), as .pth or .safetensors")


class AestheticError(ValueError):
    """An aesthetic head file that cannot be used; the message names the file and the fix."""


def read_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The head's tensors from a `.pth`/`.pt` state dict or a `.safetensors` file; AestheticError when unreadable."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise AestheticError(f"{file}: {'a folder, not a file' if file.exists() else 'not found'}; {FIX}")
    if file.suffix not in SUFFIXES:
        raise AestheticError(f"{file}: unknown file type {file.suffix!r} (expected {', '.join(SUFFIXES)}); {FIX}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, a pickle with code in it, not a state dict: all unusable
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise AestheticError(f"{file}: unreadable ({type(err).__name__}: {first}); {FIX}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AestheticError(f"{file}: not a state dict of tensors; {FIX}")
    return state


def head_format(state: dict[str, torch.Tensor], where: str = "head") -> str:
    """`mlp` or `linear` from the keys and shapes (see the module doc); AestheticError otherwise."""
    keys = set(state)
    if keys == MLP_KEYS:
        width = state["layers.0.weight"].shape[-1]
        for i, out, inp in zip(_MLP_LINEARS, MLP_WIDTHS, (width, *MLP_WIDTHS[:-1])):
            w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
            if tuple(w.shape) != (out, inp) or tuple(b.shape) != (out,):
                raise AestheticError(f"{where}: layers.{i} has shape {tuple(w.shape)}, the improved-aesthetic-predictor MLP has "
                      f"({out}, {inp}); {FIX}")
        return "mlp"
    if keys == LINEAR_KEYS:
        w, b = state["weight"], state["bias"]
        if w.ndim != 2 or w.shape[0] != 1 or tuple(b.shape) != (1,):
            raise AestheticError(f"{where}: weight {tuple(w.shape)} / bias {tuple(b.shape)} is not one Linear(D, 1); {FIX}")
        return "linear"
    shown = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
    raise AestheticError(f"{where}: keys [{shown}] are neither the improved-aesthetic-predictor MLP "
                 f"(layers.0.weight ... layers.7.bias) nor the linear head (weight, bias); {FIX}")


def width_mismatch(path: str | Path, head_width: int, clip_width: int, clip_name: str) -> str:
    """The message for a head made for another CLIP model's embeddings."""
    return (f"{path}: the aesthetic head takes {head_width}-wide CLIP image embeddings, but the evaluator's CLIP "
            f"model {clip_name!r} gives {clip_width}-wide ones; use the CLIP model the head was trained for "
            "(the published LAION heads: evaluator.model: ViT-L-14-quickgelu, evaluator.pretrained: openai for "
            "width 768; ViT-B-32 for the 512-wide linear head) or a head made for this one")


class AestheticHead:
    """A loaded head in eval mode (dropout off) on the CPU: it is a few MLP layers on (N, D) rows."""

    def __init__(self, module: torch.nn.Module, kind: str, input_width: int, path: str):
        self.module = module
        self.kind = kind  # "mlp" or "linear"
        self.input_width = input_width
        self.path = path

    @classmethod
    def load(cls, path: str | Path, clip_width: int | None = None, clip_name: str = "the evaluator's") -> AestheticHead:
        """Read and build the head; with `clip_width`, a head of another width is an AestheticError."""
        file = str(Path(path).expanduser().resolve())
        state = read_head_state(file)
        kind = head_format(state, file)
        width = int(state["layers.0.weight" if kind == "mlp" else "weight"].shape[1])
        module = build_head(kind, width)
        module.load_state_dict({k: v.float() for k, v in state.items()})
        module.eval().requires_grad_(False)
        head = cls(module, kind, width, file)
        if clip_width is not None and clip_width != head.input_width:
            raise AestheticError(width_mismatch(file, head.input_width, clip_width, clip_name))
        return head

    def __repr__(self) -> str:
        return f"AestheticHead({self.path!r}, kind={self.kind!r}, width={self.input_width})"

    @torch.inference_mode()
    def __call__(self, clip_image_emb: torch.Tensor) -> torch.Tensor:
        """Predicted score of each image from its CLIP image embedding (N, D): float32 (N,).
        Embeddings are L2-normalised here, as both projects feed them (whatever the caller did)."""
        x = torch.as_tensor(clip_image_emb).detach().to("cpu", torch.float32)
        if x.ndim != 2 or x.shape[1] != self.input_width:
            raise ValueError(f"{self.path}: expected CLIP image embeddings of shape (N, {self.input_width}), "
                             f"got {tuple(x.shape)}")
        return self.module(F.normalize(x, dim=-1)).reshape(-1)


def build_head(kind: str, width: int) -> torch.nn.Module:
    """The published module of `kind` for `width`-wide embeddings (random weights)."""
    if kind == "linear":
        return torch.nn.Linear(width, 1)
    a, b, c, d, e = MLP_WIDTHS
    p1, p2, p3 = _MLP_DROPOUTS
    layers = torch.nn.Sequential(
        torch.nn.Linear(width, a), torch.nn.Dropout(p1), torch.nn.Linear(a, b), torch.nn.Dropout(p2),
        torch.nn.Linear(b, c), torch.nn.Dropout(p3), torch.nn.Linear(c, d), torch.nn.Linear(d, e))
    # Named `layers`, as the project's module attribute, so that its state dict loads key for key.
    return torch.nn.Sequential(OrderedDict(layers=layers))
