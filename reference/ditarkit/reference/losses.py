"""Training objectives of DiTAR and its VAE, and one optimisation step.

DiTAR: velocity MSE on the target patch positions (LocDiT conditioned on the LM output,
which is dropped to zeros with probability `cond_dropout` for classifier-free guidance),
plus BCE on the stop head. VAE: multi-resolution STFT reconstruction plus a small KL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ditarkit.reference.model import DiTAR, SpeechVAE
from ditarkit.runtime.diffusion import Schedule

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop): fine to coarse


@dataclass
class SpeechBatch:
    """Utterances with a voice prompt (another clip of the same voice). Latents are the
    VAE's normalised means; lengths count whole patches."""

    text_ids: Tensor  # (B, T) int64, PAD after each text
    text_lengths: Tensor  # (B,)
    prompt: Tensor  # (B, Np_max * P, C)
    prompt_patches: Tensor  # (B,)
    target: Tensor  # (B, Nt_max * P, C)
    target_patches: Tensor  # (B,)


def ditar_loss(
    model: DiTAR,
    batch: SpeechBatch,
    diffusion_samples: int = 1,
    stop_weight: float = 1.0,
    alignment_weight: float = 0.0,
) -> dict[str, Tensor]:
    """`alignment_weight` > 0 adds a guided-attention loss (training only; the graphs do not
    change) that pulls the speech-to-text attention toward the diagonal, which is what small
    data fails to learn first."""
    cfg = model.config
    p, h = cfg.patch_size, cfg.history_patches
    sequences, targets, histories, hidden_index, stop_labels = [], [], [], [], []
    for b in range(batch.text_ids.shape[0]):
        n_prompt, n_target = int(batch.prompt_patches[b]), int(batch.target_patches[b])
        patches = torch.cat([
            batch.prompt[b, : n_prompt * p].reshape(n_prompt, p, -1),
            batch.target[b, : n_target * p].reshape(n_target, p, -1),
        ])  # (Np + Nt, P, C)
        vectors = model.aggregator(patches)  # (Np + Nt, D)
        text = model.text_embedding(batch.text_ids[b, : int(batch.text_lengths[b])])
        start = model.text_embedding.weight[cfg.text.SPEECH_START][None]
        sequences.append(torch.cat([text, vectors[:n_prompt], start, vectors[n_prompt:]]))
        first = text.shape[0] + n_prompt  # the speech-start position predicts target 0
        hidden_index += [(b, first + j) for j in range(n_target)]
        targets.append(patches[n_prompt:])
        histories += [patches[n_prompt + j - h : n_prompt + j].reshape(h * p, -1) for j in range(n_target)]
        labels = torch.zeros(n_target + 1)
        labels[-1] = 1.0  # after the last target patch, speech ends
        stop_labels.append((b, first, labels))

    embeds = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (B, S, D), right-padded
    attentions = [block.attn for block in model.lm.transformer.blocks]
    for attn in attentions:
        attn.record_probs = alignment_weight > 0
    try:
        hidden, stop_logits, _, _ = model.lm(embeds)  # causal: padding at the end is never seen
    finally:
        for attn in attentions:
            attn.record_probs = False
    rows, cols = zip(*hidden_index)
    cond = hidden[list(rows), list(cols)]  # (N, D)
    x0 = torch.cat(targets)  # (N, P, C)
    history = torch.stack(histories)  # (N, H*P, C)

    diffusion = _velocity_loss(model, cfg.diffusion, x0, cond, history, diffusion_samples)
    stop = torch.stack([
        F.binary_cross_entropy_with_logits(stop_logits[b, first : first + len(lab)], lab)
        for b, first, lab in stop_labels
    ]).mean()
    losses = {"loss": diffusion + stop_weight * stop, "diffusion": diffusion, "stop": stop}
    if alignment_weight > 0:
        text_lengths = [int(n) for n in batch.text_lengths]
        spans = [(b, first, len(lab)) for b, first, lab in stop_labels]
        losses["alignment"] = guided_attention_loss([a.probs for a in attentions], text_lengths, spans)
        losses["loss"] = losses["loss"] + alignment_weight * losses["alignment"]
    return losses


def guided_attention_loss(probs: list[Tensor], text_lengths: list[int], spans, width: float = 0.2) -> Tensor:
    """DC-TTS guided attention: attention of speech position n (of N) to text token t (of T),
    renormalised over the text, costs 1 - exp(-(n/N - t/T)^2 / 2 width^2); attention is
    averaged over layers and heads.
    spans: (batch row, first speech position, speech positions) per utterance."""
    mean_probs = torch.stack(probs).mean(dim=(0, 2))  # (B, S, S): over layers and heads
    total = mean_probs.new_zeros(())
    for (b, first, count), text in zip(spans, text_lengths):
        attention = mean_probs[b, first : first + count, :text]  # (N, T)
        # Where each speech position looks *within the text*: most of its attention may go to
        # the prompt and earlier speech, and that share must not hide a misaligned rest.
        attention = attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-6)
        n = (torch.arange(count, dtype=attention.dtype) + 0.5) / count
        t = (torch.arange(text, dtype=attention.dtype) + 0.5) / text
        cost = 1.0 - torch.exp(-((n[:, None] - t[None, :]) ** 2) / (2 * width**2))
        total = total + (attention * cost).sum(dim=1).mean()
    return total / len(spans)


def _velocity_loss(model: DiTAR, dcfg, x0: Tensor, cond: Tensor, history: Tensor, samples: int) -> Tensor:
    """Several noise levels per patch: LocDiT is small next to the LM, so extra draws are
    cheap variance reduction."""
    x0, cond, history = (a.repeat_interleave(samples, dim=0) for a in (x0, cond, history))
    keep = (torch.rand(cond.shape[0], 1) >= dcfg.cond_dropout).to(cond.dtype)
    cond = cond * keep  # classifier-free guidance: unconditional = all-zero LM output
    schedule = Schedule(dcfg.schedule)
    t = torch.rand(x0.shape[0])
    eps = torch.randn_like(x0)
    tb = t[:, None, None]
    x_t = schedule.noisy(x0, eps, tb)
    target = schedule.velocity_target(x0, eps, tb)
    return F.mse_loss(model.locdit(x_t, t, cond, history), target)


def stft_magnitude(audio: Tensor, n_fft: int, hop: int) -> Tensor:
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio, n_fft, hop, window=window, return_complex=True)
    return spec.abs().clamp(min=1e-5)


def multi_resolution_stft_loss(predicted: Tensor, target: Tensor) -> Tensor:
    total = predicted.new_zeros(())
    for n_fft, hop in STFT_RESOLUTIONS:
        pred, true = stft_magnitude(predicted, n_fft, hop), stft_magnitude(target, n_fft, hop)
        convergence = torch.linalg.norm(true - pred) / torch.linalg.norm(true)
        total = total + convergence + F.l1_loss(pred.log(), true.log())
    return total / len(STFT_RESOLUTIONS)


def vae_loss(vae: SpeechVAE, audio: Tensor, kl_weight: float = 1e-4) -> dict[str, Tensor]:
    """audio (B, T) with T a multiple of the hop."""
    mean, logvar = vae.encoder(audio)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    recon = vae.decoder(z)
    spectral = multi_resolution_stft_loss(recon, audio)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return {"loss": spectral + kl_weight * kl, "stft": spectral, "kl": kl}


def train_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., dict[str, Tensor]],
    *args,
    max_grad_norm: float = 1.0,
    **kwargs,
) -> dict[str, float]:
    """One optimisation step of any of the losses above; returns the loss terms as floats."""
    losses = loss_fn(*args, **kwargs)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}
