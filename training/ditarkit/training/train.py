"""Training recipe for the default voice: the VAE first, then the rest of DiTAR on its latents.

    python -m ditarkit.training.train vae   --corpus data/corpus --run runs/default --minutes 30
    python -m ditarkit.training.train ditar --corpus data/corpus --run runs/default --minutes 120
    python -m ditarkit.training.train ship  --run runs/default

Each stage runs for a time or step budget, checkpoints atomically every few minutes and on
exit, and resumes from its last checkpoint when started again, exactly: the optimizer, the
batch sampler's and torch's random states are saved with it, so a resumed run draws the
batches and noise it would have drawn. Works on CPU or a GPU.

The DiTAR stage makes the text carry the loss (the reasons are measured in FIELD-NOTES):
a few LM heads are supervised toward the characters each patch speaks (`--aligned-heads`),
LocDiT's history is mixed with noise now and then (`--history-noise`) so it must listen to
the LM, the patches the LM reads can be too (`--lm-input-noise`), or be LocDiT's own draws,
there and in LocDiT's history (`--drawn-inputs`), so that reading its own patches in
generation does not throw it off the text, and a new model starts with text
embeddings at the patch vectors' scale and the LM's share of LocDiT's condition at the time
embedding's. Every `--metrics-every` steps the alignment metrics (`metrics.py`) go into the
log, and the curve (PNG) is redrawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ditarkit.reference.checkpoint import WEIGHTS_FILE, load_checkpoint, load_config, save_checkpoint
from ditarkit.reference.losses import LossOptions, ditar_loss, train_step, vae_loss
from ditarkit.reference.model import DiTAR, Transformer
from ditarkit.runtime.config import DiTARConfig, TextConfig, lexicon_text, preset
from ditarkit.runtime.machine import cpu_flags
from ditarkit.runtime.text import TextFrontend, model_frontend
from ditarkit.training.arguments import build_parser, check_arguments
from ditarkit.training.data import AudioCache, DiTARBatches, Utterance, encode_corpus, log, read_manifest
from ditarkit.training.forced import forced_sentences, probe_wer
from ditarkit.training.metrics import alignment_metrics, build_probe, clock_baseline, probe_loss
from ditarkit.training.parallel import ALONE, Workers, launch, log_file
from ditarkit.training.scoring import Transcriber
from ditarkit.training.stage import Schedule, Stage
from ditarkit.training.text_tables import carry_text_tables

EVALUATED = "evaluated"  # the DiTAR stage's folder of the weights its free-running WER was measured on


def _model_for(run: Path, stage: str, config: DiTARConfig, device: str, init_from: Path | None = None,
               vae_from: Path | None = None) -> tuple[DiTAR, set[str]]:
    """The model, and the names of its parameters that start new. Resume from the stage's own
    checkpoint if it exists; else build the preset's model and take from `init_from` (a whole
    checkpoint, such as the shipped default voice or an earlier trial) every weight it has:
    parts the preset adds (a text cursor, blocks of a deeper stack) start new, a width that
    differs is an error. A new
    DiTAR stage otherwise takes only the VAE (weights and latent statistics) from `vae_from` or
    the VAE stage, so the preset, not the VAE run, decides the sizes of the LM and LocDiT."""
    own = run / stage
    if (own / WEIGHTS_FILE).is_file():
        log(f"{stage}: resuming from {own}")
        return load_checkpoint(own).to(device), set()
    model = DiTAR(config)
    fresh = {name for name, _ in model.named_parameters()}
    if init_from:
        taken = take_weights(model, load_checkpoint(init_from), str(init_from))
        fresh -= taken
        log(f"{stage}: starting from {init_from}" + (f"; new: {sorted(fresh)}" if fresh else ""))
    elif stage == "ditar":
        source = vae_from or run / "vae"
        vae = load_checkpoint(source)
        if (vae.config.audio, vae.config.vae) != (config.audio, config.vae):
            raise SystemExit(f"error: the VAE in {source} was made for another audio/VAE config than {config.name}")
        model.vae.load_state_dict(vae.vae.state_dict())
        log(f"ditar: new {config.name} model on the VAE of {source}")
    return model.to(device), fresh


def take_weights(model: DiTAR, source: DiTAR, name: str) -> set[str]:
    """Copy every tensor of `source` into `model` (all must exist there with the same shape,
    but for the text tables of another frontend, carried over by unit); returns the parameter
    names copied. Where `model`'s stack has more blocks than the source's, the extra ones
    start as identities (`grown_blocks`), so the grown model begins as the one it grows from."""
    target, weights = model.state_dict(), source.state_dict()
    if source.config.text != model.config.text:  # another frontend: its tables, row by row
        weights.update(carry_text_tables(model, source))
        log(f"text tables carried over from {name}'s {source.config.text.frontend} frontend to "
            f"{model.config.text.frontend}: {source.config.text.vocab_size} -> {model.config.text.vocab_size} ids")
    problems = [k for k, v in weights.items() if k not in target or target[k].shape != v.shape]
    if problems:
        raise SystemExit(f"error: {name} does not fit the {model.config.name} preset: "
                         f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")
    model.load_state_dict(weights, strict=False)
    grown = grown_blocks(model, set(weights))
    if grown:
        log(f"blocks {name} does not have start as identities: {', '.join(grown)}")
    return set(weights)


@torch.no_grad()
def grown_blocks(model: DiTAR, taken: set[str]) -> list[str]:
    """Blocks of a transformer stack that took no weight while others of the same stack did:
    their attention and MLP outputs are zeroed, so each adds nothing to the residual stream
    until training moves it. Returns their names."""
    grown = []
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, Transformer):
            continue
        names = [f"{stack_name}.blocks.{i}." for i in range(len(stack.blocks))]
        if not any(k.startswith(n) for n in names for k in taken):
            continue  # a stack new as a whole keeps its own initialisation
        for block, prefix in zip(stack.blocks, names):
            if not any(k.startswith(prefix) for k in taken):
                block.attn.o.weight.zero_()
                block.mlp.down.weight.zero_()
                grown.append(prefix.rstrip("."))
    return grown


# --------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------
def train_vae(args) -> None:
    corpus = read_manifest(args.corpus)
    model, _ = _model_for(args.run, "vae", preset(args.preset), args.device, args.init_from)
    cfg = model.config
    audio = AudioCache(cfg.audio.sample_rate)
    crop = int(args.crop_seconds * cfg.audio.frame_rate) * cfg.audio.hop_length
    rng = random.Random(args.seed)

    def batch() -> torch.Tensor:
        clips = []
        for item in rng.sample(corpus, args.batch):
            wav = audio(item.path)
            if len(wav) < crop:
                wav = np.pad(wav, (0, crop - len(wav)))
            offset = rng.randrange(0, len(wav) - crop + 1)
            clips.append(wav[offset : offset + crop])
        return torch.from_numpy(np.stack(clips)).to(args.device)

    stage = Stage("vae", args.run, model, model.vae.parameters(), Schedule(args.lr, 200), args.device,
                  _RandomState(rng))
    model.train()
    stage.run(lambda: train_step(stage.optimizer, vae_loss, model.vae, batch()), args.minutes, args.steps)
    set_latent_statistics(model, corpus, audio, args.device)
    stage.save()


class _RandomState:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def state(self) -> tuple:
        return self.rng.getstate()

    def restore(self, state: tuple) -> None:
        self.rng.setstate(state)


@torch.no_grad()
def set_latent_statistics(model: DiTAR, corpus: list[Utterance], audio: AudioCache, device: str,
                          count: int = 200) -> None:
    """Per-channel mean and std of the posterior means, so the LM sees unit-scale latents."""
    model.eval()
    means = []
    for item in corpus[:: max(1, len(corpus) // count)][:count]:
        wav = audio(item.path)
        wav = wav[: len(wav) // model.config.audio.hop_length * model.config.audio.hop_length]
        mean, _ = model.vae.encoder(torch.from_numpy(wav)[None].to(device))
        means.append(mean[0])
    frames = torch.cat(means)
    model.vae.latent_mean.copy_(frames.mean(0))
    model.vae.latent_std.copy_(frames.std(0).clamp(min=1e-3))
    log(f"latent statistics from {len(frames)} frames: mean |mu| {frames.mean(0).abs().mean():.3f}, "
        f"mean std {frames.std(0).mean():.3f}")


# --------------------------------------------------------------------------------------
# Stage 2: aggregator, LM, LocDiT and stop head on frozen-VAE latents
# --------------------------------------------------------------------------------------
@torch.no_grad()
def balance_scales(model: DiTAR, batch, fresh: set[str]) -> dict[str, float]:
    """Parameters that start new (`fresh`) at balanced scales: text embeddings and the text
    cursor's vector at the patch vectors' norm, and the LM's share of LocDiT's condition token
    at least at the time embedding's. Without this the LM sees text far quieter than audio
    (norm 0.3 against ~10 at init), and LocDiT's condition can be mostly time. Training-only
    (initial values)."""
    cfg = model.config
    p = cfg.patch_size
    patches = batch.target[:, : p * int(batch.target_patches.min())].reshape(-1, p, cfg.audio.latent_dim)
    patch_norm = model.aggregator(patches).norm(dim=-1).mean()
    scales = {"patch_vector_norm": float(patch_norm)}
    if "text_embedding.weight" in fresh:
        model.text_embedding.weight.mul_(patch_norm / model.text_embedding.weight.norm(dim=-1).mean())
    if "text_cursor.embedding.weight" in fresh:
        table = model.text_cursor.embedding.weight
        cursor_norm = model.text_cursor(batch.text_ids[0, : int(batch.text_lengths[0])]).norm(dim=-1).mean()
        table.mul_(patch_norm / cursor_norm)
        scales["cursor_norm_before"] = float(cursor_norm)
    if "locdit.cond_proj.weight" in fresh:
        hidden = model.lm.transformer.norm(torch.randn(256, cfg.lm.dim, device=patches.device))  # unit-RMS like h_i
        time_norm = model.locdit.time_embed(torch.rand(256, device=patches.device)).norm(dim=-1).mean()
        cond_norm = model.locdit.cond_proj(hidden).norm(dim=-1).mean()
        model.locdit.cond_proj.weight.mul_(max(1.0, float(time_norm / cond_norm)))  # raised, never lowered
        scales.update(time_embed_norm=float(time_norm), cond_norm_before=float(cond_norm))
    return scales


def free_running_wer(checkpoint: Path, corpus: Path, sentences: int) -> dict[str, float]:
    """Export the checkpoint and let it speak held-out sentences in unseen voices: WER by
    Whisper and F0 distance, through the evaluation command (subprocesses: training does not
    import the exporter)."""
    bundle, report = checkpoint / "bundle", checkpoint / "wer.json"
    commands = [
        ["ditar-export", "--checkpoint", str(checkpoint), "--out", str(bundle), "--no-trt", "--no-parity"],
        [sys.executable, "-m", "ditarkit.training.evaluate", "--bundle", str(bundle), "--corpus", str(corpus),
         "--sentences", str(sentences), "--no-piper", "--out", str(report)],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log(f"free-running WER skipped: {' '.join(command[:3])} failed: {done.stderr.strip()[-300:]}")
            return {}
    row = json.loads(report.read_text())["systems"][0]
    metrics = {"wer_pct": 100 * row["wer"], "f0_semitones": (row.get("f0") or {}).get("median_abs_semitones")}
    if row.get("words_heard") is not None:
        metrics["heard_pct"] = 100 * row["words_heard"]
    return metrics


def parse_heads(spec: str, config: DiTARConfig) -> tuple[tuple[int, int], ...]:
    """'1:0,1:1' -> ((1, 0), (1, 1)), checked against the LM's layers and heads."""
    heads = []
    for item in filter(None, spec.split(",")):
        try:
            layer, head = (int(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"error: --aligned-heads item {item!r} is not LAYER:HEAD") from None
        if not (0 <= layer < config.lm.layers and 0 <= head < config.lm.heads):
            raise SystemExit(f"error: head {item} is outside the LM's "
                             f"{config.lm.layers} layers x {config.lm.heads} heads")
        heads.append((layer, head))
    return tuple(heads)


def _per_unit(items: list[Utterance], frontend: TextFrontend) -> list[Utterance]:
    """Every utterance, aligned per unit the model reads where its alignment covers exactly
    the characters it reads, else without an alignment."""
    return [u.in_units(frontend) if u.chars is not None and len(u.chars) == len(frontend.readable(u.text))
            else dataclasses.replace(u, chars=None) for u in items]


def _aligned(items: list[Utterance], frontend: TextFrontend) -> list[Utterance]:
    """The utterances with a usable alignment, aligned per unit the model reads."""
    kept = [u for u in _per_unit(items, frontend) if u.chars is not None]
    if len(kept) < len(items):
        log(f"{len(items) - len(kept)} of {len(items)} utterances have no usable alignment: left out")
    return kept


def _text_config(frontend: str | None, preset_text: TextConfig, init_from: Path | None) -> TextConfig:
    """A new model's text config: the frontend asked for; else the one of the checkpoint it
    starts from, so --init-from a lexicon model stays one; else the preset's."""
    if frontend is None:
        return load_config(init_from).text if init_from else preset_text
    return lexicon_text(preset_text) if frontend == "lexicon" else preset_text


def train_ditar(args, workers: Workers = ALONE) -> None:
    resuming = (args.run / "ditar" / WEIGHTS_FILE).is_file()
    if not resuming and not (args.run / "vae" / WEIGHTS_FILE).is_file() and not (args.init_from or args.vae_from):
        raise SystemExit("error: train the VAE first (python -m ditarkit.training.train vae ...), "
                         "or give --vae-from or --init-from")
    config = preset(args.preset)
    if args.isolated_history is not None:
        config = dataclasses.replace(config, isolated_history=args.isolated_history == "on")
    if args.locdit_layers is not None:
        config = dataclasses.replace(config, locdit=dataclasses.replace(config.locdit, layers=args.locdit_layers))
    if args.advance_to_locdit:
        config = dataclasses.replace(config, cursor=dataclasses.replace(config.cursor, advance_to_locdit=True))
    config = dataclasses.replace(config, text=_text_config(args.frontend, config.text, args.init_from))
    model, fresh = _model_for(args.run, "ditar", config, args.device, args.init_from, args.vae_from)
    if args.frontend and model.config.text.frontend != args.frontend:
        raise SystemExit(f"error: {args.run / 'ditar'} reads with the {model.config.text.frontend} frontend, not "
                         f"{args.frontend}: a run keeps its frontend (start a new --run to change it)")
    frontend = model_frontend(model.config.text)
    corpus = read_manifest(args.corpus)
    probe = read_manifest(args.corpus, "probe.jsonl") if (args.corpus / "probe.jsonl").is_file() else []
    aligned = _aligned if args.aligned_heads or model.config.cursor else _per_unit
    corpus, probe = aligned(corpus, frontend), aligned(probe, frontend)
    with workers.lead_first():  # the lead fills the latents' cache, the others read it
        latents = encode_corpus(model, corpus + probe, args.run, args.device)
    batches = DiTARBatches(corpus, latents, model.config, args.batch // workers.size, args.seed,
                           args.max_target_seconds, (2.0, 5.0), args.engine_shares)
    options = LossOptions(args.diffusion_samples, aligned_heads=parse_heads(args.aligned_heads, model.config),
                          alignment_weight=args.alignment_weight, history_noise=args.history_noise,
                          lm_input_noise=args.lm_input_noise, advance_weight=args.advance_weight,
                          drawn_inputs=args.drawn_inputs, drawn_nfe=args.drawn_nfe)
    model.vae.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("vae.")]
    schedule = Schedule(args.lr, args.warmup, args.lr_decay_steps, args.lr_final)
    stage = Stage("ditar", args.run, model, params, schedule, args.device, batches, args.ema, workers, args.seed)
    if not stage.resumed and fresh and workers.lead:
        scales = balance_scales(model, batches(args.device), fresh)
        log("ditar: initial scales " + json.dumps(scales))
    workers.share_weights(model)  # the lead's balanced scales, on every worker
    if not stage.resumed and fresh:
        stage.restart_average()
    evaluate = None
    if probe and workers.lead:
        probe_batch = build_probe(probe, batches, args.device)
        log("ditar: a fixed-pace reader on the probe: " + json.dumps(
            clock_baseline(batches.items, probe_batch, batches.patch_samples)))

        forced_rows, transcriber = forced_sentences(probe_batch, args.wer_sentences), None
        if args.forced_wer_every and not forced_rows:
            log("ditar: no probe sentence at rate 1.0: no teacher-forced WER")

        def evaluate() -> dict:
            nonlocal transcriber
            row = alignment_metrics(stage.sampling_model, probe_batch, options.aligned_heads)
            if stage.average is not None:  # what the average gains over the weights it follows
                row["probe_diffusion_raw"] = probe_loss(model, probe_batch)
            if args.forced_wer_every and stage.step % args.forced_wer_every == 0 and forced_rows:
                transcriber = transcriber or Transcriber()
                row.update(probe_wer(stage.sampling_model, probe_batch, forced_rows, transcriber))
            if args.wer_every and stage.step % args.wer_every == 0 and stage.step:
                # a folder of its own: the stage's checkpoint stays paired with its trainer state
                save_checkpoint(stage.sampling_model, stage.dir / EVALUATED)
                row.update(free_running_wer(stage.dir / EVALUATED, args.corpus, args.wer_sentences))
            return row
    model.train()
    model.vae.eval()
    precision = training_precision(args.precision, args.device)
    if workers.lead:
        log(f"ditar: {len(batches.items)} training utterances, {len(probe)} probe, loss options {options}")
        kept = " (autocast; weights, optimizer and losses stay fp32)" if precision != "fp32" else ""
        log(f"ditar: {precision} matmuls{kept}")
        if workers.size > 1:
            logs = ", ".join(str(log_file(stage.dir, rank)) for rank in range(1, workers.size))
            log(f"ditar: {workers.size} data-parallel workers of {batches.batch} utterances each "
                f"(the followers log to {logs})")

    def step() -> dict[str, float]:
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return train_step(stage.optimizer, ditar_loss, model, batches(args.device), options=options,
                              gradient_hook=stage.average_gradients)

    stage.run(step, args.minutes, args.steps, evaluate=evaluate, evaluate_every=args.metrics_every)


