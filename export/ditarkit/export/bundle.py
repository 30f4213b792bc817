"""Checkpoint -> bundle folder: one ONNX file per graph plus `manifest.json`.

The bundle is built in a staging folder beside the target and renamed into place at the
end, so a failed or interrupted export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditarkit.export.onnx_export import export_graph
from ditarkit.reference.model import DiTAR
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        graphs = {}
        specs = graph_signatures(model.config)
        for index, (name, spec) in enumerate(specs.items(), 1):
            log(f"[{index}/{len(specs)}] exporting {name} ({'fp16' if fp16 else 'fp32'}, opset {opset})")
            path = export_graph(model, spec, staging / f"{name}.onnx", opset, fp16,
                                signature_digest(model.config, spec))
            graphs[name] = replace(spec, file=path.name, sha256=file_sha256(path))
        manifest = Manifest(model.config, "fp16" if fp16 else "fp32", opset, graphs, source=source or {})
        manifest.save(staging)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`; an existing bundle there is removed only after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
