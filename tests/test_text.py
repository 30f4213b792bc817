"""Text frontend: normalisation, ids, and clear refusals."""

from __future__ import annotations

import pytest

from ditarkit.runtime.config import TextConfig
from ditarkit.runtime.text import TextError, TextFrontend, normalize, split_sentences


def test_normalize_spells_digits_and_folds_unicode():
    assert normalize("Caf\u00e9 at 7 \u2014 \u201cok\u201d!") == "cafe at seven , ok!"


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
    assert pieces[:2] == ["One.", "Two, three?"]
    assert all(len(p) <= 121 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
