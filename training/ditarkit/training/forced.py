"""WER on a few probe sentences in their own (training) voices, three ways. Teacher-forced:
can LocDiT render what the LM gives it? Every patch is drawn by the model's own sampler from
the true previous patches and the LM's teacher-forced condition (true history, true text
cursor); no error can compound, so this moves long before a free-running WER does. It is
not a ceiling of free-running output: each drawn patch is followed by the true next one, not
by its own continuation, so its audio breaks at patch boundaries (seen in spectrograms), and
a model trained on its own draws can read better free-running. Free-running: the same
sentences and prompts, every patch from the model's own; its gap to the teacher-forced
figure is what compounding costs, apart from following an unseen voice.
The VAE round trip of the same sentences is the floor of both."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ditarkit.reference.losses import teacher_force
from ditarkit.reference.model import DiTAR
from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.sampler import GenerationOptions, generate_latents, seeded_noise
from ditarkit.training.metrics import Probe, evaluating
from ditarkit.training.scoring import word_error_rate

FORCED_RATE = 1.0  # the probe's speaking rate scored: the model's normal pace
FORCED_SEED = 4321  # the sampler's noise, fixed for the whole run so steps compare
FREE_LENGTH_CAP = 2.0  # free-running stops at this many times the true length: a model that never stops still ends


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


def free_audio(model: DiTAR, probe: Probe, rows: list[int]) -> list[np.ndarray]:
    """Waveforms of the given probe rows generated free-running, as the runtime generates:
    from the row's text and its prompt (a clip of its voice), the sampler's defaults and
    fixed noise."""
    cfg = model.config
    batch, p = probe.batch, cfg.patch_size
    audio = []
    with evaluating(model):
        runner = TorchRunner(model)
        for row in rows:
            ids = batch.text_ids[row, : int(batch.text_lengths[row])].tolist()
            prompt = batch.prompt[row, : int(batch.prompt_patches[row]) * p].float().cpu().numpy()
            seconds = FREE_LENGTH_CAP * int(batch.target_patches[row]) * cfg.patch_seconds
            options = GenerationOptions.from_config(runner.config, max_seconds=seconds)
            noise = seeded_noise(FORCED_SEED + row, p, cfg.audio.latent_dim)
            audio.append(runner.decode_latents(generate_latents(runner, ids, prompt, options, noise)))
    return audio


def probe_wer(model: DiTAR, probe: Probe, rows: list[int],
              transcribe: Callable[[np.ndarray, int], str]) -> dict[str, float]:
    """Teacher-forced and free-running WER of the rows, and their floor, the VAE round trip,
    in percent."""
    drawn, true = forced_audio(model, probe, rows)
    free = free_audio(model, probe, rows)
    rate = model.config.audio.sample_rate
    texts = [probe.texts[r] for r in rows]

    def wer(audio: list[np.ndarray]) -> float:
        return 100 * word_error_rate(texts, [transcribe(a, rate) for a in audio])

    return {"forced_wer_pct": wer(drawn), "free_probe_wer_pct": wer(free), "round_trip_wer_pct": wer(true)}
