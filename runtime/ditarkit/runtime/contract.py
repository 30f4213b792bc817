"""What a runtime must know about a model, and nothing else: the bundle's model contract.

A bundle's `manifest.json` carries one `ModelContract` (onnxruntime-genai's genai_config is the
model: a JSON contract between builder and runtime). The exporter of each model family writes
it: `DiTARConfig.contract()` for the kit's own models, the VoxCPM importer for OpenBMB's. The
runtime reads only this, so the patch loop is one loop: where the families differ it is in
the values here (rates and hops, the prompt layout, the sampler's time grid and guidance, the
stop rule), each a small named piece, never a test of the family's name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

FAMILIES = ("ditar", "voxcpm", "voxcpm2")
SCHEDULES = ("cosine_vp", "rectified_flow")
TIME_GRIDS = ("uniform", "sway")
GUIDANCE = ("cfg", "cfg_zero_star")
TEXT_FRONTENDS = ("chars", "lexicon", "tokenizer")
# Named segments of a prompt layout; an int in a layout is a token id placed there.
SEGMENTS = ("text", "reference", "reference_text")


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another."""


def patches_in(seconds: float, patch_seconds: float) -> int:
    """Whole patches in a duration; the epsilon keeps 0.3 / 0.1 = 2.9999... at 3."""
    return int(seconds / patch_seconds + 1e-9)


@dataclass(frozen=True)
class CursorConfig:
    """An explicit reading position: the LM input of every speech position also carries the
    text around the character being spoken (`before` tokens before it, `after` after), and an
    advance head on each LM output says how many characters the next patch moves on (0 to
    `max_advance`). The LM no longer has to find its place in the text by attention alone,
    which a small model trained on little data does not learn (FIELD-NOTES); the runtime
    keeps the cursor, as ELLA-V and RALL-E keep the phoneme for decoder-only TTS. With a
    cursor, the LM prefix's last row (the speech start) gets the first character's vector.

    With `advance_to_locdit`, LocDiT's condition also carries the advance the LM chose, the
    length in characters of the patch it draws: an embedding of the advance head's argmax,
    added to the LM output inside the LM graph (the graph's `hidden` output is then that
    sum). The LM output alone leaves LocDiT unsure where its patch ends wherever the advance
    is uncertain, and it learns to blur the span; told the span, as a duration model tells a
    non-autoregressive TTS decoder, it renders one, and the cursor then moves by that same
    advance. Training embeds the true advance."""

    before: int = 2
    after: int = 5
    max_advance: int = 7
    advance_to_locdit: bool = False

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def validate(self) -> None:
        if self.before < 0 or self.after < 0 or self.max_advance < 1:
            raise ConfigError("cursor: before and after must be >= 0 and max_advance >= 1")


@dataclass(frozen=True)
class AudioIO:
    """Rates and hops of the VAE's two sides (VoxCPM2 encodes 16 kHz and decodes 48 kHz)."""

    sample_rate: int  # reference audio is resampled to this before encoding
    hop_length: int  # reference samples per latent frame
    output_sample_rate: int  # generated audio
    output_hop_length: int  # generated samples per latent frame
    latent_dim: int
    # Frames that influence one frame's audio: a chunk decoded with this much left context
    # gives the samples of one whole decode, which is what makes streaming exact.
    decoder_context_frames: int
    # How a reference is cut to whole patches: "trim" drops the frames that do not fill one at
    # its start (the kit's models trained so); "pad_start" / "pad_end" add silence there, as
    # VoxCPM pads a continuation prompt and a reference clip.
    reference_fit: str = "trim"

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class LMShape:
    """The LM step graph's tensors: its input width, its KV cache, and what it returns."""

    dim: int  # width of one input row (text embedding or patch vector)
    layers: int  # KV-cache layers: every stack the step graph runs (VoxCPM: base + residual)
    kv_heads: int
    head_dim: int
    cond_dim: int  # width of the condition the step returns for LocDiT
    # The step graph takes a per-row audio mask (VoxCPM quantises the LM output at patch rows
    # and feeds the residual LM their patch vectors).
    audio_mask: bool = False


