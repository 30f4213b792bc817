"""A VoxCPM model's contract with the runtime: what differs from the kit's own models is data.

VoxCPM samples by rectified flow on a "sway" grid with CFG-zero* (package defaults: 10 steps,
cfg_value 2.0, sway 1.0, temperature 1.0), reads the stop from the LM step that drew a patch
(after at least `min_len` + 2 patches), conditions LocDiT on one previous patch, and lays its
prompt out per architecture: v1 continues from a reference whose transcript it reads before the
text, v2 isolates the reference between markers and needs no transcript.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError
from ditarkit.export.voxcpm.graphs import audio_shape, lm_shape
from ditarkit.runtime.contract import (
    AudioIO,
    LMShape,
    ModelContract,
    PromptLayout,
    SamplerSpec,
    StopRule,
    TextSpec,
)
from ditarkit.runtime.manifest import file_sha256

TOKENIZER_FILE = "tokenizer.json"  # the bundle's copy of the checkpoint's tokenizer
# The package's defaults (UnifiedCFM.forward, _inference, generate).
NFE = 10
CFG_VALUE = 2.0  # VoxCPM's guidance value; the kit's w is cfg_value - 1
SWAY = 1.0
ZERO_INIT_FRACTION = 0.04
MIN_LEN = 2  # `i > min_len`: the stop is read from the fourth patch on
# Limits of one generation. The LM's position table and the package's KV cache (`max_length`)
# bound text + reference + speech.
MAX_TOKENS = 512
MAX_SECONDS = 30.0
MAX_PROMPT_SECONDS = 10.0


def prompt_layout(architecture: str, model: nn.Module) -> tuple[PromptLayout, str]:
    """(layout, how the reference is cut to whole patches), as the package's generate builds them:
    v1 continuation `[transcript + text, 101, reference]` (the reference padded at its start),
    v2 reference mode `[103, reference, 104, text, 101]` (padded at its end)."""
    if architecture == "voxcpm":
        layout = ("reference_text", "text", model.audio_start_token, "reference")
        return PromptLayout(layout, history="prefix_end"), "pad_start"
    layout = (model.ref_audio_start_token, "reference", model.ref_audio_end_token, "text", model.audio_start_token)
    return PromptLayout(layout, history="prefix_end"), "pad_end"


def voxcpm_contract(model: nn.Module, architecture: str, config: Any, folder: str | Path, *,
                    max_tokens: int = MAX_TOKENS, max_seconds: float = MAX_SECONDS,
                    max_prompt_seconds: float = MAX_PROMPT_SECONDS) -> ModelContract:
    layout, fit = prompt_layout(architecture, model)
    audio, lm = audio_shape(model), lm_shape(model)
    contract = ModelContract(
        family=architecture,
        name=f"{architecture}-{Path(folder).resolve().name}",
        audio=AudioIO(audio["sample_rate"], audio["hop_length"], audio["output_sample_rate"],
                      audio["output_hop_length"], audio["latent_dim"], audio["decoder_context_frames"], fit),
        lm=LMShape(lm["dim"], lm["layers"], lm["kv_heads"], lm["head_dim"], lm["cond_dim"], audio_mask=True),
        text=TextSpec("tokenizer", max_tokens, config.lm_config.vocab_size, tokenizer_file=TOKENIZER_FILE,
                      tokenizer_sha256=file_sha256(Path(folder) / TOKENIZER_FILE)),
        sampler=SamplerSpec("rectified_flow", NFE, CFG_VALUE - 1.0, 1.0, time_grid="sway", sway=SWAY,
                            guidance="cfg_zero_star", zero_init_fraction=ZERO_INIT_FRACTION),
        stop=StopRule(0.5, draws_last=True, min_patches=MIN_LEN + 2),
        prompt=layout,
        patch_size=config.patch_size,
        history_patches=1,
        max_seconds=max_seconds,
        max_prompt_seconds=max_prompt_seconds,
    )
    positions = contract.max_prefix + contract.max_patches
    room = min(config.max_length, config.lm_config.max_position_embeddings)
    if positions > room:
        raise VoxCPMCheckpointError(
            f"{max_tokens} tokens + {max_prompt_seconds:g} s of reference + {max_seconds:g} s of speech need "
            f"{positions} LM positions; this model has {room} (max_length / max_position_embeddings): "
            "lower --max-seconds, --max-prompt-seconds or --max-tokens")
    return contract


def package_inputs(model, architecture: str, ids: list[int], prompt: np.ndarray):
    """The package's `_inference` inputs (text, text_mask, feat, feat_mask) for the prompt that
    `prompt_layout` describes, laid out as its generate does: v1 continuation [transcript +
    text, 101, reference], v2 reference mode [103, reference, 104, text, 101]. `prompt`
    (N, P, C) is the reference's patches. For comparing the kit's loop with the package's."""
    n, patch, dim = prompt.shape
    patches = torch.from_numpy(np.ascontiguousarray(prompt, np.float32))
    zeros = lambda k: torch.zeros(k, patch, dim)  # noqa: E731
    if architecture == "voxcpm":
        tokens = [*ids, model.audio_start_token] + [0] * n
        feats = torch.cat([zeros(len(ids) + 1), patches])
        is_text = [1] * (len(ids) + 1) + [0] * n
    else:
        tokens = [model.ref_audio_start_token] + [0] * n + [model.ref_audio_end_token, *ids, model.audio_start_token]
        feats = torch.cat([zeros(1), patches, zeros(len(ids) + 2)])
        is_text = [1] + [0] * n + [1] * (len(ids) + 2)
    text_mask = torch.tensor([is_text], dtype=torch.int32)
    return torch.tensor([tokens]), text_mask, feats[None], 1 - text_mask
