"""ditar-bench end to end on the tiny preset: a row per backend, a valid JSON report, the
same generated length on every backend. No timing is asserted beyond being a positive
number: benchmarks are not tests."""

from __future__ import annotations

import json
import math
import shlex
from importlib.util import find_spec

import pytest
from click.testing import CliRunner

from ditarkit.bench.cli import main as bench_main
from ditarkit.runtime.machine import cpu_features, describe_features

pytest.importorskip("torch", reason="the bench exports the model and runs its PyTorch row with torch")

# the graphs a synthesis calls (the tiny preset has a text cursor)
GRAPHS_PER_PATCH = {"text_embedding", "text_cursor", "patch_encoder", "lm", "locdit_sampler", "vae_decoder"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_reports_every_backend_as_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--preset", "tiny", "--runs", "1", "--seconds", "0.3", "--threads", "1", "--skip", "piper",
            "--json", str(out)]
    result = CliRunner().invoke(bench_main, args)
    assert result.exit_code == 0, result.output

    report = json.loads(out.read_text())
    assert set(report) >= {"command", "machine", "workload", "rows", "skipped", "failed"}
    assert report["command"] == "ditar-bench " + shlex.join(args)
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1 and "onnxruntime" in report["machine"]
    features = report["machine"]["cpu_features"]  # what the INT8 kernels may use, e.g. "AVX2, AVX-512, no VNNI"
    assert features == describe_features(cpu_features())
    assert f"({features})" in result.stdout.splitlines()[1] and result.stdout.splitlines()[1].startswith("machine:")
    assert report["failed"] == {} and report["skipped"]["piper"] == "--skip"

    rows = report["rows"]
    kinds = [(r["backend"], r["precision"]) for r in rows if r["backend"] != "tensorrt"]
    assert sorted(kinds) == [("onnxruntime", "fp16"), ("onnxruntime", "fp32"), ("pytorch", "fp32")]
    for row in rows:
        assert row["device"] == "cpu" and row["runs"] == 1 and not row["peer"]
        for spread in (row["rtf"], row["first_chunk_ms"]):
            assert all(positive(spread[k]) for k in ("median", "min", "max"))
            assert spread["min"] <= spread["median"] <= spread["max"]
        assert set(row["stage_ms"]) == GRAPHS_PER_PATCH
        assert all(positive(s["median"]) for s in row["stage_ms"].values())
        # per patch: one fused LocDiT solve; per sentence of 3 patches, VAE chunks of 1 and 2 patches
        calls = row["calls_per_audio_second"]
        patches_per_second = row["patches"] / row["audio_seconds"]
        assert calls["locdit_sampler"] == pytest.approx(patches_per_second)
        assert calls["vae_decoder"] == pytest.approx(2 / 3 * patches_per_second)
        assert positive(row["total_calls_per_audio_second"]) and positive(row["peak_rss_mb"])
        assert row["peak_rss_delta_mb"] >= 0 and row["notes"] == []
    # the stop head is disabled: every backend makes 3 patches for each of the 2 default sentences
    assert {r["patches"] for r in rows} == {6}
    assert all(r["audio_seconds"] == pytest.approx(0.6) for r in rows)

    table = result.stdout
    assert "RTF median [min-max]" in table and "LocDiT" in table
    assert sum(line.startswith(("pytorch ", "onnxruntime ")) for line in table.splitlines()) == 3


def test_bench_refuses_a_bundle_with_a_model_to_export(tmp_path):
    result = CliRunner().invoke(bench_main, ["--bundle", str(tmp_path), "--preset", "tiny"])
    assert result.exit_code == 2 and "not both" in result.output


def test_bench_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    result = CliRunner().invoke(bench_main, ["--bundle", str(tmp_path), "--skip", "piper"])
    assert result.exit_code == 1 and "not a ditarkit bundle" in result.output


# -- --voxcpm: the voxcpm package's loop against the kit's bundles of the same checkpoint ----
VOXCPM_STAGES = {"text_embedding", "patch_encoder", "lm", "locdit_sampler", "vae_decoder"}


