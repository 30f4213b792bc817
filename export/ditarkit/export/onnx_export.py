"""PyTorch module -> checked, stamped ONNX file, in fp32 or numerically safe fp16.

Graphs are traced with TorchScript at a default opset of 17, which TensorRT 10.3 (JetPack
6) parses: attention, RMSNorm and rotary positions come out as plain MatMul/Softmax/
ReduceMean/Cos/Sin ops, and the KV cache is input and output as separate tensors.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from ditarkit.export.graphfile import declare_io_shapes, share_equal_initializers, stamp
from ditarkit.export.inputs import dims_at, example_inputs
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.manifest import GraphSpec

DEFAULT_OPSET = 17
# A graph whose weights pass this keeps them in an external file: protobuf's hard limit is
# 2 GiB for the whole message, and the graph around the weights needs some of it.
EXTERNAL_DATA_BYTES = 1 << 30

# fp16 keeps these in fp32: norms, softmax and reductions overflow in fp16, and rotary and
# time-embedding angles lose their fractional part (FIELD-NOTES: NaN audio from fp16 DiTs).
FP32_OP_TYPES = [
    "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Reciprocal", "LayerNormalization",
    "Exp", "Log", "Cos", "Sin", "Clip",
]
# Module names in the node names. "fsq": VoxCPM's scalar quantiser rounds tanh(x) * 9, where an
# fp16 error of one part in a thousand moves a value to the next level.
FP32_SCOPES = ("norm", "rotary", "time_embed", "solver", "fsq")


def export_graph(wrapper: torch.nn.Module, spec: GraphSpec, path: Path, opset: int, fp16: bool, signature: str,
                 contract: ModelContract) -> GraphFiles:
    """Trace one graph's module at its optimal shapes with the manifest's dynamic dimensions;
    a graph whose weights pass `EXTERNAL_DATA_BYTES` keeps them in `<file>.data` beside it."""
    wrapper = wrapper.eval()
    feeds = example_inputs(spec, dims_at(spec, 1, contract.audio.hop_length), vocab=contract.text.vocab_size)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    dynamic_axes = {
        t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
        for t in (*spec.inputs, *spec.outputs)
    }
    # Traced into a folder of its own: past 2 GiB torch writes one external file per tensor.
    with tempfile.TemporaryDirectory(dir=path.parent) as traced, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints from shapes
        traced_path = Path(traced) / path.name
        torch.onnx.export(
            wrapper, args, str(traced_path), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
        graph = onnx.load(str(traced_path))  # with any external data
    graph = _fold_constants(graph)
    if fp16:
        graph = to_mixed_fp16(graph)
    # After the fp16 pass: a constant shared by a kept-fp32 node and a converted one would be
    # left in one precision for both (the converter keeps it fp32, and the converted node then
    # mixes types).
    share_equal_initializers(graph)
    declare_io_shapes(graph, spec)
    stamp(graph, signature)
    return save_graph(graph, path)


@dataclass(frozen=True)
class GraphFiles:
    path: Path
    data: Path | None = None  # the weights' file, where they are kept outside the graph


def weight_bytes(graph: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers, from their shapes and types (ByteSize() of the whole
    proto is what protobuf cannot serialise past 2 GiB; the weights are nearly all of it)."""
    return sum(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
               for t in graph.graph.initializer)


def save_graph(graph: onnx.ModelProto, path: Path) -> GraphFiles:
    """Check and write a graph; its weights go to `<name>.data` when they pass
    EXTERNAL_DATA_BYTES (protobuf refuses messages over 2 GiB, and the checker must then read
    the saved file, not the message)."""
    if weight_bytes(graph) <= EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(path))
        return GraphFiles(path)
    data = path.with_name(path.name + ".data")
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return GraphFiles(path, data)


def _fold_constants(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Polygraphy's constant folding (ONNX-GraphSurgeon + ONNX Runtime), then cleanup."""
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    ort.set_default_logger_severity(3)  # folding runs ORT; its optimizer notes are noise here
    # Polygraphy prints to stdout, which carries results (ditar-bench's table): its notes are
    # logs. (Its note on large folded tensors is about the weights' folded transposes.)
    with G_LOGGER.verbosity(G_LOGGER.WARNING), contextlib.redirect_stdout(sys.stderr):
        return fold_constants(graph, num_passes=2, error_ok=True)


def to_mixed_fp16(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and matmuls in fp16, the sensitive ops in fp32, I/O unchanged (float32)."""
    from onnxconverter_common.float16 import convert_float_to_float16

    keep = [n.name for n in graph.graph.node if any(scope in n.name.lower() for scope in FP32_SCOPES)]
    _detach_outputs(graph, set(keep))
    large = weight_bytes(graph) > EXTERNAL_DATA_BYTES
    if large:  # onnx's own shape inference cannot take it; Polygraphy's goes through a file
        from polygraphy.backend.onnx import infer_shapes

        graph = infer_shapes(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes on clamping tiny constants to fp16 range
        graph = convert_float_to_float16(
            graph, keep_io_types=True, op_block_list=FP32_OP_TYPES, node_block_list=keep,
            disable_shape_infer=large,
        )
    return remove_fp16_round_trips(graph)


def _detach_outputs(graph: onnx.ModelProto, kept: set[str]) -> None:
    """Put an Identity between each graph output and a kept-fp32 node (by name or op type)
    producing it: the
    converter would otherwise insert an fp16 round trip there that it then fails to remove
    ("The downstream node of the second cast node should be graph output"). The output is
    rounded to fp16 once, as every other fp16 graph output is."""
    nodes = graph.graph.node
    for output in graph.graph.output:
        index = next((i for i, n in enumerate(nodes) if output.name in n.output), None)
        if index is None or (nodes[index].name not in kept and nodes[index].op_type not in FP32_OP_TYPES):
            continue
        inner = f"{output.name}_fp32"
        producer = nodes[index]
        producer.output[list(producer.output).index(output.name)] = inner
        # right after its producer, so any reader of the output inside the graph stays in order
        nodes.insert(index + 1, onnx.helper.make_node("Identity", [inner], [output.name], name=f"{output.name}_out"))


def remove_fp16_round_trips(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The converter casts every kept-fp32 node's output to fp16 and back before the next
    kept node: rotary angles and norm statistics would still be rounded to fp16. Drop each
    Cast(fp16) whose consumers are all Cast(fp32), wiring those consumers' readers to the
    original fp32 tensor."""
    nodes = graph.graph.node
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.graph.output}
    to_float = lambda n: n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT  # noqa: E731
    renamed: dict[str, str] = {}
    dropped = set()
    for node in nodes:
        if node.op_type != "Cast" or node.attribute[0].i != onnx.TensorProto.FLOAT16:
            continue
        users = readers.get(node.output[0], [])
        if users and node.output[0] not in graph_outputs and all(to_float(u) for u in users):
            for user in users:
                renamed[user.output[0]] = node.input[0]
                dropped.add(id(user))
            dropped.add(id(node))
    kept = [n for n in nodes if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in renamed:
                name = renamed[name]
            node.input[i] = name
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    return graph
