"""The LocDiT sampler: noise schedule, classifier-free guidance and temperature.

Written once, on numpy arrays, and shared by every backend and by the PyTorch reference: a
second copy of this arithmetic could only ever be a parity bug.

Time runs from t = 1 (noise) to t = 0 (data) on a uniform grid of `nfe` steps. The network
predicts the velocity v; each step turns (x_t, v) into estimates of x0 and eps, then moves
to the next time with the forward process: x_s = alpha(s) x0 + sigma(s) eps (DDIM, which
for these schedules is the exact Euler step of the probability-flow ODE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (x, t, cond, history) -> velocity; x (B, P, C), t (B,), cond (B, D), history (B, H*P, C)
VelocityFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Schedule:
    name: str  # "cosine_vp" or "rectified_flow"

    def alpha(self, t: float) -> float:
        return math.cos(math.pi * t / 2) if self.name == "cosine_vp" else 1.0 - t

    def sigma(self, t: float) -> float:
        return math.sin(math.pi * t / 2) if self.name == "cosine_vp" else t

    def noisy(self, x0, eps, t):
        """Forward process x_t; `t` may be a float or an array broadcastable to x0."""
        if self.name == "cosine_vp":
            return _cos(t) * x0 + _sin(t) * eps
        return (1.0 - t) * x0 + t * eps

    def velocity_target(self, x0, eps, t):
        """What the network learns to predict at (x_t, t)."""
        if self.name == "cosine_vp":
            return _cos(t) * eps - _sin(t) * x0  # v-prediction
        return eps - x0  # rectified flow

    def estimate(self, x: np.ndarray, v: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(x0, eps) implied by the state x at time t and the predicted velocity v."""
        a, s = self.alpha(t), self.sigma(t)
        if self.name == "cosine_vp":
            return a * x - s * v, s * x + a * v
        return x - t * v, x + (1.0 - t) * v


def _cos(t):
    # Tensors (torch, at training time) have .cos(); floats and numpy arrays take np.cos.
    angle = t * (math.pi / 2)
    return angle.cos() if hasattr(angle, "cos") else np.cos(angle)


def _sin(t):
    angle = t * (math.pi / 2)
    return angle.sin() if hasattr(angle, "sin") else np.sin(angle)


def time_grid(nfe: int) -> np.ndarray:
    """nfe + 1 times from 1 down to 0."""
    return np.linspace(1.0, 0.0, nfe + 1)


def guided(velocity_pair: np.ndarray, cfg_scale: float) -> np.ndarray:
    """Classifier-free guidance on a batch-2 output [cond, uncond]: (1 + w) c - w u."""
    return (1.0 + cfg_scale) * velocity_pair[0] - cfg_scale * velocity_pair[1]


def renoise_step(nfe: int, temperature: float) -> int:
    """The temperature rule's step: the index i of the solver step t_i -> t_{i+1} with
    t_i > tau >= t_{i+1}, whose eps estimate is replaced by fresh noise; -1 for none (tau = 1
    starts from noise instead). Computed here once, for the numpy loop and the fused graph."""
    grid = time_grid(nfe)
    for index, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        if t > temperature >= s:
            return index
    return -1


def initial_state(noise: np.ndarray, temperature: float) -> np.ndarray:
    """tau = 1 starts from the starting noise; otherwise from zeros (the mean)."""
    return noise[0] if temperature >= 1.0 else np.zeros_like(noise[0])


def sample_patch(
    velocity: VelocityFn,
    cond: np.ndarray,  # (D,) LM output for this patch
    history: np.ndarray,  # (H*P, C) previous clean frames
    noise: np.ndarray,  # (2, P, C): [starting noise, noise that enters at tau]
    schedule: Schedule,
    nfe: int,
    cfg_scale: float,
    temperature: float,
) -> np.ndarray:
    """Draw one patch (P, C) with one batch-2 LocDiT call per step.

    Temperature tau: tau = 1 starts from noise; otherwise start from zeros, solve
    deterministically, and at the step that reaches tau replace the eps estimate with fresh
    noise (re-noising the x0 estimate with the forward process). tau = 0 puts that noise at
    sigma(0) = 0, so the result is deterministic.
    """
    x = initial_state(noise, temperature)
    enters = renoise_step(nfe, temperature)
    cond2 = np.stack([cond, np.zeros_like(cond)])  # (2, D): conditional, unconditional
    history2 = np.stack([history, history])  # (2, H*P, C): history kept in both branches
    grid = time_grid(nfe)
    for index, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        t_batch = np.full((2,), t, dtype=np.float32)
        v = guided(velocity(np.stack([x, x]), t_batch, cond2, history2), cfg_scale)
        x0, eps = schedule.estimate(x, v, float(t))
        if index == enters:
            eps = noise[1]
        x = (schedule.alpha(float(s)) * x0 + schedule.sigma(float(s)) * eps).astype(np.float32)
    return x
