"""Reference audio in, generated audio out, without torch: soundfile reads and writes,
soxr resamples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ditarkit.runtime.fileio import atomic_write

MIN_REFERENCE_SECONDS = 1.0  # less than this carries too little of a voice to follow
SILENCE_DBFS = -50.0  # RMS below this (after trimming) is treated as silence
TRIM_FRAME_SECONDS = 0.02
TARGET_RMS_DBFS = -20.0  # references are brought to one loudness, as in training
PEAK_LIMIT = 0.95


class AudioError(ValueError):
    """Reference audio that cannot be used, with the reason."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the file's sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"reference audio not found: {path}")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot read reference audio {path}: {err}") from None
    return audio, rate


def to_mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32)


def dbfs(audio: np.ndarray) -> float:
    return 20 * np.log10(max(float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))), 1e-10))


def trim_silence(audio: np.ndarray, rate: int, threshold_dbfs: float = SILENCE_DBFS) -> np.ndarray:
    """Cut leading and trailing frames quieter than the threshold."""
    frame = max(1, int(TRIM_FRAME_SECONDS * rate))
    count = len(audio) // frame
    if count == 0:
        return audio[:0]
    energy = np.square(audio[: count * frame].reshape(count, frame), dtype=np.float64).mean(axis=1)
    loud = np.flatnonzero(10 * np.log10(energy + 1e-20) > threshold_dbfs)
    if loud.size == 0:
        return audio[:0]
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def normalize_loudness(audio: np.ndarray) -> np.ndarray:
    """RMS to TARGET_RMS_DBFS, then scaled down if a peak would pass PEAK_LIMIT."""
    gain = 10 ** ((TARGET_RMS_DBFS - dbfs(audio)) / 20)
    peak = float(np.abs(audio).max()) * gain
    if peak > PEAK_LIMIT:
        gain *= PEAK_LIMIT / peak
    return (audio * gain).astype(np.float32)


def prepare_reference(
    audio: np.ndarray, rate: int, target_rate: int, hop: int, max_seconds: float, source: str = "reference",
    fit: str = "trim", patch_size: int = 1, shorten: bool = True,
) -> np.ndarray:
    """Any rate and channel count -> mono at `target_rate`, trimmed, loudness-normalised, its
    last `max_seconds` at most, a whole number of hops long ("trim": cut from the start), or
    of patches with silence added at its start or end ("pad_start", "pad_end": VoxCPM's
    continuation prompt and reference clip). A longer reference loses its start, unless
    `shorten` is False (its transcript would no longer match): then it is refused. Raises
    AudioError if unusable."""
    if audio.size == 0:
        raise AudioError(f"{source} is empty")
    mono = to_mono(audio)
    if not np.isfinite(mono).all():
        raise AudioError(f"{source} contains NaN or infinite samples")
    # A DC offset is no sound. Removed before resampling, whose edge ringing would read as sound.
    mono = resample((mono - mono.mean(dtype=np.float64)).astype(np.float32), rate, target_rate)
    speech = trim_silence(mono, target_rate)
    if speech.size == 0 or dbfs(speech) < SILENCE_DBFS:
        raise AudioError(f"{source} is silent")
    seconds = len(speech) / target_rate
    if seconds < MIN_REFERENCE_SECONDS:
        raise AudioError(f"{source} has {seconds:.2f} s of sound; at least {MIN_REFERENCE_SECONDS:.1f} s is needed")
    unit = hop if fit == "trim" else hop * patch_size  # padding must not pass the longest prompt
    keep = int(max_seconds * target_rate) // unit * unit
    if len(speech) > keep and not shorten:
        raise AudioError(f"{source} has {seconds:.1f} s of sound; this model reads its transcript, so it is not "
                         f"cut: give at most {keep / target_rate:.1f} s")
    speech = speech[-keep:] if len(speech) > keep else speech  # the voice continues from the prompt's end
    if fit == "trim":
        return normalize_loudness(speech[len(speech) % hop :])  # whole hops, cut from the start like the rest
    short = -len(speech) % unit
    pad = (short, 0) if fit == "pad_start" else (0, short)
    return normalize_loudness(np.pad(speech, pad))


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV, written atomically."""
    return atomic_write(path, lambda tmp: sf.write(tmp, audio, rate, subtype="PCM_16", format="WAV"))
