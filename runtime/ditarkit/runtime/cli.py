"""ditar-run (speak text with a reference voice) and ditar-engines (build TensorRT engines
on the device). Both only parse arguments and call the library."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import click
import numpy as np
import soundfile as sf

from ditarkit.runtime.audio import AudioError
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import BundleError
from ditarkit.runtime.sampler import MAX_CFG_SCALE, OptionsError
from ditarkit.runtime.synthesizer import (
    BACKENDS,
    MAX_CHUNK_PATCHES,
    StreamStats,
    SynthesisError,
    Synthesizer,
)
from ditarkit.runtime.text import TextError

USER_ERRORS = (AudioError, BundleError, OptionsError, SynthesisError, TextError, OSError)
STDOUT = "-"
# Signals that end a run as Ctrl-C does (SIGINT raises KeyboardInterrupt already): the
# partial output is removed, one line says so, and the exit status is 128 + the signal number.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` on the way up mistakes it for an error, and every `finally` and
    atomic_write's cleanup run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise Stopped in the main thread; the previous
    handlers come back on leaving (the CLI also runs in-process, in tests and scripts)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; elsewhere the defaults stay
        return

    def stop(signum: int, _frame) -> None:
        for other in STOP_SIGNALS:  # a second signal must not interrupt the cleanup of the first
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--text", help="Text to speak.")
@click.option("--text-file", type=click.Path(dir_okay=False), help="Read the text from this file (UTF-8).")
@click.option("--ref", "reference", required=True, type=click.Path(dir_okay=False),
              help="Reference voice: an audio file (any rate, mono or stereo), 1-10 s of speech.")
@click.option("--ref-text", default="",
              help="What the reference says: needed by models that continue from it (VoxCPM 0.5B / 1.5).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="WAV file to write (atomically); - streams the WAV to stdout, e.g. into aplay or sox.")
@click.option("--bundle", type=click.Path(file_okay=False), help="Bundle folder. Default: the embedded default.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--cfg", "cfg_scale", type=float,
              help=f"Guidance scale w in [0, {MAX_CFG_SCALE:g}] (default: the model's).")
@click.option("--temperature", type=float, help="Temperature tau in [0, 1] (default: the model's).")
@click.option("--nfe", type=int, help="LocDiT solver steps per patch, 1-1000 (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed, >= 0.")
@click.option("--max-seconds", type=float, help="Cap on audio per sentence (at most the model's maximum).")
@click.option("--chunk-patches", type=click.IntRange(1, 64), default=MAX_CHUNK_PATCHES, show_default=True,
              help="Largest audio chunk, in patches: chunks grow 1, 2, 4, ... up to it (1 = lowest latency).")
@click.option("--threads", type=click.IntRange(1),
              help="CPU threads for ONNX Runtime, at most the usable cores (default: 1 for small models such as "
                   "the default voice, else all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def main(text, text_file, reference, ref_text, output, bundle, backend, cfg_scale, temperature, nfe, seed,
         max_seconds, chunk_patches, threads, quiet) -> None:
    """Speak TEXT in the voice of a reference recording, streaming to a WAV file (or stdout)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    if (text is None) == (text_file is None):
        raise click.UsageError("give exactly one of --text or --text-file")
    try:
        with stop_signals_raise():
            text = read_text(text_file) if text_file else text
            check_output(output, reference)
            with Synthesizer(bundle, backend=backend, threads=threads) as synth:
                options = synth.options(cfg_scale=cfg_scale, temperature=temperature, nfe=nfe, seed=seed,
                                        max_seconds=max_seconds)
                stats = speak(synth, text, reference, output, options, chunk_patches, quiet, ref_text)
    except USER_ERRORS as err:
        raise click.ClickException(_one_line(err)) from None
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        _echo_err(f"stopped by {signal.Signals(signum).name}: {_nothing_written(output)}")
        raise click.exceptions.Exit(128 + signum) from None
    # With -o - stdout carries the audio, so the result line goes to stderr with the progress.
    click.echo(f"{'stdout' if output == STDOUT else output}: {stats.audio_seconds:.2f} s of audio in "
               f"{stats.wall_seconds:.2f} s, RTF {stats.rtf:.3f}, first chunk "
               f"{1000 * (stats.first_chunk_seconds or 0):.0f} ms, {len(stats.sentences)} sentence(s), "
               f"backend {synth.backend}", err=output == STDOUT)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
                        "save it as UTF-8") from None


