"""A VoxCPM checkpoint folder -> a kit bundle: the same graph set, checked against the package.

The graphs are the package's own modules behind the kit's signatures (`graphs.py`), the fused
solver is the kit's unrolled sampler over VoxCPM's LocDiT with VoxCPM's grid and guidance, and
the bundle carries the checkpoint's tokenizer.json. Parity runs ONNX Runtime against those
same PyTorch modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ditarkit.export.bundle import write_bundle
from ditarkit.export.parity import ParityResult, check_graphs
from ditarkit.export.voxcpm.checkpoint import load_voxcpm
from ditarkit.export.voxcpm.contract import TOKENIZER_FILE, voxcpm_contract
from ditarkit.export.voxcpm.graphs import graph_modules
from ditarkit.reference.runner import LocDiTSamplerGraph, TorchRunner
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.manifest import LOCDIT, LOCDIT_SAMPLER, Manifest

Log = Callable[[str], None]


def voxcpm_graphs(model: nn.Module, contract: ModelContract) -> dict[str, nn.Module]:
    graphs = graph_modules(model)
    graphs[LOCDIT_SAMPLER] = LocDiTSamplerGraph(graphs[LOCDIT], contract.sampler)
    return graphs


def load_for_export(folder: str | Path, **limits) -> tuple[dict[str, nn.Module], ModelContract, dict]:
    """(graph modules, contract, manifest source) of a checkpoint folder, loaded strictly."""
    model, architecture, config = load_voxcpm(folder)
    contract = voxcpm_contract(model, architecture, config, folder, **limits)
    source = {"voxcpm": str(Path(folder).resolve()), "architecture": architecture,
              "config": config.model_dump(mode="json")}
    return voxcpm_graphs(model, contract), contract, source


def export_voxcpm(folder: str | Path, out: str | Path, fp16: bool = False, opset: int = 17, parity: bool = True,
                  log: Log = lambda _msg: None, **limits) -> tuple[Manifest, list[ParityResult]]:
    graphs, contract, source = load_for_export(folder, **limits)
    weights = {id(p): p.numel() for g in graphs.values() for p in g.parameters()}  # graphs share modules
    log(f"model: {contract.name} ({source['architecture']}), {sum(weights.values()) / 1e6:.1f}M parameters")
    manifest = write_bundle(graphs, contract, out, fp16, opset, source, log,
                            files={TOKENIZER_FILE: Path(folder) / TOKENIZER_FILE})
    results = []
    if parity:
        log("checking parity against the voxcpm package's modules (ONNX Runtime, CPU)")
        results = check_graphs(TorchRunner.from_graphs(contract, graphs), out, manifest.precision)
    return manifest, results
