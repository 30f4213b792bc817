"""A VoxCPM checkpoint through `ditar-export --from-voxcpm` and the kit's one runtime loop,
against the `voxcpm` package's own inference loop: same weights, same injected noise.

Tiny random models of both architectures (tests/voxcpm_oracle.py); the package's `_inference`
is the oracle for the patches (prompt layout, FSQ, residual LM, sway grid, CFG-zero*, the stop
rule), its AudioVAE's decode for the waveform.
"""

from __future__ import annotations

import inspect
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from voxcpm_oracle import build_package_model, tiny_config, write_checkpoint

from ditarkit.export.cli import main as export_main
from ditarkit.export.parity import QUANTIZER_TOLERANCE, TOLERANCE
from ditarkit.export.voxcpm.checkpoint import ARCHITECTURES, load_voxcpm
from ditarkit.export.voxcpm.contract import package_inputs
from ditarkit.export.voxcpm.export import export_voxcpm, load_for_export
from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.manifest import load_manifest
from ditarkit.runtime.sampler import GenerationOptions, explicit_noise, generate_patches
from ditarkit.runtime.synthesizer import Synthesizer, Voice
from ditarkit.runtime.text import TextError
from ditarkit.runtime.tokenizer import TokenizerFrontend

PROMPT_PATCHES, MAX_PATCHES, MAX_TOKENS = 4, 10, 12
TEXT, REFERENCE_TEXT = "hello hello", "hell"
# The kit's loop on the package's own modules (the same fp32 arithmetic reordered by the plain
# attention): errors of ~1e-7 per graph carried through 10 patches of 10 solver steps.
TORCH_ATOL = 1e-5
# ONNX Runtime's fused kernels on top, on latents of magnitude ~3.
ORT_ATOL = 5e-5
# Audio in [-1, 1] (tanh) from those latents through the VAE decoder.
AUDIO_ATOL = 5e-5


def _limits(config: dict) -> dict:
    """Tiny models' VAEs have hops of a few samples: limits in patches, said in seconds."""
    hop = int(np.prod(config["audio_vae_config"]["encoder_rates"]))
    patch_seconds = config["patch_size"] * hop / config["audio_vae_config"]["sample_rate"]
    return {"max_tokens": MAX_TOKENS, "max_seconds": (MAX_PATCHES + 0.5) * patch_seconds,
            "max_prompt_seconds": (PROMPT_PATCHES + 0.5) * patch_seconds}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    architecture = request.param
    config = tiny_config(architecture)
    config["max_length"] = 64  # the LM positions the limits above need
    root = tmp_path_factory.mktemp(architecture)
    folder = write_checkpoint(root / "checkpoint", config, build_package_model(config, seed=3))
    bundle = root / "bundle"
    manifest, results = export_voxcpm(folder, bundle, **_limits(config))
    return architecture, config, folder, bundle, manifest, results


def test_every_graph_matches_the_package_modules_in_onnx_runtime(checkpoint):
    architecture, _, _, bundle, manifest, results = checkpoint
    assert manifest.config.family == architecture and (bundle / "tokenizer.json").is_file()
    assert {r.graph for r in results} == set(manifest.graphs)
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    assert max(r.max_abs / r.scale for r in results) < 1e-5


def _prompt(config: dict) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((PROMPT_PATCHES * config["patch_size"], config["feat_dim"])).astype(np.float32)


def _noise(config: dict) -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.standard_normal((MAX_PATCHES, 2, config["patch_size"], config["feat_dim"])).astype(np.float32)


