"""Losses and one optimisation step, on the tiny preset."""

from __future__ import annotations

import torch
from conftest import speech_like

from ditarkit.reference.losses import SpeechBatch, ditar_loss, train_step, vae_loss
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.config import preset

STEPS = 8


def _batch(cfg) -> SpeechBatch:
    g = torch.Generator().manual_seed(0)
    p, c = cfg.patch_size, cfg.audio.latent_dim
    return SpeechBatch(
        text_ids=torch.randint(4, cfg.text.vocab_size, (2, 12), generator=g),
        text_lengths=torch.tensor([12, 9]),
        prompt=torch.randn(2, 5 * p, c, generator=g),
        prompt_patches=torch.tensor([5, 3]),
        target=torch.randn(2, 7 * p, c, generator=g),
        target_patches=torch.tensor([7, 4]),
    )


def test_ditar_step_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = DiTAR(preset("tiny"))
    batch = _batch(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    with torch.no_grad():
        first = ditar_loss(model, batch, diffusion_samples=8)
    for _ in range(STEPS):
        last = train_step(opt, ditar_loss, model, batch, diffusion_samples=8)
    torch.manual_seed(1)
    with torch.no_grad():
        after = ditar_loss(model, batch, diffusion_samples=8)
    assert set(last) == {"loss", "diffusion", "stop"}
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


def test_alignment_loss_prefers_diagonal_attention():
    from ditarkit.reference.losses import guided_attention_loss

    n, t = 6, 6
    diagonal = torch.eye(n)[None, None, None].expand(1, 1, 1, n, t)  # (L, B, H, S, S)
    reversed_ = diagonal.flip(-1)
    spans = [(0, 0, n)]
    assert float(guided_attention_loss([diagonal[0]], [t], spans)) < 0.1
    assert float(guided_attention_loss([reversed_[0]], [t], spans)) > 0.5


def test_ditar_loss_reports_alignment_when_asked():
    torch.manual_seed(0)
    model = DiTAR(preset("tiny"))
    losses = ditar_loss(model, _batch(model.config), alignment_weight=1.0)
    assert 0.0 < losses["alignment"].item() < 1.0
