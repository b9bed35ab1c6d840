"""An exponential moving average of the trained weights (either method), with diffusers' EMAModel.

EMAModel keeps its shadow parameters as a list; this wrapper owns the parameter list, steps every
`ema_update_interval` optimizer steps, swaps the averaged weights in for evaluation and export
(`averaged()`), and saves the shadows by parameter name, so that an export can read them from a
checkpoint without building a trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from trainer.config import TrainConfig


class TrainedWeightsEMA:
    """EMA of `named` parameters ((name, parameter) pairs, e.g. trainer.full_finetune.trained_parameters)."""

    def __init__(self, cfg: TrainConfig, named: list[tuple[str, torch.nn.Parameter]]):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.interval = cfg.ema_update_interval
        self.ema = EMAModel(
            self.params, decay=cfg.ema_decay, min_decay=cfg.ema_min_decay, update_after_step=cfg.ema_update_after_step,
            use_ema_warmup=cfg.ema_warmup, power=cfg.ema_warmup_power,
        )

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step (1-based); updates the average every `interval` steps."""
        if global_step % self.interval == 0:
            self.ema.step(self.params)

    @property
    def decay(self) -> float | None:
        """The decay of the last update (None before the first)."""
        return self.ema.cur_decay_value

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the trained ones back afterwards, exactly."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def shadow(self) -> dict[str, torch.Tensor]:
        """{parameter name: averaged tensor} (CPU copies)."""
        return {n: s.detach().to("cpu", copy=True) for n, s in zip(self.names, self.ema.shadow_params)}

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        return {**state, "cur_decay_value": self.ema.cur_decay_value, "shadow": self.shadow()}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.names):
            missing, extra = sorted(set(self.names) - set(shadow))[:3], sorted(set(shadow) - set(self.names))[:3]
            raise KeyError(f"EMA: saved shadows do not match the trained parameters (missing {missing}, unexpected {extra})")
        device = self.params[0].device if self.params else "cpu"
        rest = {k: v for k, v in state.items() if k not in ("shadow", "cur_decay_value")}
        self.ema.load_state_dict({**rest, "shadow_params": [shadow[n].to(device) for n in self.names]})
        self.ema.cur_decay_value = state.get("cur_decay_value")
