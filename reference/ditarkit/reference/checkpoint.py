"""Checkpoints: a folder with `model.safetensors` (weights) and `config.json`.

Loading is strict: every key the model expects must be present with the right shape, and
no stray key is accepted; the error names each offending parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditarkit.reference.model import DiTAR
from ditarkit.runtime.config import DiTARConfig
from ditarkit.runtime.fileio import atomic_write

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def save_checkpoint(model: DiTAR, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write weights and config atomically (temporary files, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path))
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(model.config.to_json()))
    return directory


def load_config(directory: str | Path) -> DiTARConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint folder {directory}")
    try:
        return DiTARConfig.from_json(path.read_text())
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid config: {err}") from None


def load_checkpoint(directory: str | Path) -> DiTAR:
    """Build the model from the folder's config and load its weights, strictly, in fp32."""
    model = DiTAR(load_config(directory))
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in checkpoint folder {directory}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file: {err}") from None
    load_state_strict(model, {k: v.float() for k, v in tensors.items()}, str(path))
    return model


def load_state_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    problems = [f"missing {k}" for k in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - expected.keys())]
    problems += [
        f"{k}: shape {tuple(tensors[k].shape)} in checkpoint, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source} does not fit the model: {shown}")
    model.load_state_dict(tensors, strict=True)
