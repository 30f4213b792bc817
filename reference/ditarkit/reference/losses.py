"""Training objectives of DiTAR and its VAE, and one optimisation step.

DiTAR: velocity MSE on the target patch positions (LocDiT conditioned on the LM output,
which is dropped to zeros with probability `cond_dropout` for classifier-free guidance),
plus BCE on the stop head, plus (where the corpus says which characters each patch speaks)
an attention loss on a few LM heads and, for a model with a text cursor, cross-entropy on its
advance head (the cursor itself is teacher-forced from the same alignment). VAE:
multi-resolution STFT reconstruction plus a small KL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ditarkit.reference.model import DiTAR, SpeechVAE
from ditarkit.reference.runner import LocDiTSamplerGraph
from ditarkit.runtime.diffusion import Schedule, initial_state, renoise_step

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
    # (B, Nt_max, 2) first and last character (0-based in the text, BOS excluded) spoken
    # during each target patch; None where the corpus has no alignment.
    char_windows: Tensor | None = None

    def subset(self, rows: list[int]) -> SpeechBatch:
        """These utterances alone, in this order."""
        return SpeechBatch(**{field.name: None if (value := getattr(self, field.name)) is None else value[rows]
                              for field in dataclasses.fields(self)})


@dataclass(frozen=True)
class LossOptions:
    """The training-only knobs of the DiTAR objective (the graphs do not depend on them)."""

    diffusion_samples: int = 2  # noise levels drawn per patch: LocDiT is small, extra draws are cheap
    stop_weight: float = 1.0
    # Attention supervision: these (layer, head) pairs of the LM put their attention from each
    # speech position on the characters spoken in that patch (+-1), by -log of that mass. The
    # mass is not renormalised over the text, so a head cannot meet it while looking elsewhere.
    aligned_heads: tuple[tuple[int, int], ...] = ()
    alignment_weight: float = 0.0
    # LocDiT's shortcut: it can continue the two clean previous patches without the LM. With
    # this probability a patch's history is mixed with noise at a uniform random level, so
    # the condition carries the content.
    history_noise: float = 0.0
    # The LM's exposure bias: in generation it reads its own patches, which differ from the
    # true ones by a large fraction of their size, where teacher forcing shows it only true
    # ones. With this probability an utterance's target patches are mixed with noise, at a
    # uniform random level per patch, where the LM reads them (LocDiT's targets and history
    # stay clean), so it learns to take the content from the text.
    lm_input_noise: float = 0.0
    advance_weight: float = 0.5  # the text cursor's advance head (models with a cursor only)
    # Scheduled sampling: noise is not what the LM reads in generation. With this probability
    # an utterance's target patches are replaced, where the LM reads them and in LocDiT's
    # history, by LocDiT's own draws of them (each from its teacher-forced condition and true
    # history, without gradient, at `drawn_nfe` solver steps and the model's guidance and
    # temperature); LocDiT's targets stay the true patches, so both learn to come back to
    # the text from their own errors. Such an utterance gets no LM input noise.
    drawn_inputs: float = 0.0
    drawn_nfe: int = 4

    def __post_init__(self) -> None:
        weights = (self.alignment_weight, self.advance_weight)
        rates = (self.history_noise, self.lm_input_noise, self.drawn_inputs)
        if (min(weights) < 0 or not all(0 <= r <= 1 for r in rates) or self.diffusion_samples < 1
                or self.drawn_nfe < 1):
            raise ValueError(f"invalid loss options {self}")


@dataclass
class TeacherForced:
    """One teacher-forced LM pass over a batch, flattened to the target patches."""

    cond: Tensor  # (N, D) LocDiT's condition for each target patch: its LM output (CausalLM.condition)
    x0: Tensor  # (N, P, C) the target patches
    history: Tensor  # (N, H*P, C) their previous frames: the true ones, or where drawn, the draws
    stop_loss: Tensor  # ()
    probs: list[Tensor]  # per LM layer (B, H, S, S), when recorded
    rows: list[tuple[int, int, int]]  # (batch row, first speech position, target patches) per utterance
    advance_logits: Tensor | None = None  # (N, max_advance + 1) per target patch, with a cursor
    advance: Tensor | None = None  # (N,) int64: characters the next patch moves on, clipped


@dataclass
class DiffusionNoise:
    """Every random draw of the velocity loss, explicit so a metric can fix it."""

    t: Tensor  # (N * S,) for N patches drawn S times each
    eps: Tensor  # (N * S, P, C)
    keep_cond: Tensor  # (N * S, 1) 0 where the condition is dropped for guidance
    history_mix: Tensor  # (N, 1, 1) per patch, shared by its draws: 0 = clean history, 1 = pure noise
    history_eps: Tensor  # (N, H*P, C)

    @classmethod
    def draw(cls, x0: Tensor, history: Tensor, cond_dropout: float, history_noise: float,
             generator: torch.Generator | None = None) -> DiffusionNoise:
        """`x0` (N * S, P, C): the patches as drawn; `history` (N, H*P, C): once per patch."""
        n, patches, device = x0.shape[0], history.shape[0], x0.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        noisy_history = uniform(patches, 1, 1) < history_noise
        return cls(
            t=uniform(n),
            eps=torch.randn(x0.shape, generator=generator, device=device),
            keep_cond=(uniform(n, 1) >= cond_dropout).to(x0.dtype),
            history_mix=uniform(patches, 1, 1) * noisy_history,
            history_eps=torch.randn(history.shape, generator=generator, device=device),
        )


def cursor_path(windows: Tensor, chars: int, max_advance: int) -> tuple[Tensor, Tensor]:
    """From the characters each of n patches speaks, (n, 2): the cursor at each of the n + 1
    speech positions (the first character of each patch, then the last character of the text
    at the position that predicts the stop) and the advance after each patch, clipped."""
    cursor = torch.cat([windows[:, 0], windows.new_full((1,), chars - 1)]).clamp(0, chars - 1)
    return cursor, (cursor[1:] - cursor[:-1]).clamp(0, max_advance)


def mix_noise(x: Tensor, level: Tensor, eps: Tensor) -> Tensor:
    """Variance-preserving mix: level 0 = x, 1 = pure noise."""
    return torch.sqrt(1 - level**2) * x + level * eps


def noisy_lm_inputs(targets: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """(Nt, P, C) target patches as the LM reads them: with probability `rate` mixed with
    noise at a uniform random level per patch (LossOptions.lm_input_noise)."""
    if rate <= 0:
        return targets
    device = targets.device
    chosen = torch.rand((), generator=generator, device=device) < rate
    level = torch.rand(targets.shape[0], 1, 1, generator=generator, device=device) * chosen
    eps = torch.randn(targets.shape, generator=generator, device=device)
    return mix_noise(targets, level.to(targets.dtype), eps.to(targets.dtype))


def teacher_force(model: DiTAR, batch: SpeechBatch, record_layers: set[int] = frozenset(),
                  lm_input_noise: float = 0.0, generator: torch.Generator | None = None,
                  drawn: list[Tensor | None] | None = None) -> TeacherForced:
    """The LM over [BOS text EOS, prompt patches, SPEECH_START, target patches] of every
    utterance; attention maps of `record_layers` kept. With a text cursor, each speech
    position's input also gets the cursor vector of the character its patch starts on.
    Training only: `lm_input_noise` > 0 noises the target patches the LM reads; `drawn`
    (per utterance, None or its (Nt, P, C) patches as LocDiT drew them) replaces them where
    the LM reads them and in LocDiT's history."""
    cfg = model.config
    p, h = cfg.patch_size, cfg.history_patches
    if model.text_cursor is not None and batch.char_windows is None:
        raise ValueError("a model with a text cursor trains on aligned utterances only (char_windows)")
    sequences, targets, histories, hidden_index, stop_labels, advances = [], [], [], [], [], []
    counts = [(int(np_), int(nt)) for np_, nt in zip(batch.prompt_patches, batch.target_patches)]
    every_patches = [torch.cat([batch.prompt[b, : n_prompt * p].reshape(n_prompt, p, -1),
                                batch.target[b, : n_target * p].reshape(n_target, p, -1)])
                     for b, (n_prompt, n_target) in enumerate(counts)]  # (Np + Nt, P, C) each
    drawn = drawn or [None] * len(counts)
    # What the model conditions on: the true patches, or where drawn, the reference then its own.
    given = [x if own is None else torch.cat([x[:n_prompt], own])
             for x, own, (n_prompt, _) in zip(every_patches, drawn, counts)]
    # The reference is read clean, as in generation; drawn patches are read as drawn.
    reads = [x if own is not None else
             torch.cat([x[:n_prompt], noisy_lm_inputs(x[n_prompt:], lm_input_noise, generator)])
             for x, own, (n_prompt, _) in zip(given, drawn, counts)]
    # One aggregator call for the batch: it reads every patch on its own.
    every_vectors = model.aggregator(torch.cat(reads)).split([len(r) for r in reads])  # (Np + Nt, D) each
    for b, ((n_prompt, n_target), patches, vectors) in enumerate(zip(counts, every_patches, every_vectors)):
        ids = batch.text_ids[b, : int(batch.text_lengths[b])]
        text = model.text_embedding(ids)
        start = model.text_embedding.weight[cfg.text.SPEECH_START][None]
        speech = torch.cat([start, vectors[n_prompt:]])  # (Nt + 1, D)
        if model.text_cursor is not None:
            cursor, advance = cursor_path(batch.char_windows[b, :n_target], len(ids) - 2, cfg.cursor.max_advance)
            speech = speech + model.text_cursor(ids)[cursor + 1]  # text position = character + 1 (BOS)
            advances.append(advance)
        sequences.append(torch.cat([text, vectors[:n_prompt], speech]))
        first = text.shape[0] + n_prompt  # the speech-start position predicts target 0
        hidden_index += [(b, first + j) for j in range(n_target)]
        targets.append(patches[n_prompt:])
        histories += [given[b][n_prompt + j - h : n_prompt + j].reshape(h * p, -1) for j in range(n_target)]
        labels = torch.zeros(n_target + 1, device=patches.device)
        labels[-1] = 1.0  # after the last target patch, speech ends
        stop_labels.append((b, first, labels))

    embeds = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (B, S, D), right-padded
    attentions = [block.attn for block in model.lm.transformer.blocks]
    for i, attn in enumerate(attentions):
        attn.record_probs = i in record_layers
    try:
        hidden, stop_logits, _, _ = model.lm(embeds)  # causal: padding at the end is never seen
        probs = [attn.probs for attn in attentions]
    finally:
        for attn in attentions:
            attn.record_probs, attn.probs = False, None
    rows, cols = zip(*hidden_index)
    outputs = hidden[list(rows), list(cols)]  # h_i of each target patch
    stop = torch.stack([
        F.binary_cross_entropy_with_logits(stop_logits[b, first : first + len(lab)], lab)
        for b, first, lab in stop_labels
    ]).mean()
    cursor = model.text_cursor is not None
    advance = torch.cat(advances) if cursor else None
    return TeacherForced(
        cond=model.lm.condition(outputs, advance),  # with the advance table: told the true advance
        x0=torch.cat(targets),
        history=torch.stack(histories),
        stop_loss=stop,
        probs=probs,
        rows=[(b, first, len(lab) - 1) for b, first, lab in stop_labels],
        advance_logits=model.lm.advance_head(outputs) if cursor else None,
        advance=advance,
    )


