"""The torch-free runtime: end-to-end parity with the reference, streaming, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import BLOCK_TORCH, SEED, speech_like

from ditarkit.export.bundle import export_bundle
from ditarkit.reference.model import DiTAR, perturb_weights
from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.backends.onnxrt import OrtIOBindingRunner, OrtRunner, default_threads
from ditarkit.runtime.cli import main as run_main
from ditarkit.runtime.config import preset
from ditarkit.runtime.manifest import MANIFEST_FILE
from ditarkit.runtime.sampler import GenerationOptions, explicit_noise, generate_latents
from ditarkit.runtime.synthesizer import StreamingDecoder, StreamStats, Synthesizer

# ORT fp32 vs PyTorch over a whole synthesis: per-graph errors ~1e-6 fed back through
# 10 patches of 10 solver steps stay well inside 1e-4.
END_TO_END_TOLERANCE = 1e-4
# Streaming decodes each patch with exactly the decoder's receptive field of context:
# only fp32 summation order differs from the offline decode.
STREAM_TOLERANCE = 1e-5
# The fused graph and the loop run the same fp32 ops; ORT's fusions across the unrolled
# steps reorder a few sums (measured 2e-6 on the tiny preset).
FUSED_TOLERANCE = 1e-5
SECONDS = 1.0


@pytest.fixture(scope="module")
def bundle(tiny_fp32_bundle):
    return tiny_fp32_bundle


@pytest.fixture(scope="module")
def reference_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "voice.wav"
    sf.write(path, speech_like(2.0), 24_000)
    return path


def _fixed_run(cfg):
    noise = np.random.default_rng(7).standard_normal((40, 2, cfg.patch_size, cfg.audio.latent_dim))
    options = GenerationOptions(max_seconds=SECONDS, stop_threshold=0.999999, temperature=0.5, cfg_scale=1.5)
    return explicit_noise(noise.astype(np.float32)), options


@pytest.fixture(scope="module")
def plain_model_and_bundle(tmp_path_factory):
    """The tiny preset without a text cursor: checkpoints made before it still run."""
    import torch

    torch.manual_seed(SEED)
    model = perturb_weights(DiTAR(dataclasses.replace(preset("tiny"), cursor=None)), seed=SEED).eval()
    path = tmp_path_factory.mktemp("bundle") / "plain"
    export_bundle(model, path)
    return model, path


def test_runtime_reproduces_the_reference_latents_and_waveform(tiny_model, bundle):
    _check_runtime_reproduces_the_reference(tiny_model, bundle)


def test_a_model_without_a_text_cursor_runs_the_same_way(plain_model_and_bundle):
    model, bundle = plain_model_and_bundle
    assert model.config.cursor is None and "text_cursor" not in OrtRunner(bundle).specs
    _check_runtime_reproduces_the_reference(model, bundle)


def test_a_model_that_reads_phonemes_runs_the_same_way(tmp_path):
    import torch

    from ditarkit.runtime.config import lexicon_text
    from ditarkit.runtime.text import model_frontend

    torch.manual_seed(SEED)
    model = perturb_weights(DiTAR(dataclasses.replace(preset("tiny"), text=lexicon_text())), seed=SEED).eval()
    export_bundle(model, tmp_path / "lexicon")
    ids = model_frontend(model.config.text).encode("thought")  # TH AO1 T: ids past the characters'
    assert min(ids[1:-1]) >= model.config.text.NUM_SPECIAL + len(model.config.text.symbols)
    _check_runtime_reproduces_the_reference(model, tmp_path / "lexicon", ids)


def _check_runtime_reproduces_the_reference(tiny_model, bundle, ids=(1, 20, 21, 22, 2)):
    torch_runner, ort_runner = TorchRunner(tiny_model), OrtRunner(bundle)
    prompt_audio = speech_like(2.0)
    prompts = [r.encode_audio(prompt_audio) for r in (torch_runner, ort_runner)]
    assert np.abs(prompts[0] - prompts[1]).max() <= END_TO_END_TOLERANCE
    noise, options = _fixed_run(tiny_model.config)
    ids = list(ids)
    want = generate_latents(torch_runner, ids, prompts[0], options, noise)
    got = generate_latents(ort_runner, ids, prompts[1], options, noise)
    assert want.shape == got.shape == (40, 64)
    assert np.abs(want - got).max() <= END_TO_END_TOLERANCE * max(1.0, np.abs(want).max())
    wave_want, wave_got = torch_runner.decode_latents(want), ort_runner.decode_latents(got)
    assert wave_want.shape == (24_000,)
    assert np.abs(wave_want - wave_got).max() <= END_TO_END_TOLERANCE * max(1.0, np.abs(wave_want).max())


def test_io_binding_runner_keeps_the_cache_in_place_and_matches(bundle):
    """The device-resident KV path (run here with host memory) gives the plain runner's result."""
    plain, bound = OrtRunner(bundle), OrtIOBindingRunner(bundle, device="cpu")
    prompt = plain.encode_audio(speech_like(2.0))
    noise, options = _fixed_run(plain.config)
    want = generate_latents(plain, [1, 30, 31, 2], prompt, options, noise)
    got = generate_latents(bound, [1, 30, 31, 2], prompt, options, noise)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 0.35, 1.0])
