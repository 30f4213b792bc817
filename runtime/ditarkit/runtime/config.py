"""Every size and setting of a DiTAR system, as frozen dataclasses.

The config is plain Python (no torch): the reference model is built from it, the exporter
writes it into the bundle manifest, and the runtime reads it back from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ditarkit.runtime.contract import (
    SCHEDULES,
    AudioIO,
    ConfigError,
    CursorConfig,
    LMShape,
    ModelContract,
    PatchTiming,
    PromptLayout,
    SamplerSpec,
    StopRule,
    TextSpec,
    patches_in,
)

__all__ = ["ConfigError", "CursorConfig", "DiTARConfig", "patches_in", "preset"]

TEXT_FRONTENDS = ("chars", "lexicon")  # the kit's models read characters, or words as phonemes


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 24_000  # Hz, the rate of reference audio and of generated audio
    hop_length: int = 600  # samples per latent frame: 24000 / 600 = 40 frames/s
    latent_dim: int = 64  # channels of one latent frame

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class VAEConfig:
    """Speech VAE: STFT-domain ConvNeXt encoder, Vocos-style causal decoder.

    Both sides frame the waveform with window `n_fft` and stride `hop_length` (the audio
    config's), so there are no strided convolutions to tune: one frame per latent.
    """

    dim: int = 128  # ConvNeXt channels
    encoder_layers: int = 2
    decoder_layers: int = 4
    kernel_size: int = 7  # depthwise conv taps; the decoder's are causal (left-padded)
    n_fft: int = 1200  # analysis and synthesis window: 2 x hop, 50% overlap
    max_log_magnitude: float = 6.0  # clamp before exp() so fp16 never overflows

    @property
    def decoder_receptive_frames(self) -> int:
        """Frames that influence one frame's audio: the input conv and each block add
        kernel - 1 past frames, overlap-add one more. Streaming decodes with this context."""
        return (self.decoder_layers + 1) * (self.kernel_size - 1) + 1


@dataclass(frozen=True)
class TransformerConfig:
    """A pre-norm RMSNorm Transformer stack with rotary positions and SwiGLU MLPs."""

    dim: int
    layers: int
    heads: int
    kv_heads: int  # < heads means grouped-query attention
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = round(mlp_ratio * dim)
    rope_base: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(round(self.mlp_ratio * self.dim / 8)) * 8

    def validate(self, name: str) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"{name}: dim {self.dim} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{name}: heads {self.heads} not divisible by kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{name}: head_dim {self.head_dim} must be even for rotary positions")


@dataclass(frozen=True)
class TextConfig:
    """Text frontend: which symbol set, and the special token ids that precede it."""

    frontend: str = "chars"  # "chars"; or "lexicon": words the lexicon lists as its phonemes
    # Lower-case letters, digits, space and the punctuation that changes prosody.
    symbols: str = " abcdefghijklmnopqrstuvwxyz0123456789'.,?!-:;"
    max_tokens: int = 400
    # lexicon: the phoneme set (ids after the symbols, which still spell the words it lacks) and
    # the checksum of the kit's packaged lexicon the model was trained with
    phonemes: tuple[str, ...] = ()
    lexicon_sha256: str = ""

    # Special tokens live in the same embedding table, before the symbols.
    PAD = 0
    BOS = 1  # starts the text
    EOS = 2  # ends the text
    SPEECH_START = 3  # follows the prompt's patches; its LM output predicts the first patch
    NUM_SPECIAL = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "phonemes", tuple(self.phonemes))  # a list, read from JSON

    @property
    def vocab_size(self) -> int:
        return self.NUM_SPECIAL + len(self.symbols) + len(self.phonemes)

    def spec(self) -> TextSpec:
        """The runtime's view: which ids the symbols and the text's ends take."""
        lexicon = {}
        if self.frontend == "lexicon":
            from ditarkit.runtime.lexicon import LEXICON_FILE

            lexicon = {"phonemes": self.phonemes, "lexicon_file": LEXICON_FILE, "lexicon_sha256": self.lexicon_sha256}
        return TextSpec(self.frontend, self.max_tokens, self.vocab_size, self.symbols, self.NUM_SPECIAL, self.BOS,
                        self.EOS, **lexicon)

    def validate(self) -> None:
        if self.frontend not in TEXT_FRONTENDS:
            raise ConfigError(f"text.frontend must be one of {TEXT_FRONTENDS}")
        if (self.frontend == "lexicon") != bool(self.phonemes and self.lexicon_sha256):
            raise ConfigError("text: a lexicon frontend, and only one, has phonemes and a lexicon checksum")


def lexicon_text(base: TextConfig | None = None) -> TextConfig:
    """`base` (default: the kit's characters) reading words as phonemes from the kit's packaged
    lexicon: the symbols keep their ids, the phonemes come after them."""
    from ditarkit.runtime.lexicon import LEXICON_FILE, PACKAGED_LEXICON_DIR, PHONEMES
    from ditarkit.runtime.manifest import file_sha256

    base = base or TextConfig()
    return dataclasses.replace(base, frontend="lexicon", phonemes=PHONEMES,
                               lexicon_sha256=file_sha256(PACKAGED_LEXICON_DIR / LEXICON_FILE))


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine_vp"  # paper: x_t = cos(pi t/2) x0 + sin(pi t/2) eps, v-prediction
    nfe: int = 10  # solver steps per patch
    cfg_scale: float = 2.0  # w in out = (1 + w) cond - w uncond
    temperature: float = 0.5  # tau: the time at which noise enters the reverse ODE
    cond_dropout: float = 0.1  # training: LM output replaced by zeros with this probability
    time_embed_dim: int = 256  # sinusoidal features before the time MLP


@dataclass(frozen=True)
class DiTARConfig(PatchTiming):
    name: str = "custom"
    audio: AudioConfig = field(default_factory=AudioConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    aggregator: TransformerConfig = field(default_factory=lambda: TransformerConfig(128, 1, 4, 4))
    lm: TransformerConfig = field(default_factory=lambda: TransformerConfig(256, 4, 8, 4))
    locdit: TransformerConfig = field(default_factory=lambda: TransformerConfig(256, 3, 8, 8))
    patch_size: int = 4  # latent frames per patch: 40 frames/s / 4 = LM at 10 Hz
    history_patches: int = 2  # clean previous patches LocDiT sees as prefix
    # LocDiT's history tokens attend only among themselves: their keys and values then depend
    # on the history alone, so a runtime can compute them once per patch and share them between
    # both guidance branches and every solver step. False (all tokens see all) in checkpoints
    # made before the choice existed.
    isolated_history: bool = False
    cursor: CursorConfig | None = None  # None: the text is found by attention alone (the paper's LM)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stop_threshold: float = 0.5  # stop when sigmoid(stop logit) exceeds this
    max_seconds: float = 30.0  # hard cap on generated audio per call
    max_prompt_seconds: float = 10.0  # longer reference audio is trimmed to its last part

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes (and PatchTiming's) ----------------------------------------------
    @property
    def max_prefix(self) -> int:
        """LM positions before the first generated patch: text, prompt, speech-start."""
        return self.text.max_tokens + self.max_prompt_patches + 1

    @property
    def history_frames(self) -> int:
        return self.history_patches * self.patch_size

    @property
    def locdit_tokens(self) -> int:
        """Condition token + history frames + target frames."""
        return 1 + self.history_frames + self.patch_size

    def validate(self) -> None:
        for name in ("aggregator", "lm", "locdit"):
            getattr(self, name).validate(name)
        if self.vae.n_fft % self.audio.hop_length or self.vae.n_fft // self.audio.hop_length != 2:
            raise ConfigError("vae.n_fft must be exactly 2 x hop_length (50% overlap-add)")
        if self.diffusion.schedule not in SCHEDULES:
            raise ConfigError(f"diffusion.schedule must be one of {SCHEDULES}")
        self.text.validate()
        if self.patch_size < 1 or self.history_patches < 1:
            raise ConfigError("patch_size and history_patches must be at least 1")
        if not 0.0 <= self.diffusion.temperature <= 1.0:
            raise ConfigError("diffusion.temperature must lie in [0, 1]")
        if self.diffusion.nfe < 1:
            raise ConfigError("diffusion.nfe must be at least 1")
        if self.cursor is not None:
            self.cursor.validate()

    def contract(self) -> ModelContract:
        """What a runtime needs of this model: the bundle manifest's `model` section."""
        audio, text, diffusion = self.audio, self.text, self.diffusion
        return ModelContract(
            family="ditar",
            name=self.name,
            audio=AudioIO(audio.sample_rate, audio.hop_length, audio.sample_rate, audio.hop_length,
                          audio.latent_dim, self.vae.decoder_receptive_frames),
            lm=LMShape(self.lm.dim, self.lm.layers, self.lm.kv_heads, self.lm.head_dim, cond_dim=self.lm.dim),
            text=text.spec(),
            sampler=SamplerSpec(diffusion.schedule, diffusion.nfe, diffusion.cfg_scale, diffusion.temperature),
            stop=StopRule(self.stop_threshold),
            prompt=PromptLayout(("text", "reference", text.SPEECH_START)),
            patch_size=self.patch_size,
            history_patches=self.history_patches,
            max_seconds=self.max_seconds,
            max_prompt_seconds=self.max_prompt_seconds,
            cursor=self.cursor,
        )

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["text"]["phonemes"] = list(self.text.phonemes)  # as JSON gives it back
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTARConfig:
        nested = {
            "audio": AudioConfig,
            "vae": VAEConfig,
            "aggregator": TransformerConfig,
            "lm": TransformerConfig,
            "locdit": TransformerConfig,
            "text": TextConfig,
            "diffusion": DiffusionConfig,
            "cursor": CursorConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        kwargs = {k: (nested[k](**v) if k in nested and v is not None else v) for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> DiTARConfig:
        return cls.from_dict(json.loads(text))


def _tiny() -> DiTARConfig:
    """For tests: a whole 1 s synthesis runs in well under a second on a CPU."""
    return DiTARConfig(
        name="tiny",
        vae=VAEConfig(dim=32, encoder_layers=1, decoder_layers=2),
        aggregator=TransformerConfig(dim=32, layers=1, heads=2, kv_heads=2),
        lm=TransformerConfig(dim=64, layers=2, heads=4, kv_heads=2),
        locdit=TransformerConfig(dim=48, layers=2, heads=4, kv_heads=4),
        diffusion=DiffusionConfig(time_embed_dim=32),
        max_seconds=10.0,
        cursor=CursorConfig(),  # so every test of the graphs and the loop runs the cursor too
    )


def _small() -> DiTARConfig:
    """The size of the default voice: trainable on one GPU in hours, real time on a CPU."""
    return DiTARConfig(
        name="small",
        vae=VAEConfig(dim=192, encoder_layers=3, decoder_layers=6),
        aggregator=TransformerConfig(dim=192, layers=2, heads=6, kv_heads=6),
        lm=TransformerConfig(dim=320, layers=6, heads=8, kv_heads=4),
        # LocDiT runs nfe x 2 branches per patch: at 192 wide it keeps a 2-core CPU real time.
        locdit=TransformerConfig(dim=192, layers=4, heads=6, kv_heads=6),
        isolated_history=True,
        cursor=CursorConfig(),
    )


def _proxy() -> DiTARConfig:
    """For quick training trials of a recipe: the small preset's VAE (so the shipped one can be
    reused) under a smaller LM and LocDiT, a step several times cheaper on a CPU."""
    small = _small()
    return dataclasses.replace(
        small,
        name="proxy",
        lm=TransformerConfig(dim=256, layers=4, heads=8, kv_heads=4),
        locdit=TransformerConfig(dim=192, layers=3, heads=6, kv_heads=6),
        isolated_history=True,
    )


def _paper() -> DiTARConfig:
    """~0.6B parameters like the paper's system: for speed measurements with random weights."""
    return DiTARConfig(
        name="paper",
        vae=VAEConfig(dim=768, encoder_layers=8, decoder_layers=12),
        aggregator=TransformerConfig(dim=1024, layers=4, heads=16, kv_heads=16),
        lm=TransformerConfig(dim=1024, layers=24, heads=16, kv_heads=16),
        locdit=TransformerConfig(dim=1024, layers=8, heads=16, kv_heads=16),
    )


PRESETS = {"tiny": _tiny, "proxy": _proxy, "small": _small, "paper": _paper}


def preset(name: str) -> DiTARConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
