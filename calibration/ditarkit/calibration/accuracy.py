"""What quantization costs: per graph on held-out activations, and end to end on audio.

Per graph, each held-out feed runs through the fp32 and the quantized graph; the report
gives the worst error relative to max(1, |fp32 output|) and the median signal-to-error
ratio in dB. End to end, the same sentences are spoken by each bundle with the same seed
and the same number of patches, and the log-mel spectrograms are compared (mean absolute
difference in dB). Sampling makes any two runs differ once their paths part, so the fp32
bundle with another seed is measured too: the distance that means "a different take".
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditarkit.calibration.record import CalibrationError, Log, Recording, reference_voices
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.sampler import exact_length
from ditarkit.runtime.synthesizer import Synthesizer

MEL_BANDS = 80
# The window and hop at 24 kHz; at other rates they scale to about the same duration (a power
# of two: 512 at 16 kHz, 2048 at 48 kHz), the bands spanning 0 Hz to that rate's Nyquist.
MEL_FFT = 1024
MEL_HOP = 256
MEL_RATE = 24_000
MEL_FLOOR = 1e-5  # power floor before the log: silence is -50 dB, not -inf
OTHER_SEED = "fp32, other seed"
OTHER_SEED_OFFSET = 1000  # seed shift of that take: far from the seeds of the other texts


@dataclass(frozen=True)
class GraphError:
    graph: str
    samples: int
    worst_relative: float  # max |q - f| / max(1, max |f|), over outputs and samples
    median_snr_db: float  # 10 log10(sum f^2 / sum (q - f)^2), median over samples

    def to_dict(self) -> dict[str, float | int | str]:
        return {"graph": self.graph, "samples": self.samples, "worst_relative": self.worst_relative,
                "median_snr_db": self.median_snr_db}


def graph_errors(reference: OrtRunner, candidate: OrtRunner, heldout: Recording,
                 graphs: Sequence[str]) -> list[GraphError]:
    """Each graph's outputs from `candidate` against `reference` on the same recorded feeds."""
    errors = []
    for graph in graphs:
        samples = heldout.feeds[graph]
        worst, snrs = 0.0, []
        for feeds in samples:
            want, got = reference.run(graph, feeds), candidate.run(graph, feeds)
            for w, g in zip(want, got):
                worst = max(worst, float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max()))))
            snrs.append(_snr_db(np.concatenate([w.ravel() for w in want]), np.concatenate([g.ravel() for g in got])))
        errors.append(GraphError(graph, len(samples), worst, statistics.median(snrs)))
    return errors


def _snr_db(want: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((got.astype(np.float64) - want) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(want.astype(np.float64) ** 2)) / noise)


def mel_window(rate: int) -> tuple[int, int]:
    """(FFT size, hop) at `rate`: MEL_FFT and MEL_HOP at MEL_RATE, scaled to the rate."""
    fft = 2 ** max(6, round(np.log2(MEL_FFT * rate / MEL_RATE)))
    return fft, fft * MEL_HOP // MEL_FFT


def log_mel(audio: np.ndarray, rate: int) -> np.ndarray:
    """(frames, MEL_BANDS) log-mel power in dB, Hann window, HTK mel scale."""
    fft, hop = mel_window(rate)
    padded = np.pad(audio.astype(np.float64), (fft // 2, fft // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, fft)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(fft), axis=-1)) ** 2
    return 10.0 * np.log10(np.maximum(power @ mel_filters(rate).T, MEL_FLOOR))


def mel_filters(rate: int) -> np.ndarray:
    """(MEL_BANDS, FFT // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    edges_hz = 700.0 * (10.0 ** (np.linspace(0.0, to_mel(rate / 2), MEL_BANDS + 2) / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(mel_window(rate)[0], 1.0 / rate)
    low, centre, high = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins - low) / (centre - low)
    falling = (high - bins) / (high - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def mel_distance_db(want: np.ndarray, got: np.ndarray, rate: int) -> float:
    """Mean absolute log-mel difference in dB over equally long signals."""
    return float(np.mean(np.abs(log_mel(want, rate) - log_mel(got, rate))))


def end_to_end(reference: Synthesizer, candidates: dict[str, Synthesizer], texts: Sequence[str],
               references: Sequence[str | Path], seed: int = 0, max_seconds: float | None = None,
               log: Log = lambda _m: None, reference_texts: Sequence[str] | None = None) -> dict[str, float]:
    """Mean log-mel distance (dB) to the reference bundle's audio for each candidate, plus the
    reference against itself with another seed (OTHER_SEED). Texts are single sentences;
    `reference_texts` are the references' transcripts, for models that read them. Audio is
    compared at the bundle's output rate."""
    takes = {OTHER_SEED: (reference, OTHER_SEED_OFFSET), **{name: (synth, 0) for name, synth in candidates.items()}}
    voices = {id(synth): reference_voices(synth, references, reference_texts) for synth, _ in takes.values()}
    distances: dict[str, list[float]] = {name: [] for name in takes}
    audio = reference.config.audio
    patch_samples = reference.config.patch_size * audio.output_hop_length  # generated samples per patch
    for index, text in enumerate(texts):
        pick = index % len(references)
        options = reference.options(seed=seed + index, max_seconds=max_seconds)
        want = reference.synthesize(text, voices[id(reference)][pick], options)
        patches = round(len(want) / patch_samples)
        for name, (synth, offset) in takes.items():
            options = exact_length(synth.options(seed=seed + index + offset), patches, synth.config.patch_seconds)
            got = synth.synthesize(text, voices[id(synth)][pick], options)
            if len(got) != len(want):
                raise CalibrationError(f"{name} made {len(got)} samples for {text!r}, the reference {len(want)}: "
                                       "the comparison needs single-sentence texts")
            distances[name].append(mel_distance_db(want, got, audio.output_sample_rate))
        log(f"compared {index + 1}/{len(texts)}: {text[:50]}")
    return {name: statistics.mean(values) for name, values in distances.items()}
