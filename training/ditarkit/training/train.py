"""Training recipe for the default voice: the VAE first, then the rest of DiTAR on its latents.

    python -m ditarkit.training.train vae   --corpus data/corpus --run runs/default --minutes 30
    python -m ditarkit.training.train ditar --corpus data/corpus --run runs/default --minutes 120
    python -m ditarkit.training.train ship  --run runs/default

Each stage runs for a time or step budget, checkpoints atomically every few minutes and on
exit, and resumes from its last checkpoint when started again: on a machine that is taken
away mid-run, rerunning the same command goes on where it stopped. Works on CPU or a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ditarkit.reference.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from ditarkit.reference.losses import SpeechBatch, ditar_loss, train_step, vae_loss
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.audio import normalize_loudness
from ditarkit.runtime.config import DiTARConfig, patches_in, preset
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.text import TextFrontend

STATE_FILE = "trainer.pt"  # optimizer and step, beside the model checkpoint of a stage


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    id: str
    voice: str
    text: str
    path: Path


def read_corpus(root: str | Path) -> list[Utterance]:
    root = Path(root)
    manifest = root / "train.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"error: no train.jsonl in {root}: run python -m ditarkit.training.corpus first")
    items = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [Utterance(i["id"], i["voice"], i["text"], root / i["path"]) for i in items]


class AudioCache:
    """Corpus audio, loudness-normalised like runtime references, held in RAM as int16."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._cache: dict[Path, np.ndarray] = {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self._cache:
            audio, rate = sf.read(str(path), dtype="float32")
            if rate != self.sample_rate:
                raise SystemExit(f"error: {path} is {rate} Hz; the corpus must be {self.sample_rate} Hz")
            self._cache[path] = (normalize_loudness(audio) * 32767).astype(np.int16)
        return self._cache[path].astype(np.float32) / 32767


# --------------------------------------------------------------------------------------
# Shared loop: budget, checkpoints, resume, logging
# --------------------------------------------------------------------------------------
class Stage:
    """Runs `step()` until the budget is spent; checkpoints every `every` seconds."""

    def __init__(self, name: str, run: Path, model: DiTAR, params, lr: float, warmup: int, device: str) -> None:
        self.name, self.dir, self.model, self.device = name, run / name, model, device
        self.dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.lr, self.warmup, self.step = lr, warmup, 0
        state = self.dir / STATE_FILE
        if state.is_file():
            saved = torch.load(state, map_location=device, weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step = saved["step"]
            log(f"{name}: resumed at step {self.step}")
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, *_args) -> None:
        self.stop_requested = True

    def set_lr(self) -> None:
        scale = min(1.0, (self.step + 1) / self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * scale

    def save(self) -> None:
        save_checkpoint(self.model, self.dir)
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step}
        atomic_write(self.dir / STATE_FILE, lambda p: torch.save(state, p))

    def run(self, step_fn, minutes: float, max_steps: int | None, every: float = 300.0, log_every: int = 50):
        start = last_save = time.time()
        first_step = self.step
        totals: dict[str, float] = defaultdict(float)
        summed = 0
        history = self.dir / "log.jsonl"
        while not self.stop_requested:
            if time.time() - start > minutes * 60 or (max_steps and self.step >= max_steps):
                break
            self.set_lr()
            for key, value in step_fn().items():
                totals[key] += value
            self.step += 1
            summed += 1
            if self.step % log_every == 0:
                means = {k: v / summed for k, v in totals.items()}
                totals.clear()
                summed = 0
                rate = (self.step - first_step) / max(time.time() - start, 1e-9)
                log(f"{self.name} step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" ({rate:.2f} steps/s)")
                with history.open("a") as fh:
                    fh.write(json.dumps({"step": self.step, "time": time.time(), **means}) + "\n")
            if time.time() - last_save > every:
                self.save()
                last_save = time.time()
        self.save()
        log(f"{self.name}: saved at step {self.step} in {self.dir}")


def _model_for(run: Path, stage: str, config: DiTARConfig, device: str, init_from: Path | None = None) -> DiTAR:
    """Resume from the stage's own checkpoint if it exists, else start from `init_from` (a
    whole checkpoint, such as the shipped default voice: how training goes on on a fresh
    machine). A new DiTAR stage is otherwise built from the preset and takes only the VAE
    (weights and latent statistics) from the VAE stage, so the preset, not the VAE run,
    decides the sizes of the LM and LocDiT."""
    own = run / stage
    if (own / WEIGHTS_FILE).is_file():
        log(f"{stage}: resuming from {own}")
        return load_checkpoint(own).to(device)
    if init_from:
        log(f"{stage}: starting from {init_from}")
        return load_checkpoint(init_from).to(device)
    model = DiTAR(config)
    if stage == "ditar":
        vae = load_checkpoint(run / "vae")
        if (vae.config.audio, vae.config.vae) != (config.audio, config.vae):
            raise SystemExit(f"error: the VAE in {run / 'vae'} was trained for another audio/VAE config")
        model.vae.load_state_dict(vae.vae.state_dict())
        log(f"ditar: new {config.name} model on the VAE of {run / 'vae'}")
    return model.to(device)


# --------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------
def train_vae(args) -> None:
    corpus = read_corpus(args.corpus)
    model = _model_for(args.run, "vae", preset(args.preset), args.device, args.init_from)
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

    stage = Stage("vae", args.run, model, model.vae.parameters(), args.lr, 200, args.device)
    model.train()
    stage.run(lambda: train_step(stage.optimizer, vae_loss, model.vae, batch()), args.minutes, args.steps)
    set_latent_statistics(model, corpus, audio, args.device)
    stage.save()


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
def encode_corpus(model: DiTAR, corpus: list[Utterance], run: Path, device: str) -> dict[str, np.ndarray]:
    """Normalised latents of every utterance, cached in the run folder (fp16), keyed by the
    VAE weights they came from."""
    path = run / f"latents-{vae_fingerprint(model)}.npz"
    latents = {k: v.astype(np.float32) for k, v in np.load(path).items()} if path.is_file() else {}
    missing = [u for u in corpus if u.id not in latents]  # the corpus may have grown since
    if not missing:
        return latents
    model.eval()
    audio = AudioCache(model.config.audio.sample_rate)
    hop = model.config.audio.hop_length
    for index, item in enumerate(missing):
        wav = audio(item.path)
        wav = wav[: len(wav) // hop * hop]
        latents[item.id] = model.vae.encode(torch.from_numpy(wav)[None].to(device))[0].cpu().numpy()
        if index % 500 == 0:
            log(f"encoding corpus: {index}/{len(missing)} new utterances")
    atomic_write(path, lambda tmp: _save_npz(tmp, {k: v.astype(np.float16) for k, v in latents.items()}))
    return latents


def vae_fingerprint(model: DiTAR) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:12]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, **arrays)


