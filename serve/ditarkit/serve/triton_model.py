"""The models Triton's python backend runs: `ditar` streams speech, `register_voice` encodes a
reference once. Imported only inside the backend's stub process (one per model instance),
where `triton_python_backend_utils` exists; each instance owns one Synthesizer, which runs one
synthesis at a time, so concurrency is the instance count.

How tensors cross the stub depends on numpy's major version. The stub's numpy bridge (pybind11)
is built for numpy 1: under numpy 2 it reads request tensors wrongly and writes empty outputs
(protocol.py says more), so there they cross by DLPack. Under numpy 1 the bridge is right and
DLPack outputs crash the stub (numpy 1's DLPack deleter needs the GIL, which the stub does not
hold when it frees an output), so there they cross by the bridge. Both measured with the stub of
Triton 2.51 (nvidia-pytriton 0.7.0) on numpy 1.26.4 and 2.4.6.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ditarkit.runtime.audio import AudioError
from ditarkit.runtime.sampler import OptionsError
from ditarkit.runtime.synthesizer import MAX_CHUNK_PATCHES, StreamStats, SynthesisError, Synthesizer, Voice
from ditarkit.runtime.text import TextError
from ditarkit.serve.protocol import (
    AUDIO,
    CHUNK_INDEX,
    FINAL,
    REFERENCE_AUDIO,
    REFERENCE_TEXT,
    SAMPLE_RATE,
    VOICE_ID,
    VOICE_SECONDS,
    Reference,
    RequestError,
    SpeechRequest,
    one_line,
    parse_reference,
    parse_speech_request,
)
from ditarkit.serve.repository import PARAM_BACKEND, PARAM_BUNDLE, PARAM_THREADS, PARAM_VOICES, VOICE_DIR
from ditarkit.serve.voices import VoiceStore

# Refused requests: the client gets the runtime's (or the protocol's) one line, the server goes on.
USER_ERRORS = (RequestError, AudioError, OptionsError, TextError, SynthesisError)


def _quiet_dlpack_handoff(unraisable: Any, default=sys.unraisablehook) -> None:
    """The stub takes ownership of a numpy DLPack capsule by renaming it "used_dlpack", where
    the standard says "used_dltensor"; numpy's capsule destructor then reports a harmless
    ValueError for every output tensor (the stub frees the tensor itself). Only that is muted."""
    if "PyCapsule_GetPointer called with incorrect name" not in str(unraisable.exc_value):
        default(unraisable)


sys.unraisablehook = _quiet_dlpack_handoff


class Cancelled(Exception):
    """The client went away (closed its stream or disconnected)."""


@dataclass(frozen=True)
class Settings:
    bundle: Path
    voice_store: Path
    backend: str = "auto"
    threads: int | None = None

    @classmethod
    def from_args(cls, args: dict[str, str]) -> Settings:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        root = Path(args["model_repository"]).parent  # the backend names the model's folder

        def path(value: str) -> Path:
            return Path(value) if Path(value).is_absolute() else root / value

        threads = params.get(PARAM_THREADS)
        return cls(path(params[PARAM_BUNDLE]), path(params.get(PARAM_VOICES) or VOICE_DIR),
                   params.get(PARAM_BACKEND) or "auto", int(threads) if threads else None)


NUMPY_BRIDGE = int(np.__version__.split(".")[0]) < 2  # the numpy the stub's bridge was built for


def _read(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return (tensor.as_numpy() if NUMPY_BRIDGE else np.from_dlpack(tensor)).copy()  # the copy outlives the request


def _tensor(name: str, array: np.ndarray) -> Any:
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor(name, array) if NUMPY_BRIDGE else pb_utils.Tensor.from_dlpack(name, array)


class _Model:
    """What both models share: one Synthesizer per instance and the voice store."""

    def initialize(self, args: dict[str, str]) -> None:
        settings = Settings.from_args(args)
        self.synth = Synthesizer(settings.bundle, backend=settings.backend, threads=settings.threads)
        self.voices = VoiceStore(settings.voice_store, settings.bundle)
        self.instance = args["model_instance_name"]
        pb_utils.Logger.log_info(f"{self.instance}: {settings.bundle} on {self.synth.backend}")

    def finalize(self) -> None:
        self.synth.close()

    def encode(self, reference: Reference) -> Voice:
        """The reference's voice, with its transcript where the model reads one (refused
        without it, in the runtime's words); a model that does not read it gets none."""
        reads_transcript = self.synth.config.prompt.needs_reference_text
        try:
            voice = self.synth.voice(reference.audio, reference.sample_rate, text=reference.text)
        except AudioError as err:  # the runtime names an array reference "array"
            raise RequestError(f"{REFERENCE_AUDIO}: {one_line(err)}") from None
        except OptionsError as err:  # the transcript is missing
            raise RequestError(f"{REFERENCE_TEXT}: {one_line(err)}") from None
        return voice if reads_transcript else replace(voice, text="")


