"""Finishing an ONNX file as a bundle graph: the manifest's I/O dimension names, shared
weights, and the contract stamp the runtime checks. Used by export and calibration; needs
no torch."""

from __future__ import annotations

import hashlib

import onnx

from ditarkit.runtime import __version__
from ditarkit.runtime.manifest import META_KIT_VERSION, META_SIGNATURE, GraphSpec


def declare_io_shapes(graph: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give graph I/O the manifest's dimension names (shape inference invents its own,
    such as 'floor(samples/600)'), so the ONNX file states the same contract."""
    for declared, values in ((spec.inputs, graph.graph.input), (spec.outputs, graph.graph.output)):
        for tensor, value in zip(declared, values):
            dims = value.type.tensor_type.shape.dim
            for dim, want in zip(dims, tensor.shape):
                if isinstance(want, int):
                    dim.dim_value = want
                else:
                    dim.dim_param = want


def stamp(graph: onnx.ModelProto, signature: str) -> None:
    """Kit version and contract digest: the runtime refuses a graph from another bundle."""
    del graph.metadata_props[:]
    for key, value in ((META_KIT_VERSION, __version__), (META_SIGNATURE, signature)):
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "ditarkit"
    graph.producer_version = __version__


def share_equal_initializers(graph: onnx.ModelProto) -> None:
    """Make byte-identical initializers one: tracing the unrolled LocDiT sampler copies every
    weight once per solver step (73 MB instead of 8 MB for the default voice), and quantizing
    it may copy their scales and zero points. Bundle graphs have no subgraphs and no
    initializer as a graph output, so renaming top-level node inputs is enough."""
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for tensor in graph.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(values.tobytes()).digest())
        if key in first:
            renamed[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            kept.append(tensor)
    if not renamed:
        return
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