def test_bench_voxcpm_rows_make_the_same_patches(tmp_path):
    if find_spec("voxcpm") is None:
        pytest.skip("the package row runs the voxcpm package")
    from voxcpm_oracle import build_package_model, tiny_config, write_checkpoint

    config = tiny_config("voxcpm")
    folder = write_checkpoint(tmp_path / "checkpoint", config, build_package_model(config, seed=3))
    out = tmp_path / "bench.json"
    patches, patch_seconds = 4, 0.0005  # the tiny VAE's hop is 4 samples at 16 kHz, 2 frames a patch
    args = ["--voxcpm", str(folder), "--text", "hello hello", "--ref-text", "hell", "--seconds",
            str(patches * patch_seconds), "--runs", "1", "--threads", "1", "--skip", "piper", "--json", str(out)]
    result = CliRunner().invoke(bench_main, args)
    assert result.exit_code == 0, result.output

    report = json.loads(out.read_text())
    assert report["failed"] == {} and report["skipped"]["piper"] == "--skip"
    assert report["workload"]["voxcpm"] == str(folder) and report["workload"]["ref_text"] == "hell"
    rows = {(r["backend"], r["precision"]): r for r in report["rows"] if r["backend"] != "tensorrt"}
    assert {("voxcpm package", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")} <= set(rows)
    # INT8 where ditar-calibrate quantized the fp32 bundle; otherwise a skipped row saying why
    assert ("onnxruntime", "int8") in rows or report["skipped"]["onnxruntime int8"].startswith("ditar-calibrate")
    for (backend, _), row in rows.items():
        assert row["device"] == "cpu" and row["runs"] == 1
        assert row["notes"] == [] or backend == "voxcpm package" or "ditar-calibrate" in row["notes"][0]
        assert row["patches"] == patches and row["audio_seconds"] == pytest.approx(patches * patch_seconds)
        for spread in (row["rtf"], row["first_chunk_ms"]):
            assert all(positive(spread[k]) for k in ("median", "min", "max"))
        assert set(row["stage_ms"]) == VOXCPM_STAGES
        assert all(positive(s["median"]) and s["min"] <= s["median"] <= s["max"] for s in row["stage_ms"].values())
        calls = row["calls_per_audio_second"]
        assert calls["locdit_sampler"] == pytest.approx(patches / row["audio_seconds"])  # one fused solve a patch
        assert positive(row["peak_rss_mb"]) and row["peak_rss_delta_mb"] >= 0
    package = rows[("voxcpm package", "fp32")]
    assert package["patch_max_abs_diff"] is None  # the reference the others are held to
    assert package["calls_per_audio_second"]["vae_decoder"] == pytest.approx(patches / package["audio_seconds"])
    assert any("_inference" in note for note in package["notes"])
    # same noise, same length: fp32 is the package's arithmetic reordered, fp16 further off
    assert rows[("onnxruntime", "fp32")]["patch_max_abs_diff"] < 1e-4
    assert 0 <= rows[("onnxruntime", "fp16")]["patch_max_abs_diff"] < 0.1
    table = result.stdout
    assert "voxcpm package" in table and "patch diff" in table


def test_the_random_0_5b_is_voxcpm_0_5b_in_size():
    if find_spec("voxcpm") is None:
        pytest.skip("the config is the voxcpm package's")
    import torch

    from ditarkit.bench.voxcpm import voxcpm_05b_config
    from ditarkit.export.voxcpm.checkpoint import VocabOnlyTokenizer, import_voxcpm

    classes = import_voxcpm("voxcpm")
    config = classes["config"].model_validate(voxcpm_05b_config())
    lm = config.lm_config
    assert lm.hidden_size // lm.num_attention_heads == 2 * len(lm.rope_scaling.short_factor) == 64
    with torch.device("meta"):  # sizes without the weights
        model = classes["model"](config, VocabOnlyTokenizer({}), classes["vae"](config.audio_vae_config), device="cpu")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # the release's files: a 1.30 GB bf16 model (2 bytes a weight) and a 301 MB fp32 audiovae.pth
    assert count(model) - count(model.audio_vae) == 652_287_296 and count(model.audio_vae) == 75_355_202


@pytest.mark.parametrize("args, expected", [
    (["--voxcpm", "/no/such/folder"], "neither a checkpoint folder nor one of 0.5b-random"),
    (["--voxcpm", "0.5b-random", "--preset", "tiny"], "not both"),
    (["--ref-text", "hello"], "--ref-text goes with --voxcpm"),
])
def test_bench_refuses_bad_voxcpm_arguments_in_one_line(args, expected):
    result = CliRunner().invoke(bench_main, args)
    assert result.exit_code == 2 and expected in result.output
    assert len(result.output.strip().splitlines()) == 1
