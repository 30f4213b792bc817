"""An exponential moving average of the weights being trained: the model that is sampled,
evaluated, exported and shipped. A diffusion model's raw weights at a constant learning rate
wander around the minimum from batch to batch, and every patch drawn from them carries that
noise; their average sits nearer the minimum (torch's `AveragedModel`, with the usual warm-up
of the decay so a new model is not held near its random start)."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones: (1 + n) / (10 + n) until that
    passes `decay`, so the average first follows the weights quickly."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def averaged(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` that `update_parameters(model)` after every optimizer step keeps at
    the moving average of its weights (buffers are copied, not averaged)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")

    @torch.no_grad()
    def update(average: list[torch.Tensor], current: list[torch.Tensor], updates) -> None:
        torch._foreach_lerp_(average, current, 1.0 - ema_decay(decay, int(updates)))

    return AveragedModel(model, multi_avg_fn=update)
