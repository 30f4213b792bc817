"""The `voxcpm` package as the oracle: tiny random models of both architectures and checkpoint folders.

No VoxCPM weights can be downloaded here, so the tests build tiny configs with the package's own
classes, write folders the way the releases ship them (config.json, model.safetensors in bf16 or
pytorch_model.bin, audiovae.pth with or without a "state_dict" wrapper, a Llama-style
tokenizer.json) and load them back, with ditarkit's loader and with the package's `from_local`.

Importing voxcpm goes through `import_voxcpm`, the loader's own: voxcpm's model files import
transformers, torchaudio, librosa and huggingface_hub at the top, but building, loading and running
the networks never touches them (they serve tokenizer loading, prompt-wav reading, downloads), so
where one is not installed a placeholder stands in during that import; using it raises.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ditarkit.export.voxcpm.checkpoint import VAE_PREFIX, VocabOnlyTokenizer, import_voxcpm

HEAD_DIM = 8  # every transformer here (LM, residual LM, LocEnc, LocDiT) shares the LM's rope factors
_ROPE = {
    "type": "longrope",
    "short_factor": [1.0, 1.2, 1.5, 2.0],  # HEAD_DIM / 2 each
    "long_factor": [1.0, 1.5, 2.5, 4.0],
    "original_max_position_embeddings": 32,
}
_LM = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 4 * HEAD_DIM,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_scaling": _ROPE,
    "vocab_size": 128,  # > 104: the audio and reference-audio marker ids 101..104 index the embedding
    "use_mup": True,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
    "rope_theta": 10000.0,
}
_SMALL = {"hidden_dim": 2 * HEAD_DIM, "ffn_dim": 24, "num_heads": 2, "num_layers": 1}
_CFM = {"sigma_min": 1e-6, "solver": "euler", "t_scheduler": "log-norm", "inference_cfg_rate": 2.0}
LATENT_DIM = 8
_VAE = {  # 16 kHz in; v1 decodes at the same rate, v2 upsamples 3x to 48 kHz as the release does
    "voxcpm": {"encoder_dim": 4, "encoder_rates": [2, 2], "latent_dim": LATENT_DIM, "decoder_dim": 16,
               "decoder_rates": [2, 2], "depthwise": True, "sample_rate": 16000},
    "voxcpm2": {"encoder_dim": 4, "encoder_rates": [2, 2], "latent_dim": LATENT_DIM, "decoder_dim": 16,
                "decoder_rates": [3, 2, 2], "depthwise": True, "sample_rate": 16000, "out_sample_rate": 48000,
                "sr_bin_boundaries": [20000, 30000, 40000]},
}  # fmt: skip


def tiny_config(architecture: str, with_vae_config: bool = True) -> dict[str, Any]:
    """A config.json for a tiny model; without the VAE config it names the package's default VAE."""
    config: dict[str, Any] = {
        "architecture": architecture,
        "lm_config": copy.deepcopy(_LM),
        "patch_size": 2 if architecture == "voxcpm" else 4,
        "feat_dim": LATENT_DIM,
        "residual_lm_num_layers": 1,
        "scalar_quantization_latent_dim": 16,
        "scalar_quantization_scale": 9,
        "encoder_config": dict(_SMALL),
        "dit_config": dict(_SMALL, cfm_config=dict(_CFM)),
        "max_length": 32,
        "device": "cuda",  # as the releases say; the package falls back to cpu
        "dtype": "bfloat16",
    }
    if with_vae_config:
        config["audio_vae_config"] = copy.deepcopy(_VAE[architecture])
    return config


def tokenizer_json() -> dict[str, Any]:
    """A Llama-style (BPE, byte fallback, "▁" for spaces) tokenizer.json with a few tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "h": 5, "e": 6, "l": 7, "o": 8, "你": 9,
             "好": 10, "▁h": 11, "ll": 12, "▁he": 13, "▁hell": 14, "▁hello": 15, "你好": 16}  # fmt: skip
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t, i in list(vocab.items())[:3]]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": ["▁ h", "l l", "▁h e", "▁he ll", "▁hell o", "你 好"],
        },
    }


def build_package_model(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The package's model for `config`, every float tensor made distinct (norms start as all ones)."""
    classes = import_voxcpm(config["architecture"])
    parsed = classes["config"].model_validate(copy.deepcopy(config))
    vae = classes["vae"](parsed.audio_vae_config) if parsed.audio_vae_config else classes["vae"]()
    model = classes["model"](parsed, VocabOnlyTokenizer(tokenizer_json()["model"]["vocab"]), vae, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@dataclass(frozen=True)
class WeightFormat:
    """How one release lays out its weights."""

    name: str
    lm_file: str  # model.safetensors or pytorch_model.bin
    lm_dtype: torch.dtype
    lm_wrapped: bool  # under a "state_dict" key (.bin only)
    vae_file: str  # audiovae.pth or audiovae.safetensors
    vae_wrapped: bool  # under a "state_dict" key (.pth only)


FORMATS = (
    WeightFormat("safetensors-bf16", "model.safetensors", torch.bfloat16, False, "audiovae.pth", True),
    WeightFormat("bin-fp32", "pytorch_model.bin", torch.float32, False, "audiovae.pth", False),
    WeightFormat("bin-bf16-wrapped", "pytorch_model.bin", torch.bfloat16, True, "audiovae.safetensors", False),
)


def split_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LM tensors, VAE tensors without the audio_vae. prefix), as the two weight files hold them."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lm = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    vae = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    return lm, vae


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, wrapped: bool = False) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save({"state_dict": tensors} if wrapped else tensors, path)


def write_checkpoint(
    folder: Path, config: dict[str, Any], model: torch.nn.Module, fmt: WeightFormat = FORMATS[0]
) -> Path:
    """A checkpoint folder as the releases ship it; LM floats in fmt.lm_dtype, the VAE in fp32."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    lm, vae = split_state(model)
    lm = {k: v.to(fmt.lm_dtype) if v.is_floating_point() else v for k, v in lm.items()}
    save_tensors(lm, folder / fmt.lm_file, fmt.lm_wrapped)
    save_tensors(vae, folder / fmt.vae_file, fmt.vae_wrapped)
    return folder


@contextlib.contextmanager
def _vocab_only_tokenizer(module: Any) -> Iterator[None]:
    """from_local reads tokenizer.json through LlamaTokenizerFast; hand it the vocabulary it needs."""

    class VocabOnly:
        @staticmethod
        def from_pretrained(path: str) -> VocabOnlyTokenizer:
            data = json.loads((Path(path) / "tokenizer.json").read_text(encoding="utf-8"))
            return VocabOnlyTokenizer(data["model"]["vocab"])

    original = module.LlamaTokenizerFast
    module.LlamaTokenizerFast = VocabOnly
    try:
        yield
    finally:
        module.LlamaTokenizerFast = original


def package_from_local(folder: Path, architecture: str) -> torch.nn.Module:
    """The package's own (non-strict) load of `folder`: LM in config.dtype, VAE fp32 with weight norm."""
    import importlib

    module = importlib.import_module(f"voxcpm.model.{architecture}")
    model_class = module.VoxCPMModel if architecture == "voxcpm" else module.VoxCPM2Model
    with _vocab_only_tokenizer(module):
        return model_class.from_local(str(folder), optimize=False, device="cpu")
