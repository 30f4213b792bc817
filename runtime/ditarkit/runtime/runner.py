"""The backend interface the sampler drives, and the part every backend shares.

A backend implements one method, `run(graph, feeds)`, evaluating a bundle graph by its
manifest name; `GraphRunner` turns that into the sampler's vocabulary (embed text, step the
LM, LocDiT velocity, VAE). The PyTorch reference, ONNX Runtime and TensorRT differ only in
`run` (and, on a GPU, in where the KV cache lives).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.diffusion import initial_state, renoise_step, sample_patch
from ditarkit.runtime.manifest import (
    LM,
    LM_AUDIO_MASK,
    LM_EMBEDS,
    LM_PAST_KEYS,
    LM_PAST_VALUES,
    LM_POSITION,
    LOCDIT,
    LOCDIT_SAMPLER,
    PATCH_ENCODER,
    SAMPLER_RENOISE_STEP,
    TEXT_CURSOR,
    TEXT_EMBEDDING,
    VAE_DECODER,
    VAE_ENCODER,
    GraphSpec,
)


class RunnerClosed(RuntimeError):
    """A closed runner (or the Synthesizer that owned it) was asked to run a graph."""


class LMStep(NamedTuple):
    """The LM's outputs at the last new position."""

    hidden: np.ndarray  # (D,) the condition of the next patch
    stop_logit: float
    advance_logits: np.ndarray | None = None  # (max_advance + 1,) with a text cursor


class Runner(Protocol):
    """What the sampler needs. Arrays are numpy float32 and batch-free unless stated."""

    config: ModelContract

    def embed_text(self, ids: np.ndarray) -> np.ndarray: ...  # (T,) int64 -> (T, D)

    def text_cursor(self, ids: np.ndarray) -> np.ndarray: ...  # (T,) int64 -> (T, D), models with a cursor

    def encode_patches(self, patches: np.ndarray) -> np.ndarray: ...  # (N, P, C) -> (N, D)

    def new_lm_state(self, capacity: int) -> Any: ...  # room for `capacity` positions

    def lm_step(self, embeds: np.ndarray, state: Any, audio_mask: np.ndarray | None = None) -> LMStep:
        """(S, D) new positions -> the LM's outputs at the last one. `audio_mask` (S,) marks
        the patch rows, for models whose step needs it (contract.lm.audio_mask)."""
        ...

    def velocity(
        self, x: np.ndarray, t: np.ndarray, cond: np.ndarray, history: np.ndarray
    ) -> np.ndarray: ...  # (B, P, C), (B,), (B, D), (B, H*P, C) -> (B, P, C)

    def draw_patch(
        self, cond: np.ndarray, history: np.ndarray, noise: np.ndarray, nfe: int, cfg_scale: float,
        temperature: float,
    ) -> np.ndarray: ...  # (D,), (H*P, C), (2, P, C) -> (P, C): one guided solve

    def encode_audio(self, audio: np.ndarray) -> np.ndarray: ...  # (F*hop,) -> (F, C)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray: ...  # (F, C) -> (F*hop,)


@dataclass
class KVCache:
    """A preallocated host KV cache; the LM graph returns only the new slots."""

    keys: np.ndarray  # (L, 1, Hkv, capacity, hd)
    values: np.ndarray
    position: int = 0  # filled slots

    @classmethod
    def empty(cls, config: ModelContract, capacity: int) -> KVCache:
        lm = config.lm
        shape = (lm.layers, 1, lm.kv_heads, capacity, lm.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    def append(self, new_keys: np.ndarray, new_values: np.ndarray) -> None:
        end = self.position + new_keys.shape[3]
        if end > self.keys.shape[3]:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.keys.shape[3]}")
        self.keys[:, :, :, self.position : end] = new_keys
        self.values[:, :, :, self.position : end] = new_values
        self.position = end


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def room_for_background_decoding(threads: int) -> bool:
    """Whether the decoder's thread pool fits beside the patch loop's, `threads` each, on the
    cores this process may use: the condition for `GraphRunner.decodes_in_background` on a CPU."""
    return 2 * threads <= usable_cores()


