"""fp32 bundle + recorded activations -> INT8 bundle of Q/DQ graphs (ONNX Runtime's static
quantization in QDQ form), which ONNX Runtime runs here and TensorRT builds on the device.

Only weight multiplications are quantized (MatMul and Gemm with a constant weight):
normalization, softmax, rotary angles, activations (VoxCPM's VAE Snakes), the fused solver's
state updates and the attention products between two activations stay fp32 because their
ops are never given Q/DQ nodes. Some weight layers stay fp32 too, by module scope in their
node names, each for a stated reason: `KEEP_SCOPES` names the kit's own modules,
`IMPORTED_KEEP_SCOPES` those of the VoxCPM import's graphs. Both tables apply to every
bundle (a scope that names no node of a graph keeps nothing there), so no family is tested
by name. A per-patch graph left with no weight layer to quantize (VoxCPM's VAE decoder is
all convolutions) is copied as it is.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ditarkit.calibration.record import CalibrationError, Feeds, Log, Recording, require_fp32
from ditarkit.export.graphfile import declare_io_shapes, share_equal_initializers, stamp
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.fileio import atomic_dir
from ditarkit.runtime.machine import cpu_summary
from ditarkit.runtime.manifest import (
    LM,
    LOCDIT,
    LOCDIT_SAMPLER,
    PATCH_ENCODER,
    TEXT_CURSOR,
    TEXT_EMBEDDING,
    VAE_DECODER,
    VAE_ENCODER,
    GraphSpec,
    Manifest,
    load_manifest,
    signature_digest,
    with_files,
)

QUANTIZED_GRAPHS = (LM, LOCDIT, LOCDIT_SAMPLER, PATCH_ENCODER, VAE_DECODER)  # run once or more per patch
KEPT_GRAPHS = {  # graph -> why it stays fp32
    VAE_ENCODER: "runs once per reference voice, off the per-patch path",
    TEXT_EMBEDDING: "a table lookup with no multiplication to quantize",
    TEXT_CURSOR: "table lookups and a sum, once per sentence",
}
# Not Conv: ONNX Runtime's CPU kernels do not fuse the VAE decoder's Q/DQ (depthwise)
# convolutions and dequantize their weights on every call; fp32 there is faster and, on the
# default voice, 35 dB held-out SNR for the decoder instead of 29 dB.
QUANTIZED_OPS = ("MatMul", "Gemm")
# Activation ranges: MinMax, except where clipping rare outliers measured better. LocDiT on
# the default voice, held-out median SNR: MinMax 22.3 dB, 99.99th percentile 24.7 dB.
PERCENTILE = 99.99
CLIPPED_GRAPHS = (LOCDIT, LOCDIT_SAMPLER)
KEEP_SCOPES = {  # module scope in node names -> why its weight layers stay fp32
    "time_embed": "the diffusion time embedding: every solver step depends on its precision",
    "stop_head": "one output that decides where speech ends",
    "advance_head": "the text cursor's moves: an argmax that a rounding error can turn",
    # LocDiT's per-step projections in and out: ONNX Runtime cannot fuse their Q/DQ Gemm and
    # would dequantize the weight at every solver step, slower than fp32. (Its projections of
    # the LM output and the history run once per patch: quantized.)
    "/locdit/noisy_proj": "LocDiT's projection of the noisy patch: a small layer that INT8 would slow down",
    "/locdit/out_proj": "LocDiT's velocity output, a small layer: the solver integrates its errors",
    "/decoder/head": "the VAE decoder's spectral output layer: errors land directly in the waveform",
    "/decoder/MatMul": "the VAE decoder's inverse DFT: a fixed transform, not a learned weight",
}
# The VoxCPM import's graphs (export/voxcpm/graphs.py), whose node names carry the voxcpm
# package's module names: /base/layers.0/..., /fsq_layer/..., /time_mlp/..., /in_proj/...
# ("stop_head" and "time_embed" above name its modules too).
IMPORTED_KEEP_SCOPES = {
    "/fsq_layer/": "VoxCPM's scalar quantizer (projection, rounding to levels, projection back): an INT8 "
                   "error before the rounding moves a value to another level",
    "/stop_proj/": "the stop head's hidden layer: one output that decides where speech ends",
    "time_mlp": "VoxCPM's diffusion time embedding MLP: every solver step depends on its precision",
    # LocDiT's per-step projections in and out, kept for the reasons of the kit's above.
    "/in_proj": "LocDiT's projection of the noisy patch: a small layer that INT8 would slow down",
    "/out_proj": "LocDiT's velocity output, a small layer: the solver integrates its errors",
}
# Scopes whose name recurs in other graphs as another layer (the patch encoder's and the FSQ's
# in/out projections): kept only in these graphs.
SCOPE_GRAPHS = {"/in_proj": (LOCDIT, LOCDIT_SAMPLER), "/out_proj": (LOCDIT, LOCDIT_SAMPLER)}
# As the exporter (export/onnx_export.py): weights past this go to `<graph file>.data`.
EXTERNAL_DATA_BYTES = 1 << 30
DATA_SUFFIX = ".data"
NOTHING_TO_QUANTIZE = "no weight matmul outside the kept scopes (convolutions stay fp32: QUANTIZED_OPS)"


def keep_scopes(graph: str) -> dict[str, str]:
    """The scopes (-> why) whose weight layers stay fp32 in `graph`."""
    scopes = {**KEEP_SCOPES, **IMPORTED_KEEP_SCOPES}
    return {scope: why for scope, why in scopes.items() if graph in SCOPE_GRAPHS.get(scope, (graph,))}


@dataclass(frozen=True)
class Target:
    """The Q/DQ form a backend executes fast (and, for ONNX Runtime, correctly on every CPU)."""

    name: str
    activations: QuantType
    symmetric_activations: bool
    weights: QuantType = QuantType.QInt8
    # 7-bit weights ([-64, 64]): ONNX Runtime's u8s8 kernels on x86 without VNNI (AVX2 only)
    # add pairs of u8 x s8 products in saturating 16-bit lanes (vpmaddubsw): 2 x 255 x 127
    # overflows, 2 x 255 x 64 does not. See `TARGETS` for what it measured.
    reduce_range: bool = False
    note: str = ""

    @property
    def weights_note(self) -> str:
        bits = "7-bit [-64, 64] (reduce_range)" if self.reduce_range else "8-bit"
        return f"{_type_name(self.weights)} symmetric, {bits}, per output channel"


def _type_name(kind: QuantType) -> str:
    return {QuantType.QInt8: "int8", QuantType.QUInt8: "uint8"}[kind]


# The onnxruntime target holds on every CPU it may meet. Held-out median SNR of patch_encoder
# (tests' tiny preset / default voice), x86 with AVX2 and no VNNI (ONNX Runtime 1.32 under
# qemu -cpu Haswell) against VNNI: 8-bit weights 9.6 / 34.6 dB against 30.2 / 44.2 dB; 7-bit
# weights 29.1 / 44.0 dB on both, the same outputs. On VNNI the 7-bit weights cost 0 to
# 1.3 dB per graph and no speed; u8u8 does not saturate either but is slower on VNNI (LocDiT
# solve +40%), s8s8 saturates and has no fast kernel. README, "Latest figures", has them all.
TARGETS = {
    "onnxruntime": Target("onnxruntime", QuantType.QUInt8, False, reduce_range=True,
                          note="uint8 asymmetric activations: ONNX Runtime's x86/ARM u8s8 integer kernels"),
    "tensorrt": Target("tensorrt", QuantType.QInt8, True,
                       note="int8 symmetric activations (zero point 0): the only INT8 Q/DQ form TensorRT takes"),
}


class FeedsReader(CalibrationDataReader):
    """Recorded feeds, one at a time, as ONNX Runtime's calibrator asks for them."""

    def __init__(self, samples: list[Feeds]) -> None:
        self.samples: Iterator[Feeds] = iter(samples)

    def get_next(self) -> Feeds | None:
        return next(self.samples, None)


