"""ditar-bench --voxcpm: a VoxCPM checkpoint in the `voxcpm` package's own loop and in the kit's bundles.

The rows, each in a process of its own like the kit's:

* "voxcpm package": the package's `_inference` over its own modules (fp32, eager, CPU) in
  streaming mode, decoded as its `generate_streaming` decodes (v1: each patch re-decodes the
  last 3 patches and keeps the newest one's samples; v2: its stateful streaming decoder);
* the kit's bundles exported from the same folder (`export_voxcpm`, fp32 and fp16) on ONNX
  Runtime (and TensorRT where it runs), and an INT8 bundle where `ditar-calibrate` quantizes
  the fp32 one.

Every row gets the same inputs: the text ids of the checkpoint's tokenizer.json (the kit's
frontend), one voice encoded once by the fp32 bundle, the noise `seeded_noise(seed)` draws
for each text (the package's `torch.randn` is handed it), and exactly the workload's patches
(the package's stop head is out of reach with min_len = max_len). Each row returns its last
run's patches; the parent reports each row's largest difference from the package's.

The package row's stages carry the name of the kit graph doing the same work: text_embedding
= base_lm.embed_tokens; patch_encoder = feat_encoder (in the prefill over every prefix
position, as the package runs it); lm = base LM + FSQ + residual LM, the prefill and each step
(the package steps once more per sentence than the kit: after its last patch too);
locdit_sampler = feat_decoder (UnifiedCFM, the whole guided solve); vae_decoder = one decode.

`0.5b-random` is the published VoxCPM-0.5B architecture (`voxcpm_05b_config`) with the
package's own random initialisation, written as a checkpoint folder the way the releases ship
one (bf16 model.safetensors, audiovae.pth, and a character-level tokenizer.json): no download.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.bench.measure import (
    REFERENCE_SECONDS,
    Measurement,
    Workload,
    bundle_row,
    log,
    max_rss_mb,
    memory,
    timing_fields,
)
from ditarkit.runtime.manifest import LM, LOCDIT_SAMPLER, PATCH_ENCODER, TEXT_EMBEDDING, VAE_DECODER

PACKAGE_ROW = "voxcpm package"
RANDOM_MODELS = ("0.5b-random",)
DEFAULT_REF_TEXT = "This is the voice the speech goes on in."  # the synthetic voice's transcript
CALIBRATION_SAMPLES = 16  # recorded feeds per graph when the bench calibrates an INT8 bundle

# VoxCPM-0.5B's config.json (openbmb/VoxCPM-0.5B, architecture "voxcpm"). Its values agree
# across independent copies: a fine-tune's verbatim config.json on Hugging Face
# (Apurba-NSU-RnD-Lab/MenoChat_Vox_TTS), a checker of the release's config.json (vokra) and
# ports that hard-code it (aha, burn, llama.cpp-omni); the weight files fit it (652M parameters
# = the 1.30 GB bf16 model, 75.4M = the 301 MB fp32 audiovae.pth). The LongRoPE factors are
# MiniCPM-4's (head_dim / 2 = 32, long = short). audio_vae_config is the package's AudioVAEConfig
# defaults, written out; cfm_config names the release's solver settings (none affect inference).
_ROPE_FACTORS_05B = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297,
]  # fmt: skip
_BLOCK_05B = {"hidden_dim": 1024, "ffn_dim": 4096, "num_heads": 16, "num_layers": 4}


def voxcpm_05b_config() -> dict[str, Any]:
    """config.json of VoxCPM-0.5B (see above for the sources)."""
    return {
        "architecture": "voxcpm",
        "lm_config": {
            "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 1024, "intermediate_size": 4096,
            "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 10000,
            "rope_scaling": {"type": "longrope", "long_factor": list(_ROPE_FACTORS_05B),
                             "short_factor": list(_ROPE_FACTORS_05B), "original_max_position_embeddings": 32768},
            "vocab_size": 73448, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "use_mup": False,
        },
        "patch_size": 2,
        "feat_dim": 64,
        "scalar_quantization_latent_dim": 256,
        "scalar_quantization_scale": 9,
        "residual_lm_num_layers": 6,
        "encoder_config": dict(_BLOCK_05B),
        "dit_config": dict(_BLOCK_05B, cfm_config={"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "log-norm",
                                                   "inference_cfg_rate": 2.0}),
        "audio_vae_config": {"encoder_dim": 128, "encoder_rates": [2, 5, 8, 8], "latent_dim": 64, "decoder_dim": 1536,
                             "decoder_rates": [8, 8, 5, 2], "depthwise": True, "sample_rate": 16000,
                             "use_noise_block": False},
        "max_length": 4096,
        "device": "cuda",
        "dtype": "bfloat16",
    }  # fmt: skip


RANDOM_CONFIGS = {"0.5b-random": voxcpm_05b_config}


def char_tokenizer_json() -> dict[str, Any]:
    """A Llama-style tokenizer.json (BPE without merges, byte fallback, "▁" for spaces): one token
    per character of printable ASCII, the others by bytes; ids 3-109 are unused placeholders, so
    no character gets VoxCPM's marker ids (101-104)."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<|reserved_{i}|>" for i in range(3, 110)), "\u2581"]
    tokens += [chr(c) for c in range(33, 127)] + [f"<0x{b:02X}>" for b in range(256)]
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in enumerate(tokens[:3])]  # fmt: skip
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
    }  # fmt: skip


