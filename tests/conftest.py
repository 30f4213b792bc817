"""Shared fixtures: a tiny DiTAR with perturbed (non-trivial) random weights, and its bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference model needs torch (pip install -e .[test])")

from ditarkit.bench.signals import speech_like  # noqa: E402, F401  (tests import it from here)
from ditarkit.reference.losses import SpeechBatch  # noqa: E402
from ditarkit.reference.model import DiTAR, perturb_weights  # noqa: E402
from ditarkit.runtime.config import DiTARConfig, preset  # noqa: E402

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


def _export_tiny(tiny_model: DiTAR, tmp_path_factory: pytest.TempPathFactory, name: str, fp16: bool) -> Path:
    from ditarkit.export.bundle import export_bundle

    export_bundle(tiny_model, path := tmp_path_factory.mktemp("tiny-bundles") / name, fp16=fp16)
    return path


# One export per precision for the whole suite (each takes seconds), shared by every module that
# reads a tiny bundle: read them only; a test that edits a bundle edits its own copy.
@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_model, tmp_path_factory) -> Path:
    return _export_tiny(tiny_model, tmp_path_factory, "tiny32", fp16=False)


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_model, tmp_path_factory) -> Path:
    return _export_tiny(tiny_model, tmp_path_factory, "tiny16", fp16=True)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def aligned_batch(cfg: DiTARConfig) -> SpeechBatch:
    """Two utterances with random latents and alignments, for the losses of `cfg`'s model."""
    g = torch.Generator().manual_seed(0)
    p, c = cfg.patch_size, cfg.audio.latent_dim
    return SpeechBatch(
        text_ids=torch.randint(4, cfg.text.vocab_size, (2, 12), generator=g),
        text_lengths=torch.tensor([12, 9]),
        prompt=torch.randn(2, 5 * p, c, generator=g),
        prompt_patches=torch.tensor([5, 3]),
        target=torch.randn(2, 7 * p, c, generator=g),
        target_patches=torch.tensor([7, 4]),
        # texts of 10 and 7 characters (BOS and EOS aside), read at one or two per patch
        char_windows=torch.tensor([[[min(j, 9), min(j + 1, 9)] for j in range(7)],
                                   [[min(2 * j, 6), min(2 * j + 1, 6)] for j in range(7)]]),
    )
