"""Pronouncing-lexicon frontend: each word the lexicon lists is read as its phonemes (ARPAbet
with stress, CMUdict's first pronunciation), every other word letter by letter, spaces and
punctuation as they are. Standard library only, like the character frontend.

Why: a small model trained on a few hours of speech cannot learn English spelling from the
few thousand words it hears (rare and unseen words came out nearly all wrong, measured), while
a word's phonemes say how it sounds. The lexicon's data is CMUdict's (BSD-style licence, in
`lexicon/LICENSE` and in the file's own `;;;` header, so it travels with every copy); only the
data is used, never the GPL wrapper of the `cmudict` package. A bundle carries its own copy,
checked against the manifest's checksum, as a tokenizer is.

Each unit knows the characters of the readable text it came from (`sources`): training
turns the corpus's per-character alignment into per-unit spans with it, so a word's phonemes
share the word's span as its letters did.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

from ditarkit.runtime.contract import TextSpec
from ditarkit.runtime.text import TextError, TextFrontend

LEXICON_FILE = "cmudict.dict.gz"  # its name in the kit's package data and in a bundle
PACKAGED_LEXICON_DIR = Path(__file__).with_name("lexicon")

# CMUdict's phoneme symbols (its cmudict.symbols, in that sorted order): ARPAbet vowels with
# stress 0/1/2 or none, and consonants. A model's config holds the list it was trained with.
_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
_CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH", "T",
               "TH", "V", "W", "Y", "Z", "ZH")
PHONEMES = tuple(sorted([v + s for v in _VOWELS for s in ("", "0", "1", "2")] + list(_CONSONANTS)))

_WORD = re.compile(r"[a-z0-9']+")
_VOICELESS = frozenset({"P", "T", "K", "F", "TH"})
_SIBILANTS = frozenset({"S", "Z", "SH", "ZH", "CH", "JH"})

Lexicon = dict[str, tuple[str, ...]]


def read_lexicon(path: Path, sha256: str | None = None) -> Lexicon:
    """word -> phonemes from a gzip'd `word PH PH ...` file; refused in one line when it is
    missing, does not match `sha256`, or holds a phoneme outside PHONEMES."""
    if not path.is_file():
        raise TextError(f"no lexicon at {path}: the bundle is incomplete (export it again)")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise TextError(f"{path} does not match its checksum in the manifest (corrupt or edited)")
    try:
        lines = gzip.decompress(data).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise TextError(f"{path}: not a gzip'd UTF-8 lexicon ({err})") from None
    known, lexicon = frozenset(PHONEMES), {}
    for number, line in enumerate(lines, 1):
        if line.startswith(";;;") or not line.strip():  # CMUdict's comments: the notice that travels with the data
            continue
        word, *phonemes = line.split()
        if not phonemes or not known.issuperset(phonemes):
            raise TextError(f"{path}, line {number}: not `word PHONEME ...` in ARPAbet: {line[:60]!r}")
        lexicon.setdefault(word, tuple(phonemes))
    return lexicon


def _possessive(word: str, lexicon: Lexicon) -> tuple[str, ...] | None:
    """"zephyr's" from "zephyr": the suffix as English says it after the word's last sound."""
    stem = lexicon.get(word[:-2]) if word.endswith("'s") else None
    if stem is None:
        return None
    last = stem[-1]
    return stem + (("IH0", "Z") if last in _SIBILANTS else ("S",) if last in _VOICELESS else ("Z",))


class LexiconFrontend(TextFrontend):
    """`[BOS] units [EOS]`: the lexicon's phonemes for the words it knows, the character
    symbols (letters, digits, space, punctuation) for the rest. Normalisation, the readable
    text and sentence splitting are the character frontend's."""

    def __init__(self, spec: TextSpec, lexicon: Lexicon) -> None:
        super().__init__(spec)
        first = self.config.first_symbol_id + len(self.config.symbols)
        self._phoneme_ids = {p: first + i for i, p in enumerate(self.config.phonemes)}
        unknown = {p for phonemes in lexicon.values() for p in phonemes} - set(self._phoneme_ids)
        if unknown:
            raise TextError(f"the lexicon uses phonemes the model has no ids for: {sorted(unknown)[:5]}")
        self.lexicon = lexicon

    @classmethod
    def from_spec(cls, spec: TextSpec, folder: str | Path) -> LexiconFrontend:
        """From a text spec naming its lexicon file (and checksum) in `folder`."""
        return cls(spec, read_lexicon(Path(folder) / spec.lexicon_file, spec.lexicon_sha256 or None))

    def pronounce(self, word: str) -> tuple[str, ...] | None:
        """The word's phonemes, or None where the lexicon has no entry for it."""
        bare = word.strip("'")  # quotes around a word: 'zephyr's' is zephyr's
        return self.lexicon.get(word) or self.lexicon.get(bare) or _possessive(bare, self.lexicon)

    def units(self, text: str) -> list[tuple[str, int, int]]:
        """(unit, first character, last character) of the readable text, in reading order."""
        clean = self.readable(text)
        units, at = [], 0
        for match in _WORD.finditer(clean):
            units += [(c, i, i) for i, c in enumerate(clean[at : match.start()], at)]
            phonemes = self.pronounce(match.group())
            if phonemes is None:
                units += [(c, i, i) for i, c in enumerate(match.group(), match.start())]
            else:
                units += [(p, match.start(), match.end() - 1) for p in phonemes]
            at = match.end()
        return units + [(c, i, i) for i, c in enumerate(clean[at:], at)]

    def sources(self, text: str) -> list[tuple[int, int]]:
        return [(first, last) for _, first, last in self.units(text)]

    def _unit_ids(self, clean: str) -> list[int]:
        ids = self._phoneme_ids
        return [ids[unit] if unit in ids else self._ids[unit] for unit, _, _ in self.units(clean)]
