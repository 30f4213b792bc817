"""Sentences to speak: Debian's `fortunes`, split, filtered to plain English, ordered for
coverage. Each kept sentence is stored as the runtime's normalised text (`normalize`), which
is what the voices speak, what the alignment maps, and what the model reads."""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditarkit.runtime.text import expand_abbreviations, normalize

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIP = {"ascii-art", "perl", "translate-me"}  # mostly pictures, code or non-English
MIN_WORDS = 3
MAX_WORDS = 25
MAX_WORD_LETTERS = 18
# The held-out sentences, fixed: every shipped voice was evaluated on them and trained on none.
# A plan drawn from the fortunes would change whenever the normaliser does, and could then train
# on the sentences an earlier voice was measured on.
HELDOUT_FILE = Path(__file__).with_name("heldout.txt")

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+(?=[\"'(\[\u201c]*[A-Z])")
_ATTRIBUTION = re.compile(r"^\s*(--|-\s|~~)")
_SPOKEN = re.compile(r"^[a-z' .,?!]+$")  # what the corpus keeps: no ; : or symbols left over
_ACRONYM = re.compile(r"\b[A-Z]*[A-Z][a-z]*[A-Z]")  # two capitals in a word: read per engine


class CorpusError(RuntimeError):
    """A missing tool or input; the message is one line that says how to fix it."""


def select_sentence(raw: str) -> str | None:
    """The normalised sentence if it reads as plain English, else None (code, acronyms,
    initials, dialogue layouts, stray symbols, too short or too long)."""
    if _ACRONYM.search(raw) or re.search(r"[$/\\<>{}|_~^*;:]", raw):  # ; and : lay out lists and dialogue
        return None
    spoken = normalize(raw)
    if not spoken or not _SPOKEN.match(spoken):
        return None
    if spoken[-1] not in ".?!":
        spoken += "."
    words = spoken[:-1].split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if re.fullmatch(r"[b-hj-z]", words[-1]) or re.fullmatch(r"[a-z],", words[0]):
        return None  # cut at an initial ("robert h.") or a "q: ... a: ..." layout
    for word in words:
        core = word.rstrip(",")
        if not re.fullmatch(r"[a-z]+(?:'[a-z]+)*", core) or len(core) > MAX_WORD_LETTERS:
            return None  # stray punctuation inside ("j.", "?!" mid-sentence)
    return spoken


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
        for raw in _SENTENCE_SPLIT.split(expand_abbreviations(entry)):
            s = select_sentence(raw)
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
        _, i = heapq.heappop(heap)
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


def heldout_sentences() -> list[str]:
    """The fixed held-out sentences (`heldout.txt` beside this module), in order."""
    return [s for s in HELDOUT_FILE.read_text(encoding="utf-8").splitlines() if s]


def plan_text(seed: int, root: Path = FORTUNES_DIR) -> TextPlan:
    """The held-out sentences, and every other usable sentence in a seeded coverage order."""
    heldout = heldout_sentences()
    held_keys = {sentence_key(s) for s in heldout}
    sentences = load_sentences(root)
    pool = [s for s in sentences if sentence_key(s) not in held_keys]
    if not pool:
        raise CorpusError(f"no usable sentences in {root} outside the held-out ones")
    perm = np.random.default_rng([seed, 0x7E47]).permutation(len(pool))
    shuffled = [pool[i] for i in perm]
    ordered = [shuffled[i] for i in coverage_order(shuffled)]
    return TextPlan(heldout=heldout, train=ordered, n_candidates=len(sentences))
