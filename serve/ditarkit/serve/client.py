"""A client for the `ditar` and `register_voice` models over Triton's gRPC stream.

    with Client("127.0.0.1:8001") as client:
        voice = client.register_voice(audio, 24_000)            # once per voice (+ its transcript,
                                                                # reference_text=, for VoxCPM v1)
        for chunk in client.stream("Hello there.", voice_id=voice.voice_id, seed=3):
            play(chunk.audio)                                   # float32 at chunk.sample_rate

One Client holds one gRPC stream and runs one request at a time; use one per thread. Leaving
a stream early (break, close(), an exception) cancels the request on the server, which stops
generating at its next patch.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ditarkit.serve.protocol import (
    AUDIO,
    CHUNK_INDEX,
    CHUNK_PATCHES,
    FINAL,
    NUMPY_TYPES,
    OPTIONS,
    REFERENCE_AUDIO,
    REFERENCE_RATE,
    REFERENCE_TEXT,
    SAMPLE_RATE,
    SPEECH_INPUTS,
    SPEECH_MODEL,
    TEXT,
    VOICE_ID,
    VOICE_INPUTS,
    VOICE_MODEL,
    VOICE_SECONDS,
    one_line,
)
from ditarkit.serve.server import ServeError

DEFAULT_TIMEOUT = 120.0  # seconds without a response before a request is given up
UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")  # gRPC codes of a stream that broke


@dataclass(frozen=True)
class Chunk:
    index: int
    audio: np.ndarray  # float32 mono; empty on the final response
    final: bool
    sample_rate: int


@dataclass(frozen=True)
class RegisteredVoice:
    voice_id: int
    seconds: float  # of reference kept after trimming


class RequestRefused(ServeError):
    """The server refused the request; the message is its one-line reason."""


_DTYPES = {spec.name: spec.dtype for spec in (*SPEECH_INPUTS, *VOICE_INPUTS)}


def _input(name: str, value: Any) -> triton.InferInput:
    array = np.ascontiguousarray(np.asarray(value, dtype=NUMPY_TYPES[_DTYPES[name]]).reshape(-1))
    tensor = triton.InferInput(name, list(array.shape), _DTYPES[name])
    tensor.set_data_from_numpy(array)
    return tensor


def _utf8(name: str, text: str | bytes) -> triton.InferInput:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _input(name, np.frombuffer(data, np.uint8))


def reference_inputs(audio: np.ndarray | None, sample_rate: int | None,
                     reference_text: str | bytes | None = None) -> list[triton.InferInput]:
    """A reference's tensors: each one given (the server says what is missing); an empty
    transcript is not sent."""
    inputs = []
    if audio is not None:
        inputs.append(_input(REFERENCE_AUDIO, audio))
    if sample_rate is not None:
        inputs.append(_input(REFERENCE_RATE, [sample_rate]))
    if reference_text:
        inputs.append(_utf8(REFERENCE_TEXT, reference_text))
    return inputs


def speech_inputs(text: str | bytes, voice_id: int | None = None, audio: np.ndarray | None = None,
                  sample_rate: int | None = None, reference_text: str | bytes | None = None,
                  chunk_patches: int | None = None, **options: float | int | None) -> list[triton.InferInput]:
    """The request tensors; `reference_text` is the reference's transcript (read by models
    that continue from their reference, ignored by the others); `options` are
    GenerationOptions fields (cfg_scale, temperature, nfe, seed, max_seconds, stop_threshold),
    checked by the server."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; the server takes {sorted(OPTIONS)}")
    inputs = [_utf8(TEXT, text)]
    if voice_id is not None:
        inputs.append(_input(VOICE_ID, [voice_id]))
    inputs += reference_inputs(audio, sample_rate, reference_text)
    if chunk_patches is not None:
        inputs.append(_input(CHUNK_PATCHES, [chunk_patches]))
    inputs += [_input(name, [value]) for name, value in options.items() if value is not None]
    return inputs


class Client:
    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.timeout = url, timeout
        try:
            self._client = triton.InferenceServerClient(url)
        except InferenceServerException as err:
            raise ServeError(f"cannot reach the server at {url}: {_message(err)}") from None
        self._responses: queue.Queue | None = None  # the open stream's, None when closed
        self._ids = itertools.count()

    def register_voice(self, audio: np.ndarray, sample_rate: int,
                       reference_text: str | bytes | None = None) -> RegisteredVoice:
        """Keep a voice on the server; `reference_text`, what the reference says, is kept with
        it for models that continue from their reference (they refuse a voice without it)."""
        inputs = reference_inputs(audio, sample_rate, reference_text)
        try:
            result = self._client.infer(VOICE_MODEL, inputs, client_timeout=self.timeout)
        except InferenceServerException as err:
            raise _error(err, self.url) from None
        return RegisteredVoice(int(result.as_numpy(VOICE_ID)[0]), float(result.as_numpy(VOICE_SECONDS)[0]))

    def stream(self, text: str | bytes, **request: Any) -> Iterator[Chunk]:
        """Chunks as the server makes them, the last with final=True and no audio. Keyword
        arguments are speech_inputs' (voice_id, or audio + sample_rate [+ reference_text];
        options)."""
        inputs = speech_inputs(text, **request)  # bad arguments raise here, before anything is sent
        return self._stream(inputs)

    def _stream(self, inputs: list[triton.InferInput]) -> Iterator[Chunk]:
        responses = self._open_stream()
        try:
            self._client.async_stream_infer(SPEECH_MODEL, inputs, request_id=str(next(self._ids)),
                                            enable_empty_final_response=True)
        except InferenceServerException as err:
            self._close_stream()
            raise _error(err, self.url) from None
        done = False
        try:
            while not done:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServeError(f"no response from {self.url} in {self.timeout:g} s") from None
                if error is not None:
                    done = True  # the server ended the request with this error
                    failure = _error(error, self.url)
                    if not isinstance(failure, RequestRefused):
                        self._close_stream()  # the stream itself broke: the next request opens another
                    raise failure
                response = result.get_response()
                final_flag = response.parameters["triton_final_response"].bool_param
                if not response.outputs:  # an empty final response
                    done = final_flag
                    continue
                chunk = Chunk(int(result.as_numpy(CHUNK_INDEX)[0]), result.as_numpy(AUDIO),
                              bool(result.as_numpy(FINAL)[0]), int(result.as_numpy(SAMPLE_RATE)[0]))
                done = chunk.final or final_flag
                yield chunk
        finally:
            if not done:  # left early: cancel the request, so the server stops generating
                self._close_stream()

    def _open_stream(self) -> queue.Queue:
        if self._responses is None:
            responses: queue.Queue = queue.Queue()
            try:
                self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
            except InferenceServerException as err:
                raise ServeError(f"cannot open a stream to {self.url}: {_message(err)}") from None
            self._responses = responses
        return self._responses

    def _close_stream(self) -> None:
        if self._responses is not None:
            self._responses = None
            self._client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self._close_stream()
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _error(err: BaseException, url: str) -> ServeError:
    """A refusal by the model (its one line), or a server that cannot be reached."""
    status = err.status() if isinstance(err, InferenceServerException) else None
    if status and any(code in str(status) for code in UNREACHABLE):
        return ServeError(f"cannot reach the server at {url}: {_message(err)}")
    return RequestRefused(_message(err))


def _message(err: BaseException) -> str:
    message = err.message() if isinstance(err, InferenceServerException) else str(err)
    return one_line(message or err)
