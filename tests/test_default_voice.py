"""The shipped default voice: it loads, fits the size budget, exports and speaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditarkit.export.bundle import export_bundle
from ditarkit.reference.checkpoint import WEIGHTS_FILE, load_checkpoint
from ditarkit.reference.default_voice import default_checkpoint
from ditarkit.runtime.synthesizer import Synthesizer

EXAMPLE_VOICE = Path(__file__).resolve().parents[1] / "examples" / "voice.wav"
MAX_CHECKPOINT_MB = 50  # what the repository may carry


def test_default_voice_loads_exports_and_speaks(tmp_path):
    checkpoint = default_checkpoint()
    assert checkpoint is not None, "no trained default voice in reference/ditarkit/reference/default_voice/"
    assert (checkpoint / WEIGHTS_FILE).stat().st_size / 1e6 <= MAX_CHECKPOINT_MB
    model = load_checkpoint(checkpoint)
    export_bundle(model, tmp_path / "bundle")
    synth = Synthesizer(tmp_path / "bundle", backend="onnxruntime")
    audio = synth.synthesize("Hello there.", synth.voice(EXAMPLE_VOICE), synth.options(max_seconds=2.0))
    assert 0 < len(audio) <= 2.0 * synth.sample_rate
    assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