@torch.no_grad()
def own_draws(model: DiTAR, batch: SpeechBatch, chosen: Tensor, nfe: int,
              generator: torch.Generator | None = None) -> list[Tensor | None]:
    """For each utterance with `chosen` (B,) set, LocDiT's own draw of each of its target
    patches, (Nt, P, C), from the teacher-forced condition and the true history, by the
    sampler the runtime runs (at `nfe` steps, the model's guidance and temperature), all
    patches at once; None for the others (LossOptions.drawn_inputs)."""
    rows = torch.nonzero(chosen).flatten().tolist()
    forced = teacher_force(model, batch.subset(rows))  # the LM over the chosen utterances only
    sampler = dataclasses.replace(model.config.contract().sampler, nfe=nfe)
    device, diffusion = forced.cond.device, model.config.diffusion
    noise = torch.randn((2, *forced.x0.shape), generator=generator, device=device)
    x_init = initial_state(noise, diffusion.temperature)
    renoise_at = torch.tensor(renoise_step(nfe, diffusion.temperature, sampler), device=device)
    cfg_scale = torch.tensor([diffusion.cfg_scale], device=device)
    patches = LocDiTSamplerGraph(model.locdit, sampler)(x_init, noise[1], renoise_at, cfg_scale, forced.cond,
                                                        forced.history)
    own = dict(zip(rows, patches.to(forced.x0.dtype).split([n for _, _, n in forced.rows])))
    return [own.get(b) for b in range(len(chosen))]


