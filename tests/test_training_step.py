"""Losses and one optimisation step, on the tiny preset."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import aligned_batch, speech_like

from ditarkit.reference.losses import DiffusionNoise, LossOptions, ditar_loss, train_step, vae_loss
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.config import preset

STEPS = 8
# The shared-history path runs the same fp32 ops as the whole sequence, in another order
# (the history's keys and values once, then attended to by each draw).
SHARED_HISTORY_TOLERANCE = 1e-5


def test_ditar_step_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = DiTAR(preset("tiny"))
    batch = aligned_batch(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    with torch.no_grad():
        first = ditar_loss(model, batch, LossOptions(diffusion_samples=8))
    for _ in range(STEPS):
        last = train_step(opt, ditar_loss, model, batch, LossOptions(diffusion_samples=8))
    torch.manual_seed(1)
    with torch.no_grad():
        after = ditar_loss(model, batch, LossOptions(diffusion_samples=8))
    assert set(last) == {"loss", "diffusion", "stop", "advance"}
    assert after["loss"].item() < 0.9 * first["loss"].item()


def test_vae_step_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = DiTAR(preset("tiny"))
    audio = torch.from_numpy(speech_like(0.5))[None]
    opt = torch.optim.AdamW(model.vae.parameters(), lr=3e-3)
    torch.manual_seed(1)
    with torch.no_grad():
        first = vae_loss(model.vae, audio)
    for _ in range(STEPS):
        train_step(opt, vae_loss, model.vae, audio)
    torch.manual_seed(1)
    with torch.no_grad():
        after = vae_loss(model.vae, audio)
    assert float(after["loss"]) < 0.95 * float(first["loss"])


def test_alignment_loss_is_low_on_the_spoken_characters_and_counts_mass_off_the_text():
    from ditarkit.reference.losses import alignment_loss

    n, chars = 4, 8  # 4 speech positions after a sequence of BOS + 8 characters + EOS
    first = 1 + chars + 1
    seq = first + n
    windows = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]]])  # (B, n, 2)
    on_text = torch.zeros(1, 1, seq, seq)
    for j in range(n):
        on_text[0, 0, first + j, 1 + 2 * j] = 1.0  # position j looks at its first character
    off_text = torch.zeros(1, 1, seq, seq)
    off_text[0, 0, first:, first - 1] = 1.0  # on EOS/the prompt: renormalising over the text would hide this
    rows = [(0, first, n)]
    assert float(alignment_loss([on_text], ((0, 0),), rows, windows)) < 1e-4
    assert float(alignment_loss([off_text], ((0, 0),), rows, windows)) > 10.0


def test_alignment_loss_averages_every_position_of_every_utterance_and_head():
    from ditarkit.reference.losses import alignment_loss

    seq, heads = 16, 2
    windows = torch.tensor([[[0, 0], [1, 1], [2, 2]], [[0, 1], [2, 3], [0, 0]]])  # (B, n, 2), second row n = 2
    rows = [(0, 10, 3), (1, 12, 2)]  # (utterance, first speech position, patches)
    layers = [torch.zeros(2, heads, seq, seq) for _ in range(2)]
    chosen = ((0, 1), (1, 0))
    masses = []  # a different mass on the window at every (head, utterance, position)
    for k, (layer, head) in enumerate(chosen):
        for b, first, n in rows:
            for j in range(n):
                mass = 0.9 / (1 + k + 2 * b + j)
                masses.append(mass)
                layers[layer][b, head, first + j, 1 + int(windows[b, j, 0])] = mass  # the window's first character
                layers[layer][b, head, first + j, seq - 1] = 1 - mass  # the rest on a speech position
    # a mean over all 10 (head, position) pairs: not a mean of per-utterance or per-head means
    expected = sum(-math.log(m) for m in masses) / len(masses)
    loss = alignment_loss(layers, chosen, rows, windows).item()
    assert loss == pytest.approx(expected, abs=1e-5)  # the loss adds eps = 1e-6 inside its log


def test_ditar_loss_adds_alignment_where_the_batch_is_aligned():
    torch.manual_seed(0)
    model = DiTAR(dataclasses.replace(preset("tiny"), cursor=None))
    batch = aligned_batch(model.config)
    options = LossOptions(aligned_heads=((0, 0), (1, 1)), alignment_weight=0.5)
    losses = ditar_loss(model, batch, options)
    # a random LM spreads attention over ~20 positions: -log of a 3-character window's mass
    assert 0.5 < losses["alignment"].item() < 6.0
    assert torch.isclose(losses["loss"], losses["diffusion"] + losses["stop"] + 0.5 * losses["alignment"])
    batch.char_windows = None
    assert "alignment" not in ditar_loss(model, batch, options)


def test_a_cursor_model_adds_the_advance_loss_and_needs_aligned_batches():
    torch.manual_seed(0)
    model = DiTAR(preset("tiny"))
    batch = aligned_batch(model.config)
    losses = ditar_loss(model, batch, LossOptions(advance_weight=0.25))
    classes = model.config.cursor.max_advance + 1
    # an untrained head is near uniform over the advance counts
    assert abs(losses["advance"].item() - torch.log(torch.tensor(float(classes))).item()) < 0.5
    assert torch.isclose(losses["loss"], losses["diffusion"] + losses["stop"] + 0.25 * losses["advance"])
    batch.char_windows = None
    with pytest.raises(ValueError, match="aligned utterances"):
        ditar_loss(model, batch)


def test_the_cursor_path_follows_each_patch_s_first_character():
    from ditarkit.reference.losses import cursor_path

    windows = torch.tensor([[0, 0], [0, 2], [3, 4], [4, 4], [12, 13]])  # a long jump at the end
    cursor, advance = cursor_path(windows, chars=15, max_advance=7)
    assert cursor.tolist() == [0, 0, 3, 4, 12, 14]  # then the last character, where the stop is read
    assert advance.tolist() == [0, 3, 1, 7, 2]  # 8 is clipped to the head's largest count


def test_history_noise_is_drawn_at_its_rate_and_mixes_variance_preservingly():
    x0, history = torch.zeros(4000, 4, 8), torch.ones(4000, 8, 8)
    noise = DiffusionNoise.draw(x0, history, cond_dropout=0.1, history_noise=0.3,
                                generator=torch.Generator().manual_seed(0))
    noisy = float((noise.history_mix > 0).float().mean())
    assert abs(noisy - 0.3) < 0.03 and abs(1 - float(noise.keep_cond.mean()) - 0.1) < 0.02
    clean = DiffusionNoise.draw(x0, history, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert float(clean.history_mix.abs().max()) == 0.0 and float(clean.keep_cond.min()) == 1.0


def test_lm_input_noise_reaches_only_the_target_patches_the_lm_reads():
    from ditarkit.reference.losses import noisy_lm_inputs, teacher_force

    torch.manual_seed(0)
    model = DiTAR(preset("tiny")).eval()
    batch = aligned_batch(model.config)
    with torch.no_grad():
        clean = teacher_force(model, batch)
        assert torch.equal(teacher_force(model, batch, lm_input_noise=0.0).cond, clean.cond)
        noisy = teacher_force(model, batch, lm_input_noise=1.0, generator=torch.Generator().manual_seed(0))
    # LocDiT's targets and history stay the true patches; the LM read something else
    assert torch.equal(noisy.x0, clean.x0) and torch.equal(noisy.history, clean.history)
    starts = torch.tensor([sum(n for _, _, n in clean.rows[:b]) for b in range(len(clean.rows))])
    # the speech-start positions have read only text and the (clean) reference: the same
    assert torch.allclose(noisy.cond[starts], clean.cond[starts], atol=1e-6)
    assert not torch.allclose(noisy.cond, clean.cond, atol=1e-3)
    # the rate is per utterance
    ones = torch.ones(50, 4, 8)
    picks = [bool((noisy_lm_inputs(ones, 0.5, torch.Generator().manual_seed(s)) != 1.0).any()) for s in range(400)]
    assert abs(sum(picks) / len(picks) - 0.5) < 0.08
    # the level is uniform per patch (noise alone: a patch's spread is its level, 0.5 on average)
    levels = noisy_lm_inputs(torch.zeros(2000, 4, 8), 1.0, torch.Generator().manual_seed(1)).std(dim=(1, 2))
    assert abs(float(levels.mean()) - 0.5) < 0.03 and float(levels.max()) < 1.3
    # and the mix preserves variance: unit-variance patches stay unit variance
    mixed = noisy_lm_inputs(torch.randn(2000, 4, 8, generator=torch.Generator().manual_seed(2)), 1.0,
                            torch.Generator().manual_seed(3))
    assert abs(float(mixed.var()) - 1.0) < 0.03
    with pytest.raises(ValueError, match="invalid loss options"):
        LossOptions(lm_input_noise=1.5)


def test_a_patch_s_draws_share_its_isolated_history_as_the_whole_sequence_would_compute_it():
    from ditarkit.reference.losses import mix_noise, velocity_loss
    from ditarkit.runtime.diffusion import Schedule

    torch.manual_seed(0)
    model = DiTAR(dataclasses.replace(preset("tiny"), isolated_history=True))
    torch.nn.init.normal_(model.locdit.out_proj.weight, std=0.02)  # not the zero init: a velocity to compare
    cfg, draws, patches = model.config, 3, 5
    x0 = torch.randn(patches * draws, cfg.patch_size, cfg.audio.latent_dim)
    cond = torch.randn(patches * draws, cfg.lm.dim)
    history = torch.randn(patches, cfg.history_frames, cfg.audio.latent_dim)
    noise = DiffusionNoise.draw(x0, history, 0.3, 0.5, generator=torch.Generator().manual_seed(1))
    assert noise.history_mix.shape == (patches, 1, 1) and noise.t.shape == (patches * draws,)
    shared = velocity_loss(model, x0, cond, history, noise)
    shared.backward()
    shared_grad = model.locdit.history_proj.weight.grad.clone()
    model.zero_grad()
    schedule, tb = Schedule(cfg.diffusion.schedule), noise.t[:, None, None]
    whole_history = mix_noise(history, noise.history_mix, noise.history_eps).repeat_interleave(draws, dim=0)
    predicted = model.locdit(schedule.noisy(x0, noise.eps, tb), noise.t, cond * noise.keep_cond, whole_history)
    whole = torch.nn.functional.mse_loss(predicted, schedule.velocity_target(x0, noise.eps, tb))
    whole.backward()
    assert abs(shared.item() - whole.item()) <= SHARED_HISTORY_TOLERANCE * whole.item()
    assert torch.allclose(shared_grad, model.locdit.history_proj.weight.grad, atol=SHARED_HISTORY_TOLERANCE)
