"""LocDiT with isolated history (the default voice's attention pattern) exports and matches
PyTorch, in the per-step graph and in the fused sampler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditarkit.export.bundle import export_bundle
from ditarkit.export.parity import TOLERANCE, check_bundle
from ditarkit.reference.model import DiTAR, perturb_weights
from ditarkit.runtime.config import preset
from ditarkit.runtime.manifest import LOCDIT, LOCDIT_SAMPLER


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    torch.manual_seed(5)
    model = perturb_weights(DiTAR(dataclasses.replace(preset("tiny"), isolated_history=True)), seed=5).eval()
    out = tmp_path_factory.mktemp("isolated") / "fp32"
    export_bundle(model, out, fp16=False)
    return model, out


def test_isolated_history_graphs_match_pytorch(isolated):
    model, bundle = isolated
    results = [r for r in check_bundle(model, bundle, "fp32") if r.graph in (LOCDIT, LOCDIT_SAMPLER)]
    assert {r.graph for r in results} == {LOCDIT, LOCDIT_SAMPLER}
    assert all(r.ok for r in results), results
    assert max(r.max_abs / r.scale for r in results) <= TOLERANCE["fp32"]
