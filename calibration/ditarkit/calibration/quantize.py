"""fp32 bundle + recorded activations -> INT8 bundle of Q/DQ graphs (ONNX Runtime's static
quantization in QDQ form), which ONNX Runtime runs here and TensorRT builds on the device.

Only weight multiplications are quantized (MatMul and Gemm with a constant weight):
normalization, softmax, rotary angles and the attention products between two activations
stay fp32 because their ops are never given Q/DQ nodes. Some weight layers stay fp32 too,
by module scope, each for a stated reason (`KEEP_SCOPES`).
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
    file_sha256,
    load_manifest,
    signature_digest,
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


def weight_layers(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(nodes to quantize, weight nodes kept fp32 by scope)."""
    constants = {i.name for i in model.graph.initializer}
    weighted = [n.name for n in model.graph.node
                if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in constants]
    kept = [name for name in weighted if any(scope in name for scope in KEEP_SCOPES)]
    return [name for name in weighted if name not in kept], kept


def quantize_graph(src: Path, dst: Path, spec: GraphSpec, samples: list[Feeds], signature: str,
                   target: Target) -> dict[str, Any]:
    """One graph: calibrate activation ranges on `samples`, write stamped Q/DQ ONNX to `dst`."""
    model = onnx.load(str(src))
    nodes, kept = weight_layers(model)
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
            calibrate_method=method,
            extra_options={"ActivationSymmetric": target.symmetric_activations, "WeightSymmetric": True,
                           "CalibPercentile": PERCENTILE,
                           # Q/DQ on a layer's inputs only: its fp32 output is not requantized on
                           # the way to fp32 ops (held-out SNR +2 to +5 dB per graph, no slower).
                           "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
        )
        quantized = onnx.load(str(out))
    share_equal_initializers(quantized)  # the fused sampler's steps share their weights
    declare_io_shapes(quantized, spec)
    stamp(quantized, signature)
    onnx.checker.check_model(quantized, full_check=True)
    onnx.save(quantized, str(dst))
    return {"quantized_layers": len(nodes), "fp32_layers": kept,
            "ranges": f"percentile {PERCENTILE}" if method == CalibrationMethod.Percentile else "min-max",
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node),
            "calibration_samples": len(samples),
            "bytes": {"fp32": src.stat().st_size, "int8": dst.stat().st_size}}


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
    graphs, report = {}, {}
    for index, (name, spec) in enumerate(source.graphs.items(), 1):
        dst = out / spec.file
        if name in QUANTIZED_GRAPHS:
            log(f"[{index}/{len(source.graphs)}] quantizing {name} on {len(recording.feeds[name])} recorded feeds")
            report[name] = quantize_graph(bundle / spec.file, dst, spec, recording.feeds[name],
                                          signature_digest(source.config, spec), chosen)
        else:
            shutil.copyfile(bundle / spec.file, dst)
        graphs[name] = replace(spec, sha256=file_sha256(dst))
    description = _description(chosen, recording, report, kept=[n for n in source.graphs if n not in QUANTIZED_GRAPHS])
    manifest = replace(source, precision="int8", graphs=graphs, quantization=description)
    manifest.save(out)
    return manifest


def _description(target: Target, recording: Recording, graphs: dict[str, Any], kept: list[str]) -> dict[str, Any]:
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
        "fp32_scopes": KEEP_SCOPES,
        "fp32_graphs": {name: KEPT_GRAPHS[name] for name in kept},
        "graphs": graphs,
    }