def weight_layers(model: onnx.ModelProto, graph: str) -> tuple[list[str], list[str]]:
    """(nodes to quantize, weight nodes kept fp32 by scope) of the bundle graph `graph`."""
    constants = {i.name for i in model.graph.initializer}
    weighted = [n.name for n in model.graph.node
                if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in constants]
    scopes = keep_scopes(graph)
    kept = [name for name in weighted if any(scope in name for scope in scopes)]
    return [name for name in weighted if name not in kept], kept


def matched_scopes(graph: str, kept: list[str]) -> dict[str, str]:
    """The scope (-> why) that keeps each of `kept`'s layers, the first that names it: what the
    manifest records."""
    scopes = keep_scopes(graph)
    first = {next(scope for scope in scopes if scope in name) for name in kept}
    return {scope: why for scope, why in scopes.items() if scope in first}


def read_fp32_inputs(model: onnx.ModelProto, layers: list[str]) -> None:
    """Give `layers` their fp32 inputs back: ONNX Runtime puts one Q/DQ pair on a tensor that a
    quantized layer reads, and every other reader then reads the dequantized copy too
    (VoxCPM's stop_proj reads the LM output that lm_to_dit_proj quantizes). A layer kept fp32
    is kept for its precision, so it reads the tensor before the pair."""
    sources = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dequantized = {n.output[0]: sources[n.input[0]] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in sources}
    chosen = set(layers)
    for node in model.graph.node:
        if node.name in chosen:
            for i, name in enumerate(node.input):
                node.input[i] = dequantized.get(name, name)


