"""Inputs for tracing and parity checks, built from the manifest's graph signatures, so the
names, dtypes and shapes used here can never drift from the contract."""

from __future__ import annotations

import numpy as np

from ditarkit.runtime.manifest import LM_AUDIO_MASK, LM_POSITION, SAMPLER_RENOISE_STEP, GraphSpec


def example_inputs(spec: GraphSpec, dims: dict[str, int], seed: int = 0, vocab: int = 2) -> dict[str, np.ndarray]:
    """Random inputs of the signature's shapes. Integer inputs: `position` is the filled part
    of the cache (half of it), `renoise_step` a solver step; other ids are drawn below `vocab`;
    an audio mask is 0 or 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = tensor.resolve(dims)
        if tensor.name == LM_POSITION:
            feeds[tensor.name] = np.array([dims["capacity"] // 2], dtype=np.int64)
        elif tensor.name == SAMPLER_RENOISE_STEP:  # the second solver step: valid for any NFE >= 2
            feeds[tensor.name] = np.array([1], dtype=np.int64)
        elif tensor.name == LM_AUDIO_MASK:  # rows are text (0) or patches (1)
            feeds[tensor.name] = rng.integers(0, 2, size=shape).astype(np.float32)
        elif tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif tensor.name == "t":
            feeds[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        elif tensor.name == "audio":
            feeds[tensor.name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def dims_at(spec: GraphSpec, which: int, hop: int) -> dict[str, int]:
    """Dynamic dims at min (0), opt (1) or max (2) of their ranges; audio stays a whole
    number of hops."""
    dims = {name: rng[which] for name, rng in spec.dims.items()}
    if "samples" in dims:
        dims["samples"] = max(hop, dims["samples"] // hop * hop)
    return dims
