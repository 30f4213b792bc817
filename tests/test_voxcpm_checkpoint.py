"""Strict VoxCPM checkpoint loading, checked against the `voxcpm` package's own modules and loader."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError, import_voxcpm

# Through the loader's placeholders for the modules voxcpm imports but its model code never uses;
# where voxcpm is not installed this fails quietly and importorskip says so.
with contextlib.suppress(VoxCPMCheckpointError):
    import_voxcpm("voxcpm")
pytest.importorskip("voxcpm", reason="voxcpm==2.0.3 (the oracle for VoxCPM loading) is not installed")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from voxcpm_oracle import (  # noqa: E402
    FORMATS,
    build_package_model,
    package_from_local,
    save_tensors,
    split_state,
    tiny_config,
    tokenizer_json,
    write_checkpoint,
)

from ditarkit.export.voxcpm import ARCHITECTURES, detect_architecture, load_voxcpm  # noqa: E402
from ditarkit.export.voxcpm.checkpoint import VAE_PREFIX  # noqa: E402

# voxcpm builds its VAE with torch's deprecated (hook-based) weight_norm: known, and folded here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

# Folding computes g * v / ||v|| once with the same torch function the weight-norm hook runs on
# every call, so the folded VAE's output is expected bit for bit; the bound only leaves room for a
# kernel choosing another summation order on other hardware (fp32 rounding of values near 1).
FOLDED_VAE_ATOL = 1e-6


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One release-like folder (safetensors bf16 + wrapped audiovae.pth) per architecture."""
    root = tmp_path_factory.mktemp("voxcpm")
    return {
        arch: write_checkpoint(root / arch, tiny_config(arch), build_package_model(tiny_config(arch), seed=1))
        for arch in ARCHITECTURES
    }