def quantize_graph(src: Path, dst: Path, spec: GraphSpec, samples: list[Feeds], signature: str,
                   target: Target) -> dict[str, Any]:
    """One graph: calibrate activation ranges on `samples`, write stamped Q/DQ ONNX to `dst`."""
    nodes, kept = weight_layers(_structure(src), spec.name)
    if not nodes:  # ONNX Runtime reads an empty node list as "quantize every node"
        raise CalibrationError(f"{spec.name} has no weight layer left to quantize")
    method = CalibrationMethod.Percentile if spec.name in CLIPPED_GRAPHS else CalibrationMethod.MinMax
    # The calibrator's augmented model goes to scratch; its histogram notes (printed) go to
    # stderr with the other progress, since stdout carries the report.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        out = Path(scratch) / "quantized.onnx"
        quantize_static(
            str(src), str(out), FeedsReader(samples), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes, per_channel=True,
            reduce_range=target.reduce_range, activation_type=target.activations, weight_type=target.weights,
            calibrate_method=method, use_external_data_format=len(spec.files) > 1,  # a graph past 2 GiB
            extra_options={"ActivationSymmetric": target.symmetric_activations, "WeightSymmetric": True,
                           "CalibPercentile": PERCENTILE,
                           # Q/DQ on a layer's inputs only: its fp32 output is not requantized on
                           # the way to fp32 ops (held-out SNR +2 to +5 dB per graph, no slower).
                           "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
        )
        quantized = onnx.load(str(out))
    read_fp32_inputs(quantized, kept)
    share_equal_initializers(quantized)  # the fused sampler's steps share their weights
    declare_io_shapes(quantized, spec)
    stamp(quantized, signature)
    _save(quantized, dst)
    return {"quantized_layers": len(nodes), "fp32_layers": kept,
            "ranges": f"percentile {PERCENTILE}" if method == CalibrationMethod.Percentile else "min-max",
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node),
            "calibration_samples": len(samples),
            "bytes": {"fp32": _size(src.parent, spec.files), "int8": _size(dst.parent, _files(dst))}}


def _structure(path: Path) -> onnx.ModelProto:
    """A graph's nodes and initializer names, without reading weights kept in a data file."""
    return onnx.load(str(path), load_external_data=False)


def _files(path: Path) -> list[str]:
    """A written graph's files: the ONNX file, and its weights' file where they are apart."""
    data = path.with_name(path.name + DATA_SUFFIX)
    return [path.name, data.name] if data.exists() else [path.name]


def _size(folder: Path, names: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in names)


