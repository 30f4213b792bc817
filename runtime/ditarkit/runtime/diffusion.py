"""The LocDiT sampler: noise schedule, classifier-free guidance and temperature.

Written once, on numpy arrays, and shared by every backend and by the PyTorch reference: a
second copy of this arithmetic could only ever be a parity bug.

Time runs from t = 1 (noise) to t = 0 (data) on a grid of `nfe` steps (uniform, or VoxCPM's
"sway" warp). The network predicts the velocity v; each step turns (x_t, v) into estimates of
x0 and eps, then moves to the next time with the forward process: x_s = alpha(s) x0 +
sigma(s) eps (DDIM, which for these schedules is the exact Euler step of the probability-flow
ODE). Guidance is classifier-free, plain or CFG-zero* (VoxCPM's: the unconditional branch
scaled by its projection on the conditional one, and the first steps with zero velocity).
The guidance and grid functions take numpy arrays or torch tensors alike, so the fused
sampler graph runs this arithmetic, not a copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ditarkit.runtime.contract import SamplerSpec

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


# CFG-zero*'s guard against a zero unconditional velocity (VoxCPM's value).
ZERO_STAR_EPS = 1e-8


def time_grid(nfe: int, sampler: SamplerSpec | None = None) -> np.ndarray:
    """nfe + 1 times from 1 down to 0: uniform, or warped by "sway" toward t = 1 (s > 0 puts
    more steps where the sample is still noise)."""
    grid = np.linspace(1.0, 0.0, nfe + 1)
    if sampler is not None and sampler.time_grid == "sway":
        grid = grid + sampler.sway * (np.cos(np.pi / 2 * grid) - 1.0 + grid)
    return grid


def zero_steps(nfe: int, sampler: SamplerSpec) -> int:
    """Leading solver steps whose velocity is zero (CFG-zero*'s zero init; none otherwise)."""
    if sampler.guidance != "cfg_zero_star" or sampler.zero_init_fraction <= 0:
        return 0
    return max(1, int((nfe + 1) * sampler.zero_init_fraction))


def guided(velocity_pair, cfg_scale, guidance: str = "cfg"):
    """Guidance on a batch-2 output [cond, uncond], each (..., P, C): (1 + w) c - w u; with
    CFG-zero* the unconditional branch is first scaled by st = <c, u> / |u|^2 over each
    patch (its last two axes)."""
    c, u = velocity_pair[0], velocity_pair[1]
    if guidance == "cfg_zero_star":
        u = u * (_patch_sum(c * u) / (_patch_sum(u * u) + ZERO_STAR_EPS))
    return (1.0 + cfg_scale) * c - cfg_scale * u


def _patch_sum(a):
    # One patch is the last two axes (P, C); any axes before them are a batch of patches.
    return a.sum(axis=(-2, -1), keepdims=True)  # numpy arrays and torch tensors alike


def renoise_step(nfe: int, temperature: float, sampler: SamplerSpec | None = None) -> int:
    """The temperature rule's step: the index i of the solver step t_i -> t_{i+1} with
    t_i > tau >= t_{i+1}, whose eps estimate is replaced by fresh noise; -1 for none (tau = 1
    starts from noise instead). Computed here once, for the numpy loop and the fused graph."""
    grid = time_grid(nfe, sampler)
    for index, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        if t > temperature >= s:
            return index
    return -1


def initial_state(noise, temperature: float):
    """tau = 1 starts from the starting noise; otherwise from zeros (the mean). `noise`
    (2, ..., P, C), numpy or torch (training draws a batch of patches with it)."""
    # x - x: +0.0 everywhere (finite noise), of the noise's type, dtype and device; x * 0 would give -0.0
    return noise[0] if temperature >= 1.0 else noise[0] - noise[0]


def sample_patch(
    velocity: VelocityFn,
    cond: np.ndarray,  # (D,) LM output for this patch
    history: np.ndarray,  # (H*P, C) previous clean frames
    noise: np.ndarray,  # (2, P, C): [starting noise, noise that enters at tau]
    sampler: SamplerSpec,
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
    schedule = Schedule(sampler.schedule)
    x = initial_state(noise, temperature)
    enters = renoise_step(nfe, temperature, sampler)
    cond2 = np.stack([cond, np.zeros_like(cond)])  # (2, D): conditional, unconditional
    history2 = np.stack([history, history])  # (2, H*P, C): history kept in both branches
    grid = time_grid(nfe, sampler)
    still = zero_steps(nfe, sampler)
    for index, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        if index < still:
            v = np.zeros_like(x)
        else:
            t_batch = np.full((2,), t, dtype=np.float32)
            v = guided(velocity(np.stack([x, x]), t_batch, cond2, history2), cfg_scale, sampler.guidance)
        x0, eps = schedule.estimate(x, v, float(t))
        if index == enters:
            eps = noise[1]
        x = (schedule.alpha(float(s)) * x0 + schedule.sigma(float(s)) * eps).astype(np.float32)
    return x
