"""The PyTorch reference behind the runtime's `Runner` interface.

With it, `ditarkit.runtime.sampler.generate_patches` is the reference sampler: the same
loop, schedule, guidance and temperature rule the deployed runtime executes, with every
network evaluated by the eager PyTorch modules in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditarkit.reference.model import DiTAR


@dataclass
class TorchLMState:
    """A preallocated KV cache and how much of it is filled."""

    keys: torch.Tensor  # (L, 1, Hkv, capacity, hd)
    values: torch.Tensor
    position: int = 0


class TorchRunner:
    def __init__(self, model: DiTAR) -> None:
        self.model = model.eval()
        self.config = model.config

    @torch.inference_mode()
    def embed_text(self, ids: np.ndarray) -> np.ndarray:
        return self.model.text_embedding(torch.from_numpy(ids)).numpy()

    @torch.inference_mode()
    def encode_patches(self, patches: np.ndarray) -> np.ndarray:
        return self.model.aggregator(torch.from_numpy(patches)).numpy()

    def new_lm_state(self, capacity: int) -> TorchLMState:
        lm = self.config.lm
        shape = (lm.layers, 1, lm.kv_heads, capacity, lm.head_dim)
        return TorchLMState(torch.zeros(shape), torch.zeros(shape))

    @torch.inference_mode()
    def lm_step(self, embeds: np.ndarray, state: TorchLMState) -> tuple[np.ndarray, float]:
        position = torch.tensor([state.position], dtype=torch.int64)
        hidden, stop, keys, values = self.model.lm(
            torch.from_numpy(embeds)[None], state.keys, state.values, position
        )
        end = state.position + embeds.shape[0]
        state.keys[:, :, :, state.position : end] = keys
        state.values[:, :, :, state.position : end] = values
        state.position = end
        return hidden[0, -1].numpy(), float(stop[0, -1])

    @torch.inference_mode()
    def velocity(self, x, t, cond, history) -> np.ndarray:
        args = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, t, cond, history))
        return self.model.locdit(*args).numpy()

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        return self.model.vae.encode(torch.from_numpy(audio)[None])[0].numpy()

    @torch.inference_mode()
    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self.model.vae.decode(torch.from_numpy(latents)[None])[0].numpy()