def _vae_input(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (1, D, T), waveform (1, 1, samples)): random, fixed seed."""
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, model.audio_vae.latent_dim, 12, generator=generator)
    wave = 0.3 * torch.randn(1, 1, 48 * model.audio_vae.chunk_size, generator=generator)
    return latents, wave


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_what_was_saved_and_folds_weight_norm(tmp_path: Path, arch: str, fmt) -> None:
    source = build_package_model(tiny_config(arch), seed=3)
    folder = write_checkpoint(tmp_path / "ckpt", tiny_config(arch), source, fmt)

    model, architecture, config = load_voxcpm(folder)

    assert architecture == arch and type(model).__name__ == type(source).__name__
    assert config.dtype == "float32" and not model.training
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert not any(p.requires_grad for p in model.parameters())
    lm_saved, vae_saved = split_state(source)
    for key, saved in lm_saved.items():  # the file held saved.to(fmt.lm_dtype): that, in fp32, exactly
        assert torch.equal(state[key], saved.to(fmt.lm_dtype).to(saved.dtype)), key
    assert not [k for k in state if k.endswith(("weight_g", "weight_v"))]
    assert not [m for m in model.audio_vae.modules() if m._forward_pre_hooks]
    for key, saved in vae_saved.items():  # weight-normed pairs became `weight`; the rest is as saved
        if not key.endswith(("weight_g", "weight_v")):
            assert torch.equal(state[VAE_PREFIX + key], saved), key

    # The package's own loader (non-strict, weight norm kept, LM in config.dtype) is the oracle.
    reference = package_from_local(folder, arch)
    for key, theirs in reference.state_dict().items():
        if not key.endswith(("weight_g", "weight_v")):
            assert torch.equal(state[key].to(theirs.dtype), theirs), key
    latents, wave = _vae_input(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model.audio_vae.decode(latents), reference.audio_vae.decode(latents), rtol=0, atol=FOLDED_VAE_ATOL
        )
        torch.testing.assert_close(
            model.audio_vae.encode(wave, 16000), reference.audio_vae.encode(wave, 16000), rtol=0, atol=FOLDED_VAE_ATOL
        )


def test_detect_architecture_follows_the_package(good: dict[str, Path], tmp_path: Path) -> None:
    assert detect_architecture(good["voxcpm2"]) == "voxcpm2"
    folder = shutil.copytree(good["voxcpm"], tmp_path / "v1")
    config = json.loads((folder / "config.json").read_text())
    del config["architecture"]  # the package reads a config without it as v1
    (folder / "config.json").write_text(json.dumps(config))
    assert detect_architecture(folder) == "voxcpm"
    config["architecture"] = "VoxCPM2"  # and lower-cases it
    (folder / "config.json").write_text(json.dumps(config))
    assert detect_architecture(folder) == "voxcpm2"


def test_synthetic_tokenizer_is_a_real_tokenizer_json(good: dict[str, Path]) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers checks the synthetic tokenizer.json")
    encoding = tokenizers.Tokenizer.from_file(str(good["voxcpm"] / "tokenizer.json")).encode("hello 你好")
    assert encoding.tokens == ["▁hello", "▁", "你好"]


# -- bad input: each gives VoxCPMCheckpointError with a one-line message ----------------------


def _edit_config(**changes: object) -> Callable[[Path, str], None]:
    def edit(folder: Path, arch: str) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


_DELETE = object()


def _write(name: str, text: str) -> Callable[[Path, str], None]:
    return lambda folder, arch: (folder / name).write_text(text)


def _remove(name: str) -> Callable[[Path, str], None]:
    return lambda folder, arch: (folder / name).unlink()


def _truncate(name: str) -> Callable[[Path, str], None]:
    def edit(folder: Path, arch: str) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def _edit_lm(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, str], None]:
    def edit(folder: Path, arch: str) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_tensors(tensors, folder / "model.safetensors")

    return edit


def _edit_vae(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, str], None]:
    def edit(folder: Path, arch: str) -> None:
        tensors = torch.load(folder / "audiovae.pth", weights_only=True)["state_dict"]
        change(tensors)
        save_tensors(tensors, folder / "audiovae.pth", wrapped=True)

    return edit


def _lm_as_bin(payload: object) -> Callable[[Path, str], None]:
    def edit(folder: Path, arch: str) -> None:
        (folder / "model.safetensors").unlink()
        torch.save(payload, folder / "pytorch_model.bin")

    return edit


def _bin_truncated(folder: Path, arch: str) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    _truncate("pytorch_model.bin")(folder, arch)


def _other_architecture(folder: Path, arch: str) -> None:
    _edit_config(architecture="voxcpm" if arch == "voxcpm2" else "voxcpm2")(folder, arch)


def _bad_tokenizer_id(folder: Path, arch: str) -> None:
    data = tokenizer_json()
    data["model"]["vocab"]["▁world"] = 500
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _pop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(key)


def _reshape(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(3, 5)

    return change


def _add_extra(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_lm.layers.9.mlp.up_proj.weight"] = torch.zeros(2)


def _int_weight(tensors: dict[str, torch.Tensor]) -> None:
    tensors["stop_head.weight"] = tensors["stop_head.weight"].to(torch.int32)


BAD_INPUTS = {  # case: (change to a good folder, words the message must hold)
    "no config.json": (_remove("config.json"), "no config.json"),
    "config not JSON": (_write("config.json", "{ not json"), "not valid JSON"),
    "config a list": (_write("config.json", "[1, 2]"), "expected a JSON object"),
    "unknown architecture": (_edit_config(architecture="voxcpm3"), "unknown architecture 'voxcpm3'"),
    "architecture not a string": (_edit_config(architecture=2), "unknown architecture 2"),
    "other architecture": (_other_architecture, "does not fit the"),
    "config misses a field": (_edit_config(lm_config={"hidden_size": 8}), "lm_config.bos_token_id: Field required"),
    "config misses encoder": (_edit_config(encoder_config=_DELETE), "encoder_config: Field required"),
    "default VAE, tiny weights": (_edit_config(audio_vae_config=_DELETE), "the package's default VAE"),
    "no LM weights": (_remove("model.safetensors"), "no LM weights (expected model.safetensors or pytorch_model.bin)"),
    "no VAE weights": (_remove("audiovae.pth"), "no AudioVAE weights"),
    "no tokenizer.json": (_remove("tokenizer.json"), "no tokenizer.json"),
    "tokenizer not JSON": (_write("tokenizer.json", "\x00\x01"), "not a tokenizer.json"),
    "tokenizer without vocab": (_write("tokenizer.json", '{"model": {}}'), "not a tokenizer.json"),
    "tokenizer id past the LM": (_bad_tokenizer_id, "token ids reach 500, but lm_config.vocab_size is 128"),
    "truncated safetensors": (_truncate("model.safetensors"), "unreadable or truncated"),
    "truncated .bin": (_bin_truncated, "truncated weight file: not a complete torch.save archive"),
    "truncated audiovae.pth": (_truncate("audiovae.pth"), "not a complete torch.save archive"),
    ".bin holds a list": (_lm_as_bin([torch.zeros(2)]), "expected a mapping of tensor names"),
    ".bin holds code": (_lm_as_bin({"x": Path("/")}), "holds more than tensors: WeightsUnpickler error"),
    "LM key missing": (_edit_lm(_pop("stop_head.weight")), "1 problem(s): missing stop_head.weight"),
    "LM key unexpected": (_edit_lm(_add_extra), "unexpected base_lm.layers.9.mlp.up_proj.weight"),
    "LM wrong shape": (_edit_lm(_reshape("stop_proj.bias")), "stop_proj.bias: shape (3, 5) in file, (32,) in model"),
    "LM int weight": (_edit_lm(_int_weight), "stop_head.weight: dtype torch.int32 in file"),
    "VAE key missing": (_edit_vae(_pop("encoder.fc_mu.weight_g")), "missing encoder.fc_mu.weight_g"),
    "VAE wrong shape": (_edit_vae(_reshape("decoder.model.1.bias")), "decoder.model.1.bias: shape (3, 5)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bad_input_is_one_line_error(good: dict[str, Path], tmp_path: Path, arch: str, case: str) -> None:
    change, words = BAD_INPUTS[case]
    folder = shutil.copytree(good[arch], tmp_path / "ckpt")
    change(folder, arch)
    with pytest.raises(VoxCPMCheckpointError) as caught:
        load_voxcpm(folder)
    message = str(caught.value)
    assert "\n" not in message and words in message, message


def test_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(VoxCPMCheckpointError, match="no such directory"):
        detect_architecture(tmp_path / "absent")