def package_patches(folder, architecture, ids, prompt, noise, patch) -> np.ndarray:
    """The package's `_inference` with each patch's starting noise injected."""
    model = load_voxcpm(folder)[0]
    starts = iter(torch.from_numpy(np.ascontiguousarray(noise[:, 0].transpose(0, 2, 1)[:, None])))
    inputs = package_inputs(model, architecture, ids, prompt.reshape(-1, patch, prompt.shape[1]))
    with mock.patch("torch.randn", side_effect=lambda *a, **k: next(starts)[0][None]):
        result = next(model._inference(*inputs, min_len=2, max_len=MAX_PATCHES, inference_timesteps=10,
                                       cfg_value=2.0, streaming=False))
    if architecture == "voxcpm":  # v1 returns its decode context (the prompt's last patches) first
        context = min(inspect.signature(model._inference).parameters["streaming_prefix_len"].default - 1,
                      prompt.shape[0] // patch)
        return result[1][context:].numpy()
    return result[1].numpy()


def _kit_ids(bundle, contract, architecture) -> list[int]:
    frontend = TokenizerFrontend.from_spec(contract.text, bundle)
    return frontend.encode(TEXT, prompt_text=REFERENCE_TEXT if architecture == "voxcpm" else "")


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_the_runtime_loop_matches_the_package_inference(checkpoint, backend):
    architecture, config, folder, bundle, manifest, _ = checkpoint
    contract = manifest.config
    if backend == "pytorch":
        graphs, contract, _ = load_for_export(folder, **_limits(config))
        runner, atol = TorchRunner.from_graphs(contract, graphs), TORCH_ATOL
    else:
        runner, atol = OrtRunner(bundle), ORT_ATOL
    ids, prompt, noise = _kit_ids(bundle, contract, architecture), _prompt(config), _noise(config)
    options = GenerationOptions.from_config(contract)
    got = np.stack(list(generate_patches(runner, ids, prompt, options, explicit_noise(noise))))
    want = package_patches(folder, architecture, ids, prompt, noise, config["patch_size"])
    assert got.shape == want.shape, "the stop rule ended at another patch"
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_streamed_audio_equals_the_package_decode_of_reference_and_speech(checkpoint):
    architecture, config, folder, bundle, manifest, _ = checkpoint
    contract = manifest.config
    prompt, noise = _prompt(config), _noise(config)
    synth = Synthesizer(bundle)
    voice = Voice(prompt, 0.0, "array", REFERENCE_TEXT if architecture == "voxcpm" else "")
    chunks = list(synth.stream(TEXT, voice, noise=explicit_noise(noise), max_chunk_patches=1))
    ids = _kit_ids(bundle, contract, architecture)
    patches = package_patches(folder, architecture, ids, prompt, noise, config["patch_size"])
    speech = patches.reshape(-1, patches.shape[-1])
    model = load_voxcpm(folder)[0]
    lead = prompt if contract.prompt.continues_reference else prompt[:0]
    latents = torch.from_numpy(np.concatenate([lead, speech]).T[None].copy())
    with torch.no_grad():
        want = model.audio_vae.decode(latents)[0, 0].numpy()[len(lead) * contract.audio.output_hop_length:]
    got = np.concatenate(chunks)
    assert len(chunks) == len(patches) and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)
    assert synth.sample_rate == config["audio_vae_config"].get("out_sample_rate", 16000)


def test_continuation_needs_the_reference_transcript(checkpoint):
    architecture, config, _, bundle, _, _ = checkpoint
    synth = Synthesizer(bundle)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    if architecture == "voxcpm":
        with pytest.raises(ValueError, match="--ref-text"):
            synth.voice(audio, 16000)
        voice = Voice(_prompt(config), 0.0, "latents made elsewhere")  # no transcript
        with pytest.raises(ValueError, match="needs its transcript"):
            synth.synthesize(TEXT, voice)
    else:
        assert synth.voice(audio, 16000).latents.shape[1] == config["feat_dim"]


def test_text_over_the_limit_is_refused_in_one_line(checkpoint):
    _, _, _, bundle, _, _ = checkpoint
    synth = Synthesizer(bundle)
    voice = Voice(np.zeros((8, 8), np.float32), 0.0, "array", REFERENCE_TEXT)
    with pytest.raises(TextError, match="tokens, over the model's"):
        synth.synthesize("hello " * 40, voice)


@pytest.mark.parametrize("case, expected", [
    ("missing folder", "no such directory"),
    ("unknown architecture", "architecture"),
    ("truncated weights", "model.safetensors"),
])
def test_export_refuses_bad_checkpoints_in_one_line_and_writes_nothing(checkpoint, tmp_path, case, expected):
    import json
    import shutil

    _, _, folder, _, _, _ = checkpoint
    broken = tmp_path / "ckpt"
    if case != "missing folder":
        shutil.copytree(folder, broken)
    if case == "unknown architecture":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "architecture": "voxcpm9"}))
    elif case == "truncated weights":
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_main, ["--from-voxcpm", str(broken), "--out", str(out), "--no-trt"])
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error:") and expected in message[0], result.output
    assert not out.exists()


def test_old_bundles_are_refused_in_one_line(checkpoint, tmp_path):
    import json
    import shutil

    _, _, _, bundle, _, _ = checkpoint
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    data = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(Exception, match="re-export it"):
        load_manifest(old)


