"""Alignment metrics: does the LM read the text, and does LocDiT listen to the LM?

Measured teacher-forced on the corpus probe (held-out sentences in the base voice at three
speaking rates, with piper's alignment) under one fixed draw of noise, so that two
measurements differ only by the model:

- loss gaps: the diffusion loss with each utterance's text swapped for another's, and with
  the LM output zeroed, relative to the right text (a model that ignores the text scores 0);
  and with the model's own draws of the patches where the LM reads them and in LocDiT's
  history (at the sampler's defaults): what reading its own output costs, the exposure bias
  that free-running generation compounds (0 for a model its own errors do not move);
- text mass per head: the attention from speech positions on the characters (BOS and EOS
  left out: BOS is an attention sink that would make every head look like a reader);
- aligned-head error: how many characters a head's most-attended character lies outside the
  characters actually spoken in the patch, per speaking rate. A head that keeps a fixed pace
  drifts at 0.7 and 1.5 however well it fits 1.0;
- with a text cursor: the advance head's accuracy (teacher-forced), and the cursor error when
  the cursor follows the model's own advances over the real audio, patch by patch as the
  runtime moves it: a cursor that keeps a fixed pace drifts at 0.7 and 1.5 the same way.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ditarkit.reference.losses import (
    DiffusionNoise,
    SpeechBatch,
    TeacherForced,
    own_draws,
    teacher_force,
    velocity_loss,
)
from ditarkit.reference.model import DiTAR
from ditarkit.training.data import DiTARBatches, Utterance, collate

PROBE_SEED = 1234  # the probe's prompts and noise: fixed for the whole run


@dataclass
class Probe:
    batch: SpeechBatch
    swapped: SpeechBatch  # the same audio under other utterances' texts
    rates: list[float]  # per utterance
    text_chars: list[int]  # characters per utterance (BOS/EOS excluded)
    texts: list[str]  # what each utterance says


def build_probe(probe: list[Utterance], batches: DiTARBatches, device: str) -> Probe:
    """Each probe utterance with a prompt from a training utterance of its voice."""
    rng = random.Random(PROBE_SEED)
    frontend = batches.frontend
    p = batches.p
    texts, prompts, targets, windows = [], [], [], []
    for item in probe:
        frames = batches.latents[item.id]
        target = frames[: len(frames) // p * p]
        texts.append(frontend.encode(item.text))
        prompts.append(batches.prompt_for(item, rng))
        targets.append(target)
        windows.append(item.char_windows(len(target) // p, batches.patch_samples))
    batch = collate(batches.cfg, texts, prompts, targets, windows, device)
    # swap texts between different sentences of the same rate group: shift by one sentence
    order = sorted(range(len(probe)), key=lambda i: (probe[i].rate, probe[i].text))
    shifted = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    # the windows, where the model has a cursor, are the audio's, clipped to the other text
    swapped_texts = [texts[shifted[i]] for i in range(len(texts))]
    swapped_windows = [np.minimum(w, len(t) - 3) for w, t in zip(windows, swapped_texts)]
    swapped = collate(batches.cfg, swapped_texts, prompts, targets, swapped_windows, device)
    return Probe(batch, swapped, [u.rate for u in probe], [len(t) - 2 for t in texts], [u.text for u in probe])


def clock_baseline(train: list[Utterance], probe: Probe, patch_samples: int) -> dict[str, float]:
    """What a head that keeps a fixed pace scores: character j * c at patch j, with c the
    characters per patch of the training corpus. A reader must beat it at every rate."""
    chars = sum(len(u.chars) for u in train if u.chars is not None)
    patches = sum(int(u.chars[-1, 1]) / patch_samples for u in train if u.chars is not None)
    pace = chars / max(patches, 1e-9)
    windows = probe.batch.char_windows.cpu().numpy()
    errors: dict[float, list[float]] = defaultdict(list)
    for b, (rate, n_chars) in enumerate(zip(probe.rates, probe.text_chars)):
        n = int(probe.batch.target_patches[b])
        looked = np.minimum(np.round(np.arange(n) * pace), n_chars - 1)
        lo, hi = windows[b, :n, 0], windows[b, :n, 1]
        errors[rate].append(float(np.mean(np.maximum(lo - looked, 0) + np.maximum(looked - hi, 0))))
    per_rate = {f"clock_error_r{r:g}": float(np.mean(e)) for r, e in sorted(errors.items())}
    return {"clock_chars_per_patch": pace, **per_rate}


def _noise_for(x0: Tensor, history: Tensor) -> DiffusionNoise:
    generator = torch.Generator(device=x0.device).manual_seed(PROBE_SEED)
    return DiffusionNoise.draw(x0, history, cond_dropout=0.0, history_noise=0.0, generator=generator)


@contextmanager
def evaluating(model: DiTAR) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's mode as it was after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def probe_loss(model: DiTAR, probe: Probe) -> float:
    """The probe's teacher-forced diffusion loss with its right text, alone."""
    with evaluating(model):
        forced = teacher_force(model, probe.batch)
        noise = _noise_for(forced.x0, forced.history)
        return float(velocity_loss(model, forced.x0, forced.cond, forced.history, noise))


