"""Text frontend: normalisation, ids, and clear refusals."""

from __future__ import annotations

import pytest

from ditarkit.runtime.config import TextConfig
from ditarkit.runtime.text import TextError, TextFrontend, normalize, spell_number, split_sentences


def test_normalize_spells_numbers_and_folds_unicode():
    assert normalize("Caf\u00e9 at 7 \u2014 \u201cok\u201d!") == "cafe at seven, ok!"


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("He is 42.", "he is forty two."),
        ("Born in 1984, the 21st of May.", "born in nineteen eighty four, the twenty first of may."),
        ("12,000 robots cost $3.50 each (roughly).", "twelve thousand robots cost three point five zero dollars each, "
         "roughly."),
        ("Dr. Smith & Mr. Jones -- well-known.", "doctor smith and mister jones, well known."),
        ("It's 100% done... almost!", "it's one hundred percent done, almost!"),
        ("Call 0800 555", "call zero eight zero zero five hundred and fifty five"),
        # a symbol that normalises to nothing between two marks keeps the sentence boundary
        ("Hello there. \U0001F600! How are you?", "hello there. how are you?"),
        ("Wait. , then go", "wait. then go"),
    ],
)
def test_normalize_reads_text_as_it_is_spoken(raw, spoken):
    assert normalize(raw) == spoken
    assert normalize(spoken) == spoken  # idempotent: the corpus stores it, the runtime reads it again


def test_spell_number_reads_numbers_and_years():
    assert [spell_number(n) for n in (7, 42, 305, 1984, 12_000, 2024, 1_000_001)] == [
        "seven", "forty two", "three hundred and five", "nineteen eighty four", "twelve thousand",
        "twenty twenty four", "one million and one"]


def test_the_corpus_speaks_the_runtimes_normalised_text():
    from ditarkit.training.sentences import select_sentence

    raw = "Dr. Who met 42 friends in 1984."
    assert select_sentence(raw) == normalize(raw) == "doctor who met forty two friends in nineteen eighty four."


def test_encode_wraps_text_in_bos_and_eos():
    cfg = TextConfig()
    ids = TextFrontend(cfg).encode("ab")
    assert ids == [cfg.BOS, cfg.NUM_SPECIAL + cfg.symbols.index("a"), cfg.NUM_SPECIAL + cfg.symbols.index("b"), cfg.EOS]


@pytest.mark.parametrize("text", ["", "   ", "\U0001f600\U0001f680", "?!..", "\u4f60\u597d"])
def test_unspeakable_text_is_refused(text):
    with pytest.raises(TextError, match="no speakable"):
        TextFrontend(TextConfig()).encode(text)


def test_too_long_text_is_refused_with_advice():
    with pytest.raises(TextError, match="split it into sentences"):
        TextFrontend(TextConfig()).encode("word " * 200)


def test_split_sentences_keeps_pieces_short():
    text = "One. Two, three? " + "a" * 50 + ", " + "b " * 200
    pieces = split_sentences(text, max_chars=120)
    assert pieces[:2] == ["one.", "two, three?"]
    assert all(len(p) <= 121 for p in pieces)
    assert "".join(pieces).replace(" ", "") == normalize(text).replace(" ", "")


def test_split_sentences_measures_what_the_model_reads():
    dense = "1,234,567 " * 20  # 200 characters written, over 1,000 spoken
    pieces = split_sentences(dense)
    frontend = TextFrontend(TextConfig())
    assert len(pieces) > 5 and all(len(frontend.encode(p)) <= TextConfig().max_tokens for p in pieces)
