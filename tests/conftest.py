"""Shared fixtures: a tiny DiTAR with perturbed (non-trivial) random weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference model needs torch (pip install -e .[test])")

from ditarkit.reference.model import DiTAR, perturb_weights  # noqa: E402
from ditarkit.runtime.config import preset  # noqa: E402

SEED = 1234


@pytest.fixture(scope="session")
def tiny_model() -> DiTAR:
    torch.manual_seed(SEED)
    return perturb_weights(DiTAR(preset("tiny")), seed=SEED).eval()


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def speech_like(seconds: float, sample_rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal: enough like speech for shape and
    pipeline tests, and never silent."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.2 * voice * envelope).astype(np.float32)
