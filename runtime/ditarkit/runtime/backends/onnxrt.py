"""ONNX Runtime backend: one session per bundle graph, checked against the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ditarkit.runtime.config import DiTARConfig
from ditarkit.runtime.manifest import (
    GRAPH_NAMES,
    META_SIGNATURE,
    BundleError,
    GraphSpec,
    load_manifest,
    signature_digest,
)
from ditarkit.runtime.runner import GraphRunner

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    return options


def default_providers() -> list[str]:
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def open_session(
    bundle: Path, spec: GraphSpec, config: DiTARConfig, providers: list[str], options: ort.SessionOptions
) -> ort.InferenceSession:
    """Load one graph and refuse it unless it is the graph the manifest describes."""
    path = bundle / spec.file
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises several types for unreadable or invalid graphs
        reason = str(err).strip().splitlines()[0][:200]
        raise BundleError(f"cannot load graph {path}: {reason}") from None
    stamped = session.get_modelmeta().custom_metadata_map.get(META_SIGNATURE)
    if stamped != signature_digest(config, spec):
        raise BundleError(f"{path} was not exported with this manifest (signature {stamped})")
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (spec.input_names, spec.output_names):
        raise BundleError(f"{path}: graph I/O {names} differs from the manifest")
    return session


class OrtRunner(GraphRunner):
    """Runs a bundle on ONNX Runtime's CPU (or CUDA) execution provider."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        verify_files: bool = True,
    ) -> None:
        bundle = Path(bundle)
        self.manifest = load_manifest(bundle, verify_files=verify_files)
        self.config = self.manifest.config
        self.specs = self.manifest.graphs
        self.providers = providers or default_providers()
        options = session_options(threads)
        self.sessions = {
            name: open_session(bundle, self.specs[name], self.config, self.providers, options)
            for name in GRAPH_NAMES
        }

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(self.specs[name].output_names, feeds)