def lm_feeds(config: ModelContract, embeds: np.ndarray, audio_mask: np.ndarray | None,
             cache: dict[str, Any]) -> dict[str, Any]:
    """The LM step's inputs: the rows, their audio mask where the graph takes one (a model
    that needs it and is not given it is a bug in the caller), and the backend's cache feeds."""
    feeds = {LM_EMBEDS: embeds[None].astype(np.float32, copy=False), **cache}
    if config.lm.audio_mask:
        if audio_mask is None:
            raise ValueError("this model's LM step needs the audio mask of its rows")
        feeds[LM_AUDIO_MASK] = audio_mask[None].astype(np.float32, copy=False)
    return feeds


def lm_outputs(hidden: np.ndarray, stop: np.ndarray, advance: np.ndarray | None) -> LMStep:
    """The LM graph's host outputs (batch 1) as an `LMStep`; `advance` where the graph has it
    (the backends ask for the manifest's outputs, so it is there exactly with a cursor)."""
    return LMStep(hidden[0], float(stop[0]), None if advance is None else advance[0])


class GraphRunner:
    """The sampler's `Runner`, on top of a backend's `run(graph_name, feeds)`."""

    name: str = "graph"  # the backend's name, as reported to users
    config: ModelContract
    specs: dict[str, GraphSpec]
    bundle: Path | None = None  # the bundle folder, where the runner reads one (its tokenizer file)
    # One `locdit_sampler` call per patch when the NFE is the model's (the graph is unrolled
    # at it); otherwise, or when False, the numpy loop with one `locdit` call per step.
    fused_sampler: bool = True

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's sessions or device memory; the runner is unusable after."""

    def decodes_in_background(self) -> bool:
        """Whether the VAE decoder may run on another thread while the next patches are
        drawn: only where `run` is thread-safe and a CPU core would otherwise sit idle."""
        return False

    def _call(self, name: str, **arrays: np.ndarray) -> list[np.ndarray]:
        return self.run(name, self.specs[name].bind(**arrays))

    def embed_text(self, ids: np.ndarray) -> np.ndarray:
        return self._call(TEXT_EMBEDDING, ids=ids)[0]

    def text_cursor(self, ids: np.ndarray) -> np.ndarray:
        return self._call(TEXT_CURSOR, ids=ids)[0]

    def encode_patches(self, patches: np.ndarray) -> np.ndarray:
        return self._call(PATCH_ENCODER, patches=np.ascontiguousarray(patches, np.float32))[0]

    def new_lm_state(self, capacity: int) -> KVCache:
        return KVCache.empty(self.config, capacity)

    def lm_step(self, embeds: np.ndarray, state: KVCache, audio_mask: np.ndarray | None = None) -> LMStep:
        outputs = self._call(LM, **lm_feeds(self.config, embeds, audio_mask, {
            LM_PAST_KEYS: state.keys, LM_PAST_VALUES: state.values,
            LM_POSITION: np.array([state.position], np.int64),
        }))
        hidden, stop, new_keys, new_values = outputs[:4]
        state.append(new_keys, new_values)
        return lm_outputs(hidden, stop, outputs[4] if len(outputs) > 4 else None)

    def velocity(self, x, t, cond, history) -> np.ndarray:
        return self._call(LOCDIT, x=x, t=t, cond=cond.astype(np.float32, copy=False), history=history)[0]

    def draw_patch(self, cond: np.ndarray, history: np.ndarray, noise: np.ndarray, nfe: int, cfg_scale: float,
                   temperature: float) -> np.ndarray:
        sampler = self.config.sampler
        if self.fused_sampler and nfe == sampler.nfe:
            return self.run(LOCDIT_SAMPLER, self.sampler_feeds(cond, history, noise, nfe, cfg_scale, temperature))[0]
        return sample_patch(self.velocity, cond, history, noise, sampler, nfe, cfg_scale, temperature)

    def sampler_feeds(self, cond: np.ndarray, history: np.ndarray, noise: np.ndarray, nfe: int, cfg_scale: float,
                      temperature: float) -> dict[str, np.ndarray]:
        """The fused sampler's inputs; the temperature rule is resolved here, in one place."""
        return self.specs[LOCDIT_SAMPLER].bind(**{
            "x_init": initial_state(noise, temperature), "renoise": noise[1],
            SAMPLER_RENOISE_STEP: np.array([renoise_step(nfe, temperature, self.config.sampler)], np.int64),
            "cfg_scale": np.array([cfg_scale], np.float32), "cond": cond.astype(np.float32, copy=False),
            "history": history,
        })

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        return self._call(VAE_ENCODER, audio=audio[None].astype(np.float32, copy=False))[0][0]

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._call(VAE_DECODER, latents=latents[None].astype(np.float32, copy=False))[0][0]