def check_output(output: str, reference: str) -> None:
    """Refuse an output that would replace the reference recording (by any path to it)."""
    if output == STDOUT:
        return
    out, ref = Path(output), Path(reference)
    if out.resolve() == ref.resolve() or (out.exists() and ref.exists() and os.path.samefile(out, ref)):
        raise OptionsError(f"-o {output} is the reference audio {reference}: choose another output file")


def speak(synth: Synthesizer, text: str, reference: str, output: str, options, chunk_patches: int,
          quiet: bool, reference_text: str = "") -> StreamStats:
    """Encode the voice, then stream the speech into `output` (a file, or stdout)."""
    voice = synth.voice(reference, text=reference_text)
    if not quiet:
        _echo_err(f"backend: {synth.backend}; voice: {voice.seconds:.1f} s from {reference}")
    stats = StreamStats()
    per_patch = synth.config.patch_seconds
    progress = None if quiet else lambda n: click.echo(f"\rgenerated {n * per_patch:.1f} s", nl=False, err=True)
    chunks = synth.stream(text, voice, options, stats=stats, on_patch=progress, max_chunk_patches=chunk_patches)
    try:
        with contextlib.closing(chunks):  # a stop mid-stream cancels the queued decoding at once
            if output == STDOUT:
                write_to_stdout(chunks, synth.sample_rate)
            else:
                atomic_write(output, lambda tmp: _write_stream(tmp, chunks, synth.sample_rate))
    finally:
        if not quiet and stats.patches:
            _echo_err("")  # ends the progress line, before the result or the reason it stopped
    return stats


def pcm16(chunk: np.ndarray) -> np.ndarray:
    """float32 -> 16-bit PCM, clipped to [-1, 1] and rounded to nearest (x 32767, symmetric):
    the one conversion of both writers, so a file and stdout hold the same samples."""
    return np.rint(np.clip(chunk, -1.0, 1.0) * 32767).astype(np.int16)


def _write_stream(path: str, chunks: Iterable[np.ndarray], rate: int) -> None:
    """Write chunks as they arrive, so long text never sits whole in memory."""
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as wav:
        for chunk in chunks:
            wav.write(pcm16(chunk))  # int16 is written as it is


# A WAV header's sizes are unknown while streaming: 0xFFFFFFFF, as ffmpeg writes to a pipe,
# which aplay, sox and libsndfile read as "until the end of the stream".
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(rate: int, data_bytes: int = UNKNOWN_SIZE) -> bytes:
    """The 44-byte header of 16-bit mono PCM WAV."""
    riff = UNKNOWN_SIZE if data_bytes == UNKNOWN_SIZE else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def write_wav_stream(out: BinaryIO, chunks: Iterable[np.ndarray], rate: int) -> int:
    """Stream a WAV into `out` as chunks arrive (flushed, so a player starts on the first;
    the header goes with the first, so a run that fails before any audio writes nothing);
    where `out` can seek back (stdout redirected to a file), the sizes are then filled in.
    Returns the bytes of audio written."""
    data = None  # bytes of audio written; None until the header is out
    for chunk in chunks:
        if data is None:
            out.write(wav_header(rate))
            data = 0
        data += out.write(pcm16(chunk).astype("<i2").tobytes())
        out.flush()
    if data is None:  # no audio at all: still a valid, empty WAV
        out.write(wav_header(rate, 0))
        data = 0
    elif out.seekable():
        out.seek(0)
        out.write(wav_header(rate, data))
        out.seek(0, os.SEEK_END)
    out.flush()
    return data


def write_to_stdout(chunks: Iterable[np.ndarray], rate: int) -> None:
    try:
        write_wav_stream(sys.stdout.buffer, chunks, rate)
    except BrokenPipeError:
        # The reader went away (a player closed): stop; no error at exit flushing stdout either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OSError("stdout was closed by the reader before the audio ended") from None


def _nothing_written(output: str) -> str:
    return "the audio on stdout is incomplete" if output == STDOUT else f"{output} not written"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
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
