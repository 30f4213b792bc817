"""Reference audio preparation: what of a long recording the voice prompt keeps."""

from __future__ import annotations

import numpy as np
from conftest import speech_like

from ditarkit.runtime.audio import prepare_reference

RATE, HOP = 24_000, 600


def test_a_long_reference_keeps_its_last_part():
    """The generated speech continues from the prompt's end, so the end is what is kept."""
    first, last = speech_like(6.0, seed=1), speech_like(10.0, seed=2)
    prepared = prepare_reference(np.concatenate([first, last]), RATE, RATE, HOP, max_seconds=10.0)
    assert len(prepared) == 10 * RATE
    expected = prepare_reference(last, RATE, RATE, HOP, max_seconds=10.0)
    # the same samples up to loudness normalisation (gain measured over different spans)
    correlation = np.corrcoef(prepared, expected)[0, 1]
    assert correlation > 0.999
