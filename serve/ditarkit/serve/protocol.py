"""The serving interface: what a client sends to the `ditar` and `register_voice` models and
what comes back, and the checks a request passes before any work.

Model `ditar` (decoupled: one request, many responses):
    text                   UINT8 [-1]  the text, UTF-8 encoded (see below why not BYTES)
    voice_id               INT64 [1]   a voice registered earlier with `register_voice`, or
    reference_audio        FP32  [-1]  mono samples of a reference recording, with
    reference_sample_rate  INT32 [1]   its sample rate, and optionally
    reference_text         UINT8 [-1]  what the reference says, UTF-8 encoded as text is
    cfg_scale, temperature, max_seconds, stop_threshold   FP64 [1], optional
    nfe, chunk_patches     INT32 [1], optional;  seed  INT64 [1], optional
  responses, in order:
    audio        FP32  [-1]  float32 mono samples at `sample_rate`
    chunk_index  INT32 [1]   0, 1, 2, ...
    final        BOOL  [1]   true on the last response only, whose audio is empty
    sample_rate  INT32 [1]
  A bad request gets one Triton error with the runtime's one-line reason, and no audio.

Model `register_voice`: reference_audio + reference_sample_rate (+ reference_text, optional)
in; voice_id (INT64 [1]) and voice_seconds (FP64 [1], the reference kept after trimming) out.
The voice is encoded once and its latents are kept on the server, with its transcript, so later
requests send 8 bytes instead of the recording.

reference_text is the reference's transcript. A model that continues from its reference (VoxCPM
v1: the manifest's config.prompt.needs_reference_text) reads it before the text to speak, and
refuses a reference without one (one Triton error with the runtime's reason, no audio). A model
that does not read transcripts ignores a given one: the audio, and a registered voice's id, are
what they are without it. It travels with the reference: a registered voice keeps its own, so a
request with a voice_id sends none.

Every tensor is a number array. Text (and reference_text) travels as UTF-8 bytes in UINT8
rather than as a BYTES tensor because the python backend that PyTriton 0.7 ships (Triton 2.51)
reads request tensors through pybind11's numpy bridge, which is built for numpy 1: under numpy 2
a BYTES input crashes the model's process and a numeric input arrives as zeros. Numeric
tensors can go by DLPack instead, which BYTES cannot, so with numbers only the same repository
runs under numpy 1 and 2 (triton_model.py picks the way per numpy). Options are FP64 so that a value
means on the server exactly what it means in the client's Python (FP32 would turn 0.3 into
0.30000001), and a stream can equal an offline synthesis with the same options bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPEECH_MODEL = "ditar"
VOICE_MODEL = "register_voice"

TEXT = "text"
VOICE_ID = "voice_id"
REFERENCE_AUDIO = "reference_audio"
REFERENCE_RATE = "reference_sample_rate"
REFERENCE_TEXT = "reference_text"
CHUNK_PATCHES = "chunk_patches"
AUDIO = "audio"
CHUNK_INDEX = "chunk_index"
FINAL = "final"
SAMPLE_RATE = "sample_rate"
VOICE_SECONDS = "voice_seconds"

# GenerationOptions fields a request may set, with their wire type. The values are checked by
# the runtime (Synthesizer.options), never here: one set of ranges and messages.
OPTIONS = {"cfg_scale": "FP64", "temperature": "FP64", "nfe": "INT32", "seed": "INT64",
           "max_seconds": "FP64", "stop_threshold": "FP64"}

# A request holds one model instance until it is done: 2,000 characters is about two minutes
# of speech, the most one client may hold an instance for. UTF-8 needs at most 4 bytes a
# character, so longer byte strings are refused before they are decoded.
MAX_TEXT_CHARS = 2000
TEXT_SECONDS = 120.0  # what MAX_TEXT_CHARS takes to say: about 17 characters a second
UTF8_MAX_BYTES = 4
MAX_TEXT_BYTES = UTF8_MAX_BYTES * MAX_TEXT_CHARS
# The runtime keeps only the reference's last max_prompt_seconds (10 s for every preset);
# more is only transfer and resampling work.
MAX_REFERENCE_SECONDS = 60.0
# A transcript says what its reference says, and the model's prompt is at most the reference:
# at the speaking rate above, MAX_REFERENCE_SECONDS of speech is 1,000 characters (a 10 s
# prompt says ~170). Byte strings over 4 bytes a character are refused undecoded, as text is;
# the model's own token limit (text and transcript together) is the runtime's to check.
MAX_REFERENCE_TEXT_CHARS = round(MAX_TEXT_CHARS * MAX_REFERENCE_SECONDS / TEXT_SECONDS)
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 384_000  # telephone to the highest studio rate
MAX_CHUNK_PATCHES = 64  # as ditar-run's --chunk-patches

NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
               "UINT8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton's name (FP32, INT64, ...); config.pbtxt writes it as TYPE_<dtype>
    dims: tuple[int, ...]
    optional: bool = False


SPEECH_INPUTS = (
    TensorSpec(TEXT, "UINT8", (-1,)),
    TensorSpec(VOICE_ID, "INT64", (1,), optional=True),
    TensorSpec(REFERENCE_AUDIO, "FP32", (-1,), optional=True),
    TensorSpec(REFERENCE_RATE, "INT32", (1,), optional=True),
    TensorSpec(REFERENCE_TEXT, "UINT8", (-1,), optional=True),
    *(TensorSpec(name, dtype, (1,), optional=True) for name, dtype in OPTIONS.items()),
    TensorSpec(CHUNK_PATCHES, "INT32", (1,), optional=True),
)
SPEECH_OUTPUTS = (
    TensorSpec(AUDIO, "FP32", (-1,)),
    TensorSpec(CHUNK_INDEX, "INT32", (1,)),
    TensorSpec(FINAL, "BOOL", (1,)),
    TensorSpec(SAMPLE_RATE, "INT32", (1,)),
)
VOICE_INPUTS = (TensorSpec(REFERENCE_AUDIO, "FP32", (-1,)), TensorSpec(REFERENCE_RATE, "INT32", (1,)),
                TensorSpec(REFERENCE_TEXT, "UINT8", (-1,), optional=True))
VOICE_OUTPUTS = (TensorSpec(VOICE_ID, "INT64", (1,)), TensorSpec(VOICE_SECONDS, "FP64", (1,)))

# name -> the request's tensor as a numpy array, or None when the request does not carry it
Getter = Callable[[str], "np.ndarray | None"]


class RequestError(ValueError):
    """A request the server refuses, with the reason in one line."""


class UnknownVoice(RequestError):
    """A voice_id that no `register_voice` call of this bundle returned (or one evicted since)."""


@dataclass(frozen=True)
class Reference:
    audio: np.ndarray  # (samples,) float32
    sample_rate: int
    text: str = ""  # its transcript; "" when none was sent


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice_id: int | None  # exactly one of voice_id and reference is set
    reference: Reference | None
    options: dict[str, Any] = field(default_factory=dict)  # GenerationOptions overrides, unchecked
    chunk_patches: int | None = None


def one_line(err: object) -> str:
    """An error (or a message) as the one line a client sees."""
    return " ".join(str(err).split()) or type(err).__name__


def _utf8(raw: np.ndarray, name: str, max_chars: int, advice: str) -> str:
    """UTF-8 bytes (UINT8) as a string of at most `max_chars` characters; the byte count is
    checked before decoding."""
    if raw.size > UTF8_MAX_BYTES * max_chars:
        raise RequestError(f"{name} is {raw.size} bytes, over the server's limit of {UTF8_MAX_BYTES * max_chars}: "
                           f"{advice}")
    data = np.ascontiguousarray(raw, dtype=np.uint8).tobytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"{name} is not UTF-8 (byte {data[err.start]:#04x} at offset {err.start})") from None
    if len(text) > max_chars:
        raise RequestError(f"{name} is {len(text)} characters, over the server's limit of {max_chars}: {advice}")
    return text


def parse_text(raw: np.ndarray | None) -> str:
    if raw is None or raw.size == 0:
        raise RequestError(f"{TEXT} is empty: send the text to speak as UTF-8 bytes (UINT8)")
    return _utf8(raw, TEXT, MAX_TEXT_CHARS, "send it in parts")


def parse_reference_text(raw: np.ndarray | None) -> str:
    """The reference's transcript, "" when absent or empty (whether the model needs one is the
    runtime's to say)."""
    if raw is None or raw.size == 0:
        return ""
    return _utf8(raw, REFERENCE_TEXT, MAX_REFERENCE_TEXT_CHARS,
                 f"a transcript says what its reference says, at most {MAX_REFERENCE_SECONDS:g} s of speech")