@dataclass(frozen=True)
class SamplerSpec:
    """LocDiT's solver per patch: schedule, time grid, guidance, and the model's defaults."""

    schedule: str  # "cosine_vp" (v-prediction) or "rectified_flow"; t = 1 is noise
    nfe: int  # solver steps per patch; the fused sampler graph is unrolled at this
    cfg_scale: float  # guidance w: (1 + w) cond - w uncond (VoxCPM's cfg_value is w + 1)
    temperature: float  # tau: 1 starts from noise, below 1 noise enters at tau
    time_grid: str = "uniform"  # "sway": t + sway * (cos(pi t / 2) - 1 + t), VoxCPM's warp
    sway: float = 0.0
    guidance: str = "cfg"  # "cfg_zero_star": the unconditional branch scaled by its projection
    # CFG-zero*'s zero init: the first max(1, int((nfe + 1) * this)) solver steps only move t.
    zero_init_fraction: float = 0.0


@dataclass(frozen=True)
class StopRule:
    threshold: float = 0.5  # stop when sigmoid(stop logit) exceeds this
    # Whether the LM step whose stop logit fires still draws its patch. The kit's models
    # read the stop from the step after a patch (it draws nothing); VoxCPM's from the step
    # that drew it, which keeps that patch.
    draws_last: bool = False
    min_patches: int = 0  # the stop is not read before this many patches are drawn


@dataclass(frozen=True)
class PromptLayout:
    """The LM prefix, in order: "text" (the ids to speak), "reference_text" (the reference's
    transcript, spoken before the text, for continuation: tokenised with the text as one
    string, as VoxCPM does, so it takes no rows of its own), "reference" (the reference's
    patch vectors), and token ids (ints). The kit's: text (with its BOS and EOS), reference,
    speech start. VoxCPM2's reference mode: 103, reference, 104, text, 101."""

    prefix: tuple[str | int, ...]
    # LocDiT's first history: the reference's last patches ("reference"), or the patch at the
    # prefix's last position, zeros where that is a token ("prefix_end": VoxCPM).
    history: str = "reference"

    @property
    def needs_reference_text(self) -> bool:
        return "reference_text" in self.prefix

    @property
    def continues_reference(self) -> bool:
        """The speech follows the reference's last patch directly (VoxCPM v1's continuation),
        so its audio is decoded as the reference's continuation too."""
        return self.prefix[-1] == "reference"


@dataclass(frozen=True)
class TextSpec:
    frontend: str  # "chars" (the kit's symbol set), "lexicon" (+ phonemes from a lexicon file in the
    # bundle) or "tokenizer" (a tokenizer.json in the bundle)
    max_tokens: int  # longest id sequence one sentence may become
    vocab_size: int
    symbols: str = ""  # chars, lexicon: the symbol set, ids from `first_symbol_id` on
    first_symbol_id: int = 0
    bos: int | None = None  # chars, lexicon: ids around the text
    eos: int | None = None
    tokenizer_file: str = ""  # tokenizer: its file in the bundle and checksum
    tokenizer_sha256: str = ""
    phonemes: tuple[str, ...] = ()  # lexicon: its phoneme set, ids right after the symbols
    lexicon_file: str = ""  # lexicon: its file in the bundle and checksum
    lexicon_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "phonemes", tuple(self.phonemes))  # a list, read from JSON

    @property
    def files(self) -> dict[str, str]:
        """The files beside the graphs this text spec names, each with its checksum: a bundle
        carries them."""
        named = ((self.tokenizer_file, self.tokenizer_sha256), (self.lexicon_file, self.lexicon_sha256))
        return {name: digest for name, digest in named if name}


class PatchTiming:
    """Durations in patches, for a config with `patch_size`, `audio` (sample_rate, hop_length),
    `max_seconds` and `max_prompt_seconds`: the kit's model config and the contract alike."""

    @property
    def patch_seconds(self) -> float:
        return self.patch_size * self.audio.hop_length / self.audio.sample_rate

    @property
    def max_patches(self) -> int:
        return patches_in(self.max_seconds, self.patch_seconds)

    @property
    def max_prompt_patches(self) -> int:
        return patches_in(self.max_prompt_seconds, self.patch_seconds)


