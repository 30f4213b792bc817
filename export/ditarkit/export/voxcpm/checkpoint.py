"""Strict loading of an OpenBMB VoxCPM checkpoint folder into the `voxcpm` package's own modules.

The package's `from_local` loads with `strict=False`, so a renamed, missing or misshapen tensor
leaves a randomly initialised layer behind without a word. Here every key, shape and dtype kind
is checked against the module that config.json builds, the AudioVAE's weight norm is folded into
plain weights (what an ONNX graph wants), and everything is fp32 (bf16 files convert exactly).
Every failure is a `VoxCPMCheckpointError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import pickle
import sys
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn.utils import remove_weight_norm
from torch.nn.utils.weight_norm import WeightNorm

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# In the package's order of preference (`from_local`): the first one present is read.
LM_FILES = ("model.safetensors", "pytorch_model.bin")
VAE_FILES = ("audiovae.safetensors", "audiovae.pth")
VAE_PREFIX = "audio_vae."  # where from_local puts the VAE's keys inside the model's state
# A config.json without "architecture" is v1: the package's own default (core.py).
DEFAULT_ARCHITECTURE = "voxcpm"
# architecture -> (module, model class, config class, VAE class, VAE config class), all the package's.
_CLASSES = {
    "voxcpm": ("voxcpm.model.voxcpm", "VoxCPMModel", "VoxCPMConfig", "AudioVAE", "AudioVAEConfig"),
    "voxcpm2": ("voxcpm.model.voxcpm2", "VoxCPM2Model", "VoxCPMConfig", "AudioVAEV2", "AudioVAEConfigV2"),
}
ARCHITECTURES = tuple(_CLASSES)
# Modules voxcpm's model files import at the top but use only outside building and running the
# networks: transformers (LlamaTokenizerFast in from_local; a type hint), torchaudio and librosa
# (reading prompt wavs in generate), huggingface_hub (downloads). torchaudio has no release for
# the pinned torch, and the rest are large; where one is absent a placeholder stands in for the
# import only, and using it raises (see _Absent).
UNUSED_IMPORTS = ("transformers", "torchaudio", "librosa", "huggingface_hub")
NAMES_SHOWN = 6  # offending keys named in one message before "and N more": one readable line


class VoxCPMCheckpointError(ValueError):
    """A VoxCPM checkpoint folder is missing a file, unreadable, or does not fit its config."""

    def __init__(self, message: str) -> None:
        # Library messages (pydantic, safetensors, torch) span lines; ours never do.
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class _Absent(types.ModuleType):
    """Stands in for a module voxcpm imports but does not need here; any use of it raises."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # import machinery probing dunders: behave like a plain module
            raise AttributeError(attr)
        qualified = f"{self.__name__}.{attr}"

        def absent(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{qualified} is not installed: ditarkit loads voxcpm for export only")

        return type(attr, (), {"__new__": absent, "from_pretrained": staticmethod(absent)})


def import_voxcpm(architecture: str) -> dict[str, Any]:
    """The package's model, config, VAE and VAE config classes for one architecture."""
    module_name, *names = _CLASSES[architecture]
    absent = [n for n in UNUSED_IMPORTS if n not in sys.modules and importlib.util.find_spec(n) is None]
    sys.modules.update({n: _Absent(n) for n in absent})
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise VoxCPMCheckpointError(f"cannot import voxcpm's model code ({err}): pip install voxcpm==2.0.3") from None
    finally:
        for name in absent:  # the placeholders served voxcpm's import; nobody else should see them
            if isinstance(sys.modules.get(name), _Absent):
                del sys.modules[name]
    return dict(zip(("model", "config", "vae", "vae_config"), (getattr(module, n) for n in names)))


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise VoxCPMCheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise VoxCPMCheckpointError(f"{folder}: no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VoxCPMCheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise VoxCPMCheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def detect_architecture(folder: str | Path) -> str:
    """'voxcpm' (v1: 0.5B, 1.5) or 'voxcpm2', from config.json's "architecture" as the package reads it."""
    architecture = read_config(folder).get("architecture", DEFAULT_ARCHITECTURE)
    if not isinstance(architecture, str) or architecture.lower() not in ARCHITECTURES:
        raise VoxCPMCheckpointError(
            f"{Path(folder) / CONFIG_FILE}: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
        )
    return architecture.lower()


def load_voxcpm(folder: str | Path) -> tuple[torch.nn.Module, str, Any]:
    """(model, architecture, config): the package's module in eval mode, fp32, weight norm folded, no grads.

    `config` is the package's pydantic config as validated from config.json, with dtype and device
    set to what was built (float32, cpu).
    """
    folder = Path(folder)
    architecture = detect_architecture(folder)
    classes = import_voxcpm(architecture)
    config = _validate(classes["config"], read_config(folder), folder / CONFIG_FILE, architecture)
    vocab = read_tokenizer_vocab(folder / TOKENIZER_FILE, config.lm_config.vocab_size)
    lm_path = _first_present(folder, LM_FILES, "LM weights")
    vae_path = _first_present(folder, VAE_FILES, "AudioVAE weights")
    lm_state, vae_state = read_state_dict(lm_path), read_state_dict(vae_path)
    # fp32 throughout: bf16 values convert exactly, and the KV caches the constructor allocates
    # and the inputs generate() casts follow config.dtype.
    config.dtype, config.device = "float32", "cpu"
    try:  # as from_local does: a config without audio_vae_config means the package's default VAE
        with contextlib.redirect_stdout(sys.stderr):  # the package prints where it runs: a log, not a result
            vae = classes["vae"](config.audio_vae_config) if config.audio_vae_config else classes["vae"]()
            model = classes["model"](config, VocabOnlyTokenizer(vocab), vae, device="cpu")
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError) as err:
        raise VoxCPMCheckpointError(f"{folder}: cannot build the {architecture} model: {err}") from None
    expected = model.state_dict()
    lm_expected = {k: v for k, v in expected.items() if not k.startswith(VAE_PREFIX)}
    vae_expected = {k.removeprefix(VAE_PREFIX): v for k, v in expected.items() if k.startswith(VAE_PREFIX)}
    check_state(lm_expected, lm_state, lm_path, architecture)
    # A config that lost audio_vae_config fails here on nearly every key: say which VAE was built.
    note = "" if config.audio_vae_config else f" (no audio_vae_config in {CONFIG_FILE}: the package's default VAE)"
    check_state(vae_expected, vae_state, vae_path, architecture, note)
    model.load_state_dict(lm_state | {VAE_PREFIX + k: v for k, v in vae_state.items()}, strict=True)
    fold_weight_norm(model.audio_vae)
    return model.float().eval().requires_grad_(False), architecture, config


def _validate(config_class: Any, raw: dict[str, Any], path: Path, architecture: str) -> Any:
    from pydantic import ValidationError  # a dependency of voxcpm, importable once it is

    try:
        return config_class.model_validate(raw)
    except ValidationError as err:
        shown = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()]
        raise VoxCPMCheckpointError(f"{path}: does not fit the {architecture} config: {_summary(shown)}") from None


