"""Text frontend: text -> token ids, with no dependency beyond the standard library.

Characters here; words as phonemes from a pronouncing lexicon in `lexicon.py`. Neither needs
more than this package on a robot (no espeak-ng system library). A character model must learn
English spelling from its corpus; a lexicon model reads how the words it lists sound, and
spells only the rest.

`normalize` is the one normaliser of the kit: the training corpus speaks and aligns exactly
the text it returns, so what a model reads at run time is what it read in training.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from ditarkit.runtime.config import TextConfig
from ditarkit.runtime.contract import TextSpec

if TYPE_CHECKING:
    from ditarkit.runtime.tokenizer import TokenizerFrontend

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}
_LARGEST_SPELLED = 10**9  # longer digit strings (serial numbers, phone numbers) are read digit by digit

_CHARACTERS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "`": "'", "\u201c": " ", "\u201d": " ", '"': " ",
    "\u2013": "-", "\u2014": " -- ", "\u2026": "...", "(": " , ", ")": " , ", "[": " ", "]": " ",
})
_ABBREVIATIONS = {
    "Mr.": "mister", "Mrs.": "missus", "Ms.": "miz", "Dr.": "doctor", "St.": "saint", "Jr.": "junior",
    "Sr.": "senior", "Prof.": "professor", "Gen.": "general", "Capt.": "captain", "Lt.": "lieutenant",
    "Col.": "colonel", "Sgt.": "sergeant", "Rev.": "reverend", "Mt.": "mount", "vs.": "versus",
    "etc.": "etcetera", "e.g.": "for example", "i.e.": "that is", "a.m.": "a m", "p.m.": "p m",
    "No.": "number",
}
_ABBREVIATION = re.compile(r"(?<![A-Za-z])(" + "|".join(
    re.escape(k) for k in sorted(_ABBREVIATIONS, key=len, reverse=True)) + ")")
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at ", "=": " equals ", "#": " number ",
            "/": " slash "}


class TextError(ValueError):
    """The text has nothing the model can speak."""


def spell_number(n: int) -> str:
    """English words for 0 <= n < 10**9; 1100-1999 and 2010-2099 are read as years."""
    if not 0 <= n < _LARGEST_SPELLED:
        raise ValueError(f"{n} is outside 0..{_LARGEST_SPELLED - 1}")
    if 1100 <= n <= 1999 or 2010 <= n <= 2099:
        high, low = divmod(n, 100)
        return f"{spell_number(high)} " + ("hundred" if low == 0 else ("oh " if low < 10 else "") + spell_number(low))
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {spell_number(rest)}" if rest else "")
    for size, word in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            high, rest = divmod(n, size)
            joiner = " and " if 0 < rest < 100 else " "
            return f"{spell_number(high)} {word}" + (f"{joiner}{spell_number(rest)}" if rest else "")
    raise AssertionError(n)


def spell_ordinal(n: int) -> str:
    *words, last = spell_number(n).split()
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*words, last])


def _spell_digits(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _spell_integer(digits: str) -> str:
    if len(digits) > 1 and digits.startswith("0") or int(digits) >= _LARGEST_SPELLED:
        return _spell_digits(digits)  # "007", a serial number: read as digits
    return spell_number(int(digits))


def _spell_numbers(text: str) -> str:
    text = re.sub(r"\$(\d[\d,]*(?:\.\d+)?)", r"\1 dollars", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 12,000 -> 12000
    text = re.sub(r"(\d+)(?:st|nd|rd|th)\b", lambda m: f" {spell_ordinal(int(m.group(1)))} "
                  if int(m.group(1)) < _LARGEST_SPELLED else m.group(0), text)
    text = re.sub(r"(\d+)\.(\d+)", lambda m: f" {_spell_integer(m.group(1))} point {_spell_digits(m.group(2))} ",
                  text)
    return re.sub(r"\d+", lambda m: f" {_spell_integer(m.group(0))} ", text)


def expand_abbreviations(text: str) -> str:
    """"Mr." -> "mister": before anything splits text at full stops."""
    return _ABBREVIATION.sub(lambda m: f" {_ABBREVIATIONS[m.group(0)]} ", text)


def normalize(text: str) -> str:
    """Lower-case ASCII as it is spoken: numbers, ordinals, years, currency, common
    abbreviations and symbols spelled out; dashes, brackets, ";" and ":" become pauses (commas);
    in-word hyphens become spaces; whitespace collapsed. Idempotent."""
    text = unicodedata.normalize("NFKC", text).translate(_CHARACTERS)
    text = expand_abbreviations(text)
    text = _spell_numbers(text)
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"\.{2,}|\s-{2,}\s|\s-\s|[;:]", " , ", text)  # ellipses, dashes, ; and : are pauses
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,?!;:])", r"\1", text)  # punctuation sticks to its word, as it is spoken
    text = re.sub(r"[.,?!;:]{2,}", _strongest_mark, text)  # ", ." -> ".", "there. (emoji)!" -> "there."
    return text.strip(" ,")


def _strongest_mark(run: re.Match) -> str:
    """One mark for a run of them: its first sentence end, else its last pause, so a sentence
    boundary survives a symbol that normalised to nothing between two marks."""
    marks = run.group(0)
    return next((c for c in marks if c in ".?!"), marks[-1])


class TextFrontend:
    """Maps text to `[BOS] symbols... [EOS]` ids for the configured symbol set (a model's
    TextConfig in training, a bundle's TextSpec at run time)."""

    def __init__(self, config: TextConfig | TextSpec) -> None:
        self.config = config if isinstance(config, TextSpec) else config.spec()
        self._ids = {s: i + self.config.first_symbol_id for i, s in enumerate(self.config.symbols)}

    def readable(self, text: str) -> str:
        """What the model reads: the normalised text, keeping only the model's symbols.
        Character i of it is token i + 1 of `encode` (after BOS)."""
        return "".join(c for c in normalize(text) if c in self._ids)

    def sentences(self, text: str) -> list[str]:
        """The pieces one generation each speaks (normalised, split at sentence ends)."""
        return split_sentences(text)

    def sources(self, text: str) -> list[tuple[int, int]]:
        """For each unit `encode` makes of the text (BOS and EOS aside), the first and last
        character of `readable(text)` it reads: here each character is its own unit."""
        return [(i, i) for i in range(len(self.readable(text)))]

    def encode(self, text: str, *, prompt_text: str = "") -> list[int]:
        """`[BOS] units [EOS]` of the text, preceded by `prompt_text`'s units where given
        (a reference's transcript, read as the start of the same text)."""
        clean = self.readable(prompt_text + " " + text) if prompt_text else self.readable(text)
        if not any(c.isalnum() for c in clean):
            raise TextError(f"no speakable characters in text {text[:40]!r}")
        ids = self._unit_ids(clean)
        if len(ids) + 2 > self.config.max_tokens:
            raise TextError(
                f"text is {len(ids)} symbols, over the model's {self.config.max_tokens - 2}; "
                "split it into sentences"
            )
        return [self.config.bos, *ids, self.config.eos]

    def _unit_ids(self, clean: str) -> list[int]:
        return [self._ids[c] for c in clean]


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Normalise, then split at sentence ends and, where a sentence is still longer than
    `max_chars`, at commas or spaces. Lengths are measured on the normalised text, the text
    the model reads: "1,234,567" is 3 characters written and 50 spoken."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(normalize(text)):
        while len(sentence) > max_chars:
            cut = sentence.rfind(",", 0, max_chars)
            cut = cut if cut > 0 else sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[: cut + 1].strip())
            sentence = sentence[cut + 1 :]
        if sentence.strip():
            pieces.append(sentence.strip())
    return pieces


def text_frontend(spec: TextSpec, bundle: Path | None) -> TextFrontend | TokenizerFrontend:
    """The frontend a bundle's model reads with: characters, or the lexicon or tokenizer file
    the bundle carries (checked against its checksum in the manifest)."""
    if spec.frontend == "chars":
        return TextFrontend(spec)
    if spec.frontend == "lexicon":
        from ditarkit.runtime.lexicon import PACKAGED_LEXICON_DIR, LexiconFrontend

        # without a bundle (the PyTorch reference, training): the kit's copy, by the same checksum
        return LexiconFrontend.from_spec(spec, PACKAGED_LEXICON_DIR if bundle is None else bundle)
    if bundle is None:
        raise TextError("this model reads with a tokenizer file, and no bundle folder holds one")
    from ditarkit.runtime.tokenizer import TokenizerFrontend

    return TokenizerFrontend.from_spec(spec, bundle)


def model_frontend(config: TextConfig) -> TextFrontend:
    """The frontend a kit model reads with, from its config (training, the reference): a
    lexicon it names is the kit's packaged copy, checked against the config's checksum."""
    return text_frontend(config.spec(), None)