@dataclass(frozen=True)
class ModelContract(PatchTiming):
    family: str
    name: str
    audio: AudioIO
    lm: LMShape
    text: TextSpec
    sampler: SamplerSpec
    stop: StopRule
    prompt: PromptLayout
    patch_size: int  # latent frames per patch
    history_patches: int  # previous patches LocDiT sees
    max_seconds: float  # hard cap on generated audio per sentence
    max_prompt_seconds: float  # longer reference audio is trimmed to its last part
    cursor: CursorConfig | None = None  # the kit's text cursor, where the model has one

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes ---------------------------------------------------------------
    @property
    def max_prefix(self) -> int:
        """LM positions before the first generated patch: the text (with any transcript) at
        most `max_tokens`, the reference, and the layout's token ids."""
        tokens = sum(1 for s in self.prompt.prefix if isinstance(s, int))
        return self.text.max_tokens + self.max_prompt_patches + tokens

    @property
    def history_frames(self) -> int:
        return self.history_patches * self.patch_size

    def validate(self) -> None:
        checks = [
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (self.sampler.schedule in SCHEDULES, f"sampler.schedule must be one of {SCHEDULES}"),
            (self.sampler.time_grid in TIME_GRIDS, f"sampler.time_grid must be one of {TIME_GRIDS}"),
            (self.sampler.guidance in GUIDANCE, f"sampler.guidance must be one of {GUIDANCE}"),
            (0.0 <= self.sampler.zero_init_fraction < 1.0, "sampler.zero_init_fraction must lie in [0, 1)"),
            (self.sampler.nfe >= 1, "sampler.nfe must be at least 1"),
            (0.0 <= self.sampler.temperature <= 1.0, "sampler.temperature must lie in [0, 1]"),
            (self.text.frontend in TEXT_FRONTENDS, f"text.frontend must be one of {TEXT_FRONTENDS}"),
            (self.text.frontend != "lexicon" or bool(self.text.phonemes and self.text.lexicon_file),
             "a lexicon text frontend names its phonemes and its lexicon file"),
            (self.audio.reference_fit in ("trim", "pad_start", "pad_end"),
             "audio.reference_fit must be trim, pad_start or pad_end"),
            (self.prompt.history in ("reference", "prefix_end"), "prompt.history must be reference or prefix_end"),
            (all(isinstance(s, int) or s in SEGMENTS for s in self.prompt.prefix),
             f"prompt.prefix holds token ids and the segments {SEGMENTS}"),
            ("text" in self.prompt.prefix and "reference" in self.prompt.prefix,
             "prompt.prefix must place the text and the reference"),
            (self.patch_size >= 1 and self.history_patches >= 1, "patch_size and history_patches must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"model contract: {message}")
        if self.cursor is not None:
            self.cursor.validate()

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prompt"]["prefix"] = list(self.prompt.prefix)
        data["text"]["phonemes"] = list(self.text.phonemes)  # as JSON gives it back
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        nested = {"audio": AudioIO, "lm": LMShape, "text": TextSpec, "sampler": SamplerSpec, "stop": StopRule,
                  "prompt": PromptLayout, "cursor": CursorConfig}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model contract fields: {sorted(unknown)}")
        kwargs = {}
        for key, value in data.items():
            if key in nested and value is not None:
                fields = {f.name for f in dataclasses.fields(nested[key])}
                if set(value) - fields:
                    raise ConfigError(f"unknown fields in model contract {key}: {sorted(set(value) - fields)}")
                value = nested[key](**value)
            kwargs[key] = value
        prompt = kwargs.get("prompt")
        if isinstance(prompt, PromptLayout):
            kwargs["prompt"] = dataclasses.replace(prompt, prefix=tuple(prompt.prefix))
        return cls(**kwargs)