class DiTARBatches:
    """Target utterance + a prompt cut from another utterance of the same voice."""

    def __init__(self, corpus, latents, config: DiTARConfig, batch: int, seed: int, max_target_seconds: float,
                 prompt_seconds: tuple[float, float]) -> None:
        self.items = [u for u in corpus if u.id in latents]
        self.latents, self.cfg, self.batch = latents, config, batch
        self.rng = random.Random(seed)
        self.by_voice = defaultdict(list)
        for u in self.items:
            self.by_voice[u.voice].append(u)
        self.frontend = TextFrontend(config.text)
        p = config.patch_size
        self.max_target = patches_in(max_target_seconds, config.patch_seconds)
        self.prompt_range = tuple(patches_in(s, config.patch_seconds) for s in prompt_seconds)
        self.p = p

    def _patches(self, frames: np.ndarray, count: int, random_start: bool) -> np.ndarray:
        n = min(count, len(frames) // self.p)
        start = self.rng.randrange(0, len(frames) // self.p - n + 1) if random_start else 0
        return frames[start * self.p : (start + n) * self.p]

    def __call__(self, device: str) -> SpeechBatch:
        texts, prompts, targets = [], [], []
        while len(texts) < self.batch:
            item = self.rng.choice(self.items)
            others = [u for u in self.by_voice[item.voice] if u.id != item.id] or [item]
            target = self.latents[item.id]
            if len(target) // self.p > self.max_target or len(target) < self.p:
                continue  # too long to fit the budget, or empty
            prompt = self._patches(self.latents[self.rng.choice(others).id],
                                   self.rng.randint(*self.prompt_range), random_start=True)
            if len(prompt) < self.cfg.history_frames:
                continue
            texts.append(self.frontend.encode(item.text))
            prompts.append(prompt)
            targets.append(self._patches(target, self.max_target, random_start=False))
        pad = lambda arrays: torch.nn.utils.rnn.pad_sequence([torch.from_numpy(a) for a in arrays], batch_first=True)  # noqa: E731
        return SpeechBatch(
            text_ids=pad([np.asarray(t, np.int64) for t in texts]).to(device),
            text_lengths=torch.tensor([len(t) for t in texts]),
            prompt=pad(prompts).to(device),
            prompt_patches=torch.tensor([len(p) // self.p for p in prompts]),
            target=pad(targets).to(device),
            target_patches=torch.tensor([len(t) // self.p for t in targets]),
        )


def train_ditar(args) -> None:
    corpus = read_corpus(args.corpus)
    if not (args.run / "vae" / WEIGHTS_FILE).is_file() and not args.init_from:
        raise SystemExit("error: train the VAE first (python -m ditarkit.training.train vae ...) or give --init-from")
    model = _model_for(args.run, "ditar", preset(args.preset), args.device, args.init_from)
    latents = encode_corpus(model, corpus, args.run, args.device)
    batches = DiTARBatches(corpus, latents, model.config, args.batch, args.seed, args.max_target_seconds, (2.0, 5.0))
    model.vae.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("vae.")]
    stage = Stage("ditar", args.run, model, params, args.lr, 500, args.device)
    model.train()
    model.vae.eval()
    stage.run(lambda: train_step(stage.optimizer, ditar_loss, model, batches(args.device),
                                 diffusion_samples=args.diffusion_samples,
                                 alignment_weight=args.alignment_weight), args.minutes, args.steps)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "ditar", "ship"])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget of this invocation")
    parser.add_argument("--steps", type=int, help="stop at this total step count")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--crop-seconds", type=float, default=1.0, help="VAE training crops")
    parser.add_argument("--max-target-seconds", type=float, default=8.0)
    parser.add_argument("--diffusion-samples", type=int, default=2, help="noise levels drawn per patch")
    parser.add_argument("--alignment-weight", type=float, default=1.0, help="guided-attention loss weight")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="ship: checkpoint folder (default: the embedded default voice)")
    parser.add_argument("--init-from", type=Path, help="a checkpoint to start a stage from when it has none of its own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.lr is None:
        args.lr = {"vae": 1e-3, "ditar": 5e-4}.get(args.stage, 0.0)
    {"vae": train_vae, "ditar": train_ditar, "ship": ship}[args.stage](args)


if __name__ == "__main__":
    main()