def alignment_metrics(model: DiTAR, probe: Probe, aligned_heads: tuple[tuple[int, int], ...]) -> dict[str, float]:
    with evaluating(model):
        layers = set(range(model.config.lm.layers))
        forced = teacher_force(model, probe.batch, layers)
        noise = _noise_for(forced.x0, forced.history)
        right = float(velocity_loss(model, forced.x0, forced.cond, forced.history, noise))
        zeroed = float(velocity_loss(model, forced.x0, torch.zeros_like(forced.cond), forced.history, noise))
        swapped_cond = teacher_force(model, probe.swapped).cond
        swapped = float(velocity_loss(model, forced.x0, swapped_cond, forced.history, noise))
        out = {"probe_diffusion": right, "gap_swapped_text_pct": 100 * (swapped / right - 1),
               "gap_zeroed_lm_pct": 100 * (zeroed / right - 1)}
        out.update(_head_metrics(forced.probs, forced.rows, probe, aligned_heads))
        if forced.advance is not None:
            out.update(_cursor_metrics(model, probe, forced.advance_logits.argmax(-1) == forced.advance))
        if model.lm.advance_embedding is not None:
            out.update(_told_advance_gaps(model, forced, right, noise))
        out.update(_drawn_input_metrics(model, probe, right, noise))
    return out


def _told_advance_gaps(model: DiTAR, forced: TeacherForced, right: float, noise: DiffusionNoise) -> dict[str, float]:
    """With `cursor.advance_to_locdit`: the loss gap when LocDiT is told another patch's true
    advance (does it use what it is told?) and when told the advance head's own argmax (what
    the runtime tells it: the cost of the head's mistakes)."""
    table = model.lm.advance_embedding
    outputs = forced.cond - table(forced.advance)
    told = {"wrong": forced.advance.roll(1), "own": forced.advance_logits.argmax(-1)}
    return {f"gap_{name}_advance_pct": 100 * (float(velocity_loss(
                model, forced.x0, outputs + table(advance), forced.history, noise)) / right - 1)
            for name, advance in told.items()}


def _drawn_input_metrics(model: DiTAR, probe: Probe, right: float, noise: DiffusionNoise) -> dict[str, float]:
    """The loss gap, and the advance head's accuracy, when every utterance's patches are the
    model's own draws (from the teacher-forced condition and true history) where the LM reads
    them and in LocDiT's history; the targets stay the true patches."""
    every = torch.ones(probe.batch.target.shape[0], dtype=torch.bool)
    generator = torch.Generator(device=probe.batch.target.device).manual_seed(PROBE_SEED)
    drawn = own_draws(model, probe.batch, every, model.config.diffusion.nfe, generator)
    own = teacher_force(model, probe.batch, drawn=drawn)
    loss = float(velocity_loss(model, own.x0, own.cond, own.history, noise))
    out = {"gap_drawn_inputs_pct": 100 * (loss / right - 1)}
    if own.advance is not None:
        out["advance_acc_drawn"] = float((own.advance_logits.argmax(-1) == own.advance).float().mean())
    return out


