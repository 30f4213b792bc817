"""The Python API a robot embeds: load a bundle once, encode a voice once, speak many times.

    synth = Synthesizer("path/to/bundle")          # graphs loaded once
    voice = synth.voice("reference.wav")           # reference encoded once, reusable
    for chunk in synth.stream("Hello there.", voice):
        audio_queue.put(chunk)                     # float32 mono at synth.sample_rate

A Synthesizer runs one synthesis at a time: use one per thread (its backend buffers, the
KV cache among them, are not shared safely between concurrent calls).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ditarkit.runtime.audio import prepare_reference, read_audio
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.defaults import default_bundle_dir
from ditarkit.runtime.manifest import BundleError
from ditarkit.runtime.runner import GraphRunner, RunnerClosed
from ditarkit.runtime.sampler import (
    GenerationOptions,
    NoiseFn,
    OptionsError,
    generate_patches,
    seeded_noise,
)
from ditarkit.runtime.text import TextError, text_frontend

log = logging.getLogger("ditarkit")

BACKENDS = ("auto", "onnxruntime", "tensorrt")

class SynthesizerClosed(RunnerClosed):
    """A closed Synthesizer was asked to work. (A stream already running when it closed
    stops at its next graph call with RunnerClosed, which this specialises.)"""


class SynthesisError(RuntimeError):
    """The model produced audio that cannot be written (NaN or infinite samples)."""


def check_options(options: GenerationOptions, config: ModelContract) -> GenerationOptions:
    """The options for this model: GenerationOptions checked every range when it was built;
    max_seconds above the model's maximum is capped at it."""
    return replace(options, max_seconds=min(options.max_seconds, config.max_seconds))


@dataclass(frozen=True)
class Voice:
    """An encoded reference voice: VAE latents of the prepared reference audio."""

    latents: np.ndarray  # (F, C)
    seconds: float
    source: str = "array"
    text: str = ""  # what the reference says, for models that continue from it (VoxCPM v1)


@dataclass
class StreamStats:
    """Filled in while a stream runs: what `ditar-run` reports."""

    first_chunk_seconds: float | None = None
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    patches: int = 0
    sentences: list[str] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")