def velocity_loss(model: DiTAR, x0: Tensor, cond: Tensor, history: Tensor, noise: DiffusionNoise) -> Tensor:
    """v-prediction (or flow) MSE of LocDiT on the target patches under the given noise. `x0`
    and `cond` hold each patch's draws in a row (N * S), `history` each patch once (N): with
    isolated history its keys and values are computed once and shared by the patch's draws,
    as the runtime shares them between solver steps."""
    schedule = Schedule(model.config.diffusion.schedule)
    history = mix_noise(history, noise.history_mix, noise.history_eps)
    draws = x0.shape[0] // history.shape[0]
    tb = noise.t[:, None, None]
    x_t = schedule.noisy(x0, noise.eps, tb)
    target = schedule.velocity_target(x0, noise.eps, tb)
    cond = cond * noise.keep_cond
    if model.locdit.isolated_history:
        keys, values = (kv.repeat_interleave(draws, dim=1) for kv in model.locdit.history_cache(history))
        predicted = model.locdit.forward_cached(x_t, noise.t, cond, keys, values)
    else:
        predicted = model.locdit(x_t, noise.t, cond, history.repeat_interleave(draws, dim=0))
    return F.mse_loss(predicted, target)


def alignment_loss(probs: list[Tensor], heads: tuple[tuple[int, int], ...], rows: list[tuple[int, int, int]],
                   windows: Tensor, eps: float = 1e-6) -> Tensor:
    """-log of the attention mass each aligned head puts, from each speech position, on the
    characters of its patch +-1 (text token k + 1: BOS comes first), averaged. The rows of all
    utterances are gathered in one index per layer: a slice per utterance and head would cost
    a zero-filled gradient the size of the whole attention map each, in backward."""
    device = windows.device
    batch_index = torch.cat([torch.full((n,), b, device=device) for b, _, n in rows])
    positions = torch.cat([torch.arange(first, first + n, device=device) for _, first, n in rows])
    spans = torch.cat([windows[b, :n] for b, _, n in rows])  # (M, 2) characters per speech position
    lo = (spans[:, 0] - 1).clamp(min=0) + 1  # sequence positions
    hi = spans[:, 1] + 1 + 1  # exclusive; never past EOS, which follows the last char
    cols = torch.arange(probs[heads[0][0]].shape[-1], device=device)
    inside = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])  # (M, S)
    terms = []
    for layer in sorted({layer for layer, _ in heads}):
        chosen = torch.tensor([head for at, head in heads if at == layer], device=device)
        attention = probs[layer][batch_index[:, None], chosen[None, :], positions[:, None]]  # (M, h, S)
        mass = (attention * inside[:, None, :]).sum(dim=-1)
        terms.append(-torch.log(mass + eps).flatten())
    return torch.cat(terms).mean()


