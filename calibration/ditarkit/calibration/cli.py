"""ditar-calibrate: record activations with real voices, quantize to INT8 Q/DQ graphs, and
report what it cost. Only parses arguments and calls the library."""

from __future__ import annotations

import json
import logging
import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import onnxruntime

from ditarkit.calibration.accuracy import end_to_end, graph_errors
from ditarkit.calibration.quantize import TARGETS, write_quantized
from ditarkit.calibration.record import PER_GRAPH, CalibrationError, record, require_fp32, transcripts
from ditarkit.runtime.audio import AudioError
from ditarkit.runtime.backends.onnxrt import OrtRunner
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.defaults import default_bundle_dir
from ditarkit.runtime.fileio import atomic_dir
from ditarkit.runtime.machine import cpu_features, cpu_summary, saturates_u8s8
from ditarkit.runtime.manifest import BundleError, load_manifest
from ditarkit.runtime.runner import usable_cores
from ditarkit.runtime.sampler import OptionsError
from ditarkit.runtime.synthesizer import SynthesisError, Synthesizer
from ditarkit.runtime.text import TextError, TextFrontend, split_sentences, text_frontend

if TYPE_CHECKING:
    from ditarkit.runtime.tokenizer import TokenizerFrontend

USER_ERRORS = (AudioError, BundleError, CalibrationError, OptionsError, SynthesisError, TextError, OSError)
HELDOUT_EVERY = 4  # every 4th sentence is held out from calibration to measure the error
HELDOUT_SEED_OFFSET = 10_000  # held-out sentences draw noise no calibration sentence drew
REPORT_FILE = "calibration-report.json"


def _log(message: str) -> None:
    click.echo(message, err=True)


def read_sentences(path: str | None, frontend: TextFrontend | TokenizerFrontend | None = None) -> list[str]:
    """Sentences, one or more per line; the kit's own calibration set when no file is given.
    Lines are split into sentences as the bundle's frontend splits them (the kit's character
    frontend by default; a tokenizer speaks each line whole), so every held-out text is one
    generation (the end-to-end comparison generates each at a fixed length)."""
    text = Path(path).read_text(encoding="utf-8") if path else files("ditarkit.calibration").joinpath(
        "sentences.txt").read_text(encoding="utf-8")
    split = frontend.sentences if frontend is not None else split_sentences
    sentences = [s for line in text.splitlines() if line.strip() for s in split(line) if s.strip()]
    if len(sentences) < HELDOUT_EVERY:
        raise CalibrationError(f"need at least {HELDOUT_EVERY} sentences to calibrate and hold some out, "
                               f"got {len(sentences)}")
    return sentences


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ref", "references", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Reference voice recording; repeat for several voices (used in turn).")
@click.option("--ref-text", "reference_texts", multiple=True,
              help="What a --ref says, one per --ref in the same order: needed by models that continue from "
                   "their reference (VoxCPM 0.5B / 1.5).")
@click.option("--bundle", type=click.Path(file_okay=False), help="fp32 bundle. Default: the embedded default's.")
@click.option("-o", "--out", type=click.Path(file_okay=False), help="INT8 bundle to write. Default: BUNDLE-int8.")
@click.option("--texts", type=click.Path(dir_okay=False),
              help="Calibration sentences, one per line. Default: the kit's 24 sentences.")
@click.option("--target", type=click.Choice(sorted(TARGETS)), default="onnxruntime", show_default=True,
              help="Q/DQ form: uint8 activations for ONNX Runtime, symmetric int8 for TensorRT.")
@click.option("--samples", type=click.IntRange(1, 1024), default=PER_GRAPH, show_default=True,
              help="Recorded feeds kept per graph.")
@click.option("--compare", "compare", multiple=True, type=click.Path(file_okay=False),
              help="Another bundle (fp16, say) to put in the end-to-end comparison.")
@click.option("--save-activations", type=click.Path(dir_okay=False),
              help="Also keep the recorded calibration feeds (npz; read back with Recording.load).")
@click.option("--max-seconds", type=click.FloatRange(min=0.1), help="Cap on audio per sentence.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(references, reference_texts, bundle, out, texts, target, samples, compare, save_activations, max_seconds,
         seed) -> None:
    """Quantize an fp32 bundle to INT8 from activations recorded while it speaks, and report
    the error per graph and end to end."""
    # ONNX Runtime's quantizer warns through the root logger on every graph ("consider
    # pre-processing"); the graphs are already folded and checked, so only errors are shown.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    try:
        bundle = (Path(bundle) if bundle else default_bundle_dir("fp32")).resolve()
        out = Path(out).resolve() if out else bundle.with_name(f"{bundle.name.removesuffix('-fp32')}-int8")
        sentences, ref_texts = check_inputs(bundle, out, texts, list(references), list(reference_texts),
                                            [Path(c) for c in compare])
        report = atomic_dir(out, lambda staging: calibrate(
            bundle, staging, list(references), sentences, target, samples, [Path(c) for c in compare],
            save_activations, max_seconds, seed, ref_texts))
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_report(report))
    click.echo(f"bundle: {out}\nreport: {out / REPORT_FILE}")