class VocabOnlyTokenizer:
    """What the package's constructor reads of its tokenizer: the vocabulary (mask_multichar_chinese_tokens).

    The export takes text tokens from tokenizer.json on its own; tokenizing through the loaded
    model (generate) needs the package's LlamaTokenizerFast and is refused here rather than guessed.
    """

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        raise RuntimeError("this model was loaded for export: tokenize with tokenizer.json (LlamaTokenizerFast)")

    convert_tokens_to_ids = tokenize


def read_tokenizer_vocab(path: Path, vocab_size: int) -> dict[str, int]:
    """token -> id from a Hugging Face tokenizer.json (model vocab and added tokens), checked against the LM."""
    if not path.is_file():
        raise VoxCPMCheckpointError(f"{path.parent}: no {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        listed = data["model"]["vocab"]  # BPE: {token: id}; Unigram: [[token, score], ...]
        vocab = dict(listed) if isinstance(listed, dict) else {entry[0]: i for i, entry in enumerate(listed)}
        vocab |= {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise VoxCPMCheckpointError(
            f"{path}: not a tokenizer.json with a vocabulary ({type(err).__name__}: {err})"
        ) from None
    if not vocab or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise VoxCPMCheckpointError(f"{path}: the vocabulary is empty or has non-integer ids")
    if max(vocab.values()) >= vocab_size:  # such a token would index past the LM's embedding table
        raise VoxCPMCheckpointError(
            f"{path}: token ids reach {max(vocab.values())}, but lm_config.vocab_size is {vocab_size}"
        )
    return vocab


def _first_present(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise VoxCPMCheckpointError(f"{folder}: no {what} (expected {' or '.join(names)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a torch.save'd dict (optionally under "state_dict")."""
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        else:  # weights_only: a checkpoint is data, never code to unpickle
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's advice runs to a page; its last clause names the culprit
        culprit = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), str(err))
        raise VoxCPMCheckpointError(f"{path}: holds more than tensors: {culprit.split('. ')[0]}") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err)
        if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):  # torch says only "Invalid argument"
            reason = "not a complete torch.save archive"
        raise VoxCPMCheckpointError(f"{path}: unreadable or truncated weight file: {reason}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # the package accepts this wrapper (from_local) and so do we
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise VoxCPMCheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(state)


def check_state(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    path: Path,
    architecture: str,
    note: str = "",
) -> None:
    """Raise naming every missing, unexpected, misshapen or wrong-kind tensor of `path`."""
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    for key in sorted(expected.keys() & found.keys()):
        want, have = expected[key], found[key]
        if have.shape != want.shape:
            problems.append(f"{key}: shape {tuple(have.shape)} in file, {tuple(want.shape)} in model")
        elif have.is_floating_point() != want.is_floating_point():  # an int buffer is not a weight
            problems.append(f"{key}: dtype {have.dtype} in file, {want.dtype} in model")
    if problems:
        raise VoxCPMCheckpointError(
            f"{path}: does not fit the {architecture} model built from {CONFIG_FILE}{note}: {_summary(problems)}"
        )


def _summary(items: list[str]) -> str:
    more = f"; and {len(items) - NAMES_SHOWN} more" if len(items) > NAMES_SHOWN else ""
    return f"{len(items)} problem(s): " + "; ".join(items[:NAMES_SHOWN]) + more


def fold_weight_norm(module: torch.nn.Module) -> int:
    """Replace each weight-normed (weight_g, weight_v) pair by the plain weight it computes; the count folded.

    remove_weight_norm computes g * v / ||v|| with the same function the forward hook runs, so
    outputs stay as they were and the graph loses the per-call renormalisation.
    """
    folded = 0
    for sub in module.modules():
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(sub, hook.name)
                folded += 1
    return folded