def _head_metrics(probs: list[Tensor], rows: list[tuple[int, int, int]], probe: Probe,
                  aligned_heads: tuple[tuple[int, int], ...]) -> dict[str, float]:
    windows = probe.batch.char_windows
    heads = probs[0].shape[1]
    mass = np.zeros((len(probs), heads))
    errors: dict[float, list[np.ndarray]] = defaultdict(list)  # rate -> (L, H) mean errors per utterance
    for (b, first, n), rate, chars in zip(rows, probe.rates, probe.text_chars):
        stacked = torch.stack([p[b, :, first : first + n, 1 : 1 + chars] for p in probs])  # (L, H, n, chars)
        mass += stacked.sum(-1).mean(-1).cpu().numpy() / len(rows)
        looked = stacked.argmax(-1).cpu().numpy()  # (L, H, n): 0-based character
        lo, hi = windows[b, :n, 0].cpu().numpy(), windows[b, :n, 1].cpu().numpy()
        miss = np.maximum(lo - looked, 0) + np.maximum(looked - hi, 0)
        errors[rate].append(miss.mean(-1))
    out: dict[str, float] = {"text_mass_max": float(mass.max()), "text_mass_mean": float(mass.mean()),
                             "heads_reading": int((mass > 0.1).sum())}
    per_rate = {rate: np.mean(e, axis=0) for rate, e in sorted(errors.items())}  # (L, H) each
    worst = np.max(np.stack(list(per_rate.values())), axis=0)  # a head's error at its worst rate
    best = np.unravel_index(int(worst.argmin()), worst.shape)
    out["best_head"] = f"{best[0]}:{best[1]}"
    for rate, err in per_rate.items():
        out[f"best_head_error_r{rate:g}"] = float(err[best])
        if aligned_heads:
            out[f"aligned_error_r{rate:g}"] = float(np.mean([err[layer, head] for layer, head in aligned_heads]))
    for layer, head in aligned_heads:
        out[f"mass_{layer}:{head}"] = float(mass[layer, head])
    return out


def _cursor_metrics(model: DiTAR, probe: Probe, correct: Tensor) -> dict[str, float]:
    """Advance accuracy (teacher-forced) and the free cursor's error in characters, per rate."""
    accuracy: dict[float, list[float]] = defaultdict(list)
    errors: dict[float, list[float]] = defaultdict(list)
    windows = probe.batch.char_windows.cpu().numpy()
    offset = 0
    for b, rate in enumerate(probe.rates):
        n = int(probe.batch.target_patches[b])
        accuracy[rate].append(float(correct[offset : offset + n].float().mean()))
        offset += n
        cursor = follow_cursor(model, probe.batch, b)
        lo, hi = windows[b, :n, 0], windows[b, :n, 1]
        errors[rate].append(float(np.mean(np.maximum(lo - cursor, 0) + np.maximum(cursor - hi, 0))))
    out = {f"advance_acc_r{r:g}": float(np.mean(a)) for r, a in sorted(accuracy.items())}
    out.update({f"cursor_error_r{r:g}": float(np.mean(e)) for r, e in sorted(errors.items())})
    return out


def follow_cursor(model: DiTAR, batch: SpeechBatch, b: int) -> np.ndarray:
    """(n,) the character the cursor is on at each target patch of utterance b, when it moves
    by the model's own advances (argmax, as the runtime moves it) while the LM reads the real
    audio: one LM step per patch through the KV cache."""
    cfg = model.config
    p, n = cfg.patch_size, int(batch.target_patches[b])
    ids = batch.text_ids[b, : int(batch.text_lengths[b])]
    chars = len(ids) - 2
    rows = model.text_cursor(ids)  # (T, D)
    n_prompt = int(batch.prompt_patches[b])
    prompt = model.aggregator(batch.prompt[b, : n_prompt * p].reshape(n_prompt, p, -1))
    target = model.aggregator(batch.target[b, : n * p].reshape(n, p, -1))
    start = model.text_embedding.weight[cfg.text.SPEECH_START][None]
    steps = torch.cat([model.text_embedding(ids), prompt, start + rows[1][None]])[None]
    keys = values = None
    position = torch.zeros(1, dtype=torch.int64, device=ids.device)
    cursor, path = 0, []
    for j in range(n):
        hidden, _, new_keys, new_values = model.lm(steps, keys, values, position)
        keys = new_keys if keys is None else torch.cat([keys, new_keys], dim=3)
        values = new_values if values is None else torch.cat([values, new_values], dim=3)
        position = position + steps.shape[1]
        path.append(cursor)
        cursor = min(cursor + int(model.lm.advance_head(hidden[0, -1]).argmax()), chars - 1)
        steps = (target[j] + rows[cursor + 1])[None, None]
    return np.asarray(path)