def test_ditar_run_speaks_a_voxcpm_bundle_and_refuses_v1_prompts_it_cannot_read(checkpoint, tmp_path):
    import soundfile as sf
    from conftest import speech_like

    from ditarkit.runtime.cli import main as run_main

    architecture, config, _, bundle, manifest, _ = checkpoint
    reference = tmp_path / "ref.wav"
    sf.write(reference, speech_like(2.0, 16000), 16000)
    out = tmp_path / "out.wav"
    args = ["--bundle", str(bundle), "--text", TEXT, "--ref", str(reference), "-o", str(out), "-q"]
    if architecture == "voxcpm":
        refused = CliRunner().invoke(run_main, args)
        assert refused.exit_code == 1 and "--ref-text" in refused.output and not out.exists()
        assert len(refused.output.strip().splitlines()) == 1
        # The tiny model's prompt holds a few ms: a reference is cut to fit, but not one whose
        # transcript the model reads (it would no longer say what the audio says).
        too_long = CliRunner().invoke(run_main, [*args, "--ref-text", REFERENCE_TEXT])
        assert too_long.exit_code == 1 and "not cut" in too_long.output and not out.exists()
        assert len(too_long.output.strip().splitlines()) == 1
        return
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    assert rate == manifest.config.audio.output_sample_rate and len(audio) > 0
    assert len(audio) % (manifest.config.patch_size * manifest.config.audio.output_hop_length) == 0


def test_an_fp16_bundle_keeps_parity_with_the_package(checkpoint, tmp_path):
    _, config, folder, _, _, _ = checkpoint
    manifest, results = export_voxcpm(folder, tmp_path / "fp16", fp16=True, **_limits(config))
    assert manifest.precision == "fp16" and results and all(r.ok for r in results), [r for r in results if not r.ok]
    # Only the LM step holds the FSQ, whose level jumps earn it the wider limit.
    assert {r.graph for r in results if r.tolerance == QUANTIZER_TOLERANCE["fp16"]} == {"lm"}
    assert all(r.tolerance == TOLERANCE["fp16"] for r in results if r.graph != "lm")


def test_a_graph_past_the_size_limit_keeps_its_weights_in_a_checksummed_file(checkpoint, tmp_path, monkeypatch):
    """Graphs whose weights pass 2 GiB (VoxCPM 1.5 and VoxCPM2 LMs in fp32) are written as ONNX
    external data; the limit is lowered here so a tiny model takes that path."""
    from ditarkit.export import onnx_export
    from ditarkit.runtime.manifest import BundleError

    _, config, folder, bundle, _, _ = checkpoint
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 4096)
    manifest, results = export_voxcpm(folder, tmp_path / "big", **_limits(config))
    lm = manifest.graphs["lm"]
    assert lm.data_file == "lm.onnx.data" and (tmp_path / "big" / lm.data_file).stat().st_size > 4096
    assert all(r.ok for r in results)
    assert load_manifest(tmp_path / "big").graphs["lm"] == lm
    noise = explicit_noise(_noise(config))
    ids, prompt = _kit_ids(tmp_path / "big", manifest.config, manifest.config.family), _prompt(config)
    options = GenerationOptions.from_config(manifest.config)
    big = list(generate_patches(OrtRunner(tmp_path / "big"), ids, prompt, options, noise))
    small = list(generate_patches(OrtRunner(bundle), ids, prompt, options, explicit_noise(_noise(config))))
    np.testing.assert_array_equal(np.stack(big), np.stack(small))
    data = tmp_path / "big" / lm.data_file
    raw = data.read_bytes()
    data.write_bytes(raw[:-4] + bytes(b ^ 0xFF for b in raw[-4:]))  # the last weight, corrupted
    with pytest.raises(BundleError, match="lm.onnx.data does not match its checksum"):
        load_manifest(tmp_path / "big")


def test_export_limits_size_the_bundle_and_are_refused_where_the_model_cannot_hold_them(checkpoint, tmp_path):
    _, config, folder, _, _, _ = checkpoint
    limits = _limits(config)
    flags = ["--max-seconds", str(limits["max_seconds"]), "--max-prompt-seconds", str(limits["max_prompt_seconds"]),
             "--max-tokens", str(limits["max_tokens"])]
    out = tmp_path / "sized"
    result = CliRunner().invoke(export_main, ["--from-voxcpm", str(folder), "--out", str(out), "--no-trt", *flags])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).config.max_patches == MAX_PATCHES
    # The defaults (30 s of speech) need far more positions than the tiny model's table.
    refused = CliRunner().invoke(export_main, ["--from-voxcpm", str(folder), "--out", str(tmp_path / "no"), "--no-trt"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert refused.exit_code == 1 and len(errors) == 1 and "lower --max-seconds" in errors[0]
    assert refused.stdout == "" and "Traceback" not in refused.output  # the package's own print went to stderr
    assert not (tmp_path / "no").exists()
    misplaced = CliRunner().invoke(export_main, ["--preset", "tiny", "--max-seconds", "3", "--out",
                                                 str(tmp_path / "t")])
    assert misplaced.exit_code == 2 and "go with --from-voxcpm" in misplaced.output