def open_runner(bundle: str | Path, backend: str = "auto", threads: int | None = None) -> GraphRunner:
    """ONNX Runtime or TensorRT for a bundle; "auto" takes TensorRT when its engines for this
    GPU are in the bundle and TensorRT runs here, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend in ("auto", "tensorrt"):
        from ditarkit.runtime.backends import tensorrt

        reason = tensorrt.unavailable_reason()
        if reason is None:
            try:
                return tensorrt.TensorRTRunner(bundle)
            except BundleError as err:
                if backend == "tensorrt":
                    raise
                log.info("TensorRT not used: %s", err)
        elif backend == "tensorrt":
            raise BundleError(f"TensorRT backend unavailable: {reason}")
        else:
            log.info("TensorRT not used: %s", reason)
    from ditarkit.runtime.backends.onnxrt import CUDA, OrtIOBindingRunner, OrtRunner, ort

    if CUDA in ort.get_available_providers():
        return OrtIOBindingRunner(bundle, device="cuda", threads=threads)  # KV cache stays on the GPU
    return OrtRunner(bundle, threads=threads)


# Chunk sizes grow 1, 2, 4, ... patches up to this cap: the first audio comes after one
# patch, and later chunks share the decoder's left context among more new frames (each chunk
# recomputes `decoder_receptive_frames` of context, 43 frames for the default voice, so
# 4-patch chunks cost about a third of the decoder time of 1-patch chunks).
MAX_CHUNK_PATCHES = 4


class StreamingDecoder:
    """Turns patches into audio as they arrive. The VAE decoder is causal with a receptive
    field of `context` frames, so decoding each new chunk with that much left context gives
    the same samples as decoding everything at the end.

    With an `executor`, chunks after the first are decoded on it while the caller draws the
    next patches (the backends release the GIL), taking the VAE off the critical path where
    a core is spare. The first chunk is decoded at once: it is the latency a listener waits
    for. Chunks come out in order either way."""

    def __init__(self, runner: GraphRunner, max_chunk_patches: int = MAX_CHUNK_PATCHES,
                 executor: Executor | None = None, lead_in: np.ndarray | None = None) -> None:
        """`lead_in` (F, C): frames that come before the speech and are not spoken again, the
        reference's end where the speech continues it (VoxCPM v1): the first chunk then sounds
        as the end of one decode of reference and speech."""
        if max_chunk_patches < 1:
            raise ValueError("max_chunk_patches must be >= 1")
        self.runner = runner
        self.context = runner.config.audio.decoder_context_frames
        self.hop = runner.config.audio.output_hop_length
        self.patch_size = runner.config.patch_size
        self.max_chunk_patches = max_chunk_patches
        self.executor = executor
        self.chunk_patches = 1  # size of the next chunk
        self.frames: list[np.ndarray] = [] if lead_in is None else list(lead_in[-self.context :])  # (C,) each
        self.decoded = len(self.frames)  # frames already handed to the decoder
        self.pending: deque[Future] = deque()  # chunks in order, decoded or being decoded
        self._first = True  # the first chunk is decoded at once: the latency a listener waits for

    def push(self, patch: np.ndarray) -> list[np.ndarray]:
        """(P, C) new frames -> the chunks whose audio is now ready, in order (often none)."""
        self.frames.extend(patch)
        if len(self.frames) - self.decoded >= self.chunk_patches * self.patch_size:
            self.chunk_patches = min(2 * self.chunk_patches, self.max_chunk_patches)
            self._decode_new_frames()
        return self._ready(wait=False)

    def finish(self) -> list[np.ndarray]:
        """Every chunk not yet returned, the frames not yet decoded among them."""
        self._decode_new_frames()
        return self._ready(wait=True)

    def _decode_new_frames(self) -> None:
        start = self.decoded
        if start == len(self.frames):
            return
        first = max(0, start - self.context)
        window = np.stack(self.frames[first:])  # context + new frames
        self.decoded = len(self.frames)
        skip = (start - first) * self.hop
        first_chunk, self._first = self._first, False
        if self.executor is None or first_chunk:
            done: Future = Future()
            done.set_result(self._decode(window, skip))
            self.pending.append(done)
        else:
            self.pending.append(self.executor.submit(self._decode, window, skip))

    def _decode(self, window: np.ndarray, skip: int) -> np.ndarray:
        return self.runner.decode_latents(window)[skip:].copy()

    def cancel(self) -> None:
        """Drop the chunks not yet returned (the caller stopped listening)."""
        for future in self.pending:
            future.cancel()  # a chunk already being decoded finishes, unread
        self.pending.clear()

    def _ready(self, wait: bool) -> list[np.ndarray]:
        ready = []
        while self.pending and (wait or self.pending[0].done()):
            ready.append(self.pending.popleft().result())
        return ready


class Synthesizer:
    def __init__(self, bundle: str | Path | None = None, backend: str = "auto", threads: int | None = None) -> None:
        if bundle is None:
            bundle = default_bundle_dir()
            if not bundle.exists():
                raise BundleError(f"no default bundle at {bundle}: run `ditar-export` once "
                                  "(needs the [export] extra), or pass a bundle")
        self._attach(open_runner(bundle, backend, threads), owns_runner=True)

    @classmethod
    def from_runner(cls, runner: GraphRunner) -> Synthesizer:
        """Wrap a runner made elsewhere (the PyTorch reference in benchmarks, say); closing
        the Synthesizer leaves that runner to its owner."""
        synth = cls.__new__(cls)
        synth._attach(runner, owns_runner=False)
        return synth

    def close(self) -> None:
        """Stop the decoder thread and release the backend (also on leaving a `with` block).
        A closed Synthesizer refuses further work with SynthesizerClosed. Idempotent."""
        self._closed = True
        if self._decoder_thread is not None:
            self._decoder_thread.shutdown(cancel_futures=True)
            self._decoder_thread = None
        if self._owns_runner:
            self.runner.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SynthesizerClosed("this Synthesizer is closed: create a new one")

    def __enter__(self) -> Synthesizer:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _attach(self, runner: GraphRunner, owns_runner: bool) -> None:
        self.runner = runner
        self._owns_runner = owns_runner
        self._closed = False
        # One worker: chunks decode in order, one at a time, beside the patch loop.
        background = runner.decodes_in_background()
        self._decoder_thread = ThreadPoolExecutor(1, thread_name_prefix="ditar-vae") if background else None
        self.backend = runner.name
        self.config = runner.config
        self.frontend = text_frontend(self.config.text, runner.bundle)
        self.sample_rate = self.config.audio.output_sample_rate

    def voice(self, reference: str | Path | np.ndarray, sample_rate: int | None = None, text: str = "") -> Voice:
        """Encode a reference voice from a file, or from an array (samples[, channels]).
        `text` is what the reference says: required by models that continue from their
        reference (the prompt layout reads its transcript), unused by the others."""
        self._check_open()
        if self.config.prompt.needs_reference_text and not text.strip():
            raise OptionsError("this model continues from its reference: give the reference's transcript "
                               "(ditar-run --ref-text; reference_text when served)")
        if isinstance(reference, np.ndarray):
            if sample_rate is None:
                raise ValueError("sample_rate is required with an array reference")
            audio, rate, source = reference, sample_rate, "array"
        else:
            audio, rate = read_audio(reference)
            source = str(reference)
        cfg = self.config
        prepared = prepare_reference(audio, rate, cfg.audio.sample_rate, cfg.audio.hop_length,
                                     cfg.max_prompt_seconds, source, fit=cfg.audio.reference_fit,
                                     patch_size=cfg.patch_size, shorten=not cfg.prompt.needs_reference_text)
        return Voice(self.runner.encode_audio(prepared), len(prepared) / cfg.audio.sample_rate, source, text.strip())

    def options(self, **overrides) -> GenerationOptions:
        """The model's default options, with any given here taking precedence; every value
        is checked here (OptionsError names the first out of range)."""
        return check_options(GenerationOptions.from_config(self.config, **overrides), self.config)

    def stream(
        self,
        text: str,
        voice: Voice,
        options: GenerationOptions | None = None,
        noise: NoiseFn | None = None,
        stats: StreamStats | None = None,
        on_patch: Callable[[int], None] | None = None,
        max_chunk_patches: int = MAX_CHUNK_PATCHES,
    ) -> Iterator[np.ndarray]:
        """Yield audio chunks (float32, copies) as they are generated: the first after one
        patch, then chunks of 2, 4, ... patches up to `max_chunk_patches` (1 = one chunk per
        patch, the lowest latency between chunks; larger is less decoder work). Long text is
        split into sentences, each generated in turn with the same voice. Options and text
        are checked in full here, when called, before any audio is made."""
        self._check_open()
        options = check_options(options or self.options(), self.config)
        if max_chunk_patches < 1:
            raise OptionsError(f"max_chunk_patches must be >= 1, got {max_chunk_patches}")
        sentences, token_ids = self._encode_sentences(text, voice)
        stats = stats if stats is not None else StreamStats()
        stats.sentences = sentences
        noise = noise or seeded_noise(options.seed, self.config.patch_size, self.config.audio.latent_dim)
        return self._generate(token_ids, voice, options, noise, stats, on_patch, max_chunk_patches)

    def _generate(self, token_ids: list[list[int]], voice: Voice, options: GenerationOptions, noise: NoiseFn,
                  stats: StreamStats, on_patch: Callable[[int], None] | None,
                  max_chunk_patches: int) -> Iterator[np.ndarray]:
        start = time.perf_counter()
        lead_in = voice.latents if self.config.prompt.continues_reference else None
        for ids in token_ids:
            decoder = StreamingDecoder(self.runner, max_chunk_patches, self._decoder_thread, lead_in)
            try:
                for patch in generate_patches(self.runner, ids, voice.latents, options, noise):
                    self._check_open()  # closed by another thread mid-stream
                    stats.patches += 1
                    if on_patch:
                        on_patch(stats.patches)
                    for chunk in decoder.push(patch):
                        yield self._count(chunk, stats, start)
                for chunk in decoder.finish():
                    yield self._count(chunk, stats, start)
            finally:  # a stream closed early leaves no decoding queued before the next one's
                decoder.cancel()

    def _count(self, chunk: np.ndarray, stats: StreamStats, start: float) -> np.ndarray:
        if not np.isfinite(chunk).all():  # never hand a listener NaN: it plays as full-scale noise
            raise SynthesisError("the model produced NaN or infinite audio; this bundle or these options are broken")
        stats.audio_seconds += len(chunk) / self.sample_rate
        stats.wall_seconds = time.perf_counter() - start
        if stats.first_chunk_seconds is None:
            stats.first_chunk_seconds = stats.wall_seconds
        return chunk

    def _encode_sentences(self, text: str, voice: Voice) -> tuple[list[str], list[list[int]]]:
        """Sentences with something to say and their ids; a piece with nothing speakable
        (an emoji between sentences) is skipped, text with nothing at all is refused. A
        layout that reads the reference's transcript gets it here, before each sentence."""
        reads_transcript = self.config.prompt.needs_reference_text
        if reads_transcript and not voice.text:  # a Voice made from latents alone, say
            raise OptionsError("this model continues from its reference: the voice needs its transcript")
        joined = voice.text if reads_transcript else ""
        kept = []
        for sentence in self.frontend.sentences(text):
            try:
                kept.append((sentence, self.frontend.encode(sentence, prompt_text=joined)))
            except TextError as err:
                if "no speakable" not in str(err):
                    raise
        if not kept:
            self.frontend.encode(text)  # raises the frontend's own reason
            raise TextError(f"no speakable characters in text {text[:40]!r}")
        return [s for s, _ in kept], [ids for _, ids in kept]

    def synthesize(self, text: str, voice: Voice, options: GenerationOptions | None = None,
                   noise: NoiseFn | None = None) -> np.ndarray:
        """The whole utterance at once (float32 mono at `sample_rate`)."""
        chunks = list(self.stream(text, voice, options, noise))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
