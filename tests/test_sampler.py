"""The shared sampler: guidance, temperature and the patch loop with the reference."""

from __future__ import annotations

import numpy as np
import pytest

from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.contract import SamplerSpec
from ditarkit.runtime.diffusion import Schedule, guided, renoise_step, sample_patch, time_grid
from ditarkit.runtime.sampler import GenerationOptions, OptionsError, explicit_noise, generate_latents

P, C, D, HP = 4, 3, 5, 8


def affine_velocity(x, t, cond, history):
    """A known velocity field: branch-dependent through cond, time-dependent through t."""
    return 0.5 * x + cond[:, :1, None] + t[:, None, None] + 0.1 * history.mean(axis=1, keepdims=True)


def _spec(schedule: str) -> SamplerSpec:
    """The kit's sampler (uniform grid, plain guidance) on `schedule`; the per-call values
    (nfe, guidance, temperature) are given to sample_patch."""
    return SamplerSpec(schedule, nfe=10, cfg_scale=0.0, temperature=1.0)


def _draw(noise, temperature, cfg_scale=1.5, schedule="cosine_vp", nfe=10):
    cond = np.linspace(-1, 1, D).astype(np.float32)
    history = np.ones((HP, C), np.float32)
    return sample_patch(affine_velocity, cond, history, noise, _spec(schedule), nfe, cfg_scale, temperature)


def test_guidance_formula_on_known_tensors():
    pair = np.array([[2.0, -1.0], [0.5, 3.0]])
    np.testing.assert_allclose(guided(pair, 0.0), [2.0, -1.0])
    np.testing.assert_allclose(guided(pair, 2.0), [3 * 2.0 - 2 * 0.5, 3 * -1.0 - 2 * 3.0])