# -- in the row processes ---------------------------------------------------------------------
def write_random_checkpoint(folder: str, name: str, seed: int = 0) -> str:
    """A checkpoint folder of `name` (RANDOM_MODELS) with the package's random initialisation."""
    import torch
    from safetensors.torch import save_file

    from ditarkit.export.voxcpm.checkpoint import VAE_PREFIX, VocabOnlyTokenizer, import_voxcpm

    config = RANDOM_CONFIGS[name]()
    tokenizer = char_tokenizer_json()
    classes = import_voxcpm(config["architecture"])
    parsed = classes["config"].model_validate(copy.deepcopy(config))
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(sys.stderr):  # the package prints its device choice
        vae = classes["vae"](parsed.audio_vae_config)
        model = classes["model"](parsed, VocabOnlyTokenizer(tokenizer["model"]["vocab"]), vae, device="cpu")
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, writing {folder}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    state = model.state_dict()
    lm = {k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v.contiguous()
          for k, v in state.items() if not k.startswith(VAE_PREFIX)}  # as the releases: bf16
    save_file(lm, str(out / "model.safetensors"))
    del lm
    torch.save({"state_dict": {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}},
               out / "audiovae.pth")
    return str(out)


def workload_limits(folder: str, work: Workload, ref_text: str) -> dict[str, float]:
    """Limits that hold this workload, for a model whose positions cannot hold the kit's defaults
    (a tiny test model): its longest text, its patches, and as much reference as is left."""
    from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError, detect_architecture, import_voxcpm, read_config
    from ditarkit.export.voxcpm.contract import MAX_PROMPT_SECONDS
    from ditarkit.runtime.contract import patches_in
    from ditarkit.runtime.tokenizer import TokenizerFrontend

    architecture = detect_architecture(folder)
    classes = import_voxcpm(architecture)
    config = classes["config"].model_validate(read_config(folder))
    vae = config.audio_vae_config or classes["vae_config"]()
    patch_seconds = config.patch_size * math.prod(vae.encoder_rates) / vae.sample_rate
    patches = max(1, round(work.seconds / patch_seconds))
    frontend = TokenizerFrontend(Path(folder) / "tokenizer.json", 1 << 30, config.lm_config.vocab_size)
    prompt_text = ref_text if architecture == "voxcpm" else ""  # v1 reads the transcript before the text
    tokens = max(len(frontend.encode(text, prompt_text=prompt_text)) for text in work.texts)
    room = min(config.max_length, config.lm_config.max_position_embeddings)
    spare = min(room - tokens - patches - 3, patches_in(MAX_PROMPT_SECONDS, patch_seconds))  # <= 3 marker ids
    if spare < 1:
        raise VoxCPMCheckpointError(f"{folder}: {room} LM positions cannot hold {tokens} text tokens, "
                                    f"{patches} patches and a reference: shorten --text or --seconds")
    return {"max_tokens": tokens, "max_seconds": (patches + 0.5) * patch_seconds,
            "max_prompt_seconds": spare * patch_seconds * (1 + 1e-6)}