def _save(graph: onnx.ModelProto, path: Path) -> None:
    """Check and write a graph, its weights in `<file>.data` beside it when they pass
    EXTERNAL_DATA_BYTES (protobuf refuses a message over 2 GiB), as the exporter writes them."""
    if sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer) <= EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(path))
        return
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)


def quantize_bundle(bundle: str | Path, out: str | Path, recording: Recording, target: str | Target = "onnxruntime",
                    log: Log = lambda _msg: None) -> Manifest:
    """Write an INT8 bundle at `out` (atomically) from the fp32 `bundle` and its recordings."""
    return atomic_dir(out, lambda staging: write_quantized(bundle, staging, recording, target, log))


def write_quantized(bundle: str | Path, out: Path, recording: Recording, target: str | Target = "onnxruntime",
                    log: Log = lambda _msg: None) -> Manifest:
    """Fill the empty folder `out` with the INT8 bundle of the fp32 `bundle`; `target` is a
    name in TARGETS or a Target."""
    bundle = Path(bundle)
    source = load_manifest(bundle)
    require_fp32(source, bundle)
    chosen = TARGETS[target] if isinstance(target, str) else target
    graphs, report, kept = {}, {}, {}
    for index, (name, spec) in enumerate(source.graphs.items(), 1):
        dst = out / spec.file
        reason = _kept_reason(bundle, spec)
        if reason is None:
            if not recording.feeds.get(name):
                raise CalibrationError(f"no feeds of {name} were recorded: speak longer sentences (--max-seconds)")
            log(f"[{index}/{len(source.graphs)}] quantizing {name} on {len(recording.feeds[name])} recorded feeds")
            report[name] = quantize_graph(bundle / spec.file, dst, spec, recording.feeds[name],
                                          signature_digest(source.config, spec), chosen)
            files = _files(dst)
            graphs[name] = with_files(spec, dst, out / files[1] if len(files) > 1 else None)
        else:
            log(f"[{index}/{len(source.graphs)}] keeping {name} in fp32: {reason}")
            for file in spec.files:  # the same bytes: the same checksums
                shutil.copyfile(bundle / file, out / file)
            graphs[name] = spec
            kept[name] = reason
    for file in bundle_files(source.config):
        shutil.copyfile(bundle / file, out / file)
    description = _description(chosen, recording, report, kept)
    manifest = replace(source, precision="int8", graphs=graphs, quantization=description)
    manifest.save(out)
    return manifest


def bundle_files(config: ModelContract) -> list[str]:
    """The files beside the graphs that the contract names (a tokenizer, a lexicon): the INT8
    bundle carries them too, checked against the same checksums."""
    return list(config.text.files)


def _kept_reason(bundle: Path, spec: GraphSpec) -> str | None:
    """Why a graph is copied as it is; None: it is quantized."""
    if spec.name not in QUANTIZED_GRAPHS:
        return KEPT_GRAPHS.get(spec.name, "runs off the per-patch path")
    if not weight_layers(_structure(bundle / spec.file), spec.name)[0]:
        return NOTHING_TO_QUANTIZE
    return None


def _description(target: Target, recording: Recording, graphs: dict[str, Any], kept: dict[str, str]) -> dict[str, Any]:
    """What the manifest records about the quantization: enough to redo or audit it."""
    return {
        "scheme": "int8",
        "format": "QDQ",
        "tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}",
        "target": target.name,
        "activations": target.note,
        "weights": target.weights_note,
        # Read by the runtime, which checks the form against the CPU it runs on.
        "activation_type": _type_name(target.activations),
        "weight_type": _type_name(target.weights),
        "reduce_range": target.reduce_range,
        "calibrated_on": cpu_summary(),
        "calibration": {"sentences": recording.sentences,
                        "references": [Path(r).name for r in recording.references]},
        "ops": list(QUANTIZED_OPS),
        "fp32_scopes": {scope: why for name, info in graphs.items()
                        for scope, why in matched_scopes(name, info["fp32_layers"]).items()},
        "fp32_graphs": kept,
        "graphs": graphs,
    }

