"""The lexicon frontend: words as CMUdict phonemes, letters for the rest; its file in the
package and in a bundle, checked; a model of it trained, exported and run by the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import BLOCK_TORCH, SEED, speech_like

from ditarkit.runtime.config import DiTARConfig, TextConfig, lexicon_text, preset
from ditarkit.runtime.lexicon import LEXICON_FILE, PACKAGED_LEXICON_DIR, PHONEMES, LexiconFrontend, read_lexicon
from ditarkit.runtime.text import TextError, TextFrontend, model_frontend


@pytest.fixture(scope="module")
def frontend() -> LexiconFrontend:
    return model_frontend(lexicon_text())


def test_known_words_are_phonemes_and_the_rest_letters_each_with_its_characters(frontend):
    units = frontend.units("Hello, lossage!")
    assert units == [("HH", 0, 4), ("AH0", 0, 4), ("L", 0, 4), ("OW1", 0, 4), (",", 5, 5), (" ", 6, 6),
                     *[(c, 7 + i, 7 + i) for i, c in enumerate("lossage")], ("!", 14, 14)]  # not in CMUdict
    assert frontend.sources("Hello, lossage!") == [(first, last) for _, first, last in units]
    # numbers are spelled by the one normaliser first, then read as words
    assert [u for u, _, _ in frontend.units("42")] == ["F", "AO1", "R", "T", "IY0", " ", "T", "UW1"]


def test_a_possessive_the_lexicon_lacks_ends_as_english_says_it(frontend):
    assert frontend.pronounce("zephyr's") == frontend.pronounce("zephyr") + ("Z",)  # after a voiced sound
    assert frontend.pronounce("kit's") == frontend.pronounce("kit") + ("S",)  # after a voiceless one
    assert frontend.pronounce("abacus's") == frontend.pronounce("abacus") + ("IH0", "Z")  # after a sibilant
    assert frontend.pronounce("'zephyr's'") == frontend.pronounce("zephyr's")  # in quotes
    assert frontend.pronounce("xqzv") is None


def test_ids_put_phonemes_after_the_symbols_and_characters_keep_theirs(frontend):
    chars = TextFrontend(TextConfig())
    config = lexicon_text()
    first_phoneme = config.NUM_SPECIAL + len(config.symbols)
    ids = frontend.encode("a qx.")  # "a" is a word the lexicon lists, "qx" is spelled
    assert ids[0] == config.BOS and ids[-1] == config.EOS
    assert ids[1] == first_phoneme + PHONEMES.index("AH0")
    assert ids[2:-1] == chars.encode("a qx.")[2:-1]  # " ", "q", "x", "." as the characters' ids
    assert max(ids) < config.vocab_size == first_phoneme + len(PHONEMES)


def test_a_lexicon_file_that_is_edited_corrupt_or_not_arpabet_is_refused_in_one_line(tmp_path):
    packaged = PACKAGED_LEXICON_DIR / LEXICON_FILE
    spec = lexicon_text().spec()
    assert len(read_lexicon(packaged, spec.lexicon_sha256)) > 100_000
    cases = {
        "edited": (gzip.compress(b"hello HH AH0 L OW1\n"), "does not match its checksum"),
        "corrupt": (b"not gzip at all", "not a gzip'd UTF-8 lexicon"),
        "bad phoneme": (gzip.compress(b"hello HH AH0 L OW9\n"), "line 1: not `word PHONEME ...`"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        with pytest.raises(TextError, match=message) as err:
            read_lexicon(path, spec.lexicon_sha256 if name == "edited" else None)
        assert "\n" not in str(err.value)
    with pytest.raises(TextError, match="no lexicon at"):
        read_lexicon(tmp_path / "missing.gz")


def test_the_lexicon_config_round_trips_and_is_checked():
    config = dataclasses.replace(preset("tiny"), text=lexicon_text())
    assert DiTARConfig.from_json(config.to_json()) == config
    assert config.contract().text.files == {LEXICON_FILE: config.text.lexicon_sha256}
    assert TextConfig().spec().files == {}
    with pytest.raises(Exception, match="a lexicon frontend, and only one, has phonemes"):
        dataclasses.replace(preset("tiny"), text=dataclasses.replace(TextConfig(), frontend="lexicon"))


@pytest.fixture(scope="module")
def lexicon_bundle(tmp_path_factory):
    import torch

    from ditarkit.export.bundle import export_bundle
    from ditarkit.reference.model import DiTAR, perturb_weights

    torch.manual_seed(SEED)
    model = perturb_weights(DiTAR(dataclasses.replace(preset("tiny"), text=lexicon_text())), seed=SEED).eval()
    path = tmp_path_factory.mktemp("lexicon") / "bundle"
    export_bundle(model, path)
    return model, path


def test_the_bundle_carries_the_lexicon_and_reads_with_it(lexicon_bundle, frontend):
    from ditarkit.runtime.synthesizer import Synthesizer

    _, bundle = lexicon_bundle
    assert (bundle / LEXICON_FILE).read_bytes() == (PACKAGED_LEXICON_DIR / LEXICON_FILE).read_bytes()
    with Synthesizer(bundle, backend="onnxruntime") as synth:
        assert isinstance(synth.frontend, LexiconFrontend)
        assert synth.frontend.encode("Don't worry about it.") == frontend.encode("Don't worry about it.")


def _ditar_run(*args: str) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + "from ditarkit.runtime.cli import main; main()"  # as on a robot: no torch
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def test_ditar_run_speaks_with_a_lexicon_bundle_and_refuses_an_edited_lexicon(lexicon_bundle, tmp_path):
    import shutil

    _, bundle = lexicon_bundle
    ref = tmp_path / "voice.wav"
    sf.write(ref, speech_like(2.0), 24_000)
    out = tmp_path / "out.wav"
    done = _ditar_run("--bundle", str(bundle), "--ref", str(ref), "--text", "Hello there.", "--max-seconds", "0.5",
                      "-o", str(out))
    assert done.returncode == 0, done.stderr
    audio, rate = sf.read(out)
    assert rate == 24_000 and len(audio) > 0 and np.isfinite(audio).all()
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    (edited / LEXICON_FILE).write_bytes(gzip.compress(b"hello HH AH0 L OW1\n"))
    done = _ditar_run("--bundle", str(edited), "--ref", str(ref), "--text", "Hello.", "-o", str(tmp_path / "x.wav"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "does not match its checksum in the manifest" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.wav").exists()


def test_the_pytorch_reference_reads_a_lexicon_model_with_the_packaged_copy(lexicon_bundle):
    from ditarkit.reference.runner import TorchRunner
    from ditarkit.runtime.synthesizer import Synthesizer

    model, _ = lexicon_bundle
    with Synthesizer.from_runner(TorchRunner(model)) as synth:  # no bundle folder: the kit's lexicon
        assert isinstance(synth.frontend, LexiconFrontend)


def test_a_bundle_whose_lexicon_is_edited_fails_at_load_when_files_are_verified(lexicon_bundle, tmp_path):
    import shutil

    from ditarkit.runtime.manifest import BundleError, load_manifest

    _, bundle = lexicon_bundle
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    load_manifest(edited)  # as exported: fine
    (edited / LEXICON_FILE).write_bytes(gzip.compress(b"hello HH AH0 L OW1\n"))
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_manifest(edited)  # what ditar-serve checks before Triton starts
    (edited / LEXICON_FILE).unlink()
    with pytest.raises(BundleError, match="is missing from the bundle"):
        load_manifest(edited)


def test_export_refuses_a_packaged_lexicon_the_model_was_not_trained_with(tmp_path):
    import torch

    from ditarkit.export.bundle import export_bundle
    from ditarkit.reference.model import DiTAR
    from ditarkit.runtime.manifest import BundleError

    torch.manual_seed(SEED)
    text = dataclasses.replace(lexicon_text(), lexicon_sha256="0" * 64)  # trained with another lexicon
    model = DiTAR(dataclasses.replace(preset("tiny"), text=text)).eval()
    with pytest.raises(BundleError, match="not the one this model was trained with"):
        export_bundle(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_lexicon_with_phonemes_the_model_lacks_is_refused(frontend):
    spec = dataclasses.replace(lexicon_text().spec(), phonemes=PHONEMES[:-1])  # no ZH
    with pytest.raises(TextError, match="phonemes the model has no ids for: \\['ZH'\\]"):
        LexiconFrontend(spec, frontend.lexicon)
