"""Text frontend: text -> token ids, with no dependency beyond the standard library.

Characters, not phonemes: the frontend must run on a robot with nothing but this package
installed (no espeak-ng system library), and character models need no lexicon to drift
out of sync with the checkpoint. The cost, a model that must learn English spelling, is
paid once at training time.
"""

from __future__ import annotations

import re
import unicodedata

from ditarkit.runtime.config import TextConfig

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_REPLACEMENTS = {
    "\u2018": "'", "\u2019": "'", "\u201c": "", "\u201d": "", '"': "",
    "\u2013": "-", "\u2014": ", ", "&": " and ", "%": " percent", "+": " plus ",
}


class TextError(ValueError):
    """The text has nothing the model can speak."""


def normalize(text: str) -> str:
    """Lower-case ASCII with digits spelled out and whitespace collapsed."""
    for src, dst in _REPLACEMENTS.items():
        text = text.replace(src, dst)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.lower()
    text = re.sub(r"\d", lambda m: f" {_NUMBER_WORDS[int(m.group())]} ", text)
    return re.sub(r"\s+", " ", text).strip()


class TextFrontend:
    """Maps text to `[BOS] symbols... [EOS]` ids for the configured symbol set."""

    def __init__(self, config: TextConfig) -> None:
        self.config = config
        self._ids = {s: i + config.NUM_SPECIAL for i, s in enumerate(config.symbols)}

    def encode(self, text: str) -> list[int]:
        clean = normalize(text)
        ids = [self._ids[c] for c in clean if c in self._ids]
        if not any(c.isalnum() for c in clean if c in self._ids):
            raise TextError(f"no speakable characters in text {text[:40]!r}")
        if len(ids) + 2 > self.config.max_tokens:
            raise TextError(
                f"text is {len(ids)} symbols, over the model's {self.config.max_tokens - 2}; "
                "split it into sentences"
            )
        return [self.config.BOS, *ids, self.config.EOS]


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split long text at sentence ends, then at commas, so each piece fits the model."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        while len(sentence) > max_chars:
            cut = sentence.rfind(",", 0, max_chars)
            cut = cut if cut > 0 else sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[: cut + 1].strip())
            sentence = sentence[cut + 1 :]
        if sentence.strip():
            pieces.append(sentence.strip())
    return pieces
