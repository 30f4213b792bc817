"""Scheduled sampling: LocDiT's own draws, all patches at once, as the model's inputs in
training (LossOptions.drawn_inputs), and the batched solve they come from."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ditarkit.reference import losses as losses_module
from ditarkit.reference.losses import LossOptions, SpeechBatch, ditar_loss, own_draws, teacher_force
from ditarkit.reference.model import DiTAR
from ditarkit.reference.runner import LocDiTSamplerGraph
from ditarkit.runtime.config import preset
from ditarkit.runtime.diffusion import guided, renoise_step

# A batch of patches solved at once runs the same fp32 ops as each patch alone, in another
# batch layout (matmul blocking differs with the row count).
BATCHED_SOLVE_TOLERANCE = 1e-5


def _model(isolated: bool) -> DiTAR:
    torch.manual_seed(0)
    model = DiTAR(dataclasses.replace(preset("tiny"), isolated_history=isolated)).eval()
    torch.nn.init.normal_(model.locdit.out_proj.weight, std=0.05)  # not the zero init: a velocity to follow
    return model


def _batch(cfg) -> SpeechBatch:
    g = torch.Generator().manual_seed(0)
    p, c = cfg.patch_size, cfg.audio.latent_dim
    return SpeechBatch(
        text_ids=torch.randint(4, cfg.text.vocab_size, (3, 12), generator=g),
        text_lengths=torch.tensor([12, 9, 10]),
        prompt=torch.randn(3, 5 * p, c, generator=g),
        prompt_patches=torch.tensor([5, 3, 4]),
        target=torch.randn(3, 7 * p, c, generator=g),
        target_patches=torch.tensor([7, 4, 6]),
        char_windows=torch.tensor([[[min(j, 7), min(j + 1, 7)] for j in range(7)]] * 3),
    )


@pytest.mark.parametrize("isolated", [True, False])
@pytest.mark.parametrize("guidance", ["cfg", "cfg_zero_star"])
def test_a_batch_of_patches_is_solved_as_each_patch_alone(isolated, guidance):
    model = _model(isolated)
    cfg = model.config
    sampler = dataclasses.replace(cfg.contract().sampler, nfe=4, guidance=guidance)
    graph = LocDiTSamplerGraph(model.locdit, sampler)
    g = torch.Generator().manual_seed(1)
    n, p, c = 5, cfg.patch_size, cfg.audio.latent_dim
    x_init, renoise = torch.randn(n, p, c, generator=g), torch.randn(n, p, c, generator=g)
    cond, history = torch.randn(n, cfg.lm.dim, generator=g), torch.randn(n, cfg.history_frames, c, generator=g)
    step, scale = torch.tensor(2), torch.tensor([1.5])
    with torch.no_grad():
        together = graph(x_init, renoise, step, scale, cond, history)
        alone = torch.stack([graph(x_init[i], renoise[i], step, scale, cond[i], history[i]) for i in range(n)])
    assert together.shape == (n, p, c)
    torch.testing.assert_close(together, alone, atol=BATCHED_SOLVE_TOLERANCE, rtol=0)
    assert float((together - x_init).abs().max()) > 0.1  # the solve moved every patch somewhere


def test_cfg_zero_star_scales_each_patch_by_its_own_projection():
    c = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 2.0)])  # two patches, conditional
    u = np.stack([np.full((2, 3), 2.0), np.full((2, 3), 1.0)])  # and unconditional
    # per patch st = <c, u> / |u|^2: 0.5 and 2, so the scaled u equals c in both
    batched = guided(np.stack([c, u]), 1.0, "cfg_zero_star")
    np.testing.assert_allclose(batched, c, rtol=1e-6)
    np.testing.assert_allclose(batched[1], guided(np.stack([c[1], u[1]]), 1.0, "cfg_zero_star"), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0])  # from zeros, re-noised at tau; or from the noise
def test_own_draws_are_the_sampler_s_from_the_teacher_forced_condition_for_the_chosen_only(temperature):
    model = _model(True)
    cfg = model.config
    model.config = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, temperature=temperature))
    batch = _batch(cfg)
    chosen = torch.tensor([True, False, True])
    with torch.no_grad():
        drawn = own_draws(model, batch, chosen, nfe=3, generator=torch.Generator().manual_seed(2))
        again = own_draws(model, batch, chosen, nfe=3, generator=torch.Generator().manual_seed(2))
        forced = teacher_force(model, batch)
    assert drawn[1] is None and [d.shape[0] for d in (drawn[0], drawn[2])] == [7, 6]
    assert all(torch.equal(a, b) for a, b in zip((drawn[0], drawn[2]), (again[0], again[2])))
    # each chosen patch, drawn alone from its own condition and history with its own noise
    # (13 chosen patches: the first utterance's 7, then the third's 6, rows 11-16 of the batch)
    p, c = cfg.patch_size, cfg.audio.latent_dim
    sampler = dataclasses.replace(model.config.contract().sampler, nfe=3)
    noise = torch.randn((2, 13, p, c), generator=torch.Generator().manual_seed(2))
    graph = LocDiTSamplerGraph(model.locdit, sampler)
    step = torch.tensor(renoise_step(3, temperature, sampler))
    for (b, j), k, row in (((0, 0), 0, 0), ((0, 6), 6, 6), ((2, 0), 7, 11), ((2, 5), 12, 16)):
        x_init = noise[0, k] if temperature >= 1 else torch.zeros(p, c)
        with torch.no_grad():
            alone = graph(x_init, noise[1, k], step, torch.tensor([cfg.diffusion.cfg_scale]), forced.cond[row],
                          forced.history[row])
        torch.testing.assert_close(drawn[b][j], alone, atol=BATCHED_SOLVE_TOLERANCE, rtol=0)


def test_no_draws_change_nothing_and_draw_nothing_from_the_generator():
    model = _model(True)
    batch = _batch(model.config)
    states = []
    with torch.no_grad():
        outputs = []
        for drawn in (None, [None] * 3):
            generator = torch.Generator().manual_seed(5)
            outputs.append(teacher_force(model, batch, lm_input_noise=0.5, generator=generator, drawn=drawn))
            states.append(generator.get_state())
    assert torch.equal(outputs[0].cond, outputs[1].cond) and torch.equal(outputs[0].history, outputs[1].history)
    assert torch.equal(states[0], states[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_own_draws_run_on_the_gpu():
    model = _model(True).cuda()
    batch = SpeechBatch(**{k: None if v is None else v.cuda() for k, v in vars(_batch(model.config)).items()})
    drawn = own_draws(model, batch, torch.tensor([True, False, True], device="cuda"), nfe=2,
                      generator=torch.Generator(device="cuda").manual_seed(0))
    assert drawn[0].device.type == "cuda" and drawn[1] is None


def test_drawn_patches_replace_what_the_lm_reads_and_locdit_s_history_never_its_targets():
    model = _model(True)
    batch = _batch(model.config)
    h, p = model.config.history_patches, model.config.patch_size
    with torch.no_grad():
        clean = teacher_force(model, batch)
        drawn = own_draws(model, batch, torch.tensor([False, True, False]), nfe=3,
                          generator=torch.Generator().manual_seed(0))
        mixed = teacher_force(model, batch, lm_input_noise=1.0, generator=torch.Generator().manual_seed(1),
                              drawn=drawn)
        quiet = teacher_force(model, batch, drawn=drawn)
    assert torch.equal(mixed.x0, clean.x0)  # LocDiT still learns the true patches
    second = slice(7, 7 + 4)  # the drawn utterance's rows in patch order
    own = drawn[1].reshape(-1, model.config.audio.latent_dim)
    # its history: the reference's last patches, then its own draws
    torch.testing.assert_close(quiet.history[second][h], own[: h * p])
    torch.testing.assert_close(quiet.history[second][0], clean.history[second][0])
    assert not torch.allclose(quiet.cond[second][1:], clean.cond[second][1:], atol=1e-4)
    # the speech-start position has read only text and the reference
    torch.testing.assert_close(quiet.cond[second][0], clean.cond[second][0], atol=1e-6, rtol=0)
    # the others are untouched without noise, and an utterance with draws gets no noise on top
    keep = torch.cat([torch.arange(0, 7), torch.arange(11, 17)])
    torch.testing.assert_close(quiet.cond[keep], clean.cond[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed.cond[second], quiet.cond[second], atol=1e-6, rtol=0)
    assert not torch.allclose(mixed.cond[keep], clean.cond[keep], atol=1e-4)


def test_a_step_with_drawn_inputs_trains_every_part_and_the_rate_is_validated(monkeypatch):
    model = _model(True).train()
    batch = _batch(model.config)
    options = LossOptions(drawn_inputs=1.0, drawn_nfe=2)
    calls = []
    monkeypatch.setattr(losses_module, "own_draws", lambda *args: calls.append(args[2]) or own_draws(*args))
    losses = ditar_loss(model, batch, options, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and bool(calls[0].all())  # every utterance at rate 1
    losses["loss"].backward()
    for part in (model.lm, model.locdit, model.aggregator):
        assert any(float(q.grad.abs().max()) > 0 for q in part.parameters() if q.grad is not None)
    for bad in (dict(drawn_inputs=1.5), dict(drawn_inputs=-0.1), dict(drawn_nfe=0)):
        with pytest.raises(ValueError, match="invalid loss options"):
            LossOptions(**bad)


def test_the_drawn_input_gap_compares_like_with_like(monkeypatch):
    from ditarkit.training import metrics
    from ditarkit.training.metrics import Probe, _drawn_input_metrics, _noise_for

    model = _model(True)
    batch = _batch(model.config)
    probe = Probe(batch, batch, [1.0] * 3, [10, 7, 8], ["a", "b", "c"])
    with torch.no_grad():
        forced = teacher_force(model, batch)
        noise = _noise_for(forced.x0, forced.history)
        right = float(metrics.velocity_loss(model, forced.x0, forced.cond, forced.history, noise))
        real = _drawn_input_metrics(model, probe, right, noise)
        truth = [forced.x0[s : s + n] for s, n in ((0, 7), (7, 4), (11, 6))]
        monkeypatch.setattr(metrics, "own_draws", lambda *args: truth)  # "draws" that are the true patches
        same = _drawn_input_metrics(model, probe, right, noise)
    assert abs(same["gap_drawn_inputs_pct"]) < 1e-4 and real["gap_drawn_inputs_pct"] != 0.0
    assert 0.0 <= real["advance_acc_drawn"] <= 1.0
