"""The corpus as training batches: utterances, their latents (cached), prompts and the
text units (characters, or a lexicon's phonemes) each patch speaks."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ditarkit.reference.losses import SpeechBatch
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.audio import normalize_loudness
from ditarkit.runtime.config import DiTARConfig, patches_in
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.text import TextFrontend, model_frontend
from ditarkit.training.alignment import even_spans, patch_character_windows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Utterance:
    id: str
    voice: str
    text: str
    path: Path
    chars: np.ndarray | None = None  # (characters or units, 2) [start, end) samples, or None
    rate: float = 1.0

    def char_windows(self, patches: int, patch_samples: int) -> np.ndarray | None:
        return None if self.chars is None else patch_character_windows(self.chars, patches, patch_samples)

    def in_units(self, frontend: TextFrontend) -> Utterance:
        """The utterance with its alignment per unit the frontend reads, not per character
        (the corpus aligns characters). Units read from the same characters i..j (a word's
        phonemes) share the time from i's start to j's end evenly, in order, as the corpus
        shares a word's time among its letters: the cursor then moves through a word as it
        does through its letters, never by more than a word's worth at once."""
        if self.chars is None:
            return self
        sources = np.asarray(frontend.sources(self.text), np.int64).reshape(-1, 2)
        spans = np.stack([self.chars[sources[:, 0], 0], self.chars[sources[:, 1], 1]], axis=1)
        first = 0
        for end in range(1, len(sources) + 1):
            if end == len(sources) or (sources[end] != sources[first]).any():
                spans[first:end] = even_spans(tuple(spans[first]), end - first)
                first = end
        return replace(self, chars=spans)


def read_manifest(root: str | Path, name: str = "train.jsonl") -> list[Utterance]:
    root = Path(root)
    manifest = root / name
    if not manifest.is_file():
        raise SystemExit(f"error: no {name} in {root}: run python -m ditarkit.training.corpus first")
    items = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [Utterance(i["id"], i["voice"], i["text"], root / i["path"],
                      np.asarray(i["chars"], np.int64) if "chars" in i else None, i.get("rate", 1.0))
            for i in items]


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


def vae_fingerprint(model: DiTAR) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:12]


def engine_of(voice: str) -> str:
    """The engine that rendered a corpus voice: the first word of its name ("kokoro_af_bella")."""
    return voice.split("_", 1)[0]


def draw_weights(items: list[Utterance], shares: dict[str, float]) -> list[float] | None:
    """Per-utterance draw weights that give each engine in `shares` that share of the draws
    (the engines not named split the rest by their utterance counts); None when no share is
    set, a uniform draw. A few hours of a varied engine among many of one voice's variants
    would otherwise be drawn by their small count."""
    if not shares:
        return None
    counts = Counter(engine_of(u.voice) for u in items)
    missing = sorted(set(shares) - set(counts))
    if missing:
        raise SystemExit(f"error: no utterance of the corpus is from {', '.join(missing)} "
                         f"(its engines: {', '.join(sorted(counts))})")
    rest = max(0.0, 1.0 - sum(shares.values()))
    others = sum(n for engine, n in counts.items() if engine not in shares)
    return [shares[e] / counts[e] if e in shares else rest / others for e in map(engine_of, (u.voice for u in items))]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, **arrays)


@torch.no_grad()
def encode_corpus(model: DiTAR, corpus: list[Utterance], cache_dir: Path, device: str) -> dict[str, np.ndarray]:
    """Normalised latents of every utterance, cached (fp16) in `cache_dir`, keyed by the VAE
    weights they came from; utterances added to the corpus since are encoded and added."""
    path = cache_dir / f"latents-{vae_fingerprint(model)}.npz"
    latents = {k: v.astype(np.float32) for k, v in np.load(path).items()} if path.is_file() else {}
    missing = [u for u in corpus if u.id not in latents]
    if not missing:
        return latents
    model.eval()
    audio = AudioCache(model.config.audio.sample_rate)
    hop = model.config.audio.hop_length
    for index, item in enumerate(missing):
        wav = audio(item.path)
        wav = wav[: len(wav) // hop * hop]
        # rounded to the cache's fp16 now, so a resumed run trains on the very same numbers
        latents[item.id] = model.vae.encode(torch.from_numpy(wav)[None].to(device))[0].cpu().numpy(
            ).astype(np.float16).astype(np.float32)
        if index % 500 == 0:
            log(f"encoding corpus: {index}/{len(missing)} new utterances")
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: _save_npz(tmp, {k: v.astype(np.float16) for k, v in latents.items()}))
    return latents


