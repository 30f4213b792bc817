"""LocDiT with isolated history (the default voice's attention pattern) exports and matches
PyTorch, in the per-step graph and in the fused sampler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import speech_like

from ditarkit.export.bundle import export_bundle
from ditarkit.export.parity import TOLERANCE, check_bundle
from ditarkit.reference.model import DiTAR, perturb_weights
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.config import preset
from ditarkit.runtime.manifest import LOCDIT, LOCDIT_SAMPLER
from ditarkit.runtime.sampler import GenerationOptions, explicit_noise, generate_latents

# The fused sampler computes the history's keys and values once per patch, the step-by-step
# loop runs the whole LocDiT sequence at every step: the same fp32 values summed in another
# order (attention over [history, condition, patch] instead of [condition, history, patch]).
CACHED_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    torch.manual_seed(5)
    model = perturb_weights(DiTAR(dataclasses.replace(preset("tiny"), isolated_history=True)), seed=5).eval()
    out = tmp_path_factory.mktemp("isolated") / "fp32"
    export_bundle(model, out, fp16=False)
    return model, out


def test_isolated_history_graphs_match_pytorch(isolated):
    model, bundle = isolated
    results = [r for r in check_bundle(model, bundle, "fp32") if r.graph in (LOCDIT, LOCDIT_SAMPLER)]
    assert {r.graph for r in results} == {LOCDIT, LOCDIT_SAMPLER}
    assert all(r.ok for r in results), results
    assert max(r.max_abs / r.scale for r in results) <= TOLERANCE["fp32"]


@torch.no_grad()
def test_the_cached_history_gives_the_whole_sequence_s_velocity(isolated):
    model, _ = isolated
    locdit, cfg = model.locdit, model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.patch_size, cfg.audio.latent_dim, generator=g)
    history = torch.randn(2, cfg.history_frames, cfg.audio.latent_dim, generator=g)
    cond, t = torch.randn(2, cfg.lm.dim, generator=g), torch.tensor([0.9, 0.3])
    whole = locdit(x, t, cond, history)
    cached = locdit.forward_cached(x, t, cond, *locdit.history_cache(history))
    assert (cached - whole).abs().max() < CACHED_TOLERANCE
    assert whole.abs().max() > 10 * CACHED_TOLERANCE  # not two zero outputs


def test_a_history_that_sees_the_patch_cannot_be_cached():
    model = DiTAR(dataclasses.replace(preset("tiny"), isolated_history=False))
    with pytest.raises(ValueError, match="attends to itself alone"):
        model.locdit.history_cache(torch.zeros(1, model.config.history_frames, model.config.audio.latent_dim))


def test_the_fused_sampler_with_cached_history_equals_the_step_by_step_loop(isolated):
    _, bundle = isolated
    runner = OrtRunner(bundle)
    cfg = runner.config
    prompt = runner.encode_audio(speech_like(2.0))
    noise = explicit_noise(np.random.default_rng(7).standard_normal(
        (40, 2, cfg.patch_size, cfg.audio.latent_dim)).astype(np.float32))
    options = GenerationOptions(max_seconds=1.0, stop_threshold=0.999999, temperature=0.5, cfg_scale=1.5)
    fused = generate_latents(runner, [1, 30, 31, 2], prompt, options, noise)
    runner.fused_sampler = False
    stepwise = generate_latents(runner, [1, 30, 31, 2], prompt, options, noise)
    assert fused.shape[0] >= cfg.patch_size
    np.testing.assert_allclose(fused, stepwise, rtol=0, atol=CACHED_TOLERANCE)
