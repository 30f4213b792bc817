"""ditar-serve (a bundle behind Triton, or a Triton model repository written for one) and
ditar-loadtest (N concurrent streaming clients against it). Both only parse arguments and call
the library; bad input is one line on stderr and exit status 1."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import click

from ditarkit.runtime.audio import AudioError, read_audio, to_mono
from ditarkit.runtime.cli import Stopped, stop_signals_raise
from ditarkit.runtime.clicommand import OneLineCommand
from ditarkit.runtime.defaults import default_bundle_dir
from ditarkit.runtime.fileio import atomic_write
from ditarkit.runtime.manifest import BundleError, load_manifest
from ditarkit.runtime.sampler import NEVER_STOP
from ditarkit.runtime.synthesizer import BACKENDS
from ditarkit.serve.protocol import SPEECH_MODEL, VOICE_MODEL, one_line
from ditarkit.serve.repository import MAX_INSTANCES, RepositorySettings, write_repository
from ditarkit.serve.server import Address, LocalTriton, ServeError, check_ports_free, workspace

USER_ERRORS = (AudioError, BundleError, ServeError, OSError, ValueError)
DEFAULT_TEXT = "The robot arm moved the red cube to the left. Then it waited for the next instruction."


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", required=False, type=click.Path(file_okay=False))
@click.option("--instances", type=click.IntRange(1, MAX_INSTANCES), default=1, show_default=True,
              help="Instances of the speech model: each runs one synthesis at a time.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True,
              help="Streaming goes over gRPC.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime threads per instance (default: the runtime's).")
@click.option("--voices", type=click.Path(file_okay=False),
              help="Keep registered voices in this folder (default: with the server, gone when it stops).")
@click.option("--write-repository", "repository", type=click.Path(file_okay=False),
              help="Write a Triton model repository for BUNDLE into this folder and exit (for a Triton server "
                   "elsewhere: a GPU box, a Jetson).")
@click.option("--repository", "serve_repository", type=click.Path(file_okay=False, exists=True),
              help="Serve this repository (one --write-repository wrote) as it is, with its own settings.")
@click.option("--link-bundle", is_flag=True, help="With --write-repository: refer to BUNDLE by its absolute path "
                                                   "instead of copying it into the repository.")
@click.option("--verbose", is_flag=True, help="Triton's verbose log.")
@click.option("-q", "--quiet", is_flag=True, help="No server log on stderr.")
def serve_main(bundle, instances, host, http_port, grpc_port, backend, threads, voices, repository, serve_repository,
               link_bundle, verbose, quiet) -> None:
    """Serve BUNDLE (default: the embedded default's) through Triton Inference Server: model `ditar`
    streams speech, `register_voice` keeps a voice for later requests. Ctrl-C (SIGINT), SIGTERM
    or SIGHUP shuts it down cleanly."""
    if http_port == grpc_port:
        raise click.UsageError("--http-port and --grpc-port must differ")
    if link_bundle and not repository:
        raise click.UsageError("--link-bundle goes with --write-repository")
    if serve_repository and (repository or bundle):
        raise click.UsageError("--repository serves a repository as it is: give no BUNDLE or --write-repository")
    if bundle is None and not serve_repository and not default_bundle_dir().exists():
        raise click.ClickException(f"no default bundle at {default_bundle_dir()}: run `ditar-export` once "
                                   "(needs the [export] extra), or pass a bundle")
    bundle = Path(bundle) if bundle else default_bundle_dir()
    voice_store = str(Path(voices).resolve()) if voices else None
    address = Address(host, http_port, grpc_port)
    try:
        if serve_repository:
            with workspace() as tmp:
                run_server(Path(serve_repository).resolve(), tmp, address, verbose, quiet,
                           what=f"the repository {serve_repository}")
            return
        if repository:
            settings = RepositorySettings(instances, backend, threads, link_bundle, voice_store)
            out = write_repository(repository, bundle, settings)
            click.echo(f"wrote {out}: run `tritonserver --model-repository {Path(out).resolve()}` "
                       "with ditarkit installed in the server's Python")
            return
        serve(bundle, address, RepositorySettings(instances, backend, threads, voice_store=voice_store), verbose, quiet)
    except USER_ERRORS as err:
        raise click.ClickException(one_line(err)) from None


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here even where it was ignored when we started (a server
    started with `&` from a script inherits SIGINT ignored): a server must stop on SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def import_roots() -> tuple[str, ...]:
    """The folders holding this process's `ditarkit` namespace portions (runtime, serve, ...)."""
    import ditarkit

    return tuple(dict.fromkeys(str(Path(p).resolve().parent) for p in ditarkit.__path__))


def serve(bundle: Path, address: Address, settings: RepositorySettings, verbose: bool, quiet: bool) -> None:
    """Write a repository for `bundle` (linking it, not copying) into a workspace that lives as
    long as the server, and serve it."""
    load_manifest(bundle)  # a bad bundle is refused in one line before Triton starts
    with workspace() as tmp:
        settings = replace(settings, link_bundle=True, voice_store=settings.voice_store or str(tmp / "voices"),
                           python_paths=import_roots())
        repository = write_repository(tmp / "repository", bundle, settings)
        run_server(repository, tmp, address, verbose, quiet,
                   what=f"{bundle} ({SPEECH_MODEL} x {settings.instances}, {VOICE_MODEL})")


def run_server(repository: Path, workspace: Path, address: Address, verbose: bool, quiet: bool, what: str) -> None:
    """Start Triton over `repository`, say so on stdout (one line, when ready), and run until
    a stop signal, after which Triton is shut down and the exit status is 0."""
    check_ports_free(address)
    server = LocalTriton(repository, workspace, address, on_log=None if quiet else _echo_err, verbose=verbose)
    try:
        with stop_signals_raise(), sigint_raises():
            server.start()
            click.echo(f"serving {what} at grpc {address.grpc_url}, http {address.probe_host}:{address.http_port}")
            sys.stdout.flush()
            status = server.wait()
            raise ServeError(f"tritonserver exited with status {status}: {server.failure()}")
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        status = server.stop()
        _echo_err(f"stopped by {signal.Signals(signum).name}: tritonserver shut down (status {status})")
    finally:
        server.stop()


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="The server's gRPC address (this machine).")
@click.option("--ref", "reference", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Reference voice (an audio file).")
@click.option("--ref-text", default="",
              help="What the reference says: needed by models that continue from it (VoxCPM 0.5B / 1.5).")
@click.option("--text", default=DEFAULT_TEXT, show_default=True)
@click.option("--streams", type=click.IntRange(1, 64), default=4, show_default=True, help="Concurrent clients.")
@click.option("--requests", type=click.IntRange(1, 10_000), default=16, show_default=True,
              help="Requests in all, shared by the clients.")
@click.option("--duration", type=click.FloatRange(0, 3600, min_open=True), default=60.0, show_default=True,
              help="No request starts after this many seconds.")
@click.option("--timeout", type=click.FloatRange(0, 3600, min_open=True), default=120.0, show_default=True,
              help="A request with no response for this long is given up.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-seconds", type=float, help="Cap on audio per sentence (the server checks it).")
@click.option("--exact-length", is_flag=True, help="Ignore the stop head: every sentence is --max-seconds long, so "
                                                    "runs compare equal work (as ditar-bench does).")
@click.option("--inline-voice", is_flag=True, help="Send the reference audio with every request instead of "
                                                    "registering it once.")
@click.option("--server-pid", type=click.IntRange(1), help="The server's process for RSS (default: the one "
                                                            "listening on the port).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def loadtest_main(url, reference, ref_text, text, streams, requests, duration, timeout, seed, max_seconds, exact_length,
                  inline_voice, server_pid, json_path, quiet) -> None:
    """Run STREAMS concurrent streaming clients against a ditar server on this machine, and print
    time to first chunk, RTF, throughput, errors and the server's memory as JSON."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    log = (lambda _m: None) if quiet else _echo_err
    if exact_length and max_seconds is None:
        raise click.UsageError("--exact-length needs --max-seconds")
    options = {"seed": seed, "max_seconds": max_seconds, "stop_threshold": NEVER_STOP if exact_length else None}
    try:
        from ditarkit.serve.loadtest import LoadPlan, check_loopback, run_load  # needs tritonclient

        check_loopback(url)  # before anything is read or sent
        audio, rate = read_audio(reference)
        plan = LoadPlan(url, text, to_mono(audio), rate, streams, requests, duration, timeout, not inline_voice,
                        {k: v for k, v in options.items() if v is not None}, ref_text)
        results = run_load(plan, log, server_pid)
    except ImportError as err:
        raise click.ClickException(f"the load test needs tritonclient: {one_line(err)}") from None
    except USER_ERRORS as err:
        raise click.ClickException(one_line(err)) from None
    text_out = json.dumps(results, indent=2)
    if json_path:
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text_out + "\n", encoding="utf-8"))
    click.echo(text_out)
    if results["errors"]:
        log(f"{results['errors']} of {results['requests']} request(s) failed")
