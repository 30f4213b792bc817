"""The PyTorch reference: KV cache, causality, bidirectional LocDiT, VAE shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import speech_like

# fp32 math reordered (one fused call vs. many steps): a few ulps of values of size ~1.
CACHE_TOLERANCE = 1e-5
# Rotary against a complex rotation: the same fp32 angles (up to ~4 rad), multiplied in
# another order: a few ulps.
ROTARY_TOLERANCE = 1e-5


def _embeds(model, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, steps, model.config.lm.dim, generator=g)


@torch.no_grad()
def test_prefill_then_steps_equal_one_full_forward(tiny_model):
    lm, cfg = tiny_model.lm, tiny_model.config.lm
    embeds = _embeds(tiny_model, 24)
    full_hidden, full_stop, _, _ = lm(embeds)

    capacity, prefill = 32, 10
    shape = (cfg.layers, 1, cfg.kv_heads, capacity, cfg.head_dim)
    keys, values = torch.zeros(shape), torch.zeros(shape)
    hidden, stop = [], []
    spans = [(0, prefill)] + [(i, i + 1) for i in range(prefill, 24)]
    for start, end in spans:
        h, s, k, v = lm(embeds[:, start:end], keys, values, torch.tensor([start]))
        keys[:, :, :, start:end], values[:, :, :, start:end] = k, v
        hidden.append(h)
        stop.append(s)
    assert (torch.cat(hidden, 1) - full_hidden).abs().max() < CACHE_TOLERANCE
    assert (torch.cat(stop, 1) - full_stop).abs().max() < CACHE_TOLERANCE


@torch.no_grad()
def test_stale_cache_slots_beyond_position_are_ignored(tiny_model):
    """A preallocated cache holds garbage past `position`; it must not leak in."""
    lm, cfg = tiny_model.lm, tiny_model.config.lm
    embeds = _embeds(tiny_model, 6)
    shape = (cfg.layers, 1, cfg.kv_heads, 16, cfg.head_dim)
    _, _, k, v = lm(embeds[:, :5])
    clean_k, clean_v = torch.zeros(shape), torch.zeros(shape)
    clean_k[:, :, :, :5], clean_v[:, :, :, :5] = k, v
    dirty_k, dirty_v = clean_k.clone(), clean_v.clone()
    dirty_k[:, :, :, 5:] = 1e3
    dirty_v[:, :, :, 5:] = -1e3
    pos = torch.tensor([5])
    a = lm(embeds[:, 5:], clean_k, clean_v, pos)[0]
    b = lm(embeds[:, 5:], dirty_k, dirty_v, pos)[0]
    assert torch.equal(a, b)


@torch.no_grad()
def test_lm_is_causal(tiny_model):
    embeds = _embeds(tiny_model, 12)
    changed = embeds.clone()
    changed[:, 7:] += 5.0
    a, _, _, _ = tiny_model.lm(embeds)
    b, _, _, _ = tiny_model.lm(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@torch.no_grad()
def test_locdit_patch_output_depends_on_every_prefix_token(tiny_model):
    cfg = tiny_model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.patch_size, cfg.audio.latent_dim, generator=g)
    t = torch.tensor([0.3])
    cond = torch.randn(1, cfg.lm.dim, generator=g)
    history = torch.randn(1, cfg.history_frames, cfg.audio.latent_dim, generator=g)
    base = tiny_model.locdit(x, t, cond, history)
    assert base.shape == x.shape
    assert (tiny_model.locdit(x, t, cond + 1.0, history) - base).abs().max() > 1e-4
    assert (tiny_model.locdit(x, torch.tensor([0.6]), cond, history) - base).abs().max() > 1e-4
    for frame in range(cfg.history_frames):
        moved = history.clone()
        moved[:, frame] += 1.0
        assert (tiny_model.locdit(x, t, cond, moved) - base).abs().max() > 1e-4, frame


@torch.no_grad()
def test_asking_for_the_last_positions_only_gives_the_same_numbers(tiny_model):
    transformer = tiny_model.locdit.transformer
    x = torch.randn(2, 13, transformer.cfg.dim, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(13)
    full, keys, values = transformer(x, positions)
    last, keys_last, values_last = transformer(x, positions, outputs=4)
    assert last.shape == (2, 4, transformer.cfg.dim)
    assert (last - full[:, -4:]).abs().max() <= CACHE_TOLERANCE
    assert torch.equal(keys, keys_last) and torch.equal(values, values_last)


@torch.no_grad()
def test_last_positions_only_respect_the_causal_mask_too(tiny_model):
    from ditarkit.reference.model import causal_mask

    transformer = tiny_model.lm.transformer
    x, positions = _embeds(tiny_model, 9), torch.arange(9)
    mask = causal_mask(9, 0, torch.tensor(0), positions.device)
    full, _, _ = transformer(x, positions, mask)
    last, _, _ = transformer(x, positions, mask, outputs=3)
    assert (last - full[:, -3:]).abs().max() <= CACHE_TOLERANCE
    with pytest.raises(ValueError, match="outputs"):
        transformer(x, positions, mask, outputs=10)


def test_rotary_turns_each_pair_by_position_times_frequency():
    from ditarkit.reference.model import RotaryEmbedding, apply_rotary

    head_dim, positions = 8, torch.arange(5)
    cos, signed_sin = RotaryEmbedding(head_dim, base=10_000.0)(positions)
    x = torch.randn(5, head_dim, generator=torch.Generator().manual_seed(2))
    half = head_dim // 2
    angles = positions[:, None] * 10_000.0 ** (-torch.arange(half) * 2 / head_dim)
    turned = torch.complex(x[:, :half], x[:, half:]) * torch.polar(torch.ones_like(angles), angles)
    assert torch.allclose(apply_rotary(x, cos, signed_sin), torch.cat([turned.real, turned.imag], -1),
                          atol=ROTARY_TOLERANCE)


@torch.no_grad()
def test_one_second_is_forty_frames_and_ten_patches(tiny_model):
    cfg = tiny_model.config
    audio = torch.from_numpy(speech_like(1.0))[None]
    latents = tiny_model.vae.encode(audio)
    assert latents.shape == (1, 40, cfg.audio.latent_dim)
    assert latents.shape[1] // cfg.patch_size == 10
    assert tiny_model.vae.decode(latents).shape == audio.shape


@torch.no_grad()
def test_vae_decoder_is_causal_so_streaming_can_be_exact(tiny_model):
    hop = tiny_model.config.audio.hop_length
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 30, tiny_model.config.audio.latent_dim, generator=g)
    changed = z.clone()
    changed[:, 20:] += 1.0
    a, b = tiny_model.vae.decode(z), tiny_model.vae.decode(changed)
    assert torch.equal(a[:, : 20 * hop], b[:, : 20 * hop])
    # And the stated receptive field is enough: decoding with that much left context only
    # reproduces the full decode of the frames after it.
    context = tiny_model.config.vae.decoder_receptive_frames
    window = tiny_model.vae.decode(z[:, 25 - context :])[:, context * hop :]
    assert (window - a[:, 25 * hop :]).abs().max() < 1e-5


def test_the_model_runs_on_the_meta_device():
    """Every tensor the model makes is made on its input's device (a CPU-made mask would fail
    on a GPU at the first training step; on `meta` it fails here)."""
    import dataclasses

    from ditarkit.reference.losses import SpeechBatch, ditar_loss
    from ditarkit.reference.model import DiTAR
    from ditarkit.runtime.config import preset

    cfg = dataclasses.replace(preset("tiny"), isolated_history=True)
    with torch.device("meta"):
        model = DiTAR(cfg)
    p, c, meta = cfg.patch_size, cfg.audio.latent_dim, "meta"
    # lengths stay host integers (they shape the batch); the data is on the model's device
    batch = SpeechBatch(torch.zeros(2, 9, dtype=torch.int64, device=meta), torch.tensor([9, 7]),
                        torch.zeros(2, 3 * p, c, device=meta), torch.tensor([3, 3]),
                        torch.zeros(2, 5 * p, c, device=meta), torch.tensor([5, 4]),
                        torch.zeros(2, 5, 2, dtype=torch.int64, device=meta))
    assert cfg.cursor is not None  # the text cursor's tensors too
    losses = ditar_loss(model, batch)
    assert losses["loss"].device.type == "meta"
    keys = torch.zeros(cfg.lm.layers, 1, cfg.lm.kv_heads, 16, cfg.lm.head_dim, device="meta")
    hidden, _, _, _ = model.lm(torch.zeros(1, 1, cfg.lm.dim, device="meta"), keys, keys,
                               torch.tensor([3], device="meta"))
    assert hidden.device.type == "meta"


@torch.no_grad()
def test_isolated_history_tokens_depend_on_the_history_alone():
    import dataclasses

    from ditarkit.reference.model import DiTAR, isolated_history_mask, perturb_weights
    from ditarkit.runtime.config import preset

    cfg = dataclasses.replace(preset("tiny"), isolated_history=True)
    locdit = perturb_weights(DiTAR(cfg), seed=3).locdit
    g = torch.Generator().manual_seed(0)
    history = torch.randn(1, cfg.history_frames, cfg.audio.latent_dim, generator=g)

    def hidden(x, t, cond):  # every position's output of LocDiT's transformer
        c = locdit.cond_proj(cond) + locdit.time_embed(t)
        tokens = torch.cat([c[:, None], locdit.history_proj(history), locdit.noisy_proj(x)], dim=1)
        mask = isolated_history_mask(cfg.history_frames, cfg.patch_size, tokens.device)
        return locdit.transformer(tokens, torch.arange(tokens.shape[1]), mask)

    a_out, a_keys, _ = hidden(torch.randn(1, 4, 64, generator=g), torch.tensor([0.2]), torch.randn(1, 64, generator=g))
    b_out, b_keys, _ = hidden(torch.randn(1, 4, 64, generator=g), torch.tensor([0.9]), torch.zeros(1, 64))
    rows = slice(1, 1 + cfg.history_frames)
    assert torch.equal(a_keys[:, :, :, rows], b_keys[:, :, :, rows])  # history keys: shareable per patch
    assert not torch.allclose(a_out[:, -4:], b_out[:, -4:])  # the patch still sees condition and time


@torch.no_grad()
def test_a_text_cursor_row_holds_the_tokens_around_its_position_alone():
    from ditarkit.reference.model import DiTAR, perturb_weights
    from ditarkit.runtime.config import preset

    cfg = preset("tiny")
    before, after = cfg.cursor.before, cfg.cursor.after
    cursor = perturb_weights(DiTAR(cfg), seed=5).text_cursor
    ids = torch.arange(4, 24)  # 20 tokens
    rows = cursor(ids)
    assert rows.shape == (20, cfg.lm.dim)
    changed = ids.clone()
    changed[10] = 30
    moved = (cursor(changed) - rows).abs().amax(dim=1) > 0
    assert torch.nonzero(moved).flatten().tolist() == list(range(10 - after, 10 + before + 1))
    # a one-token text: every offset but the centre reads PAD
    single = cursor(ids[:1])
    pads = cursor.embedding.weight.view(cfg.cursor.window, cfg.text.vocab_size, -1)[:, cfg.text.PAD]
    expected = pads.sum(0) - pads[before] + cursor.embedding.weight[before * cfg.text.vocab_size + 4]
    torch.testing.assert_close(single[0], expected)
