"""Which character of the text is spoken when: piper's phoneme durations mapped onto the
characters the model reads, and those spans onto the model's patches.

Piper (with `include_alignments`) gives each phoneme's exact sample count as it
synthesises. Its phonemizer keeps word boundaries (a " " phoneme) and punctuation (",", "?"
...), so the words of the text and of the phoneme stream correspond in order, except that
espeak runs some function words together ("was the" -> one word "wʌzðə") and may split one.
The words are matched by a small dynamic programme (groups of 1-3 text words to one phoneme
word, or one text word to two, scored by how closely the text words phonemized one by one
spell the phoneme word); within a
group, the letters share its phoneme span evenly (spelling does not say which letter makes
which sound, and a patch is 100 ms, longer than most letters). A text that cannot be matched
is not aligned (the caller leaves it out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np

PUNCTUATION = ".,?!;:"
_BOUNDARY_PHONEMES = {"^", "$", "_"}


@dataclass(frozen=True)
class PhonemeSpan:
    phoneme: str
    start: int  # samples, in the concatenated audio
    end: int


@dataclass(frozen=True)
class SpokenWord:
    core: tuple[int, int]  # the word's sounds
    punctuation: tuple[int, int]  # the pause its trailing punctuation makes (may be empty)
    sounds: str = ""  # its phonemes, stress and length marks left out


STRESS_MARKS = "\u02c8\u02cc\u02d0"  # primary/secondary stress and length: not sounds

# What a group of the matcher costs beyond its phoneme mismatches: (text words, phoneme words).
# espeak runs an unstressed function word into the word before it ("was the", "than a"), so a
# merge whose last word is the shortest is the cheaper kind.
MISMATCH_COST = 0.5  # per phoneme in one spelling and not the other (weak forms: "a" alone "eI", said "@")
MERGE_COST = {True: 0.3, False: 0.8}  # keyed by "the last word is the shortest"
SPLIT_COST = 0.5  # one text word, two phoneme words
MAX_MISMATCH_SHARE = 0.4  # more of the phonemes than this differ: the text is not what was spoken


def bare_phonemes(said: str) -> str:
    """A phonemizer's word with stress and length marks, punctuation and spaces left out: the
    spelling the matcher compares."""
    return "".join(c for c in said if c not in STRESS_MARKS + PUNCTUATION + " ")


class AlignmentError(ValueError):
    """The text and the phonemes do not correspond word for word."""


def phoneme_spans(chunks: Sequence[Sequence[tuple[str, int]]], gap: int) -> list[list[PhonemeSpan]]:
    """Per chunk (piper speaks one chunk per sentence), the (phoneme, samples) list turned
    into absolute spans; chunks are joined with `gap` samples of silence between them."""
    out, cursor = [], 0
    for index, chunk in enumerate(chunks):
        if index:
            cursor += gap
        spans = []
        for phoneme, count in chunk:
            spans.append(PhonemeSpan(phoneme, cursor, cursor + int(count)))
            cursor += int(count)
        out.append(spans)
    return out


def spoken_words(chunks: list[list[PhonemeSpan]]) -> list[SpokenWord]:
    """Words of the phoneme stream: runs between " " phonemes, each split into its sounds and
    its trailing punctuation."""
    words = []
    for chunk in chunks:
        current: list[PhonemeSpan] = []
        for span in [*chunk, PhonemeSpan(" ", chunk[-1].end, chunk[-1].end)] if chunk else []:
            if span.phoneme == " ":
                if current:
                    words.append(_word(current))
                current = []
            elif span.phoneme not in _BOUNDARY_PHONEMES:
                current.append(span)
    return words


def _word(spans: list[PhonemeSpan]) -> SpokenWord:
    sounds = [s for s in spans if s.phoneme not in PUNCTUATION]
    marks = [s for s in spans if s.phoneme in PUNCTUATION]
    if not sounds:
        raise AlignmentError("a phoneme word with punctuation only")
    core = (sounds[0].start, sounds[-1].end)
    punctuation = (marks[0].start, marks[-1].end) if marks else (core[1], core[1])
    return SpokenWord(core, punctuation, "".join(s.phoneme for s in sounds if s.phoneme not in STRESS_MARKS))


def _group_cost(written: list[str], spoken: list[str]) -> tuple[float, int]:
    a, b = "".join(written), "".join(spoken)
    matched = sum(block.size for block in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    mismatches = len(a) + len(b) - 2 * matched
    if len(written) > 1:
        penalty = MERGE_COST[len(written[-1]) == min(len(w) for w in written)]
    else:
        penalty = SPLIT_COST if len(spoken) > 1 else 0.0
    return MISMATCH_COST * mismatches + penalty, mismatches


def match_words(written: list[str], spoken: list[str]) -> list[tuple[int, int]]:
    """The grouping of text words (as phonemized one by one) onto spoken phoneme words that
    costs least: (text words, phoneme words) per group, in order."""
    n, m = len(written), len(spoken)
    best = np.full((n + 1, m + 1), np.inf)
    choice: dict[tuple[int, int], tuple[int, int, int]] = {}
    best[0, 0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            if not np.isfinite(best[i, j]):
                continue
            for a, b in ((1, 1), (2, 1), (3, 1), (1, 2)):
                if i + a <= n and j + b <= m:
                    cost, mismatches = _group_cost(written[i : i + a], spoken[j : j + b])
                    if best[i, j] + cost < best[i + a, j + b]:
                        best[i + a, j + b] = best[i, j] + cost
                        choice[(i + a, j + b)] = (a, b, mismatches)
    if not np.isfinite(best[n, m]):
        raise AlignmentError(f"{n} words in the text cannot be matched to {m} in the phonemes")
    groups, at, mismatched = [], (n, m), 0
    while at != (0, 0):
        a, b, mismatches = choice[at]
        groups.append((a, b))
        mismatched += mismatches
        at = (at[0] - a, at[1] - b)
    if mismatched > MAX_MISMATCH_SHARE * (len("".join(written)) + len("".join(spoken))):
        raise AlignmentError(f"the text and the phonemes differ in {mismatched} phonemes: not what was spoken")
    return groups[::-1]


def even_spans(span: tuple[int, int], count: int) -> np.ndarray:
    """`span` split into `count` consecutive [start, end) spans of (nearly) equal length."""
    edges = np.linspace(span[0], span[1], count + 1).round().astype(np.int64)
    return np.stack([edges[:-1], edges[1:]], axis=1)


def character_spans(text: str, words: list[SpokenWord], phonemize: Callable[[str], str]) -> np.ndarray:
    """(len(text), 2) int64 [start, end) samples of every character of `text` (the model's
    readable text: words separated by single spaces, punctuation attached to its word).
    `phonemize(word)` gives a word's phonemes as the engine says it alone, marks left out."""
    text_words = text.split(" ")
    if any(not w.rstrip(PUNCTUATION) for w in text_words):
        raise AlignmentError(f"a word of {text!r} has no letters")
    groups = match_words([phonemize(w.rstrip(PUNCTUATION)) for w in text_words], [w.sounds for w in words])
    spans = np.zeros((len(text), 2), np.int64)
    position, i, j = 0, 0, 0
    for a, b in groups:
        written = " ".join(text_words[i : i + a])
        first, last = words[j], words[j + b - 1]
        core = written.rstrip(PUNCTUATION)
        marks = written[len(core) :]
        spans[position : position + len(core)] = even_spans((first.core[0], last.core[1]), len(core))
        position += len(core)
        if marks:
            spans[position : position + len(marks)] = even_spans(last.punctuation, len(marks))
            position += len(marks)
        i, j = i + a, j + b
        if i < len(text_words):  # the space: from this group's end to the next word's start
            spans[position] = (max(last.core[1], last.punctuation[1]), words[j].core[0])
            position += 1
    return spans


def rescale_spans(spans: np.ndarray, source_rate: int, target_rate: int, offset: int) -> np.ndarray:
    """Spans in `source_rate` samples -> `target_rate` samples, shifted by `offset` (the
    trim: output sample = resampled sample + offset)."""
    return (spans * (target_rate / source_rate)).round().astype(np.int64) + offset


def patch_character_windows(spans: np.ndarray, patches: int, patch_samples: int) -> np.ndarray:
    """(patches, 2) int64: the first and last character (0-based in the readable text)
    spoken during each patch. A patch in the leading silence belongs to the first
    character, one in the trailing silence to the last; a patch between two characters
    (a pause no character covers) to the one before and the one after."""
    starts, ends = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0] + 1)
    windows = np.zeros((patches, 2), np.int64)
    for j in range(patches):
        lo, hi = j * patch_samples, (j + 1) * patch_samples
        overlapping = np.flatnonzero((starts < hi) & (ends > lo))
        if overlapping.size:
            windows[j] = (overlapping[0], overlapping[-1])
        else:
            after = int(np.searchsorted(starts, lo))
            windows[j] = (max(after - 1, 0), min(after, len(spans) - 1))
    return windows
