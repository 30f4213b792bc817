"""Checkpoint -> bundle folder: one ONNX file per graph plus `manifest.json`.

The bundle is built in a staging folder beside the target and swapped into place at the
end (`atomic_dir`), so a failed or interrupted export never leaves a half-written bundle.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ditarkit.export.onnx_export import export_graph
from ditarkit.reference.model import DiTAR
from ditarkit.reference.runner import GRAPH_MODULES
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.fileio import atomic_dir
from ditarkit.runtime.lexicon import PACKAGED_LEXICON_DIR
from ditarkit.runtime.manifest import BundleError, Manifest, file_sha256, graph_signatures, signature_digest, with_files

Log = Callable[[str], None]


def export_bundle(
    model: DiTAR,
    out: str | Path,
    fp16: bool = False,
    opset: int = 17,
    source: dict[str, Any] | None = None,
    log: Log = lambda _msg: None,
) -> Manifest:
    """A kit model's bundle, with the packaged lexicon where the model reads with one; the
    reference model's own config is kept in the manifest's source."""
    contract = model.config.contract()
    graphs = {name: GRAPH_MODULES[name](model) for name in graph_signatures(contract)}
    source = {**(source or {}), "config": model.config.to_dict()}
    files = {name: PACKAGED_LEXICON_DIR / name for name in contract.text.files}  # a lexicon it reads with
    for name, path in files.items():
        if file_sha256(path) != contract.text.files[name]:
            raise BundleError(f"the packaged {name} is not the one this model was trained with (its checksum "
                              "differs): export it with the ditarkit version it was trained with")
    return write_bundle(graphs, contract, out, fp16, opset, source, log, files)


def write_bundle(
    graphs: Mapping[str, nn.Module],
    contract: ModelContract,
    out: str | Path,
    fp16: bool = False,
    opset: int = 17,
    source: dict[str, Any] | None = None,
    log: Log = lambda _msg: None,
    files: Mapping[str, Path] | None = None,
) -> Manifest:
    """Any model family's bundle: one module per graph of the contract's signatures, and
    `files` (bundle name -> path: a tokenizer) copied beside them."""
    specs = graph_signatures(contract)
    precision = "fp16" if fp16 else "fp32"

    def build(staging: Path) -> Manifest:
        for name, path in (files or {}).items():
            shutil.copyfile(path, staging / name)
        exported = {}
        for index, (name, spec) in enumerate(specs.items(), 1):
            log(f"[{index}/{len(specs)}] exporting {name} ({precision}, opset {opset})")
            saved = export_graph(graphs[name], spec, staging / f"{name}.onnx", opset, fp16,
                                 signature_digest(contract, spec), contract)
            exported[name] = with_files(spec, saved.path, saved.data)
        manifest = Manifest(contract, precision, opset, exported, source=source or {})
        manifest.save(staging)
        return manifest

    return atomic_dir(out, build)
