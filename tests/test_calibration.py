"""INT8 calibration on the tiny preset: recorded activations, Q/DQ graphs, bounded error."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import onnx
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import BLOCK_TORCH, speech_like

from ditarkit.calibration.accuracy import OTHER_SEED, end_to_end, graph_errors, mel_distance_db
from ditarkit.calibration.cli import REPORT_FILE, machine_line, read_sentences
from ditarkit.calibration.cli import main as calibrate_main
from ditarkit.calibration.quantize import KEEP_SCOPES, QUANTIZED_GRAPHS, QUANTIZED_OPS, quantize_bundle
from ditarkit.calibration.record import Recording, record
from ditarkit.export.bundle import export_bundle
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.backends import onnxrt
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.backends.tensorrt import check_buildable
from ditarkit.runtime.config import DiTARConfig
from ditarkit.runtime.machine import cpu_summary
from ditarkit.runtime.manifest import LM, LM_PAST_KEYS, LM_PAST_VALUES, LM_POSITION, BundleError, load_manifest
from ditarkit.runtime.synthesizer import Synthesizer

TEXTS = ("hello there.", "the red cube moves left.", "stop now!")
SECONDS = 0.6  # audio per sentence: enough patches for every graph to be recorded
SAMPLES = 8
# Tiny random weights give activations with no outliers; 8-bit ranges leave a relative
# error near 2^-8 per layer, so a quantized graph's output stays above 20 dB SNR. A broken
# graph (wrong scale, zero point or wiring) lands near or below 0 dB.
MIN_SNR_DB = 20.0
# Masked slots add exp(-30000) = 0 to the softmax: only the attention's summation length
# changes, which reorders fp32 sums.
CACHE_CUT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def setup(tiny_fp32_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    fp32 = tiny_fp32_bundle
    voice = root / "voice.wav"
    sf.write(voice, speech_like(2.0), 24_000)
    recording = record(fp32, TEXTS, [voice], per_graph=SAMPLES, max_seconds=SECONDS)
    int8 = root / "tiny-int8"
    manifest = quantize_bundle(fp32, int8, recording)
    return fp32, int8, voice, recording, manifest


def test_recording_keeps_a_bounded_sample_of_every_graph(setup, tmp_path):
    fp32, _, _, recording, _ = setup
    assert set(QUANTIZED_GRAPHS) <= set(recording.feeds)
    assert all(0 < len(samples) <= SAMPLES for samples in recording.feeds.values())
    for feeds in recording.feeds[LM]:  # the cache is cut to its filled slots
        assert feeds[LM_PAST_KEYS].shape[3] == max(1, int(feeds[LM_POSITION][0]))
    for graph, samples in recording.feeds.items():
        for feeds in samples:
            load_manifest(fp32).graphs[graph].check_feeds(feeds)
    again = Recording.load(recording.save(tmp_path / "acts.npz"))
    assert again.sentences == len(TEXTS) and set(again.feeds) == set(recording.feeds)
    np.testing.assert_array_equal(again.feeds[LM][0][LM_PAST_KEYS], recording.feeds[LM][0][LM_PAST_KEYS])


def test_quantized_graphs_hold_qdq_nodes_and_pass_the_checker(setup):
    _, int8, _, _, manifest = setup
    assert manifest.precision == "int8" and load_manifest(int8).quantization["format"] == "QDQ"
    for name in QUANTIZED_GRAPHS:
        graph = onnx.load(str(int8 / manifest.graphs[name].file))
        onnx.checker.check_model(graph, full_check=True)
        ops = {n.op_type for n in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
        assert manifest.quantization["graphs"][name]["quantized_layers"] > 0


def test_sensitive_layers_and_convolutions_stay_fp32(setup):
    _, int8, _, _, manifest = setup
    matched = set()
    for name in QUANTIZED_GRAPHS:
        nodes = onnx.load(str(int8 / manifest.graphs[name].file)).graph.node
        dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
        for node in nodes:
            scopes = {scope for scope in KEEP_SCOPES if scope in node.name}
            if node.op_type == "Conv" or (node.op_type in QUANTIZED_OPS and scopes):
                assert node.input[1] not in dequantized, node.name  # its weight is still the fp32 constant
                matched |= scopes
    assert matched == set(KEEP_SCOPES)  # every kept scope names layers that exist


def test_quantized_graphs_stay_close_to_fp32_on_held_out_activations(setup):
    fp32, int8, voice, _, _ = setup
    heldout = record(fp32, ("a different sentence.",), [voice], per_graph=SAMPLES, seed=1, max_seconds=SECONDS)
    for error in graph_errors(OrtRunner(fp32), OrtRunner(int8), heldout, QUANTIZED_GRAPHS):
        assert error.median_snr_db >= MIN_SNR_DB, error


def test_runtime_speaks_with_the_int8_bundle_closer_to_fp32_than_another_seed(setup):
    fp32, int8, voice, _, _ = setup
    reference = Synthesizer(fp32, backend="onnxruntime")
    distances = end_to_end(reference, {"int8": Synthesizer(int8, backend="onnxruntime")}, TEXTS[:2], [voice],
                           max_seconds=SECONDS)
    assert np.isfinite(distances["int8"])
    assert distances["int8"] < distances[OTHER_SEED], distances


def test_mel_distance_is_zero_for_equal_audio_and_grows_with_noise():
    clean = speech_like(1.0)
    # White noise at 0.05 rms against a ~0.1 rms signal (about 6 dB SNR) fills the quiet
    # mel bands by many dB; anything under 1 dB would mean the distance misses it.
    noisy = clean + np.random.default_rng(0).normal(0, 0.05, clean.shape).astype(np.float32)
    assert mel_distance_db(clean, clean, 24_000) == 0.0
    assert mel_distance_db(clean, noisy, 24_000) > 1.0


def _quantized_weights(path) -> list[np.ndarray]:
    """The integer weight tensors of a Q/DQ graph (constants fed to DequantizeLinear)."""
    graph = onnx.load(str(path))
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    return [constants[n.input[0]] for n in graph.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in constants and constants[n.input[0]].ndim == 2]


def test_tensorrt_target_has_symmetric_int8_activations(setup, tmp_path):
    fp32, _, _, recording, _ = setup
    manifest = quantize_bundle(fp32, tmp_path / "trt", recording, target="tensorrt")
    graph = onnx.load(str(tmp_path / "trt" / manifest.graphs[LM].file))
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    zero_points = [constants[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    weights = _quantized_weights(tmp_path / "trt" / manifest.graphs[LM].file)
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 127  # full 8 bits
    assert manifest.quantization["reduce_range"] is False


def test_onnxruntime_target_has_7_bit_weights_that_no_cpu_saturates(setup):
    """x86 without VNNI adds pairs of u8 x s8 products in int16: 2 x 255 x 64 = 32640 fits,
    2 x 255 x 127 does not. Every quantized weight of every graph must lie in [-64, 64]."""
    _, int8, _, _, manifest = setup
    for name in QUANTIZED_GRAPHS:
        weights = _quantized_weights(int8 / manifest.graphs[name].file)
        assert weights and all(w.dtype == np.int8 for w in weights), name
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64, name
    recorded = load_manifest(int8).quantization
    assert recorded["reduce_range"] is True and recorded["weight_type"] == "int8"
    assert recorded["activation_type"] == "uint8" and recorded["calibrated_on"] == cpu_summary()


def test_the_runtime_warns_when_an_int8_form_saturates_on_this_cpu(setup, tmp_path, monkeypatch, caplog):
    _, int8, _, _, _ = setup
    old = tmp_path / "old-int8"
    shutil.copytree(int8, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["quantization"]["reduce_range"] = False  # as the kit made INT8 bundles before issue 14
    (old / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(onnxrt, "cpu_features", lambda: {"AVX2": True, "AVX-512": False, "VNNI": False,
                                                         "AMX-INT8": False})
    with caplog.at_level(logging.WARNING, logger="ditarkit"):
        OrtRunner(int8)
        assert not caplog.records  # 7-bit weights: nothing to say
        OrtRunner(old)
    assert len(caplog.records) == 1 and "saturate" in caplog.records[0].getMessage()


def test_cli_calibrates_and_reports(setup, tmp_path):
    fp32, _, voice, _, _ = setup
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["one two three.", "four five six.", "seven eight.", "nine ten."]))
    out = tmp_path / "cli-int8"
    result = CliRunner().invoke(calibrate_main, ["--bundle", str(fp32), "--ref", str(voice), "-o", str(out),
                                                 "--texts", str(texts), "--samples", "4", "--max-seconds", "0.4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / REPORT_FILE).read_text())
    assert {e["graph"] for e in report["graph_errors"]} == set(QUANTIZED_GRAPHS)
    assert set(report["mel_distance_db"]) == {OTHER_SEED, "int8"}
    assert "median SNR" in result.stdout
    # The figures hold for this CPU: its first line names it with the features the kernels use.
    assert result.stdout.splitlines()[0] == f"machine: {machine_line()}" == f"machine: {report['machine']}"
    assert cpu_summary() in report["machine"] and report["quantization"]["calibrated_on"] == cpu_summary()


def _calibrate_cli(*args: str):
    return CliRunner().invoke(calibrate_main, list(args))


def _one_line_refusal(result, expected: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(("case", "expected"), [
    ("int8 source", "calibrate from an fp32 bundle"),
    ("out is the source", "would overwrite the fp32 bundle"),
    ("unspeakable sentence", "no speakable"),
    ("too few sentences", "need at least 4 sentences"),
    ("foreign compare bundle", "not a bundle of the same model"),
    ("out is a user folder", "is not a bundle: refusing to replace it"),
])
def test_cli_refuses_bad_input_in_one_line_before_any_work(setup, tmp_path, case, expected):
    fp32, int8, voice, _, _ = setup
    texts = tmp_path / "texts.txt"
    texts.write_text("one two.\nthree four.\nfive six.\nseven eight.\n")
    out = tmp_path / "out"
    args = {"int8 source": ["--bundle", str(int8)], "out is the source": ["-o", str(fp32)]}.get(case, [])
    if case == "unspeakable sentence":
        texts.write_text("one two.\n~~~\nfive six.\nseven eight.\n")  # "~" is no symbol of the model's
    elif case == "too few sentences":
        texts.write_text("one two.\n")
    elif case == "foreign compare bundle":
        foreign = tmp_path / "foreign"
        source = DiTARConfig.from_dict(load_manifest(fp32).source["config"])
        export_bundle(DiTAR(replace(source, max_seconds=9.0)), foreign)
        args = ["--compare", str(foreign)]
    elif case == "out is a user folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    result = _calibrate_cli("--bundle", str(fp32), "--ref", str(voice), "-o", str(out), "--texts", str(texts),
                            "--max-seconds", "0.3", *args)
    _one_line_refusal(result, expected)
    assert (fp32 / "manifest.json").exists() and load_manifest(fp32).precision == "fp32"
    assert case == "out is a user folder" or not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_multi_sentence_lines_are_split_into_single_sentence_texts(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there. How are you?\nFine!\n\nGood.\nBye now.")
    # normalised, as the runtime splits and reads them
    assert read_sentences(str(texts)) == ["hello there.", "how are you?", "fine!", "good.", "bye now."]


def test_the_recorded_lm_cache_cut_gives_the_same_outputs_as_the_full_cache(setup):
    fp32, _, _, recording, _ = setup
    runner = OrtRunner(fp32)
    feeds = max(recording.feeds[LM], key=lambda f: int(f[LM_POSITION][0]))
    assert int(feeds[LM_POSITION][0]) > 1
    padded = dict(feeds)
    for name in (LM_PAST_KEYS, LM_PAST_VALUES):
        cut = feeds[name]
        padded[name] = np.concatenate([cut, np.zeros_like(cut)], axis=3)  # twice the capacity, zeros after
    for got, want in zip(runner.run(LM, feeds), runner.run(LM, padded)):
        np.testing.assert_allclose(got, want, rtol=0, atol=CACHE_CUT_TOLERANCE)


def test_tensorrt_refuses_a_bundle_quantized_for_onnxruntime(setup):
    _, int8, _, _, _ = setup
    with pytest.raises(BundleError, match="--target tensorrt"):
        check_buildable(load_manifest(int8))


def test_cli_runs_without_torch_for_tensorrt_and_compares_another_bundle(setup, tmp_path):
    fp32, int8, voice, _, _ = setup
    texts = tmp_path / "texts.txt"
    texts.write_text("one two three.\nfour five six.\nseven eight.\nnine ten.\n")
    out = tmp_path / "trt-int8"
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from ditarkit.calibration.cli import main
        main(["--bundle", {str(fp32)!r}, "--ref", {str(voice)!r}, "-o", {str(out)!r}, "--texts", {str(texts)!r},
              "--samples", "4", "--max-seconds", "0.3", "--target", "tensorrt", "--compare", {str(int8)!r}],
             standalone_mode=False)
        assert "torch" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["quantization"]["target"] == "tensorrt"
    assert set(report["mel_distance_db"]) == {OTHER_SEED, "int8", f"int8 ({int8.name})"}