def ditar_loss(model: DiTAR, batch: SpeechBatch, options: LossOptions = LossOptions(),
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Velocity MSE + stop BCE, + the attention alignment loss where the batch is aligned."""
    supervise = options.alignment_weight > 0 and bool(options.aligned_heads) and batch.char_windows is not None
    drawn = None
    if options.drawn_inputs > 0:
        device = batch.target.device
        chosen = torch.rand(batch.target.shape[0], generator=generator, device=device) < options.drawn_inputs
        drawn = own_draws(model, batch, chosen, options.drawn_nfe, generator) if chosen.any() else None
    forced = teacher_force(model, batch, {layer for layer, _ in options.aligned_heads} if supervise else set(),
                           options.lm_input_noise, generator, drawn)
    n = options.diffusion_samples
    x0, cond = (a.repeat_interleave(n, dim=0) for a in (forced.x0, forced.cond))
    noise = DiffusionNoise.draw(x0, forced.history, model.config.diffusion.cond_dropout, options.history_noise,
                                generator)
    diffusion = velocity_loss(model, x0, cond, forced.history, noise)
    losses = {"loss": diffusion + options.stop_weight * forced.stop_loss, "diffusion": diffusion,
              "stop": forced.stop_loss}
    if forced.advance is not None:
        losses["advance"] = F.cross_entropy(forced.advance_logits, forced.advance)
        losses["loss"] = losses["loss"] + options.advance_weight * losses["advance"]
    if supervise:
        losses["alignment"] = alignment_loss(forced.probs, options.aligned_heads, forced.rows, batch.char_windows)
        losses["loss"] = losses["loss"] + options.alignment_weight * losses["alignment"]
    return losses


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
    gradient_hook: Callable[[], None] | None = None,
    **kwargs,
) -> dict[str, float]:
    """One optimisation step of any of the losses above; returns the loss terms as floats.
    `gradient_hook` runs between backward and clipping (data-parallel workers average their
    gradients there)."""
    losses = loss_fn(*args, **kwargs)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if gradient_hook is not None:
        gradient_hook()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}
