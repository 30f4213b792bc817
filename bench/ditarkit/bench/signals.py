"""A synthetic voice for benchmarks and tests, so neither depends on a recording."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, sample_rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal with a wandering pitch: enough like
    speech for pipeline tests and timing, and never silent."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.2 * voice * envelope).astype(np.float32)
