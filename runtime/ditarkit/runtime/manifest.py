"""The bundle manifest: the contract between the exporter and every runtime backend.

`graph_signatures` is the one definition of each graph's inputs, outputs, dtypes and
dynamic dimensions (with min/opt/max ranges, which are also the TensorRT profiles). The
exporter names tensors from it and writes it to `manifest.json`; runtimes and tests read
the manifest back and address tensors only through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.runtime import __version__
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.fileio import atomic_write

FORMAT_VERSION = 3  # bumped when the graphs' contract changes; other versions are refused
MANIFEST_FILE = "manifest.json"

# Graph names, which are also the ONNX file stems.
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
TEXT_EMBEDDING = "text_embedding"
PATCH_ENCODER = "patch_encoder"
LM = "lm"
LOCDIT = "locdit"
LOCDIT_SAMPLER = "locdit_sampler"  # the whole guided NFE loop of one patch, unrolled at the model's NFE
TEXT_CURSOR = "text_cursor"  # models with a text cursor only (config.cursor)
GRAPH_NAMES = (VAE_ENCODER, VAE_DECODER, TEXT_EMBEDDING, PATCH_ENCODER, LM, LOCDIT, LOCDIT_SAMPLER)

# The LM step's tensors: the runtimes bind its KV cache by these names.
LM_EMBEDS = "embeds"
LM_AUDIO_MASK = "audio_mask"  # models whose step depends on which rows are patches (contract.lm.audio_mask)
LM_PAST_KEYS = "past_keys"
LM_PAST_VALUES = "past_values"
LM_POSITION = "position"
LM_HIDDEN = "hidden"
LM_STOP_LOGIT = "stop_logit"
LM_NEW_KEYS = "new_keys"
LM_NEW_VALUES = "new_values"
LM_ADVANCE_LOGITS = "advance_logits"  # models with a text cursor only

SAMPLER_RENOISE_STEP = "renoise_step"
KV_CACHE_NOTE = "outputs hold only the new positions; the runtime writes them at `position`"

# ONNX metadata_props keys stamped into every graph, checked when a session is created.
META_KIT_VERSION = "ditarkit.kit_version"
META_SIGNATURE = "ditarkit.signature"


class BundleError(ValueError):
    """A bundle is missing, corrupt, from another kit version, or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple[int | str, ...]  # ints are fixed; strings name a dynamic dimension

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, tuple[int, int, int]]  # dynamic dimension -> (min, opt, max)
    file: str = ""
    sha256: str = ""
    data_file: str = ""  # the weights' file beside a graph too large for one (ONNX external data)
    data_sha256: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def bind(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds keyed by the graph's input names; a wrong or missing name is a bug."""
        if set(arrays) != set(self.input_names):
            raise KeyError(f"{self.name}: inputs are {self.input_names}, got {sorted(arrays)}")
        return arrays

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Validate dtypes, fixed sizes and dynamic ranges (tests and debugging; the hot
        loop skips it)."""
        seen: dict[str, int] = {}
        for spec in self.inputs:
            array = feeds[spec.name]
            if array.dtype != np.dtype(spec.dtype) or array.ndim != len(spec.shape):
                raise ValueError(f"{self.name}.{spec.name}: expected {spec.dtype}{list(spec.shape)}, "
                                 f"got {array.dtype}{list(array.shape)}")
            for want, got in zip(spec.shape, array.shape):
                if isinstance(want, int):
                    ok = want == got
                else:
                    lo, _, hi = self.dims[want]
                    ok = lo <= got <= hi and seen.setdefault(want, got) == got
                if not ok:
                    raise ValueError(f"{self.name}.{spec.name}: shape {list(array.shape)} does not fit "
                                     f"{list(spec.shape)} with ranges {self.dims}")

    def to_dict(self) -> dict[str, Any]:
        tensors = lambda ts: [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        data = {"data_file": self.data_file, "data_sha256": self.data_sha256} if self.data_file else {}
        return {"file": self.file, "sha256": self.sha256, **data, "inputs": tensors(self.inputs),
                "outputs": tensors(self.outputs), "dims": {k: list(v) for k, v in self.dims.items()}}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> GraphSpec:
        tensors = lambda ts: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in ts)  # noqa: E731
        return cls(name, tensors(data["inputs"]), tensors(data["outputs"]),
                   {k: tuple(v) for k, v in data["dims"].items()}, data["file"], data["sha256"],
                   data.get("data_file", ""), data.get("data_sha256", ""))

    @property
    def files(self) -> list[str]:
        """The bundle's files of this graph: the ONNX file, and its weights' file if apart."""
        return [self.file, self.data_file] if self.data_file else [self.file]


def graph_signatures(cfg: ModelContract) -> dict[str, GraphSpec]:
    """Every graph's I/O: the `GRAPH_NAMES` every model has, the text cursor's graph and LM
    output where the model has one, the LM's audio mask where its step needs it. Floating I/O
    is float32 at every precision (an fp16 bundle casts inside its graphs), so a runtime feeds
    the same arrays to any bundle."""
    f32, i64 = "float32", "int64"
    c, p, hop = cfg.audio.latent_dim, cfg.patch_size, cfg.audio.hop_length
    lm = cfg.lm
    kv = (lm.layers, 1, lm.kv_heads, "capacity", lm.head_dim)  # (L, B=1, Hkv, slots, hd)
    new_kv = (lm.layers, 1, lm.kv_heads, "steps", lm.head_dim)
    max_frames = cfg.max_patches * p
    stream_frames = cfg.audio.decoder_context_frames + p
    prompt_frames = cfg.max_prompt_patches * p
    max_positions = cfg.max_prefix + cfg.max_patches
    spec = GraphSpec
    advance = (TensorSpec(LM_ADVANCE_LOGITS, f32, (1, cfg.cursor.max_advance + 1)),) if cfg.cursor else ()
    audio_mask = (TensorSpec(LM_AUDIO_MASK, f32, (1, "steps")),) if lm.audio_mask else ()  # 1 at patch rows
    graphs = {
        VAE_ENCODER: spec(
            VAE_ENCODER,
            (TensorSpec("audio", f32, (1, "samples")),),  # samples = frames * hop
            (TensorSpec("latents", f32, (1, "frames", c)),),
            {"samples": _span(cfg.history_frames * hop, 5 * cfg.audio.sample_rate, prompt_frames * hop)},
        ),
        VAE_DECODER: spec(
            VAE_DECODER,
            (TensorSpec("latents", f32, (1, "frames", c)),),
            (TensorSpec("audio", f32, (1, "samples")),),
            {"frames": _span(1, stream_frames, max_frames + stream_frames)},
        ),
        TEXT_EMBEDDING: spec(
            TEXT_EMBEDDING,
            (TensorSpec("ids", i64, ("tokens",)),),
            (TensorSpec("embeds", f32, ("tokens", lm.dim)),),
            {"tokens": _span(1, 64, cfg.text.max_tokens)},
        ),
        PATCH_ENCODER: spec(
            PATCH_ENCODER,
            (TensorSpec("patches", f32, ("patches", p, c)),),
            (TensorSpec("vectors", f32, ("patches", lm.dim)),),
            {"patches": _span(1, 1, cfg.max_prompt_patches)},
        ),
        LM: spec(
            LM,
            (
                TensorSpec(LM_EMBEDS, f32, (1, "steps", lm.dim)),
                *audio_mask,
                TensorSpec(LM_PAST_KEYS, f32, kv),
                TensorSpec(LM_PAST_VALUES, f32, kv),
                TensorSpec(LM_POSITION, i64, (1,)),  # filled cache slots = first new position
            ),
            (
                # LocDiT's condition from the last new position (cursor.advance_to_locdit: with the advance told)
                TensorSpec(LM_HIDDEN, f32, (1, lm.cond_dim)),
                TensorSpec(LM_STOP_LOGIT, f32, (1,)),
                TensorSpec(LM_NEW_KEYS, f32, new_kv),  # only the new slots: no input/output aliasing
                TensorSpec(LM_NEW_VALUES, f32, new_kv),
                *advance,  # at the last new position, like the stop logit
            ),
            {"steps": _span(1, 1, cfg.max_prefix), "capacity": _span(1, max_positions // 2, max_positions)},
        ),
        LOCDIT: spec(
            LOCDIT,
            (
                TensorSpec("x", f32, ("batch", p, c)),
                TensorSpec("t", f32, ("batch",)),
                TensorSpec("cond", f32, ("batch", lm.cond_dim)),
                TensorSpec("history", f32, ("batch", cfg.history_frames, c)),
            ),
            (TensorSpec("velocity", f32, ("batch", p, c)),),
            {"batch": _span(1, 2, 8)},  # 2 = both guidance branches in one call
        ),
        LOCDIT_SAMPLER: spec(
            LOCDIT_SAMPLER,
            (
                TensorSpec("x_init", f32, (p, c)),  # starting state: noise (tau = 1) or zeros
                TensorSpec("renoise", f32, (p, c)),  # the noise that enters at tau
                TensorSpec(SAMPLER_RENOISE_STEP, i64, (1,)),  # solver step it enters at; -1 = none
                TensorSpec("cfg_scale", f32, (1,)),
                TensorSpec("cond", f32, (lm.cond_dim,)),
                TensorSpec("history", f32, (cfg.history_frames, c)),
            ),
            (TensorSpec("patch", f32, (p, c)),),
            {},
        ),
    }
    if cfg.cursor:
        graphs[TEXT_CURSOR] = spec(
            TEXT_CURSOR,
            (TensorSpec("ids", i64, ("tokens",)),),  # the whole text, BOS and EOS included
            (TensorSpec("cursor", f32, ("tokens", lm.dim)),),  # row i: added while text token i is spoken
            {"tokens": _span(1, 64, cfg.text.max_tokens)},
        )
    return graphs


def _span(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """A dynamic dimension's (min, opt, max): the usual size, within what the model allows."""
    return low, min(max(opt, low), high), high


def signature_digest(config: ModelContract, graph: GraphSpec) -> str:
    """Identifies a graph's contract (model contract + I/O, not where its files are); stamped
    into the ONNX file."""
    contract = dataclasses.replace(graph, file="", sha256="", data_file="", data_sha256="").to_dict()
    payload = json.dumps({"config": config.to_dict(), "graph": contract}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    config: ModelContract  # written as "model"
    precision: str  # fp32, fp16, int8, fp8
    opset: int
    graphs: dict[str, GraphSpec]
    kit_version: str = __version__
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] = field(default_factory=dict)  # what was quantized, and how
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint it came from

    @property
    def decoder_context_frames(self) -> int:
        return self.config.audio.decoder_context_frames

    def derived(self) -> dict[str, dict[str, Any]]:
        """The sections written for readers that do not know the config's layout. They repeat
        what the config says, so `load_manifest` checks them against it: an edit to either
        that the other does not share is refused, never silently ignored."""
        lm = self.config.lm
        return {
            "kv_cache": {
                "layout": "[layers, batch, kv_heads, capacity, head_dim]",
                "layers": lm.layers, "kv_heads": lm.kv_heads, "head_dim": lm.head_dim,
                "inputs": [LM_PAST_KEYS, LM_PAST_VALUES], "outputs": [LM_NEW_KEYS, LM_NEW_VALUES],
                "shared_buffer": False,
                "note": KV_CACHE_NOTE,
            },
            "streaming": {"decoder_context_frames": self.decoder_context_frames},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kit_version": self.kit_version,
            "precision": self.precision,
            "opset": self.opset,
            "model": self.config.to_dict(),
            **self.derived(),
            "quantization": self.quantization,
            "source": self.source,
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            config=ModelContract.from_dict(data["model"]),
            precision=data["precision"],
            opset=data["opset"],
            graphs={n: GraphSpec.from_dict(n, g) for n, g in data["graphs"].items()},
            kit_version=data["kit_version"],
            format_version=data["format_version"],
            quantization=data.get("quantization", {}),
            source=data.get("source", {}),
        )

    def save(self, bundle: str | Path) -> Path:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        return atomic_write(Path(bundle) / MANIFEST_FILE, lambda p: Path(p).write_text(text))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle: str | Path, verify_files: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with `verify_files`, every graph file's checksum."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle} is not a ditarkit bundle: no {MANIFEST_FILE}")
    try:
        data = json.loads(path.read_text())
        version = data["format_version"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path} is not a valid manifest") from None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{bundle} was made by ditarkit {data.get('kit_version', '?')} (bundle format {version}); "
            f"this is ditarkit {__version__} (format {FORMAT_VERSION}): re-export it with this version"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path} is not a valid manifest: {err}") from None
    missing = [n for n in graph_signatures(manifest.config) if n not in manifest.graphs]
    if missing:
        raise BundleError(f"{path} lacks graphs {missing}")
    check_derived(data, manifest, path)
    if verify_files:
        for graph in manifest.graphs.values():
            verify_graph_file(bundle, graph)
        for name, digest in manifest.config.text.files.items():  # a tokenizer, a lexicon
            verify_file(bundle / name, digest)
    return manifest


