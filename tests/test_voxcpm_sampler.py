"""The kit's numpy sampler with VoxCPM's pieces (sway grid, CFG-zero*, zero init) against the
`voxcpm` package's own UnifiedCFM, on the same estimator and the same starting noise."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from voxcpm_oracle import import_voxcpm

from ditarkit.runtime.contract import SamplerSpec
from ditarkit.runtime.diffusion import sample_patch, time_grid, zero_steps

P, C, DC = 4, 6, 10  # patch frames, latent channels, condition width
VOXCPM_SAMPLER = SamplerSpec("rectified_flow", nfe=10, cfg_scale=1.0, temperature=1.0, time_grid="sway", sway=1.0,
                             guidance="cfg_zero_star", zero_init_fraction=0.04)
# float32 rounding over up to 25 Euler steps on outputs of magnitude ~3 (7e-7 seen): the
# package accumulates `t = t - dt` in float32 where the kit takes each grid point in float64.
SAMPLER_ATOL = 5e-6


class Estimator(torch.nn.Module):
    """A nonlinear stand-in for LocDiT with the package's call: (x (N, C, P), mu, t, cond (N, C, P), dt)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.3 * torch.randn(C, C, generator=g))
        self.m = torch.nn.Parameter(0.3 * torch.randn(DC, C, generator=g))

    def forward(self, x, mu, t, cond, dt):
        h = torch.einsum("ncp,cd->ndp", x, self.w) + (mu @ self.m)[:, :, None] + t[:, None, None] + 0.5 * cond
        return (torch.tanh(h) + 0.1 * dt[:, None, None]).contiguous()


def package_cfm(estimator: torch.nn.Module):
    import_voxcpm("voxcpm")  # the placeholders for its unused top-level imports
    from voxcpm.modules.locdit.unified_cfm import CfmConfig, UnifiedCFM

    return UnifiedCFM(C, CfmConfig(), estimator)


def kit_velocity(estimator: torch.nn.Module):
    """The kit's `locdit` graph signature over the package's estimator call."""

    def velocity(x, t, cond, history):
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, t, cond, history)]
        x_, t_, cond_, hist_ = args
        with torch.no_grad():
            v = estimator(x_.transpose(1, 2), cond_, t_, hist_.transpose(1, 2), torch.zeros_like(t_))
        return v.transpose(1, 2).numpy()

    return velocity


@pytest.mark.parametrize("nfe, cfg_value", [(10, 2.0), (4, 3.0), (25, 1.5)])
def test_the_sampler_matches_the_package_cfm(nfe, cfg_value):
    estimator = Estimator()
    rng = np.random.default_rng(nfe)
    z = rng.standard_normal((1, C, P)).astype(np.float32)  # the package's noise layout
    mu = rng.standard_normal((1, DC)).astype(np.float32)
    cond = rng.standard_normal((1, C, P)).astype(np.float32)  # the previous patch
    with mock.patch("torch.randn", return_value=torch.from_numpy(z)):
        want = package_cfm(estimator)(torch.from_numpy(mu), nfe, P, torch.from_numpy(cond), cfg_value=cfg_value)
    noise = np.stack([z[0].T, np.zeros((P, C), np.float32)])  # tau = 1: starts from noise[0]
    got = sample_patch(kit_velocity(estimator), mu[0], cond[0].T, noise, VOXCPM_SAMPLER, nfe, cfg_value - 1.0, 1.0)
    np.testing.assert_allclose(got, want[0].T.numpy(), atol=SAMPLER_ATOL, rtol=0)


def test_sway_grid_and_zero_init_follow_the_package_formulas():
    grid = time_grid(10, VOXCPM_SAMPLER)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    uniform = np.linspace(1, 0, 11)
    np.testing.assert_allclose(grid, uniform + np.cos(np.pi / 2 * uniform) - 1 + uniform)
    # max(1, int((nfe + 1) * 0.04)): one step up to nfe 48, two from 49.
    assert [zero_steps(n, VOXCPM_SAMPLER) for n in (1, 10, 48, 49)] == [1, 1, 1, 2]
    assert zero_steps(10, SamplerSpec("rectified_flow", 10, 1.0, 1.0)) == 0
