"""ditar-run (speak text with a reference voice) and ditar-engines (build TensorRT engines
on the device). Both only parse arguments and call the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import numpy as np
import soundfile as sf

from ditarkit.runtime.audio import AudioError
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import BundleError
from ditarkit.runtime.sampler import OptionsError
from ditarkit.runtime.synthesizer import BACKENDS, MAX_CHUNK_PATCHES, StreamStats, Synthesizer
from ditarkit.runtime.text import TextError

USER_ERRORS = (AudioError, BundleError, OptionsError, TextError, OSError)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--text", help="Text to speak.")
@click.option("--text-file", type=click.Path(dir_okay=False), help="Read the text from this file.")
@click.option("--ref", "reference", required=True, type=click.Path(dir_okay=False),
              help="Reference voice: an audio file (any rate, mono or stereo), 1-10 s of speech.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="WAV file to write.")
@click.option("--bundle", type=click.Path(file_okay=False), help="Bundle folder. Default: the embedded default.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--cfg", "cfg_scale", type=float, help="Guidance scale w (default: the model's).")
@click.option("--temperature", type=float, help="Temperature tau in [0, 1] (default: the model's).")
@click.option("--nfe", type=int, help="LocDiT solver steps per patch (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-seconds", type=float, help="Cap on audio per sentence.")
@click.option("--chunk-patches", type=click.IntRange(1, 64), default=MAX_CHUNK_PATCHES, show_default=True,
              help="Largest audio chunk, in patches: chunks grow 1, 2, 4, ... up to it (1 = lowest latency).")
@click.option("--threads", type=click.IntRange(1),
              help="CPU threads for ONNX Runtime (default: 1 for small models such as the default voice, "
                   "else all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def main(text, text_file, reference, output, bundle, backend, cfg_scale, temperature, nfe, seed,
         max_seconds, chunk_patches, threads, quiet) -> None:
    """Speak TEXT in the voice of a reference recording, streaming to a WAV file."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    if (text is None) == (text_file is None):
        raise click.UsageError("give exactly one of --text or --text-file")
    try:
        if text_file:
            text = Path(text_file).read_text(encoding="utf-8")
        synth = Synthesizer(bundle, backend=backend, threads=threads)
        options = synth.options(cfg_scale=cfg_scale, temperature=temperature, nfe=nfe, seed=seed,
                                max_seconds=max_seconds)
        voice = synth.voice(reference)
        if not quiet:
            _echo_err(f"backend: {synth.backend}; voice: {voice.seconds:.1f} s from {reference}")
        stats = StreamStats()
        per_patch = synth.config.patch_seconds
        progress = None if quiet else lambda n: click.echo(f"\rgenerated {n * per_patch:.1f} s", nl=False, err=True)
        chunks = synth.stream(text, voice, options, stats=stats, on_patch=progress,
                              max_chunk_patches=chunk_patches)
        atomic_write(output, lambda tmp: _write_stream(tmp, chunks, synth.sample_rate))
        if not quiet:
            _echo_err("")
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{output}: {stats.audio_seconds:.2f} s of audio in {stats.wall_seconds:.2f} s, "
               f"RTF {stats.rtf:.3f}, first chunk {1000 * (stats.first_chunk_seconds or 0):.0f} ms, "
               f"{len(stats.sentences)} sentence(s), backend {synth.backend}")


def _write_stream(path: str, chunks, rate: int) -> None:
    """Write chunks as they arrive, so long text never sits whole in memory."""
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as wav:
        for chunk in chunks:
            wav.write(np.clip(chunk, -1.0, 1.0))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
def engines_main(bundle: str) -> None:
    """Build TensorRT engines for BUNDLE on this device (engines do not travel between GPUs)."""
    from ditarkit.runtime.backends.tensorrt import build_engines, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise click.ClickException(f"cannot build TensorRT engines here: {reason}")
    try:
        paths = build_engines(bundle, log=_echo_err)
    except BundleError as err:
        raise click.ClickException(str(err)) from None
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
