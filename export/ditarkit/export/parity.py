"""Per-graph parity: ONNX Runtime on the bundle against the PyTorch reference modules.

Each graph runs at the minimum, optimal and maximum of its dynamic ranges, and once more at
the edges of its value ranges (t = 0 and 1, full-scale and silent audio, large latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ditarkit.export.inputs import dims_at, example_inputs
from ditarkit.reference.model import DiTAR
from ditarkit.reference.runner import TorchRunner
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.manifest import LM_AUDIO_MASK
from ditarkit.runtime.runner import GraphRunner

# Max abs error allowed, relative to max(1, max |reference output|).
# fp32: reordered fp32 arithmetic in ORT's fused kernels stays far below 1e-4.
# fp16: 10-bit mantissas (~1e-3 per op), accumulated over a few layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# A graph with a scalar quantizer (VoxCPM's FSQ in its LM step rounds tanh(x) * 9): where an
# fp16 error puts a value across a level boundary it moves a whole level (1/9), and the layers
# after it carry that; the package's own bf16 inference moves levels the same way. Such fp16
# graphs are held to a fraction of one level at the output scale instead.
QUANTIZER_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-1}
QUANTIZER_SCOPE = "fsq"
POINTS = ("min", "opt", "max", "edges")


@dataclass(frozen=True)
class ParityResult:
    graph: str
    output: str
    point: str  # which inputs: min/opt/max dynamic sizes, or value-range edges
    max_abs: float
    scale: float  # max(1, max |reference|)
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance * self.scale


def parity_inputs(runner: GraphRunner, name: str, point: str, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = runner.config
    spec = runner.specs[name]
    which = {"min": 0, "opt": 1, "max": 2, "edges": 0}[point]
    feeds = example_inputs(spec, dims_at(spec, which, cfg.audio.hop_length), seed, cfg.text.vocab_size)
    if point == "edges":
        feeds = _at_value_edges(feeds, cfg.text.vocab_size)
    spec.check_feeds(feeds)  # the inputs themselves must honour the manifest's contract
    return feeds


def _at_value_edges(feeds: dict[str, np.ndarray], vocab: int) -> dict[str, np.ndarray]:
    edged = dict(feeds)
    for key, value in feeds.items():
        if key == "t":
            edged[key] = (np.arange(value.size) % 2).astype(np.float32).reshape(value.shape)  # 0 and 1
        elif key == "audio":
            half = value.shape[-1] // 2  # first half full-scale square wave, second half silence
            square = np.sign(np.sin(np.arange(half) * 0.05)).astype(np.float32)
            edged[key] = np.concatenate([square, np.zeros(value.shape[-1] - half, np.float32)])[None]
        elif key == "ids":
            edged[key] = np.full_like(value, vocab - 1)
        elif key == LM_AUDIO_MASK:
            edged[key] = np.ones_like(value)  # every row a patch
        elif value.dtype == np.float32:
            edged[key] = value * 4.0  # latents and states well outside their usual spread
    return edged


def check_bundle(model: DiTAR, bundle: str | Path, precision: str, seed: int = 0) -> list[ParityResult]:
    return check_graphs(TorchRunner(model), bundle, precision, seed)


def check_graphs(reference: GraphRunner, bundle: str | Path, precision: str, seed: int = 0) -> list[ParityResult]:
    """Every graph of `bundle` in ONNX Runtime against `reference` (any family's PyTorch modules)."""
    deployed = OrtRunner(bundle)
    results = []
    for name, spec in deployed.specs.items():
        limit = (QUANTIZER_TOLERANCE if _has_quantizer(Path(bundle) / spec.file) else TOLERANCE)[precision]
        for point in POINTS:
            feeds = parity_inputs(deployed, name, point, seed)
            want, got = reference.run(name, feeds), deployed.run(name, feeds)
            for tensor, a, b in zip(spec.outputs, want, got):
                error = float(np.abs(a.astype(np.float64) - b).max()) if np.isfinite(b).all() else float("inf")
                scale = max(1.0, float(np.abs(a).max()))
                results.append(ParityResult(name, tensor.name, point, error, scale, limit))
    return results


def _has_quantizer(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False)
    return any(QUANTIZER_SCOPE in node.name.lower() for node in graph.graph.node)


def format_table(results: list[ParityResult]) -> str:
    lines = [f"{'graph':<15}{'output':<16}{'worst at':<10}{'max abs err':>12}{'scale':>9}{'limit':>10}  ok"]
    worst: dict[tuple[str, str], ParityResult] = {}
    for r in results:
        key = (r.graph, r.output)
        if key not in worst or r.max_abs / r.scale > worst[key].max_abs / worst[key].scale:
            worst[key] = r
    for r in worst.values():
        lines.append(f"{r.graph:<15}{r.output:<16}{r.point:<10}{r.max_abs:>12.2e}{r.scale:>9.2f}"
                     f"{r.tolerance * r.scale:>10.1e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
