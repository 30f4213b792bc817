"""`ditar-calibrate` on bundles imported from VoxCPM (v1 `voxcpm`, v2 `voxcpm2`): tiny random
models from tests/voxcpm_oracle.py, exported, quantized by the CLI, spoken by the runtime.

What differs from the kit's own models is all in the bundle's contract: a tokenizer.json
frontend, a v1 prompt that reads the reference's transcript, a VAE that encodes at 16 kHz and
(v2) decodes at 48 kHz, an LM step with an audio mask, and the package's module names in the
graphs' node names (the scopes kept fp32).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import speech_like
from voxcpm_oracle import build_package_model, tiny_config, write_checkpoint

from ditarkit.calibration import quantize
from ditarkit.calibration.accuracy import OTHER_SEED, mel_distance_db, mel_window
from ditarkit.calibration.cli import REPORT_FILE
from ditarkit.calibration.cli import main as calibrate_main
from ditarkit.calibration.quantize import IMPORTED_KEEP_SCOPES, NOTHING_TO_QUANTIZE, QUANTIZED_OPS, keep_scopes
from ditarkit.calibration.record import Recording
from ditarkit.export.voxcpm.checkpoint import ARCHITECTURES
from ditarkit.export.voxcpm.export import export_voxcpm
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.manifest import (
    LM,
    LM_AUDIO_MASK,
    LM_PAST_KEYS,
    LM_PAST_VALUES,
    LM_POSITION,
    VAE_DECODER,
    load_manifest,
    with_files,
)
from ditarkit.runtime.sampler import exact_length
from ditarkit.runtime.synthesizer import Synthesizer

MAX_TOKENS, MAX_PATCHES = 12, 10
REFERENCE_TEXT = "hell"  # what the v1 reference "says": read before every text
# Short lines of the tiny tokenizer's words: within 12 tokens with the transcript joined.
TEXTS = ("hello hello", "he hello", "hello, hell", "hell hello", "hello he", "oh hello", "hello you", "he he")
SAMPLES = 6
SPOKEN_PATCHES = 6
# Tiny random weights, 8-bit ranges: as tests/test_calibration.py, a broken graph lands near 0 dB.
MIN_SNR_DB = 20.0
CACHE_CUT_TOLERANCE = 1e-6  # masked slots only change the attention's summation length
# Ops that must never read a dequantized tensor: norms, rotary, softmax, the FSQ rounding, Snake.
FP32_OPS = ("Softmax", "Round", "Tanh", "Sin", "Cos", "ReduceMean", "Sqrt")
FP32_NAMES = ("norm", "rotary", "/fsq_layer/")


REFERENCE_SECONDS = 1.2  # the calibration voice and the prompt's limit
ROOMY_POSITIONS = 8192  # a 1.2 s prompt at the tiny VAEs' hops, the text and the speech


def _limits(config: dict) -> dict:
    """The tiny VAEs' hops are a few samples: the speech's limit in patches, said in seconds. The
    prompt holds the whole reference: a v1 model reads its transcript, so a reference is not
    cut to fit (thousands of patches at these hops: the LM's position table is widened)."""
    hop = int(np.prod(config["audio_vae_config"]["encoder_rates"]))
    patch_seconds = config["patch_size"] * hop / config["audio_vae_config"]["sample_rate"]
    return {"max_tokens": MAX_TOKENS, "max_seconds": (MAX_PATCHES + 0.5) * patch_seconds,
            "max_prompt_seconds": REFERENCE_SECONDS}


def _ref_text_args(bundle) -> list[str]:
    return ["--ref-text", REFERENCE_TEXT] if load_manifest(bundle).config.prompt.needs_reference_text else []


@pytest.fixture(scope="module", params=ARCHITECTURES)
def calibrated(request, tmp_path_factory):
    architecture = request.param
    config = tiny_config(architecture)
    config["max_length"] = config["lm_config"]["max_position_embeddings"] = ROOMY_POSITIONS
    root = tmp_path_factory.mktemp(f"calibrate-{architecture}")
    folder = write_checkpoint(root / "checkpoint", config, build_package_model(config, seed=5))
    fp32 = root / "fp32"
    export_voxcpm(folder, fp32, parity=False, **_limits(config))
    voice = root / "voice.wav"
    sf.write(voice, speech_like(REFERENCE_SECONDS - 0.1, 16_000), 16_000)
    texts = root / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    int8, acts = root / "int8", root / "acts.npz"
    result = CliRunner().invoke(calibrate_main, [
        "--bundle", str(fp32), "--ref", str(voice), *_ref_text_args(fp32), "-o", str(int8), "--texts", str(texts),
        "--samples", str(SAMPLES), "--save-activations", str(acts)])
    assert result.exit_code == 0, result.output
    print(f"\n{architecture}:\n{result.stdout}")  # the tool's figures, shown with pytest -s
    return architecture, fp32, int8, voice, texts, result.stdout, Recording.load(acts)


def _voice(synth: Synthesizer, path) -> object:
    needs = synth.config.prompt.needs_reference_text
    return synth.voice(path, text=REFERENCE_TEXT if needs else "")


def test_the_int8_bundle_speaks_through_the_runtime_at_the_output_rate(calibrated):
    architecture, fp32, int8, voice, _, _, _ = calibrated
    manifest = load_manifest(int8)
    assert manifest.precision == "int8" and manifest.config == load_manifest(fp32).config
    assert (int8 / manifest.config.text.tokenizer_file).is_file()  # the tokenizer travels with the graphs
    audio_io = manifest.config.audio
    assert audio_io.output_sample_rate == (48_000 if architecture == "voxcpm2" else 16_000)
    with Synthesizer(int8, backend="onnxruntime") as synth:
        assert synth.sample_rate == audio_io.output_sample_rate
        options = exact_length(synth.options(seed=3), SPOKEN_PATCHES, synth.config.patch_seconds)
        audio = synth.synthesize("hello hello", _voice(synth, voice), options)
    assert audio.dtype == np.float32 and np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert len(audio) == SPOKEN_PATCHES * manifest.config.patch_size * audio_io.output_hop_length


def test_the_report_is_written_and_printed(calibrated):
    architecture, fp32, int8, _, _, stdout, _ = calibrated
    report = json.loads((int8 / REPORT_FILE).read_text())
    quantization = load_manifest(int8).quantization
    quantized = set(quantization["graphs"])
    assert {"lm", "locdit", "locdit_sampler", "patch_encoder"} <= quantized
    assert {e["graph"] for e in report["graph_errors"]} == quantized
    assert all(e["median_snr_db"] >= MIN_SNR_DB for e in report["graph_errors"]), report["graph_errors"]
    distances = report["mel_distance_db"]
    assert set(distances) == {OTHER_SEED, "int8"} and all(np.isfinite(v) for v in distances.values())
    # The VAE decoder is convolutions and Snakes only: nothing to quantize, copied as it is.
    assert quantization["fp32_graphs"][VAE_DECODER] == NOTHING_TO_QUANTIZE
    spec = load_manifest(fp32).graphs[VAE_DECODER]
    assert (int8 / spec.file).read_bytes() == (fp32 / spec.file).read_bytes()
    assert "median SNR" in stdout and f"{VAE_DECODER:<16} fp32: " in stdout
    assert report["heldout_sentences"] == list(TEXTS[::4])  # a tokenizer speaks each line whole


def test_kept_scopes_are_unquantized_in_the_int8_graphs(calibrated):
    _, _, int8, _, _, _, _ = calibrated
    manifest = load_manifest(int8)
    matched, quantized_layers = set(), 0
    for name in manifest.quantization["graphs"]:
        graph = onnx.load(str(int8 / manifest.graphs[name].file)).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        constants = {i.name for i in graph.initializer}
        scopes = keep_scopes(name)
        for node in graph.node:
            reads_dq = any(i in dequantized for i in node.input)
            kept = {scope for scope in scopes if scope in node.name}
            if node.op_type in QUANTIZED_OPS and kept:
                assert node.input[1] in constants and not reads_dq, node.name  # fp32 weight and input
                matched |= kept
            elif node.op_type in QUANTIZED_OPS and node.input[1] in dequantized:
                quantized_layers += 1
            if node.op_type in FP32_OPS or any(s in node.name for s in FP32_NAMES):
                assert not reads_dq, node.name
        for kept_layer in manifest.quantization["graphs"][name]["fp32_layers"]:
            assert any(scope in kept_layer for scope in scopes)
    assert set(IMPORTED_KEEP_SCOPES) | {"stop_head"} <= matched  # every VoxCPM scope names layers here
    assert quantized_layers > 0
    assert set(manifest.quantization["fp32_scopes"]) <= matched


def test_the_recorded_lm_feeds_carry_the_audio_mask_and_a_cut_cache(calibrated):
    _, fp32, _, _, _, _, recording = calibrated
    manifest = load_manifest(fp32)
    for graph, samples in recording.feeds.items():
        for feeds in samples:
            manifest.graphs[graph].check_feeds(feeds)
    for mask in (f[LM_AUDIO_MASK][0] for f in recording.feeds[LM]):  # a prefill has both kinds of rows
        assert mask.all() if len(mask) == 1 else mask.any() and not mask.all()
    feeds = max(recording.feeds[LM], key=lambda f: int(f[LM_POSITION][0]))
    assert feeds[LM_PAST_KEYS].shape[3] == int(feeds[LM_POSITION][0]) > 1
    padded = dict(feeds)
    for name in (LM_PAST_KEYS, LM_PAST_VALUES):
        padded[name] = np.concatenate([feeds[name], np.ones_like(feeds[name])], axis=3)  # masked slots
    runner = OrtRunner(fp32)
    for got, want in zip(runner.run(LM, feeds), runner.run(LM, padded)):
        np.testing.assert_allclose(got, want, rtol=0, atol=CACHE_CUT_TOLERANCE)


def test_graphs_with_their_weights_in_a_data_file_are_read_and_written_so(calibrated, tmp_path, monkeypatch):
    """A VoxCPM2 LM passes 2 GiB in fp32 (protobuf's limit): its weights sit in `lm.onnx.data`.
    Here the tiny LM is saved so, and the INT8 graphs are written so too (threshold 0)."""
    _, fp32, _, voice, _, _, recording = calibrated
    source = tmp_path / "fp32"
    shutil.copytree(fp32, source)
    manifest = load_manifest(source)
    spec = manifest.graphs[LM]
    path, data = source / spec.file, source / f"{spec.file}.data"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    replace(manifest, graphs={**manifest.graphs, LM: with_files(spec, path, data)}).save(source)
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_BYTES", 0)
    int8 = quantize.quantize_bundle(source, tmp_path / "int8", recording)
    assert int8.graphs[LM].data_file == f"{spec.file}.data"  # (graphs of tensors under 1 kB have none)
    assert all((tmp_path / "int8" / f).is_file() for g in int8.graphs.values() for f in g.files)
    assert load_manifest(tmp_path / "int8") == int8  # every checksum holds
    with Synthesizer(tmp_path / "int8", backend="onnxruntime") as synth:
        options = exact_length(synth.options(), 2, synth.config.patch_seconds)
        assert np.isfinite(synth.synthesize("hello", _voice(synth, voice), options)).all()


@pytest.mark.parametrize(("case", "expected"), [
    ("no transcript", "give each --ref its transcript with --ref-text"),
    ("transcripts for other refs", "2 --ref-text for 1 --ref"),
    ("text over the limit", "tokens, over the model's"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(calibrated, tmp_path, case, expected):
    architecture, fp32, _, voice, texts, _, _ = calibrated
    if case == "no transcript" and architecture != "voxcpm":
        # VoxCPM2's reference mode reads none: the fixture calibrated it without one.
        assert not load_manifest(fp32).config.prompt.needs_reference_text and _ref_text_args(fp32) == []
        return
    args = {"no transcript": [], "transcripts for other refs": ["--ref-text", "he", "--ref-text", "hell"]}.get(
        case, _ref_text_args(fp32))
    if case == "text over the limit":
        texts = tmp_path / "long.txt"
        texts.write_text("\n".join([*TEXTS[:3], "hello " * 20]) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(calibrate_main, ["--bundle", str(fp32), "--ref", str(voice), *args,
                                                 "-o", str(out), "--texts", str(texts)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("rate", [16_000, 24_000, 48_000])
def test_the_mel_distance_reads_any_output_rate_over_the_same_window(rate):
    fft, hop = mel_window(rate)
    assert 0.02 <= fft / rate <= 0.05 and hop * 4 == fft  # about 43 ms at every rate
    clean = speech_like(0.5, rate)
    noisy = clean + np.random.default_rng(0).normal(0, 0.05, clean.shape).astype(np.float32)
    assert mel_distance_db(clean, clean, rate) == 0.0 and mel_distance_db(clean, noisy, rate) > 1.0