def check_derived(data: Mapping[str, Any], manifest: Manifest, path: Path) -> None:
    """Every field of the manifest's `kv_cache` and `streaming` sections must say what the
    model config says (the note aside, which is prose)."""
    for section, fields in manifest.derived().items():
        written = data.get(section)
        if not isinstance(written, Mapping):
            raise BundleError(f"{path} lacks its {section!r} section")
        for key, want in fields.items():
            got = written.get(key)
            if key != "note" and got != want:
                raise BundleError(f"{path}: {section}.{key} is {got!r} but the model config gives {want!r} "
                                  "(an edited manifest): re-export the bundle")


def verify_graph_file(bundle: Path, graph: GraphSpec) -> None:
    for name, digest in ((graph.file, graph.sha256), (graph.data_file, graph.data_sha256)):
        if name:
            verify_file(bundle / name, digest)


def verify_file(path: Path, digest: str) -> None:
    """The file is there and, where the manifest records a checksum, matches it."""
    if not path.is_file():
        raise BundleError(f"{path} is missing from the bundle")
    if digest and file_sha256(path) != digest.lower():
        raise BundleError(f"{path} does not match its checksum in the manifest (corrupt or edited)")


def with_files(spec: GraphSpec, path: Path, data: Path | None = None) -> GraphSpec:
    """The spec of a graph written to `path` (and its weights to `data`), with checksums."""
    return dataclasses.replace(spec, file=path.name, sha256=file_sha256(path), data_file=data.name if data else "",
                               data_sha256=file_sha256(data) if data else "")
