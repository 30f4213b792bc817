"""ditar-export: a DiTAR checkpoint -> bundle (ONNX graphs + manifest), parity, engines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.config import PRESETS, ConfigError, preset
from ditarkit.runtime.defaults import default_bundle_dir
from ditarkit.runtime.manifest import BundleError

FALLBACK_PRESET = "tiny"


def log(message: str) -> None:
    click.echo(message, err=True)


def load_model(checkpoint: str | None, preset_name: str | None, seed: int):
    import torch

    from ditarkit.reference.checkpoint import load_checkpoint
    from ditarkit.reference.default_voice import default_checkpoint
    from ditarkit.reference.model import DiTAR, perturb_weights

    if checkpoint:
        return load_checkpoint(checkpoint), {"checkpoint": str(Path(checkpoint).resolve())}
    if preset_name is None:
        shipped = default_checkpoint()
        if shipped is not None:
            return load_checkpoint(shipped), {"checkpoint": "embedded default voice"}
        log(f"warning: no trained default voice is shipped yet; exporting the '{FALLBACK_PRESET}' "
            "preset with random weights (it will not speak)")
        preset_name = FALLBACK_PRESET
    torch.manual_seed(seed)
    model = perturb_weights(DiTAR(preset(preset_name)), seed)
    return model, {"preset": preset_name, "random_weights_seed": seed}


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(file_okay=False),
              help="Checkpoint folder (model.safetensors + config.json). Default: the embedded default voice.")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
              help="Export a preset with random weights instead (speed measurements).")
@click.option("--from-voxcpm", "voxcpm", type=click.Path(file_okay=False),
              help="An OpenBMB VoxCPM checkpoint folder (VoxCPM 0.5B / 1.5 or VoxCPM2) instead. "
                   "Default --out: ./FOLDER-fp32 (or -fp16).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True),
              help="--from-voxcpm: longest speech per sentence (default 30); sizes the KV cache and engine profiles.")
@click.option("--max-prompt-seconds", type=click.FloatRange(min=0, min_open=True),
              help="--from-voxcpm: longest reference (default 10).")
@click.option("--max-tokens", type=click.IntRange(min=1), help="--from-voxcpm: longest text in tokens (default 512).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Bundle folder to write. Default: the kit's default bundle location.")
@click.option("--fp16", is_flag=True,
              help="fp16 weights and matmuls; norms, softmax, reductions, rotary and time embedding stay fp32.")
@click.option("--opset", type=click.IntRange(14, 21), default=17, show_default=True,
              help="ONNX opset; 17 is what TensorRT 10.3 (JetPack 6) parses.")
@click.option("--trt/--no-trt", default=None,
              help="Build TensorRT engines too. Default: when TensorRT and a GPU are present.")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Check every graph against PyTorch with ONNX Runtime.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights for --preset.")
def main(checkpoint, preset_name, voxcpm, max_seconds, max_prompt_seconds, max_tokens, out, fp16, opset, trt, parity,
         seed) -> None:
    """Export a DiTAR checkpoint (or a VoxCPM one) to a bundle of ONNX graphs with a manifest."""
    from ditarkit.reference.checkpoint import CheckpointError

    if sum(bool(x) for x in (checkpoint, preset_name, voxcpm)) > 1:
        raise click.UsageError("give one of --checkpoint, --preset and --from-voxcpm")
    limits = {k: v for k, v in (("max_seconds", max_seconds), ("max_prompt_seconds", max_prompt_seconds),
                                ("max_tokens", max_tokens)) if v is not None}
    if limits and not voxcpm:
        raise click.UsageError("--max-seconds, --max-prompt-seconds and --max-tokens go with --from-voxcpm "
                               "(the kit's models carry theirs in their config)")
    precision = "fp16" if fp16 else "fp32"
    if out:
        out = Path(out)
    else:
        out = Path(f"{Path(voxcpm).resolve().name}-{precision}") if voxcpm else default_bundle_dir(precision)
    start = time.perf_counter()
    try:
        if voxcpm:
            manifest, results = _export_voxcpm(voxcpm, out, fp16, opset, parity, limits)
        else:
            manifest, results = _export_kit_model(checkpoint, preset_name, seed, out, fp16, opset, parity)
        _build_engines(out, trt)
    except (CheckpointError, ConfigError, BundleError, OSError) as err:
        raise click.ClickException(str(err)) from None
    _summary(out, manifest, results, time.perf_counter() - start)
    if results and not all(r.ok for r in results):
        raise click.ClickException("parity check failed: see the table above")


def _export_kit_model(checkpoint, preset_name, seed, out, fp16, opset, parity):
    from ditarkit.export.bundle import export_bundle
    from ditarkit.export.parity import check_bundle

    model, source = load_model(checkpoint, preset_name, seed)
    log(f"model: {model.config.name}, {model.num_parameters() / 1e6:.1f}M parameters")
    manifest = export_bundle(model, out, fp16=fp16, opset=opset, source=source, log=log)
    results = []
    if parity:
        log("checking parity against PyTorch (ONNX Runtime, CPU)")
        results = check_bundle(model, out, manifest.precision)
    return manifest, results


def _export_voxcpm(folder, out, fp16, opset, parity, limits):
    from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError
    from ditarkit.export.voxcpm.export import export_voxcpm

    try:
        return export_voxcpm(folder, out, fp16, opset, parity, log=log, **limits)
    except VoxCPMCheckpointError as err:
        raise click.ClickException(str(err)) from None


def _build_engines(bundle: Path, wanted: bool | None) -> None:
    from ditarkit.runtime.backends.tensorrt import build_engines, unavailable_reason

    reason = unavailable_reason()
    if reason is None and wanted is not False:
        build_engines(bundle, log=log)
    elif wanted:
        raise click.ClickException(f"cannot build TensorRT engines here: {reason}")
    else:
        why = f" ({reason})" if reason else ""
        log(f"no TensorRT engines built{why}; on the target device run: ditar-engines {bundle}")


def _summary(bundle: Path, manifest, results, seconds: float) -> None:
    from ditarkit.export.parity import format_table

    click.echo(f"bundle: {bundle} ({manifest.precision}, opset {manifest.opset}, {seconds:.1f} s)")
    for graph in manifest.graphs.values():
        size = (bundle / graph.file).stat().st_size / 1e6
        click.echo(f"  {graph.file:<22}{size:>8.2f} MB  sha256 {graph.sha256[:12]}")
    if results:
        click.echo(format_table(results))


if __name__ == "__main__":
    sys.exit(main())
