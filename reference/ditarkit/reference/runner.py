"""The PyTorch reference as a backend: each bundle graph is its reference module's forward.

The wrappers here are what `ditar-export` traces into ONNX, and `TorchRunner` evaluates
them eagerly behind the runtime's `GraphRunner`. So `generate_patches(TorchRunner(model),
...)` is the reference sampler: the same loop, schedule, guidance and temperature rule the
deployed runtime executes, with every network in fp32 PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ditarkit.reference.model import DiTAR
from ditarkit.runtime.manifest import (
    LM,
    LOCDIT,
    PATCH_ENCODER,
    TEXT_EMBEDDING,
    VAE_DECODER,
    VAE_ENCODER,
    graph_signatures,
)
from ditarkit.runtime.runner import GraphRunner


class VAEEncoderGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.vae = model.vae

    def forward(self, audio: Tensor) -> Tensor:  # (1, T) -> (1, F, C)
        return self.vae.encode(audio)


class VAEDecoderGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.vae = model.vae

    def forward(self, latents: Tensor) -> Tensor:  # (1, F, C) -> (1, F * hop)
        return self.vae.decode(latents)


class TextEmbeddingGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.embedding = model.text_embedding

    def forward(self, ids: Tensor) -> Tensor:  # (T,) -> (T, D)
        return self.embedding(ids)


class PatchEncoderGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.aggregator = model.aggregator

    def forward(self, patches: Tensor) -> Tensor:  # (N, P, C) -> (N, D)
        return self.aggregator(patches)


class LMGraph(nn.Module):
    """One call serves prefill (steps = prompt length) and decoding (steps = 1)."""

    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.lm = model.lm

    def forward(self, embeds: Tensor, past_keys: Tensor, past_values: Tensor, position: Tensor):
        hidden, stop, keys, values = self.lm(embeds, past_keys, past_values, position)
        return hidden[:, -1], stop[:, -1], keys, values  # (1, D), (1,), (L, 1, Hkv, S, hd) x 2


class LocDiTGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.locdit = model.locdit

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, history: Tensor) -> Tensor:
        return self.locdit(x, t, cond, history)  # (B, P, C)


# Forward arguments follow the order of each graph's inputs in `graph_signatures`.
GRAPH_MODULES: dict[str, type[nn.Module]] = {
    VAE_ENCODER: VAEEncoderGraph,
    VAE_DECODER: VAEDecoderGraph,
    TEXT_EMBEDDING: TextEmbeddingGraph,
    PATCH_ENCODER: PatchEncoderGraph,
    LM: LMGraph,
    LOCDIT: LocDiTGraph,
}


class TorchRunner(GraphRunner):
    name = "pytorch"

    def __init__(self, model: DiTAR) -> None:
        self.model = model.eval()
        self.config = model.config
        self.specs = graph_signatures(model.config)
        self.graphs = {name: cls(model).eval() for name, cls in GRAPH_MODULES.items()}

    @torch.inference_mode()
    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        device = self.model.text_embedding.weight.device  # CPU, or CUDA for GPU measurements
        args = (torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in self.specs[name].input_names)
        out = self.graphs[name](*args)
        return [o.cpu().numpy() for o in (out if isinstance(out, tuple) else (out,))]