def _pad(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.from_numpy(a) for a in arrays], batch_first=True)


def collate(config: DiTARConfig, texts: list[list[int]], prompts: list[np.ndarray], targets: list[np.ndarray],
            windows: list[np.ndarray | None], device: str) -> SpeechBatch:
    p = config.patch_size
    aligned = all(w is not None for w in windows)
    return SpeechBatch(
        text_ids=_pad([np.asarray(t, np.int64) for t in texts]).to(device),
        text_lengths=torch.tensor([len(t) for t in texts]),
        prompt=_pad(prompts).to(device),
        prompt_patches=torch.tensor([len(x) // p for x in prompts]),
        target=_pad(targets).to(device),
        target_patches=torch.tensor([len(x) // p for x in targets]),
        char_windows=_pad(windows).to(device) if aligned else None,
    )


class DiTARBatches:
    """Target utterance + a prompt cut from another utterance of the same voice; targets drawn
    uniformly, or by engine shares (`draw_weights`). Its random state is saved with the
    checkpoint, so a resumed run draws the batches it would have."""

    def __init__(self, corpus: list[Utterance], latents: dict[str, np.ndarray], config: DiTARConfig, batch: int,
                 seed: int, max_target_seconds: float, prompt_seconds: tuple[float, float],
                 engine_shares: dict[str, float] | None = None) -> None:
        self.cfg, self.batch, self.latents = config, batch, latents
        self.p = config.patch_size
        self.patch_samples = self.p * config.audio.hop_length
        self.max_target = patches_in(max_target_seconds, config.patch_seconds)
        self.items = [u for u in corpus if u.id in latents and self.p <= len(latents[u.id])
                      and len(latents[u.id]) // self.p <= self.max_target]
        if not self.items:
            raise SystemExit(f"error: no utterance of the corpus fits {max_target_seconds} s")
        weights = draw_weights(self.items, engine_shares or {})
        self.cum_weights = None if weights is None else list(accumulate(weights))
        self.rng = random.Random(seed)
        self.by_voice: dict[str, list[Utterance]] = defaultdict(list)
        for u in corpus:
            if u.id in latents:
                self.by_voice[u.voice].append(u)
        self.frontend = model_frontend(config.text)
        self.prompt_range = tuple(patches_in(s, config.patch_seconds) for s in prompt_seconds)

    def prompt_for(self, item: Utterance, rng: random.Random) -> np.ndarray:
        others = [u for u in self.by_voice[item.voice] if u.id != item.id] or [item]
        frames = self.latents[rng.choice(others).id]
        n = min(rng.randint(*self.prompt_range), len(frames) // self.p)
        start = rng.randrange(0, len(frames) // self.p - n + 1)
        return frames[start * self.p : (start + n) * self.p]

    def draw(self) -> Utterance:
        if self.cum_weights is None:
            return self.rng.choice(self.items)
        return self.rng.choices(self.items, cum_weights=self.cum_weights)[0]

    def __call__(self, device: str) -> SpeechBatch:
        texts, prompts, targets, windows = [], [], [], []
        while len(texts) < self.batch:
            item = self.draw()
            prompt = self.prompt_for(item, self.rng)
            if len(prompt) < self.cfg.history_frames:
                continue
            frames = self.latents[item.id]
            target = frames[: len(frames) // self.p * self.p]
            texts.append(self.frontend.encode(item.text))
            prompts.append(prompt)
            targets.append(target)
            windows.append(item.char_windows(len(target) // self.p, self.patch_samples))
        return collate(self.cfg, texts, prompts, targets, windows, device)

    def state(self) -> tuple:
        return self.rng.getstate()

    def restore(self, state: tuple) -> None:
        self.rng.setstate(state)