def check_inputs(bundle: Path, out: Path, texts: str | None, references: list[str], reference_texts: list[str],
                 compare: list[Path]) -> tuple[list[str], list[str]]:
    """Everything that can be refused is refused before minutes of recording. Returns the
    sentences (split as the bundle's frontend splits them) and one transcript per reference."""
    manifest = load_manifest(bundle)
    require_fp32(manifest, bundle)
    if out == bundle or out in bundle.parents or bundle in out.parents:
        raise CalibrationError(f"the INT8 bundle {out} would overwrite the fp32 bundle {bundle}: choose another -o")
    config = manifest.config
    frontend = text_frontend(config.text, bundle)
    sentences = read_sentences(texts, frontend)
    ref_texts = transcripts(config, references, reference_texts)
    layout = config.prompt
    for sentence in sentences:  # encoded as the synthesizer will: raises TextError naming the problem
        for ref_text in dict.fromkeys(ref_texts if layout.needs_reference_text else [""]):
            frontend.encode(sentence, prompt_text=ref_text)
    for path in compare:
        if load_manifest(path, verify_files=False).config != config:
            raise CalibrationError(f"{path} is not a bundle of the same model as {bundle}")
    return sentences, ref_texts


def calibrate(bundle: Path, out: Path, references: list[str], sentences: list[str], target: str,
              samples: int, compare: list[Path], save_activations: str | None, max_seconds: float | None,
              seed: int, reference_texts: list[str] | None = None) -> dict[str, Any]:
    """Record, quantize into `out`, measure, and write the report there. `reference_texts`:
    each reference's transcript, for models that read it."""
    heldout, calibration = sentences[::HELDOUT_EVERY], [s for i, s in enumerate(sentences) if i % HELDOUT_EVERY]
    _log(f"machine: {machine_line()}")
    if target == "onnxruntime" and saturates_u8s8(cpu_features()):
        _log("note: this CPU has no VNNI: the bundle will be accurate here (7-bit weights), but INT8 measured no "
             "faster than fp32 on such a CPU (RTF 0.204 against 0.209, a 2-core AVX2 EPYC)")
    _log(f"recording activations: {len(calibration)} sentences, {len(references)} voice(s)")
    recording = record(bundle, calibration, references, samples, seed, max_seconds, log=_log,
                       reference_texts=reference_texts)
    if save_activations:
        recording.save(save_activations)
    manifest = write_quantized(bundle, out, recording, target, log=_log)
    _log(f"measuring on {len(heldout)} held-out sentences")
    heldout_seed = seed + HELDOUT_SEED_OFFSET
    heldout_recording = record(bundle, heldout, references, samples, heldout_seed, max_seconds, log=_log,
                               reference_texts=reference_texts)
    errors = graph_errors(OrtRunner(bundle), OrtRunner(out), heldout_recording, list(manifest.quantization["graphs"]))
    candidates = {"int8": Synthesizer(out, backend="onnxruntime")}
    candidates.update({_label(path): Synthesizer(path, backend="onnxruntime") for path in compare})
    mel = end_to_end(Synthesizer(bundle, backend="onnxruntime"), candidates, heldout, references, heldout_seed,
                     max_seconds, log=_log, reference_texts=reference_texts)
    report = {"bundle": str(out), "source": str(bundle), "machine": machine_line(),
              "quantization": manifest.quantization,
              "graph_errors": [e.to_dict() for e in errors], "mel_distance_db": mel,
              "heldout_sentences": heldout}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))  # `out` is staging: swapped in whole
    return report


def _label(path: Path) -> str:
    return f"{load_manifest(path, verify_files=False).precision} ({path.name})"


def machine_line() -> str:
    """The CPU and what its integer kernels can use: the figures below hold for this machine."""
    return f"{cpu_summary()}, {usable_cores()} usable cores, onnxruntime {onnxruntime.__version__}"


def format_report(report: dict[str, Any]) -> str:
    graphs = report["quantization"]["graphs"]
    lines = [f"machine: {report['machine']}",
             "graph            int8 layers/all  size int8/fp32  worst rel. error  median SNR"]
    for error in report["graph_errors"]:
        name = error["graph"]
        info = graphs[name]
        layers = f"{info['quantized_layers']}/{info['quantized_layers'] + len(info['fp32_layers'])}"
        size = f"{info['bytes']['int8'] / info['bytes']['fp32']:.0%}"
        lines.append(f"{name:<16} {layers:>15}  {size:>14}  {error['worst_relative']:>16.2e}  "
                     f"{error['median_snr_db']:>7.1f} dB")
    lines += [f"{name:<16} fp32: {why}" for name, why in report["quantization"]["fp32_graphs"].items()]
    lines.append("")
    lines.append("end to end, log-mel distance to fp32 (same seed, same length):")
    lines += [f"  {name:<24} {value:6.2f} dB" for name, value in report["mel_distance_db"].items()]
    return "\n".join(lines)
