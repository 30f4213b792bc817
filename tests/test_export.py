"""ditar-export: per-graph parity, KV-cache loop through ONNX Runtime, bundle integrity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ditarkit.export.cli import main as export_main
from ditarkit.export.parity import TOLERANCE, check_bundle
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.backends.tensorrt import unavailable_reason
from ditarkit.runtime.config import preset
from ditarkit.runtime.manifest import (
    GRAPH_NAMES,
    LM,
    LOCDIT,
    LOCDIT_SAMPLER,
    MANIFEST_FILE,
    TEXT_CURSOR,
    BundleError,
    load_manifest,
)

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
LOOP_STEPS = 20


@pytest.fixture(scope="module")
def bundles(tiny_fp32_bundle, tiny_fp16_bundle):
    return {precision: (path, load_manifest(path)) for precision, path in
            (("fp32", tiny_fp32_bundle), ("fp16", tiny_fp16_bundle))}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_matches_pytorch(tiny_model, bundles, precision):
    results = check_bundle(tiny_model, bundles[precision][0], precision)
    assert {r.graph for r in results} == {*GRAPH_NAMES, TEXT_CURSOR}
    failures = [r for r in results if not r.ok]
    assert not failures, failures
    worst = max(r.max_abs / r.scale for r in results)
    assert worst <= TOLERANCE[precision]


def test_lm_prefill_and_steps_through_onnxruntime_match_the_full_forward(tiny_model, bundles):
    runner = OrtRunner(bundles["fp32"][0])
    dim = tiny_model.config.lm.dim
    embeds = np.random.default_rng(0).standard_normal((12 + LOOP_STEPS, dim)).astype(np.float32)
    with torch.inference_mode():
        full_hidden, full_stop, _, _ = tiny_model.lm(torch.from_numpy(embeds)[None])
        full_advance = tiny_model.lm.advance_head(full_hidden)
    state = runner.new_lm_state(64)
    outs = [runner.lm_step(embeds[:12], state)]
    for i in range(12, 12 + LOOP_STEPS):
        outs.append(runner.lm_step(embeds[i : i + 1], state))
    got_hidden = np.stack([o.hidden for o in outs])
    want_hidden = full_hidden[0, 11:].numpy()
    assert np.abs(got_hidden - want_hidden).max() <= TOLERANCE["fp32"] * max(1.0, np.abs(want_hidden).max())
    np.testing.assert_allclose([o.stop_logit for o in outs], full_stop[0, 11:].numpy(), atol=TOLERANCE["fp32"])
    np.testing.assert_allclose(np.stack([o.advance_logits for o in outs]), full_advance[0, 11:].numpy(),
                               atol=TOLERANCE["fp32"])
    assert state.position == 12 + LOOP_STEPS


def test_graphs_pass_the_full_checker_and_match_the_manifest(bundles):
    for precision, (path, manifest) in bundles.items():
        assert load_manifest(path).precision == precision
        for name, spec in manifest.graphs.items():
            model = onnx.load(str(path / spec.file))
            onnx.checker.check_model(model, full_check=True)
            for declared, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
                assert [t.name for t in declared] == [v.name for v in actual], name
                for t, v in zip(declared, actual):
                    assert ONNX_DTYPES[t.dtype] == v.type.tensor_type.elem_type, (name, t.name)
                    dims = [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                    assert dims == list(t.shape), (name, t.name, dims)


def test_fp16_bundle_stores_fp16_weights(bundles):
    """Weight bytes halve (the tiny graphs are too small for file sizes to show it)."""
    def weight_bytes(bundle):
        path, manifest = bundle
        weights = onnx.load(str(path / manifest.graphs[LM].file)).graph.initializer
        return sum(len(w.raw_data) for w in weights if w.data_type != onnx.TensorProto.INT64)

    assert weight_bytes(bundles["fp16"]) < 0.55 * weight_bytes(bundles["fp32"])


def _copy_bundle(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_graph_is_refused(bundles, tmp_path):
    bundle = _copy_bundle(bundles["fp32"][0], tmp_path / "b")
    lm = bundle / "lm.onnx"
    lm.write_bytes(lm.read_bytes()[:1000])
    with pytest.raises(BundleError, match="does not match its checksum"):
        OrtRunner(bundle)
    with pytest.raises(BundleError, match="cannot load graph"):
        OrtRunner(bundle, verify_files=False)


def test_edited_manifest_and_foreign_version_are_refused(bundles, tmp_path):
    bundle = _copy_bundle(bundles["fp32"][0], tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["graphs"]["locdit"]["outputs"][0]["name"] = "renamed"
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not exported with this manifest"):
        OrtRunner(bundle)
    manifest["format_version"] = 999
    manifest["kit_version"] = "9.9.9"
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"made by ditarkit 9\.9\.9.*re-export"):
        load_manifest(bundle)
    (bundle / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not a valid manifest"):
        load_manifest(bundle)


def test_the_text_cursor_graph_is_part_of_the_contract_exactly_when_the_config_has_a_cursor(bundles, tmp_path):
    import dataclasses

    from ditarkit.runtime.manifest import LM_ADVANCE_LOGITS, graph_signatures

    plain = graph_signatures(dataclasses.replace(preset("tiny"), cursor=None).contract())
    assert set(plain) == set(GRAPH_NAMES) and LM_ADVANCE_LOGITS not in plain[LM].output_names
    bundle = _copy_bundle(bundles["fp32"][0], tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    del manifest["graphs"][TEXT_CURSOR]
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lacks graphs \['text_cursor'\]"):
        load_manifest(bundle)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("kv_cache", "layers", 99), ("kv_cache", "head_dim", 3), ("kv_cache", "shared_buffer", True),
    ("streaming", "decoder_context_frames", 1),
])
def test_manifest_fields_that_repeat_the_config_cannot_be_edited_without_effect(bundles, tmp_path, section, key,
                                                                               value):
    bundle = _copy_bundle(bundles["fp32"][0], tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest[section][key] = value
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"{section}\.{key} is {value!r} but the model config gives"):
        load_manifest(bundle)
    del manifest[section]
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"lacks its '{section}' section"):
        load_manifest(bundle)


def test_cli_exports_a_preset_and_prints_parity(tmp_path):
    result = CliRunner().invoke(export_main, ["--preset", "tiny", "--out", str(tmp_path / "b"), "--no-trt"])
    assert result.exit_code == 0, result.output
    assert "lm.onnx" in result.stdout and "velocity" in result.stdout
    source = load_manifest(tmp_path / "b").source
    assert source == {"preset": "tiny", "random_weights_seed": 0, "config": preset("tiny").to_dict()}


def test_cli_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = CliRunner().invoke(export_main, ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: no config.json in checkpoint folder {tmp_path / 'ckpt'}"]
    assert not (tmp_path / "b").exists()


TRT_REASON = unavailable_reason()


@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT engines cannot be built here: {TRT_REASON}")
def test_tensorrt_engines_build_and_match_pytorch(tiny_model, bundles):
    from ditarkit.export.parity import parity_inputs
    from ditarkit.reference.runner import TorchRunner
    from ditarkit.runtime.backends.tensorrt import TensorRTRunner, build_engines

    path = bundles["fp32"][0]
    build_engines(path)
    trt_runner, reference = TensorRTRunner(path), TorchRunner(tiny_model)
    for name in trt_runner.specs:
        feeds = parity_inputs(trt_runner, name, "opt")
        for a, b in zip(reference.run(name, feeds), trt_runner.run(name, feeds)):
            assert np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(a).max()), name


def test_the_fused_sampler_shares_one_copy_of_the_locdit_weights(bundles):
    for bundle, manifest in bundles.values():
        sampler, locdit = (onnx.load(str(bundle / manifest.graphs[n].file)) for n in (LOCDIT_SAMPLER, LOCDIT))
        contents = [(tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in sampler.graph.initializer]
        assert len(set(contents)) == len(contents)  # no tensor stored twice
        assert len(_matmul_weights(sampler)) == len(_matmul_weights(locdit))  # every step reads the same ones


def _matmul_weights(graph: onnx.ModelProto) -> set[str]:
    constants = {t.name for t in graph.graph.initializer}
    return {n.input[1] for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in constants}
