"""The PyTorch reference as a backend: each bundle graph is its reference module's forward.

The wrappers here are what `ditar-export` traces into ONNX, and `TorchRunner` evaluates
them eagerly behind the runtime's `GraphRunner`. So `generate_patches(TorchRunner(model),
...)` is the reference sampler: the same loop, schedule, guidance and temperature rule the
deployed runtime executes, with every network in fp32 PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ditarkit.reference.model import DiTAR
from ditarkit.runtime.contract import ModelContract, SamplerSpec
from ditarkit.runtime.diffusion import Schedule, guided, time_grid, zero_steps
from ditarkit.runtime.manifest import (
    LM,
    LOCDIT,
    LOCDIT_SAMPLER,
    PATCH_ENCODER,
    TEXT_CURSOR,
    TEXT_EMBEDDING,
    VAE_DECODER,
    VAE_ENCODER,
    graph_signatures,
)
from ditarkit.runtime.runner import GraphRunner, room_for_background_decoding


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


class TextCursorGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.cursor = model.text_cursor

    def forward(self, ids: Tensor) -> Tensor:  # (T,) -> (T, D)
        return self.cursor(ids)


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
        outputs = (hidden[:, -1], stop[:, -1], keys, values)  # (1, D), (1,), (L, 1, Hkv, S, hd) x 2
        if self.lm.advance_head is None:
            return outputs
        # Like the stop head, applied before the last position is taken: a head reading the
        # `hidden` graph output itself would meet it after the fp16 export's output cast.
        advance_logits = self.lm.advance_head(hidden)[:, -1]  # (1, max_advance + 1)
        # The advance the runtime's cursor takes (its argmax of these logits), told to LocDiT.
        cond = self.lm.condition(hidden[:, -1], advance_logits.argmax(-1))
        return (cond, *outputs[1:], advance_logits)


class LocDiTGraph(nn.Module):
    def __init__(self, model: DiTAR) -> None:
        super().__init__()
        self.locdit = model.locdit

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, history: Tensor) -> Tensor:
        return self.locdit(x, t, cond, history)  # (B, P, C)


class GuidedSolverStep(nn.Module):
    """One step of `diffusion.sample_patch` in torch: guidance (the diffusion module's own
    function), (x0, eps) estimate, the temperature rule, and the move to the next time. Its
    own module so that its nodes carry the scope "solver", which an fp16 export keeps in fp32
    (the state crosses every step)."""

    def __init__(self, sampler: SamplerSpec) -> None:
        super().__init__()
        self.schedule, self.guidance = Schedule(sampler.schedule), sampler.guidance

    def forward(self, x: Tensor, velocity_pair: Tensor | None, cfg_scale: Tensor, renoise: Tensor, enters: Tensor,
                t: float, s: float) -> Tensor:
        v = torch.zeros_like(x) if velocity_pair is None else guided(velocity_pair, cfg_scale, self.guidance)
        x0, eps = self.schedule.estimate(x, v, t)
        eps = torch.where(enters, renoise, eps)
        return self.schedule.alpha(s) * x0 + self.schedule.sigma(s) * eps


class LocDiTSamplerGraph(nn.Module):
    """The guided NFE loop of one patch, unrolled at the model's NFE: one call per patch
    instead of NFE, the same arithmetic as `diffusion.sample_patch`. Any model family's
    LocDiT graph fits: `locdit(x, t, cond, history)` is the `locdit` graph's signature.
    The same loop solves a batch of patches at once (training draws its own patches with
    it): x_init, renoise (..., P, C), cond (..., D), history (..., H*P, C)."""

    def __init__(self, locdit: nn.Module, sampler: SamplerSpec) -> None:
        super().__init__()
        self.locdit = locdit
        self.solver = GuidedSolverStep(sampler)
        self.grid = [float(t) for t in time_grid(sampler.nfe, sampler)]
        self.still = zero_steps(sampler.nfe, sampler)  # leading steps with zero velocity: no LocDiT call
        # A LocDiT whose history attends to itself alone offers its history's keys and values
        # once per patch (`history_cache`); any other runs its whole sequence every step.
        self.caches_history = bool(getattr(locdit, "isolated_history", False))

    def forward(self, x_init: Tensor, renoise: Tensor, renoise_step: Tensor, cfg_scale: Tensor, cond: Tensor,
                history: Tensor) -> Tensor:
        # The state, its starting noise and the re-noise go into the solver as they are: only
        # LocDiT's side is reshaped, so an fp16 export keeps the state's path in fp32.
        x = x_init
        patch = x.shape[-2:]
        cond2 = torch.stack([cond, torch.zeros_like(cond)]).reshape(-1, cond.shape[-1])  # conditional, unconditional
        velocity_of = self._velocity(history.reshape(-1, *history.shape[-2:]))
        for index, (t, s) in enumerate(zip(self.grid[:-1], self.grid[1:])):
            velocity = None
            if index >= self.still:
                x2 = torch.stack([x, x]).reshape(-1, *patch)  # (2N, P, C): every patch in both branches
                times = torch.full((x2.shape[0],), t, device=x.device)
                velocity = velocity_of(x2, times, cond2).reshape(2, *x.shape)
            x = self.solver(x, velocity, cfg_scale, renoise, renoise_step == index, t, s)
        return x  # (..., P, C)

    def _velocity(self, history: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """LocDiT on both branches of every patch at one solver step, given their history
        (N, H*P, C); branch-major, as `forward` stacks x and cond."""
        if self.caches_history:
            keys, values = (torch.cat([a, a], dim=1) for a in self.locdit.history_cache(history))  # shared by branches
            return lambda x, t, cond: self.locdit.forward_cached(x, t, cond, keys, values)
        history2 = torch.cat([history, history])
        return lambda x, t, cond: self.locdit(x, t, cond, history2)


def _locdit_sampler(model: DiTAR) -> LocDiTSamplerGraph:
    return LocDiTSamplerGraph(model.locdit, model.config.contract().sampler)


# Forward arguments follow the order of each graph's inputs in `graph_signatures`.
GRAPH_MODULES: dict[str, Callable[[DiTAR], nn.Module]] = {
    VAE_ENCODER: VAEEncoderGraph,
    VAE_DECODER: VAEDecoderGraph,
    TEXT_EMBEDDING: TextEmbeddingGraph,
    PATCH_ENCODER: PatchEncoderGraph,
    LM: LMGraph,
    LOCDIT: LocDiTGraph,
    LOCDIT_SAMPLER: _locdit_sampler,
    TEXT_CURSOR: TextCursorGraph,
}


class TorchRunner(GraphRunner):
    """Each graph's PyTorch module, run eagerly: the reference every bundle is checked against.
    `TorchRunner(model)` for the kit's own models; `from_graphs` for another family's modules
    (the VoxCPM import), which follow the same graph signatures."""

    name = "pytorch"

    def __init__(self, model: DiTAR) -> None:
        contract = model.config.contract()
        specs = graph_signatures(contract)
        self._attach(contract, {name: GRAPH_MODULES[name](model) for name in specs},
                     model.text_embedding.weight.device)

    @classmethod
    def from_graphs(cls, contract: ModelContract, graphs: dict[str, nn.Module],
                    device: torch.device | str = "cpu") -> TorchRunner:
        runner = cls.__new__(cls)
        runner._attach(contract, graphs, torch.device(device))
        return runner

    def _attach(self, contract: ModelContract, graphs: dict[str, nn.Module], device: torch.device) -> None:
        self.config = contract
        self.specs = graph_signatures(contract)
        missing = sorted(set(self.specs) - set(graphs))
        if missing:
            raise ValueError(f"no PyTorch module for graphs {missing}")
        self.graphs = {name: graphs[name].eval() for name in self.specs}
        self.device = device  # CPU, or CUDA for GPU measurements

    @torch.inference_mode()
    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = (torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.specs[name].input_names)
        out = self.graphs[name](*args)
        return [o.cpu().numpy() for o in (out if isinstance(out, tuple) else (out,))]

    def decodes_in_background(self) -> bool:
        # As the ONNX Runtime runner does, so that benchmarks compare engines, not loops.
        return self.device.type == "cpu" and room_for_background_decoding(torch.get_num_threads())