def export_voxcpm_bundles(folder: str, out: str, precisions: tuple[str, ...], engines: bool, work: Workload,
                          ref_text: str) -> dict[str, Any]:
    """Export the checkpoint once per precision into out/<precision> (no parity run: ditar-export
    and the tests do that; the rows' patch differences check the bundles end to end), then encode
    the voice once with the first bundle. Returns {"bundles": precision -> folder, "voice": Voice}."""
    from ditarkit.bench.signals import speech_like
    from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError
    from ditarkit.export.voxcpm.export import export_voxcpm
    from ditarkit.runtime.audio import prepare_reference
    from ditarkit.runtime.synthesizer import Synthesizer, Voice

    limits: dict[str, float] = {}
    bundles = {}
    for precision in precisions:
        path = Path(out) / precision
        log(f"exporting {precision} bundle to {path}")
        try:
            export_voxcpm(folder, path, fp16=precision == "fp16", parity=False, log=log, **limits)
        except VoxCPMCheckpointError as err:
            if limits or "LM positions" not in str(err):
                raise
            limits = workload_limits(folder, work, ref_text)
            log(f"  the kit's default limits need more LM positions than the model has: exporting for the "
                f"workload ({', '.join(f'{k} {v:.4g}' for k, v in limits.items())})")
            export_voxcpm(folder, path, fp16=precision == "fp16", parity=False, log=log, **limits)
        if engines:
            from ditarkit.runtime.backends.tensorrt import build_engines

            build_engines(path, log=log)
        bundles[precision] = str(path)
    synth = Synthesizer(bundles[precisions[0]], backend="onnxruntime", threads=work.threads)
    if work.ref:  # as a user's: refused where its transcript is read and it is longer than the model takes
        voice = synth.voice(work.ref, text=ref_text)
    else:  # made up, transcript and all: cut to the longest reference the bundle takes, as any other model's
        cfg = synth.config
        rate = cfg.audio.sample_rate
        prepared = prepare_reference(speech_like(REFERENCE_SECONDS, rate), rate, rate, cfg.audio.hop_length,
                                     cfg.max_prompt_seconds, "synthetic voice", fit=cfg.audio.reference_fit,
                                     patch_size=cfg.patch_size)
        voice = Voice(synth.runner.encode_audio(prepared), len(prepared) / rate, "synthetic", ref_text)
    synth.close()
    return {"bundles": bundles, "voice": voice}


def calibrate_int8(bundle: str, out: str, ref_wav: str, ref_text: str, work: Workload,
                   texts_file: str | None = None) -> dict[str, str | None]:
    """`ditar-calibrate` on the fp32 bundle, as a user runs it (its report goes to stderr here), on
    its own sentences or `texts_file`: {"bundle": out} where it quantized it, else {"reason": its
    one-line error}."""
    import click

    from ditarkit.calibration.cli import main as calibrate_main

    args = ["--bundle", bundle, "-o", out, "--ref", ref_wav, "--samples", str(CALIBRATION_SAMPLES),
            "--max-seconds", f"{max(work.seconds, 0.1):g}", "--seed", str(work.seed)]
    if texts_file:
        args += ["--texts", texts_file]
    if ref_text and any("--ref-text" in p.opts for p in calibrate_main.params):  # where it takes transcripts
        args += ["--ref-text", ref_text]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            calibrate_main.main(args, prog_name="ditar-calibrate", standalone_mode=False)
    except click.ClickException as err:
        return {"bundle": None, "reason": f"ditar-calibrate {' '.join(args[:2])} ...: {err.format_message()}"}
    except Exception as err:  # a crash inside calibration: the row is skipped with what it said
        return {"bundle": None, "reason": f"ditar-calibrate crashed: {type(err).__name__}: {err}"}
    return {"bundle": out, "reason": None}