def training_precision(choice: str, device: str) -> str:
    """bf16 autocast where the hardware computes bf16 natively (a CUDA GPU with bf16, a CPU with
    AMX or AVX-512 BF16, where it makes a step markedly faster), else fp32."""
    if choice != "auto":
        return choice
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = cpu_flags() or set()
    return "bf16" if flags & {"amx_bf16", "avx512_bf16"} else "fp32"


# --------------------------------------------------------------------------------------
# Ship: the trained model as the embedded default voice (fp16 weights, < 50 MB)
# --------------------------------------------------------------------------------------
def ship(args) -> None:
    from ditarkit.reference.default_voice import DIRECTORY

    source = args.run / "ditar"
    model = load_checkpoint(source)
    out = Path(args.out) if args.out else DIRECTORY
    save_checkpoint(model, out, dtype=torch.float16)
    size = (out / "model.safetensors").stat().st_size / 1e6
    print(json.dumps({"shipped": str(out), "parameters": model.num_parameters(), "megabytes": round(size, 1)}))


def main(argv: list[str] | None = None) -> None:
    args = build_parser(__doc__).parse_args(argv)
    check_arguments(args)
    if args.lr is None:
        args.lr = {"vae": 1e-3, "ditar": 5e-4}.get(args.stage, 0.0)
    if args.workers > 1:
        launch(_worker, args, args.workers, args.run / "ditar")
    else:
        _worker(args, ALONE)


def _worker(args: argparse.Namespace, workers: Workers) -> None:
    """One process of a stage (of the DiTAR stage's workers, each runs this)."""
    threads = args.threads or (max(1, len(os.sched_getaffinity(0)) // workers.size) if workers.size > 1 else None)
    if threads:  # workers share the cores: torch's default, every core each, would oversubscribe them
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)  # the same initial weights everywhere; the streams part in Stage
    if args.stage == "ditar":
        train_ditar(args, workers)
    else:
        {"vae": train_vae, "ship": ship}[args.stage](args)


if __name__ == "__main__":
    main()
