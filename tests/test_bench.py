"""ditar-bench runs end to end on the tiny preset and writes its JSON report (no timing
is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ditarkit.bench.cli import main as bench_main


def test_bench_reports_every_backend_as_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_main, ["--preset", "tiny", "--runs", "1", "--seconds", "0.5",
                                             "--threads", "1", "--no-piper", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["precision"]) for r in report["rows"]}
    assert {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")} <= rows
    for row in report["rows"]:
        assert row["rtf"]["median"] > 0 and row["first_chunk_ms"]["median"] > 0
        assert abs(row["audio_seconds"] - 2 * 0.5) < 1e-9  # two sentences in the default text
        assert set(row["stage_ms"]) == {"encode_patches", "lm_step", "velocity", "decode_latents"}
    assert "cpu" in report["machine"] and "LocDiT ms" in result.stdout