def test_fused_sampler_graph_equals_the_step_by_step_loop(bundle, temperature):
    """One locdit_sampler call per patch gives the numpy loop's patches (locdit per step),
    for tau at the deterministic end, between grid points, and starting from noise."""
    runner = OrtRunner(bundle)
    prompt = runner.encode_audio(speech_like(2.0))
    noise, options = _fixed_run(runner.config)
    options = replace(options, temperature=temperature)
    fused = generate_latents(runner, [1, 30, 31, 2], prompt, options, noise)
    runner.fused_sampler = False
    stepwise = generate_latents(runner, [1, 30, 31, 2], prompt, options, noise)
    np.testing.assert_allclose(fused, stepwise, rtol=0, atol=FUSED_TOLERANCE)


def test_an_nfe_other_than_the_models_runs_step_by_step(bundle):
    runner = OrtRunner(bundle)
    calls = []
    run = runner.run
    runner.run = lambda name, feeds: (calls.append(name), run(name, feeds))[1]
    noise, options = _fixed_run(runner.config)
    latents = generate_latents(runner, [1, 30, 2], runner.encode_audio(speech_like(2.0)), replace(options, nfe=3),
                               noise)
    patches = len(latents) // runner.config.patch_size
    assert "locdit_sampler" not in calls and calls.count("locdit") == 3 * patches


def test_stream_equals_offline_decoding_and_starts_after_the_first_patch(bundle, reference_wav):
    synth = Synthesizer(bundle, backend="onnxruntime")
    voice = synth.voice(reference_wav)
    noise, options = _fixed_run(synth.config)
    calls = []
    draw_patch = synth.runner.draw_patch
    synth.runner.draw_patch = lambda *a: (calls.append(1), draw_patch(*a))[1]
    stream = synth.stream("hello world", voice, options, noise)
    first = next(stream)
    assert len(calls) == 1  # only the first patch was drawn before its audio came out
    chunks = [first, *stream]
    assert len(first) == synth.config.patch_size * synth.config.audio.hop_length
    ids = synth.frontend.encode("hello world")
    offline_latents = generate_latents(synth.runner, ids, voice.latents, options, noise)
    offline = synth.runner.decode_latents(offline_latents)
    streamed = np.concatenate(chunks)
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() <= STREAM_TOLERANCE * max(1.0, np.abs(offline).max())


def test_chunks_grow_from_one_patch_to_the_cap(bundle, reference_wav):
    synth = Synthesizer(bundle, backend="onnxruntime")
    voice = synth.voice(reference_wav)
    noise, options = _fixed_run(synth.config)
    samples_per_patch = synth.config.patch_size * synth.config.audio.hop_length
    for cap, head in ((4, [1, 2, 4]), (1, [1, 1, 1])):
        stats = StreamStats()
        sizes = [len(c) // samples_per_patch for c in synth.stream("hello world", voice, options, noise, stats,
                                                                   max_chunk_patches=cap)]
        assert sizes[:3] == head and max(sizes) == cap and sum(sizes) == stats.patches


def test_background_decoding_returns_the_same_chunks_in_order(bundle):
    runner = OrtRunner(bundle)
    cfg = runner.config
    patches = np.random.default_rng(5).standard_normal((9, cfg.patch_size, cfg.audio.latent_dim)).astype(np.float32)

    def chunks(executor):
        decoder = StreamingDecoder(runner, executor=executor)
        first = decoder.push(patches[0])
        assert len(first) == 1  # the first chunk never waits for a worker
        return first + [chunk for patch in patches[1:] for chunk in decoder.push(patch)] + decoder.finish()

    with ThreadPoolExecutor(1) as worker:
        threaded = chunks(worker)
    inline = chunks(None)
    assert [len(c) for c in threaded] == [len(c) for c in inline]
    assert all(np.array_equal(a, b) for a, b in zip(threaded, inline))


def test_a_stream_closed_early_does_not_disturb_the_next(bundle, reference_wav):
    with Synthesizer(bundle, backend="onnxruntime") as synth:
        voice = synth.voice(reference_wav)
        noise, options = _fixed_run(synth.config)
        whole = np.concatenate(list(synth.stream("hello world", voice, options, noise)))
        stream = synth.stream("hello world", voice, options, noise, max_chunk_patches=1)
        next(stream), next(stream), next(stream)
        stream.close()  # the listener hung up with chunks still being decoded
        again = np.concatenate(list(synth.stream("hello world", voice, options, noise)))
    assert np.array_equal(whole, again)