def scalar(get: Getter, name: str) -> np.generic | None:
    """A tensor that must hold exactly one value, or None when absent."""
    value = get(name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"{name} must hold one value, got {value.size}")
    return value.reshape(-1)[0]


def parse_reference(get: Getter, required: bool) -> Reference | None:
    """Reference audio, its rate and its transcript, bounded here; whether it holds a usable
    voice (silence, NaN, too short, a transcript missing) is the runtime's to say."""
    audio, rate = get(REFERENCE_AUDIO), scalar(get, REFERENCE_RATE)
    transcript = parse_reference_text(get(REFERENCE_TEXT))
    if audio is None:
        if rate is not None:
            raise RequestError(f"{REFERENCE_RATE} was sent without {REFERENCE_AUDIO}")
        if required:
            raise RequestError(f"send {REFERENCE_AUDIO} (FP32 mono samples) and {REFERENCE_RATE}")
        if transcript:
            raise RequestError(f"{REFERENCE_TEXT} was sent without {REFERENCE_AUDIO} (a registered voice "
                               "keeps the transcript it was registered with)")
        return None
    if rate is None:
        raise RequestError(f"{REFERENCE_AUDIO} needs its {REFERENCE_RATE}")
    rate = int(rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise RequestError(f"{REFERENCE_RATE} must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {rate}")
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    seconds = audio.size / rate
    if seconds > MAX_REFERENCE_SECONDS:
        raise RequestError(f"{REFERENCE_AUDIO} is {seconds:.1f} s, over the server's limit of "
                           f"{MAX_REFERENCE_SECONDS:g} s (the model uses at most its last 10 s)")
    return Reference(audio, rate, transcript)


def parse_speech_request(get: Getter) -> SpeechRequest:
    text = parse_text(get(TEXT))
    voice_id = scalar(get, VOICE_ID)
    reference = parse_reference(get, required=voice_id is None)
    if voice_id is not None and reference is not None:
        raise RequestError(f"send either {VOICE_ID} or {REFERENCE_AUDIO}, not both")
    options: dict[str, Any] = {}
    for name, dtype in OPTIONS.items():
        value = scalar(get, name)
        if value is not None:
            options[name] = float(value) if dtype == "FP64" else int(value)
    chunk_patches = scalar(get, CHUNK_PATCHES)
    if chunk_patches is not None and not 1 <= int(chunk_patches) <= MAX_CHUNK_PATCHES:
        raise RequestError(f"{CHUNK_PATCHES} must be an integer in [1, {MAX_CHUNK_PATCHES}], got {int(chunk_patches)}")
    return SpeechRequest(text, None if voice_id is None else int(voice_id), reference, options,
                         None if chunk_patches is None else int(chunk_patches))