def test_zero_guidance_ignores_the_unconditional_branch():
    noise = np.random.default_rng(0).standard_normal((2, P, C)).astype(np.float32)

    def garbage_uncond(x, t, cond, history):
        v = affine_velocity(x, t, cond, history)
        v[1] = 1e6
        return v

    cond, history = np.ones(D, np.float32), np.zeros((HP, C), np.float32)
    a = sample_patch(affine_velocity, cond, history, noise, _spec("cosine_vp"), 10, 0.0, 1.0)
    b = sample_patch(garbage_uncond, cond, history, noise, _spec("cosine_vp"), 10, 0.0, 1.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule", ["cosine_vp", "rectified_flow"])
def test_temperature_zero_is_deterministic_and_one_is_not(schedule):
    rng = np.random.default_rng(1)
    n1, n2 = (rng.standard_normal((2, P, C)).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(_draw(n1, 0.0, schedule=schedule), _draw(n2, 0.0, schedule=schedule))
    assert np.abs(_draw(n1, 1.0, schedule=schedule) - _draw(n2, 1.0, schedule=schedule)).max() > 1e-2


@pytest.mark.parametrize("schedule", ["cosine_vp", "rectified_flow"])
def test_intermediate_temperature_renoises_the_x0_estimate_at_tau(schedule):
    """tau = 0.5 on a 10-step grid: 5 deterministic steps from zeros, then the x0 estimate
    is re-noised with the forward process at t = 0.5, then 5 more deterministic steps."""
    sched, w, tau = Schedule(schedule), 1.5, 0.5
    noise = np.random.default_rng(2).standard_normal((2, P, C)).astype(np.float32)
    cond = np.linspace(-1, 1, D).astype(np.float32)
    history = np.ones((HP, C), np.float32)
    cond2, hist2 = np.stack([cond, 0 * cond]), np.stack([history, history])
    x = np.zeros((P, C), np.float32)
    grid = time_grid(10)
    for t, s in zip(grid[:-1], grid[1:]):
        v = guided(affine_velocity(np.stack([x, x]), np.full(2, t, np.float32), cond2, hist2), w)
        x0, eps = sched.estimate(x, v, t)
        if np.isclose(s, tau):
            eps = noise[1]  # the noise enters here, at tau
        x = sched.alpha(s) * x0 + sched.sigma(s) * eps
    np.testing.assert_allclose(_draw(noise, tau, w, schedule), x, rtol=1e-5, atol=1e-6)
    # The starting noise is unused below tau = 1; the renoising noise is used.
    other_start = noise.copy()
    other_start[0] += 1.0
    np.testing.assert_array_equal(_draw(other_start, tau, w, schedule), _draw(noise, tau, w, schedule))
    other_renoise = noise.copy()
    other_renoise[1] += 1.0
    assert np.abs(_draw(other_renoise, tau, w, schedule) - _draw(noise, tau, w, schedule)).max() > 1e-3


def test_schedule_estimate_inverts_the_forward_process():
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal((2, P, C))
    for name in ("cosine_vp", "rectified_flow"):
        sched = Schedule(name)
        for t in (0.1, 0.5, 0.9):
            x_t = sched.noisy(x0, eps, t)
            v = sched.velocity_target(x0, eps, t)
            est_x0, est_eps = sched.estimate(x_t, v, t)
            np.testing.assert_allclose(est_x0, x0, atol=1e-12)
            np.testing.assert_allclose(est_eps, eps, atol=1e-12)


def test_options_are_validated_when_built():
    bad_options = (dict(temperature=1.5), dict(nfe=0), dict(cfg_scale=-1), dict(stop_threshold=1.0),
                   dict(cfg_scale=float("inf")), dict(max_seconds=float("inf")), dict(temperature=float("nan")))
    for bad in bad_options:
        with pytest.raises(OptionsError):
            GenerationOptions(**bad)


def test_reference_sampler_with_explicit_noise_is_reproducible(tiny_model):
    from conftest import speech_like

    cfg = tiny_model.config
    runner = TorchRunner(tiny_model)
    prompt = runner.encode_audio(speech_like(1.0))
    noise = np.random.default_rng(5).standard_normal((20, 2, cfg.patch_size, 64)).astype(np.float32)
    opts = GenerationOptions(max_seconds=1.0, stop_threshold=0.999999)
    a = generate_latents(runner, [1, 10, 11, 2], prompt, opts, explicit_noise(noise))
    b = generate_latents(runner, [1, 10, 11, 2], prompt, opts, explicit_noise(noise))
    assert a.shape == (40, 64)  # 1 s: 10 patches of 4 frames
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()


def test_max_seconds_counts_whole_patches_without_float_truncation(tiny_model):
    """0.3 s is 3 patches of 0.1 s, although 0.3 / 0.1 = 2.9999... in floating point."""
    from conftest import speech_like

    runner = TorchRunner(tiny_model)
    prompt = runner.encode_audio(speech_like(1.0))
    latents = generate_latents(runner, [1, 10, 2], prompt, GenerationOptions(max_seconds=0.3, stop_threshold=0.999999))
    assert latents.shape[0] == 3 * tiny_model.config.patch_size


@pytest.mark.parametrize(("nfe", "temperature", "step"), [(10, 0.5, 4), (10, 0.0, 9), (10, 1.0, -1), (10, 0.35, 6),
                                                          (4, 0.75, 0), (1, 0.5, 0)])
def test_renoise_step_is_where_time_crosses_tau(nfe, temperature, step):
    assert renoise_step(nfe, temperature) == step


def test_the_text_cursor_moves_by_the_advance_head_and_stops_at_the_last_character(tiny_model):
    """Each speech input of the LM is a patch vector plus the cursor row of the character being
    read; the cursor moves by the argmax of the previous step's advance logits, never past the
    last character (BOS and EOS are rows 0 and T - 1)."""
    runner = TorchRunner(tiny_model)
    cfg = runner.config
    text = [cfg.text.bos, *range(10, 16), cfg.text.eos]  # six characters
    rows = runner.text_cursor(np.asarray(text, np.int64))
    steps, vectors = [], []
    lm_step, encode = runner.lm_step, runner.encode_patches
    runner.lm_step = lambda embeds, state, mask: steps.append((embeds, lm_step(embeds, state, mask))) or steps[-1][1]
    runner.encode_patches = lambda patches: vectors.append(encode(patches)) or vectors[-1]
    options = GenerationOptions(max_seconds=3.0, stop_threshold=1 - 1e-9)
    prompt = np.random.default_rng(0).standard_normal((12, cfg.audio.latent_dim)).astype(np.float32)
    generate_latents(runner, text, prompt, options)
    read = [int(np.abs(steps[0][0][-1] - runner.embed_text(np.array([cfg.prompt.prefix[-1]]))[0]
                       - rows).max(-1).argmin()) - 1]
    for (embeds, _), vector in zip(steps[1:], vectors[1:]):  # vectors[0] is the prompt's
        read.append(int(np.abs(embeds[0] - vector[0] - rows).max(-1).argmin()) - 1)
    expected = [0]
    for _, step in steps[:-1]:
        expected.append(min(expected[-1] + int(np.argmax(step.advance_logits)), 5))
    assert len(read) == 30 and read == expected
    assert max(read) == 5  # the random head moves fast enough to reach the end and stay there
