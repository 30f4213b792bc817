"""The patch loop: one LM step and one guided LocDiT solve per patch, until stop.

The LM prefix follows the model's prompt layout (contract.prompt): the kit's models read
[BOS text EOS, reference patches, speech start], VoxCPM2 [103, reference, 104, text, 101].
With a text cursor (contract.cursor) the loop also keeps the reading position: each LM input
of the speech gets the cursor vector of the character being spoken, and after each patch
the cursor moves on by the advance head's most likely count, never past the last character.

The loop sees a backend only through `Runner`, so the PyTorch reference, ONNX Runtime and
TensorRT all run this same code: what differs between them is arithmetic, never logic.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ditarkit.runtime.contract import ModelContract, PromptLayout, patches_in
from ditarkit.runtime.runner import LMStep, Runner

# patch index -> (2, P, C) float32: [starting noise, noise that enters at tau]
NoiseFn = Callable[[int], np.ndarray]


# The largest float below 1, as a stop threshold: sigmoid(stop logit) exceeds it only when it
# rounds to 1.0 (logit > ~36.7), so the stop head never ends a sentence early and runs that
# must compare equal lengths (benchmarks, quantization accuracy) generate the same patches.
NEVER_STOP = math.nextafter(1.0, 0.0)


# Guidance above this drives the output out of range: the default voice peaks at 0.84 of
# full scale at w = 20, clips 0.8 % of its samples at w = 50 and 55 % at w = 1000 (the
# paper's DiTAR uses w of a few units).
MAX_CFG_SCALE = 20.0


class OptionsError(ValueError):
    """A generation option is out of range."""


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call sampling options, validated when built, never inside the loop."""

    cfg_scale: float = 2.0  # guidance w; 0 = conditional branch only
    temperature: float = 0.5  # tau in [0, 1]: 0 deterministic, 1 starts from pure noise
    nfe: int = 10  # LocDiT solver steps per patch
    seed: int = 0  # seeds the noise generator
    max_seconds: float = 30.0  # stop after this much audio even if the stop head has not fired
    stop_threshold: float = 0.5  # stop when sigmoid(stop logit) exceeds this

    def __post_init__(self) -> None:
        """Every option finite and in its range, with one line naming the first that is not
        (a bare `>= 0` would let inf through, and nan fails every comparison)."""
        checks = [
            (_finite(self.cfg_scale) and 0.0 <= self.cfg_scale <= MAX_CFG_SCALE,
             f"cfg_scale must be a number in [0, {MAX_CFG_SCALE:g}], got {self.cfg_scale}"),
            (_finite(self.temperature) and 0.0 <= self.temperature <= 1.0,
             f"temperature must be a number in [0, 1], got {self.temperature}"),
            (_whole(self.nfe) and 1 <= self.nfe <= 1000, f"nfe must be an integer in [1, 1000], got {self.nfe}"),
            (_whole(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}"),
            (_finite(self.max_seconds) and self.max_seconds > 0,
             f"max_seconds must be a finite number > 0, got {self.max_seconds}"),
            (_finite(self.stop_threshold) and 0.0 < self.stop_threshold < 1.0,
             f"stop_threshold must be a number in (0, 1), got {self.stop_threshold}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionsError(message)

    @classmethod
    def from_config(cls, config: ModelContract, **overrides: Any) -> GenerationOptions:
        """The model's own defaults, with any option given here taking precedence."""
        defaults = cls(
            cfg_scale=config.sampler.cfg_scale,
            temperature=config.sampler.temperature,
            nfe=config.sampler.nfe,
            max_seconds=config.max_seconds,
            stop_threshold=config.stop.threshold,
        )
        return replace(defaults, **{k: v for k, v in overrides.items() if v is not None})


def exact_length(options: GenerationOptions, patches: int, patch_seconds: float) -> GenerationOptions:
    """Options that make exactly `patches` patches per sentence: the stop head is ignored,
    and max_seconds gets half a patch of slack (the sampler truncates max_seconds /
    patch_seconds, and 0.3 / 0.1 is 2.999... in floating point)."""
    return replace(options, max_seconds=(patches + 0.5) * patch_seconds, stop_threshold=NEVER_STOP)


def seeded_noise(seed: int, patch_size: int, latent_dim: int) -> NoiseFn:
    """Noise drawn patch by patch from one seeded generator, so a stream is reproducible."""
    rng = np.random.default_rng(seed)
    return lambda _index: rng.standard_normal((2, patch_size, latent_dim), dtype=np.float32)


def explicit_noise(noise: np.ndarray) -> NoiseFn:
    """Noise given up front, (N, 2, P, C): lets two implementations be compared exactly."""
    return lambda index: noise[index]


def prompt_patches(latents: np.ndarray, config: ModelContract) -> np.ndarray:
    """(F, C) reference latents -> (N, P, C), dropping the frames that do not fill a patch
    at the start (the end of the prompt is what the first generated patch continues)."""
    p = config.patch_size
    n = latents.shape[0] // p
    if n < config.history_patches:
        need = config.history_patches * config.patch_seconds
        raise ValueError(f"reference audio is too short: need at least {need:.2f} s")
    return latents[latents.shape[0] - n * p :].reshape(n, p, -1)


def generate_patches(
    runner: Runner,
    text_ids: list[int],
    prompt_latents: np.ndarray,
    options: GenerationOptions,
    noise: NoiseFn | None = None,
) -> Iterator[np.ndarray]:
    """Yield generated patches (P, C) one at a time, as soon as each is drawn. `text_ids`
    are the frontend's (the kit's: BOS, the characters, EOS; with the reference's transcript
    first where the layout reads one)."""
    cfg = runner.config
    noise = noise or seeded_noise(options.seed, cfg.patch_size, cfg.audio.latent_dim)
    prompt = prompt_patches(prompt_latents, cfg)  # (Np, P, C)
    max_patches = max(1, min(cfg.max_patches, patches_in(options.max_seconds, cfg.patch_seconds)))
    ids = np.asarray(text_ids, dtype=np.int64)
    cursor = Cursor(runner.text_cursor(ids), len(ids) - 2) if cfg.cursor else None
    prefix, audio_mask = prefix_rows(runner, cfg.prompt, ids, prompt)
    if cursor is not None:
        prefix[-1] += cursor.vector()[0]  # the speech start reads the first character
    state = runner.new_lm_state(prefix.shape[0] + max_patches)
    step = runner.lm_step(prefix, state, audio_mask)
    history = first_history(cfg, prompt).reshape(cfg.history_frames, -1)  # (H*P, C)
    patch_row = np.ones(1, np.float32)  # the audio mask of one generated patch
    for index in range(max_patches):
        patch = runner.draw_patch(step.hidden, history, noise(index), options.nfe, options.cfg_scale,
                                  options.temperature)
        yield patch
        drawn = index + 1
        if drawn == max_patches or (cfg.stop.draws_last and _stops(step, drawn, cfg, options)):
            return
        history = np.concatenate([history[cfg.patch_size :], patch])
        embeds = runner.encode_patches(patch[None])  # (1, D)
        if cursor is not None:
            cursor.advance(step.advance_logits)
            embeds = embeds + cursor.vector()
        step = runner.lm_step(embeds, state, patch_row)
        if not cfg.stop.draws_last and _stops(step, drawn, cfg, options):  # speech ends after this patch
            return


def _stops(step: LMStep, drawn: int, cfg: ModelContract, options: GenerationOptions) -> bool:
    return drawn >= cfg.stop.min_patches and _sigmoid(step.stop_logit) > options.stop_threshold


def prefix_rows(runner: Runner, layout: PromptLayout, text_ids: np.ndarray,
                prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LM prefix of `layout`: (S, D) rows, and (S,) 1 at the reference's patch rows."""
    rows, mask = [], []
    for segment in layout.prefix:
        if segment == "reference":
            part = runner.encode_patches(prompt)
        elif segment == "text":
            part = runner.embed_text(text_ids)
        elif segment == "reference_text":
            continue  # tokenised with the text: at the start of its ids
        else:
            part = runner.embed_text(np.asarray([segment], np.int64))
        rows.append(part)
        mask.append(np.full(part.shape[0], segment == "reference", np.float32))
    return np.concatenate(rows), np.concatenate(mask)


def first_history(cfg: ModelContract, prompt: np.ndarray) -> np.ndarray:
    """LocDiT's history for the first patch, (H, P, C): the reference's last patches, or with
    "prefix_end" the patch at the prefix's last row, zeros where that row is a token."""
    if cfg.prompt.history == "prefix_end" and cfg.prompt.prefix[-1] != "reference":
        return np.zeros((cfg.history_patches, *prompt.shape[1:]), np.float32)
    return prompt[-cfg.history_patches :]


class Cursor:
    """The character being spoken, over the text cursor's vectors of one text."""

    def __init__(self, vectors: np.ndarray, chars: int) -> None:
        self.vectors, self.last = vectors, max(chars - 1, 0)  # (T, D): row 0 is BOS
        self.char = 0

    def vector(self) -> np.ndarray:  # (1, D)
        return self.vectors[self.char + 1][None]

    def advance(self, logits: np.ndarray) -> None:
        self.char = min(self.char + int(np.argmax(logits)), self.last)


def generate_latents(
    runner: Runner,
    text_ids: list[int],
    prompt_latents: np.ndarray,
    options: GenerationOptions,
    noise: NoiseFn | None = None,
) -> np.ndarray:
    """All generated latent frames at once, (N * P, C)."""
    patches = list(generate_patches(runner, text_ids, prompt_latents, options, noise))
    return np.concatenate(patches)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