def test_decoding_goes_to_a_spare_core_only(bundle, monkeypatch):
    from ditarkit.runtime import runner as runner_module

    runner = OrtRunner(bundle, threads=1)
    monkeypatch.setattr(runner_module, "usable_cores", lambda: 1)
    assert not runner.decodes_in_background()
    monkeypatch.setattr(runner_module, "usable_cores", lambda: 2)
    assert runner.decodes_in_background()
    assert not OrtRunner(bundle, threads=2).decodes_in_background()  # the decoder would take 2 more


def _run(args):
    return CliRunner().invoke(run_main, ["--quiet", *args])


def test_cli_writes_a_24khz_wav_from_a_stereo_44k_reference(bundle, tmp_path):
    stereo = np.stack([speech_like(2.0, 44_100), speech_like(2.0, 44_100, seed=1)], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 44_100)
    out = tmp_path / "out.wav"
    result = _run(["--bundle", str(bundle), "--text", "Hello. This is a test.", "--ref",
                   str(tmp_path / "stereo.wav"), "-o", str(out), "--max-seconds", "0.5"])
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    assert rate == 24_000 and audio.ndim == 1 and len(audio) > 0
    assert "RTF" in result.stdout and "first chunk" in result.stdout
    assert not list(tmp_path.glob(".*tmp"))


def _bad_inputs(bundle, tmp, reference_wav):
    sf.write(tmp / "silent.wav", np.zeros(48_000, np.float32), 24_000)
    sf.write(tmp / "short.wav", speech_like(0.4), 24_000)
    (tmp / "text.wav").write_text("this is not audio")
    foreign = tmp / "foreign"
    foreign.mkdir()
    for f in bundle.iterdir():
        (foreign / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((foreign / MANIFEST_FILE).read_text())
    manifest.update(format_version=0, kit_version="0.0.1")
    (foreign / MANIFEST_FILE).write_text(json.dumps(manifest))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for f in bundle.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "locdit.onnx").write_bytes(b"\0" * 100)
    ok = ["--bundle", str(bundle), "--ref", str(reference_wav)]
    return {
        "empty text": (["--text", ""] + ok, "no speakable"),
        "emoji only": (["--text", "\U0001f600\U0001f916"] + ok, "no speakable"),
        "missing reference": (["--bundle", str(bundle), "--text", "hi", "--ref", str(tmp / "nope.wav")], "not found"),
        "silent reference": (["--bundle", str(bundle), "--text", "hi", "--ref", str(tmp / "silent.wav")], "silent"),
        "short reference": (["--bundle", str(bundle), "--text", "hi", "--ref", str(tmp / "short.wav")], "at least"),
        "unreadable reference": (["--bundle", str(bundle), "--text", "hi", "--ref", str(tmp / "text.wav")],
                                 "cannot read"),
        "foreign bundle": (["--bundle", str(foreign), "--text", "hi", "--ref", str(reference_wav)], "re-export"),
        "corrupt graph": (["--bundle", str(corrupt), "--text", "hi", "--ref", str(reference_wav)], "checksum"),
        "bad temperature": (["--text", "hi", "--temperature", "2"] + ok, "temperature"),
    }


def test_every_bad_input_exits_nonzero_in_one_line_and_writes_nothing(bundle, tmp_path, reference_wav):
    for case, (args, message) in _bad_inputs(bundle, tmp_path, reference_wav).items():
        out = tmp_path / "out.wav"
        result = _run([*args, "-o", str(out)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (case, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], (case, lines)
        assert not out.exists(), case
        assert not list(tmp_path.glob(".out.wav*")), case


def test_runtime_imports_and_runs_without_torch(bundle, reference_wav, tmp_path):
    out = tmp_path / "out.wav"
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from ditarkit.runtime.cli import main
        main(["--quiet", "--bundle", {str(bundle)!r}, "--ref", {str(reference_wav)!r}, "--text", "hi there",
              "-o", {str(out)!r}, "--max-seconds", "0.3"], standalone_mode=False)
        assert "torch" not in sys.modules
        print("ran without torch")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ran without torch" in result.stdout
    assert sf.info(str(out)).samplerate == 24_000


def test_a_sentence_with_nothing_to_say_is_skipped_not_fatal(bundle, reference_wav):
    synth = Synthesizer(bundle, backend="onnxruntime")
    stats_text = "Hello there. ~~~! How are you?"  # "~" is no symbol of the model's
    stats = StreamStats()
    chunks = list(synth.stream(stats_text, synth.voice(reference_wav), synth.options(max_seconds=0.2), stats=stats))
    assert stats.sentences == ["hello there.", "how are you?"]  # as the model reads them: normalised
    assert len(chunks) == stats.patches > 0


def test_small_models_default_to_one_onnxruntime_thread():
    assert default_threads(preset("tiny")) == 1 and default_threads(preset("small")) == 1
    assert default_threads(preset("paper")) is None  # ONNX Runtime's own default: all cores
