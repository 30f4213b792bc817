"""ditar-bench end to end on the tiny preset: a row per backend, a valid JSON report, the
same generated length on every backend. No timing is asserted beyond being a positive
number: benchmarks are not tests."""

from __future__ import annotations

import json
import math
import shlex

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
