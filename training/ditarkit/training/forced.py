"""Teacher-forced WER: can LocDiT render what the LM gives it? Every patch of a few probe
sentences is drawn by the model's own sampler from the true previous patches and the LM's
teacher-forced condition (true history, true text cursor), the patches are decoded and
Whisper transcribes them. No error can compound, so this moves long before a free-running
WER does, and the VAE round trip of the same sentences is its floor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ditarkit.reference.losses import teacher_force
from ditarkit.reference.model import DiTAR
from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.sampler import seeded_noise
from ditarkit.training.evaluate import word_error_rate
from ditarkit.training.metrics import Probe, evaluating

FORCED_RATE = 1.0  # the probe's speaking rate scored: the model's normal pace
FORCED_SEED = 4321  # the sampler's noise, fixed for the whole run so steps compare


def forced_sentences(probe: Probe, sentences: int) -> list[int]:
    """The probe rows scored: the first `sentences` spoken at FORCED_RATE."""
    return [i for i, rate in enumerate(probe.rates) if rate == FORCED_RATE][:sentences]


def _spans(probe_rows: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Each utterance's (start, count) in the teacher-forced patch order."""
    starts = np.cumsum([0] + [n for _, _, n in probe_rows])
    return [(int(s), n) for s, (_, _, n) in zip(starts, probe_rows)]


def forced_audio(model: DiTAR, probe: Probe, rows: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(drawn, true) waveforms of the given probe rows: every patch drawn with the model's
    sampler defaults from its true history and teacher-forced condition, and the VAE
    round trip of the true patches."""
    cfg = model.config
    with evaluating(model):
        forced = teacher_force(model, probe.batch)
        runner = TorchRunner(model)
        spec = runner.config.sampler
        spans = _spans(forced.rows)
        drawn, true = [], []
        for row in rows:
            start, count = spans[row]
            noise = seeded_noise(FORCED_SEED + row, cfg.patch_size, cfg.audio.latent_dim)
            cond, history = (t[start : start + count].float().cpu().numpy() for t in (forced.cond, forced.history))
            patches = [runner.draw_patch(cond[i], history[i], noise(i), spec.nfe, spec.cfg_scale, spec.temperature)
                       for i in range(count)]
            drawn.append(runner.decode_latents(np.concatenate(patches)))
            x0 = forced.x0[start : start + count].reshape(-1, cfg.audio.latent_dim)
            true.append(runner.decode_latents(x0.float().cpu().numpy()))
    return drawn, true


def forced_wer(model: DiTAR, probe: Probe, rows: list[int],
               transcribe: Callable[[np.ndarray, int], str]) -> dict[str, float]:
    """Teacher-forced WER and its floor, the VAE round trip, in percent."""
    drawn, true = forced_audio(model, probe, rows)
    rate = model.config.audio.sample_rate
    texts = [probe.texts[r] for r in rows]
    return {"forced_wer_pct": 100 * word_error_rate(texts, [transcribe(a, rate) for a in drawn]),
            "round_trip_wer_pct": 100 * word_error_rate(texts, [transcribe(a, rate) for a in true])}
