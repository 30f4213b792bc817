"""Checkpoint -> bundle folder: one ONNX file per graph plus `manifest.json`.

The bundle is built in a staging folder beside the target and swapped into place at the
end (`atomic_dir`), so a failed or interrupted export never leaves a half-written bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditarkit.export.onnx_export import export_graph
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.fileio import atomic_dir
from ditarkit.runtime.manifest import Manifest, file_sha256, graph_signatures, signature_digest

Log = Callable[[str], None]


def export_bundle(
    model: DiTAR,
    out: str | Path,
    fp16: bool = False,
    opset: int = 17,
    source: dict[str, Any] | None = None,
    log: Log = lambda _msg: None,
) -> Manifest:
    specs = graph_signatures(model.config)
    precision = "fp16" if fp16 else "fp32"

    def build(staging: Path) -> Manifest:
        graphs = {}
        for index, (name, spec) in enumerate(specs.items(), 1):
            log(f"[{index}/{len(specs)}] exporting {name} ({precision}, opset {opset})")
            path = export_graph(model, spec, staging / f"{name}.onnx", opset, fp16,
                                signature_digest(model.config, spec))
            graphs[name] = replace(spec, file=path.name, sha256=file_sha256(path))
        manifest = Manifest(model.config, precision, opset, graphs, source=source or {})
        manifest.save(staging)
        return manifest

    return atomic_dir(out, build)
