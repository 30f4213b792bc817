"""Checkpoints: exact round trip, strict loading with readable errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditarkit.reference.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_is_exact(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == tiny_model.config
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_wrong_shape_names_the_parameter(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    tensors["lm.stop_head.weight"] = torch.zeros(1, 7)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"lm\.stop_head\.weight: shape \(1, 7\)"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    del tensors["locdit.out_proj.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"missing locdit\.out_proj\.bias.*unexpected extra\.weight"):
        load_checkpoint(tmp_path)


def test_missing_folder_and_corrupt_file_are_clear(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tiny_model, tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)