class SpeechModel(_Model):
    """`ditar`: text and a voice in, audio chunks out as they are generated."""

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._speak(request, request.get_response_sender())
        return None  # decoupled: every response went through the sender

    def _speak(self, request: Any, sender: Any) -> None:
        stats, sent = StreamStats(), 0
        try:
            job = parse_speech_request(lambda name: _read(request, name))
            options = self.synth.options(**job.options)
            chunks = self.synth.stream(job.text, self._voice(job), options, stats=stats,
                                       on_patch=lambda _patches: _stop_if_cancelled(sender),
                                       max_chunk_patches=job.chunk_patches or MAX_CHUNK_PATCHES)
            with contextlib.closing(chunks):  # a stop mid-stream drops the decoding queued for it
                for chunk in chunks:
                    _stop_if_cancelled(sender)
                    sender.send(self._response(chunk, sent, final=False))
                    sent += 1
            sender.send(self._response(np.zeros(0, np.float32), sent, final=True),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            pb_utils.Logger.log_info(
                f"{self.instance}: {stats.audio_seconds:.2f} s of audio in {stats.wall_seconds:.2f} s, first chunk "
                f"{1000 * (stats.first_chunk_seconds or 0):.0f} ms, {sent} chunk(s)")
        except USER_ERRORS as err:
            pb_utils.Logger.log_info(f"{self.instance}: refused: {one_line(err)}")
            _finish(sender, one_line(err))
        except Exception as err:
            if isinstance(err, Cancelled) or sender.is_cancelled():  # also a send that raced the client leaving
                pb_utils.Logger.log_info(f"{self.instance}: cancelled by the client after {stats.patches} "
                                         f"patch(es), {sent} chunk(s) sent")
                _finish(sender, None)
            else:  # a bug: the client gets one line, the log the traceback
                pb_utils.Logger.log_error(f"{self.instance}: {traceback.format_exc()}")
                _finish(sender, f"internal error: {one_line(err)}")

    def _voice(self, job: SpeechRequest) -> Voice:
        if job.reference is not None:
            return self.encode(job.reference)
        stored = self.voices.get(job.voice_id)
        cfg = self.synth.config
        seconds = stored.latents.shape[0] * cfg.audio.hop_length / cfg.audio.sample_rate
        return Voice(stored.latents, seconds, f"voice {job.voice_id}", stored.text)

    def _response(self, chunk: np.ndarray, index: int, final: bool) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            _tensor(AUDIO, chunk.astype(np.float32, copy=False)),
            _tensor(CHUNK_INDEX, np.array([index], np.int32)),
            _tensor(FINAL, np.array([final], np.bool_)),
            _tensor(SAMPLE_RATE, np.array([self.synth.sample_rate], np.int32)),
        ])


class VoiceModel(_Model):
    """`register_voice`: a reference in, the id of its kept latents out."""

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._register(request) for request in requests]

    def _register(self, request: Any) -> Any:
        try:
            start = time.perf_counter()
            reference = parse_reference(lambda name: _read(request, name), required=True)
            voice = self.encode(reference)
            voice_id = self.voices.put(voice.latents, voice.text)
            pb_utils.Logger.log_info(f"{self.instance}: voice {voice_id} ({voice.seconds:.1f} s) in "
                                     f"{1000 * (time.perf_counter() - start):.0f} ms")
            return pb_utils.InferenceResponse(output_tensors=[
                _tensor(VOICE_ID, np.array([voice_id], np.int64)),
                _tensor(VOICE_SECONDS, np.array([voice.seconds], np.float64)),
            ])
        except USER_ERRORS as err:
            pb_utils.Logger.log_info(f"{self.instance}: refused: {one_line(err)}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(err)))
        except Exception as err:
            pb_utils.Logger.log_error(f"{self.instance}: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {one_line(err)}"))


def _stop_if_cancelled(sender: Any) -> None:
    if sender.is_cancelled():
        raise Cancelled


def _finish(sender: Any, error: str | None) -> None:
    """The request's last response: its error, or (cancelled) nothing. Sending to a client that
    has gone may fail; the request is released either way."""
    response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) if error else None
    try:
        if response is None:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as err:  # noqa: BLE001 (the stub raises its own exception types)
        pb_utils.Logger.log_warn(f"final response not delivered: {one_line(err)}")