def bench_voxcpm_bundle(bundle: str, backend: str, work: Workload, voice,
                        note: str | None = None) -> tuple[Measurement, np.ndarray]:
    """A VoxCPM bundle in the kit's runtime with the shared voice; (row, last run's patches)."""
    patches: list[np.ndarray] = []
    row = bundle_row(bundle, backend, work, voice, patches)
    row.notes += [note] if note else []
    return row, np.stack(patches)


def _timed(fn, calls: list[float], keep: list | None = None):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        if keep is not None:  # feat_decoder's (1, D, P) patch, kept as the kit's (P, D)
            keep.append(out[0].transpose(0, 1).float().numpy().copy())
        return out

    return timed


def _time_lm(model, calls: list[float]) -> None:
    """One `lm` call: from the base LM's entry (prefill or step) to the residual LM's exit."""
    began = [0.0]

    def starts(fn):
        def wrapped(*args, **kwargs):
            began[0] = time.perf_counter()
            return fn(*args, **kwargs)
        return wrapped

    def ends(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append(time.perf_counter() - began[0])
            return out
        return wrapped

    for name in ("forward", "forward_step"):
        setattr(model.base_lm, name, starts(getattr(model.base_lm, name)))
        setattr(model.residual_lm, name, ends(getattr(model.residual_lm, name)))


def _package_stream(model, architecture: str, inputs, patches: int, nfe: int, cfg_value: float,
                    vae_calls: list[float]):
    """The package's streaming generation of one sentence: audio chunks (numpy) as its
    generate_streaming makes them, the stop head out of reach."""
    import torch

    stream = model._inference(*inputs, min_len=patches, max_len=patches, inference_timesteps=nfe,
                              cfg_value=cfg_value, streaming=True)
    if architecture == "voxcpm":
        keep = model.patch_size * model.chunk_size
        for latents, _seq in stream:
            start = time.perf_counter()
            audio = model.audio_vae.decode(latents.to(torch.float32))[..., -keep:]
            vae_calls.append(time.perf_counter() - start)
            yield audio.reshape(-1).numpy()
        return
    with model.audio_vae.streaming_decode() as decoder:
        for latents, _seq, _context in stream:
            start = time.perf_counter()
            audio = decoder.decode_chunk(latents.to(torch.float32))
            vae_calls.append(time.perf_counter() - start)
            yield audio.reshape(-1).numpy()


def bench_voxcpm_package(folder: str, bundle: str, work: Workload, voice) -> tuple[Measurement, np.ndarray]:
    """The voxcpm package's own loop on the checkpoint (fp32, CPU, eager); (row, last run's patches).
    The bundle gives the text frontend and the contract the kit's rows run by."""
    import torch

    from ditarkit.export.voxcpm.checkpoint import detect_architecture, import_voxcpm, load_voxcpm
    from ditarkit.export.voxcpm.contract import package_inputs
    from ditarkit.runtime.manifest import load_manifest
    from ditarkit.runtime.sampler import prompt_patches, seeded_noise
    from ditarkit.runtime.text import text_frontend

    if work.threads:
        torch.set_num_threads(work.threads)
    architecture = detect_architecture(folder)
    import_voxcpm(architecture)  # the package's imports come before the baseline
    sys.modules[f"voxcpm.model.{architecture}"].tqdm = lambda steps, *_args, **_kwargs: steps  # no progress bar
    baseline = max_rss_mb()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        model, _, _ = load_voxcpm(folder)
    load = time.perf_counter() - start
    contract = load_manifest(bundle, verify_files=False).config
    frontend = text_frontend(contract.text, Path(bundle))
    psize, dim = contract.patch_size, contract.audio.latent_dim
    patches = max(1, round(work.seconds / contract.patch_seconds))
    prompt = prompt_patches(voice.latents, contract)
    joined = voice.text if contract.prompt.needs_reference_text else ""
    texts = [[package_inputs(model, architecture, frontend.encode(s, prompt_text=joined), prompt)
              for s in frontend.sentences(text)] for text in work.texts]

    times: dict[str, list[float]] = defaultdict(list)
    drawn: list[np.ndarray] = []
    model.base_lm.embed_tokens.forward = _timed(model.base_lm.embed_tokens.forward, times[TEXT_EMBEDDING])
    model.feat_encoder.forward = _timed(model.feat_encoder.forward, times[PATCH_ENCODER])
    model.feat_decoder.forward = _timed(model.feat_decoder.forward, times[LOCDIT_SAMPLER], drawn)
    _time_lm(model, times[LM])
    noise: dict[str, Any] = {"draw": None}
    real_randn = torch.randn

    def randn(*size, **kwargs):  # the starting noise of each solve, from the kit's seeded draws
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if noise["draw"] is not None and tuple(shape) == (1, dim, psize):
            start = noise["draw"](0)[0]  # (P, C)
            return torch.from_numpy(np.ascontiguousarray(start.T))[None].to(kwargs.get("dtype") or torch.float32)
        return real_randn(*size, **kwargs)

    nfe, cfg_value = contract.sampler.nfe, contract.sampler.cfg_scale + 1.0  # the kit's w is cfg_value - 1
    rate = contract.audio.output_sample_rate

    def one_pass() -> list[tuple[float, float, float]]:
        drawn.clear()
        passes = []
        for sentences in texts:
            noise["draw"] = seeded_noise(work.seed, psize, dim)  # per text, as each kit stream draws it
            begin, first, samples = time.perf_counter(), None, 0
            for inputs in sentences:
                for chunk in _package_stream(model, architecture, inputs, patches, nfe, cfg_value, times[VAE_DECODER]):
                    samples += len(chunk)
                    first = first if first is not None else time.perf_counter() - begin
            passes.append((time.perf_counter() - begin, samples / rate, first))
        return passes

    torch.randn = randn
    try:
        with torch.inference_mode():
            one_pass()  # warm-up
            for calls in times.values():
                calls.clear()
            rtf, first, audio = [], [], 0.0
            for run in range(work.runs):
                passes = one_pass()
                audio = sum(p[1] for p in passes)
                rtf.append(sum(p[0] for p in passes) / audio)
                first += [p[2] for p in passes]
                log(f"  {PACKAGE_ROW}: run {run + 1}/{work.runs}: RTF {rtf[-1]:.3f}, "
                    f"first chunk {1000 * first[-1]:.0f} ms")
    finally:
        torch.randn = real_randn
    expected = patches * sum(len(s) for s in texts)
    timing = timing_fields(work.runs, audio, len(drawn), expected, rtf, first, times)
    timing["notes"] += [
        f"the voxcpm package's own _inference ({architecture}) and streaming decode, eager; "
        "lm = base LM + FSQ + residual LM, one step more per sentence than the kit (after the last patch)",
    ]
    if architecture == "voxcpm":
        timing["notes"].append("VAE: each patch re-decodes the last 3 patches (the package's streaming decode)")
    row = Measurement(PACKAGE_ROW, "fp32", "cpu", load_seconds=load, **memory(baseline), **timing)
    return row, np.stack(drawn)
