"""Shared fixtures: a tiny DiTAR with perturbed (non-trivial) random weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference model needs torch (pip install -e .[test])")

from ditarkit.bench.signals import speech_like  # noqa: E402, F401  (tests import it from here)
from ditarkit.reference.model import DiTAR, perturb_weights  # noqa: E402
from ditarkit.runtime.config import preset  # noqa: E402

SEED = 1234

# Prepended to a subprocess script: any import of torch fails, as on a robot without it.
BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
"""


@pytest.fixture(scope="session")
def tiny_model() -> DiTAR:
    torch.manual_seed(SEED)
    return perturb_weights(DiTAR(preset("tiny")), seed=SEED).eval()


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)
