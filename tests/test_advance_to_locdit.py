"""LocDiT told the advance of the patch it draws (`CursorConfig.advance_to_locdit`): in
training the true advance, in the LM graph the advance head's argmax, embedded and added to
the LM output. A model grown from one without the table starts as that model, and the
exported graphs and the runtime loop reproduce PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import aligned_batch, speech_like

from ditarkit.export.bundle import export_bundle
from ditarkit.export.parity import TOLERANCE, check_bundle
from ditarkit.reference.losses import teacher_force
from ditarkit.reference.model import DiTAR, perturb_weights
from ditarkit.reference.runner import LMGraph, TorchRunner
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.config import preset
from ditarkit.runtime.sampler import GenerationOptions, explicit_noise, generate_latents

# ORT fp32 vs PyTorch over a whole synthesis: per-graph errors ~1e-6 fed back through
# 10 patches of 10 solver steps stay well inside 1e-4 (as for the model without the table).
END_TO_END_TOLERANCE = 1e-4


def _config(told: bool):
    cfg = preset("tiny")
    return dataclasses.replace(cfg, cursor=dataclasses.replace(cfg.cursor, advance_to_locdit=told))


def _model(told: bool, seed: int = 3) -> DiTAR:
    """A perturbed tiny model; told: the same weights, plus a perturbed advance table."""
    torch.manual_seed(seed)
    plain = perturb_weights(DiTAR(_config(False)), seed=seed).eval()
    if not told:
        return plain
    model = DiTAR(_config(True)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    perturb_weights(model.lm.advance_embedding, seed=seed + 1, scale=0.2)
    return model


def _lm_inputs(cfg):
    g = torch.Generator().manual_seed(4)
    lm = cfg.lm
    seq = 6
    empty_cache = torch.zeros(lm.layers, 1, lm.kv_heads, 0, lm.dim // lm.heads)
    return torch.randn(1, seq, lm.dim, generator=g), empty_cache, empty_cache, torch.tensor([0])


def test_only_cursor_models_get_the_table_and_it_starts_at_zero():
    assert DiTAR(_config(False)).lm.advance_embedding is None
    assert DiTAR(dataclasses.replace(preset("tiny"), cursor=None)).lm.advance_embedding is None
    table = DiTAR(_config(True)).lm.advance_embedding
    assert table.num_embeddings == preset("tiny").cursor.max_advance + 1
    assert float(table.weight.detach().abs().max()) == 0.0


@torch.no_grad()
def test_a_model_grown_from_one_without_the_table_starts_as_that_model():
    from ditarkit.training.train import take_weights

    source = _model(False)
    grown = DiTAR(_config(True)).eval()
    taken = take_weights(grown, source, "source")
    assert "lm.advance_embedding.weight" not in taken
    batch = aligned_batch(source.config)
    torch.testing.assert_close(teacher_force(grown, batch).cond, teacher_force(source, batch).cond, rtol=0, atol=0)


@torch.no_grad()
def test_training_tells_locdit_the_true_advance():
    model = _model(True)
    forced = teacher_force(model, aligned_batch(model.config))
    told = model.lm.advance_embedding(forced.advance)
    plain = teacher_force(_model(False), aligned_batch(model.config))  # the same weights but the table
    torch.testing.assert_close(forced.cond, plain.cond + told)
    assert float(told.abs().max()) > 0.01  # a perturbed table: the advance changes the condition
    assert forced.advance.unique().numel() > 1  # the batch reads at more than one pace


@torch.no_grad()
def test_the_lm_graph_tells_locdit_the_advance_head_s_argmax():
    model = _model(True)
    graph, plain = LMGraph(model), LMGraph(_model(False))
    inputs = _lm_inputs(model.config)
    cond, *rest, logits = graph(*inputs)
    bare, *plain_rest, plain_logits = plain(*inputs)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)  # the head reads h_i, not the sum
    torch.testing.assert_close(cond, bare + model.lm.advance_embedding(logits.argmax(-1)))
    for got, want in zip(rest, plain_rest):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def told_bundle(tmp_path_factory):
    model = _model(True)
    out = tmp_path_factory.mktemp("advance-to-locdit") / "fp32"
    export_bundle(model, out, fp16=False)
    return model, out


def test_every_graph_of_the_told_model_matches_pytorch(told_bundle):
    model, bundle = told_bundle
    results = check_bundle(model, bundle, "fp32")
    assert results and all(r.ok for r in results), results
    assert max(r.max_abs / r.scale for r in results) <= TOLERANCE["fp32"]


def test_the_runtime_reproduces_the_told_model_and_the_table_matters(told_bundle):
    model, bundle = told_bundle
    torch_runner, ort_runner = TorchRunner(model), OrtRunner(bundle)
    assert ort_runner.config.cursor.advance_to_locdit  # the contract carries the setting
    cfg = model.config
    prompt = ort_runner.encode_audio(speech_like(2.0))
    noise = explicit_noise(np.random.default_rng(7).standard_normal(
        (40, 2, cfg.patch_size, cfg.audio.latent_dim)).astype(np.float32))
    options = GenerationOptions(max_seconds=1.0, stop_threshold=0.999999, temperature=0.5, cfg_scale=1.5)
    ids = [1, 20, 21, 22, 23, 24, 2]
    want = generate_latents(torch_runner, ids, prompt, options, noise)
    got = generate_latents(ort_runner, ids, prompt, options, noise)
    assert want.shape == got.shape
    assert np.abs(want - got).max() <= END_TO_END_TOLERANCE * max(1.0, np.abs(want).max())
    with torch.no_grad():
        model.lm.advance_embedding.weight.zero_()
    try:
        untold = generate_latents(TorchRunner(model), ids, prompt, options, noise)
    finally:
        with torch.no_grad():  # the module's model is shared: put its table back
            model.lm.advance_embedding.weight.copy_(_model(True).lm.advance_embedding.weight)
    assert np.abs(untold - want).max() > 100 * END_TO_END_TOLERANCE


def test_the_probe_measures_what_locdit_makes_of_the_told_advance():
    from ditarkit.training.metrics import Probe, alignment_metrics

    model = _model(True)
    batch = aligned_batch(model.config)
    probe = Probe(batch, batch, rates=[1.0, 2.0], text_chars=[10, 7], texts=["a" * 10, "b" * 7])
    told = alignment_metrics(model, probe, aligned_heads=())
    assert told["gap_wrong_advance_pct"] != 0.0 and np.isfinite(told["gap_own_advance_pct"])
    with torch.no_grad():
        model.lm.advance_embedding.weight.zero_()  # told nothing: any advance gives the same loss
    untold = alignment_metrics(model, probe, aligned_heads=())
    assert abs(untold["gap_wrong_advance_pct"]) < 1e-4 and abs(untold["gap_own_advance_pct"]) < 1e-4
    assert "gap_wrong_advance_pct" not in alignment_metrics(_model(False), probe, aligned_heads=())
