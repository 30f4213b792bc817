"""A loaded VoxCPM model (v1 `voxcpm`, v2 `voxcpm2`) as the kit's ONNX graphs: wrappers over the package's modules.

Every weight and table is the package module's own (its Linear/Embedding/conv layers, norms,
LongRoPE cos/sin buffers and MLPs are registered here and called, never copied), so a wrapper
computes what `_inference` computes. Only the attention is rewritten: the package calls
`scaled_dot_product_attention(..., enable_gqa=True)`, which the TorchScript ONNX exporter
(opset 17) cannot export, and its cache update writes in place. Here attention is plain
MatMul/Softmax with the grouped-query heads made explicit by a reshape, and the LM takes its KV
cache as inputs and returns only the new slots. Submodule names put "norm" and "rotary" into
the ONNX node names of the norms and rotary code, which the kit's fp16 export keeps in fp32
(the package itself computes the RMS variance and the rotation in fp32).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError

_ARCHITECTURES = {"VoxCPMModel": "voxcpm", "VoxCPM2Model": "voxcpm2"}


def architecture_of(model: nn.Module) -> str:
    """'voxcpm' or 'voxcpm2' from the package's model class (they differ in the residual input and DiT condition)."""
    try:
        return _ARCHITECTURES[type(model).__name__]
    except KeyError:
        raise VoxCPMCheckpointError(f"not a VoxCPM model: {type(model).__name__}") from None


def _refuse_mean_mode(model: nn.Module) -> None:
    # Mean mode feeds the DiT a nonzero dt (the solver's step) that these graphs do not take.
    if model.feat_decoder.mean_mode:
        raise VoxCPMCheckpointError("dit_mean_mode is true: the LocDiT's mean mode is not supported by the export yet")


class _RotaryTable(nn.Module):
    """cos/sin rows of the package's LongRoPE table (its own buffers: not in the checkpoint, built from the config)."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope(positions)  # (S, hd) each, scaled as the package scales them


class _RotaryApply(nn.Module):
    """The package's own apply_rotary_pos_emb (rotate-half), in a module so its nodes are named "rotary"."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.apply_rotary = sys.modules[type(rope).__module__].apply_rotary_pos_emb

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply_rotary(q, k, cos, sin)


class _Block(nn.Module):
    """MiniCPMDecoderLayer.forward with attention in plain ops; returns this call's (post-rotary) keys and values."""

    def __init__(self, layer: nn.Module, rope: nn.Module | None) -> None:
        super().__init__()
        attn = layer.self_attn
        self.input_layernorm, self.self_attn = layer.input_layernorm, attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.rotary = _RotaryApply(rope) if rope is not None else None
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        # muP: every residual branch times scale_depth / sqrt(layers of this stack), as the package does
        self.branch_scale = layer.scale_depth / math.sqrt(layer.num_hidden_layers) if layer.use_mup else None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, past_k: Tensor | None, past_v: Tensor | None,
        allowed: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        batch = x.shape[0]
        h = self.input_layernorm(x)
        q = self.self_attn.q_proj(h).reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.self_attn.k_proj(h).reshape(batch, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.self_attn.v_proj(h).reshape(batch, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None and rope is not None:
            q, k = self.rotary(q, k, *rope)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # (B, Hkv, slots + S, hd)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        # GQA as SDPA's enable_gqa: query head j reads kv head j // groups. The groups' query rows
        # are stacked per kv head (a free reshape), so K and V are never repeated.
        queries = q.reshape(batch, self.kv_heads, -1, self.head_dim)  # (B, Hkv, groups * S, hd)
        scores = torch.matmul(queries, keys.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if allowed is not None:  # (S, slots + S): a where, so a garbage slot scores -inf however large it was
            grouped = scores.unflatten(2, (self.heads // self.kv_heads, -1))
            scores = grouped.masked_fill(~allowed, float("-inf")).flatten(2, 3)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, Hkv, groups * S, hd)
        out = out.reshape(batch, self.heads, -1, self.head_dim).transpose(1, 2).flatten(2)
        x = self._add(x, self.self_attn.o_proj(out))
        x = self._add(x, self.mlp(self.post_attention_layernorm(x)))
        return x, k, v

    def _add(self, residual: Tensor, branch: Tensor) -> Tensor:
        return residual + (branch if self.branch_scale is None else branch * self.branch_scale)


class _Stack(nn.Module):
    """A MiniCPMModel (base LM, residual LM, LocEnc or LocDiT transformer) over explicit positions and KV."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(layer, lm.rope_emb) for layer in lm.layers)
        self.norm = lm.norm
        self.rotary = _RotaryTable(lm.rope_emb) if lm.rope_emb is not None else None

    def forward(
        self, x: Tensor, positions: Tensor, keep: slice, past_keys: Tensor | None = None,
        past_values: Tensor | None = None, allowed: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:  # fmt: skip
        """Final-normed rows `keep` (the norm is per row) and every layer's new keys and values."""
        rope = self.rotary(positions) if self.rotary is not None else None
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past_k = None if past_keys is None else past_keys[i]
            past_v = None if past_values is None else past_values[i]
            x, k, v = layer(x, rope, past_k, past_v, allowed)
            keys.append(k)
            values.append(v)
        return self.norm(x[:, keep]), keys, values


class VoxVAEEncoderGraph(nn.Module):
    """audio (1, S) at the VAE's input rate, S a multiple of the hop -> latents (1, S / hop, D): `encode`'s mean.

    The package's encode right-pads the audio to a whole hop and asserts sr == its sample_rate;
    at a whole hop the pad is empty, so the caller pads (the package pads prompts to a whole
    patch, on the left for continuation and on the right for a v2 reference). fc_logvar is not run.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.block, self.fc_mu = model.audio_vae.encoder.block, model.audio_vae.encoder.fc_mu

    def forward(self, audio: Tensor) -> Tensor:
        return self.fc_mu(self.block(audio.unsqueeze(1))).transpose(1, 2)


class VoxVAEDecoderGraph(nn.Module):
    """latents (1, F, D) -> audio (1, F * output hop) = `decode`, tanh-bounded.

    v2 conditions each decoder block on the output rate: the package's decode defaults it to
    out_sample_rate and bucketises it (torch.bucketize, which has no ONNX op) into per-block
    scale/bias rows; the bucket is resolved here once with the package's own get_sr_idx, so the
    graph decodes at that rate only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        decoder = model.audio_vae.decoder
        self.model = decoder.model
        self.sr_cond_model = getattr(decoder, "sr_cond_model", None)
        if getattr(decoder, "sr_bin_boundaries", None) is not None:
            rate = torch.tensor([model.audio_vae.out_sample_rate], dtype=torch.int32)
            self.register_buffer("sr_index", decoder.get_sr_idx(rate), persistent=False)
        else:
            self.sr_cond_model = None

    def forward(self, latents: Tensor) -> Tensor:
        x = latents.transpose(1, 2)
        if self.sr_cond_model is None:
            return self.model(x)[:, 0]
        for layer, condition in zip(self.model, self.sr_cond_model):
            if condition is not None:
                x = condition(x, self.sr_index)
            x = layer(x)
        return x[:, 0]


def _left_reach(conv: nn.Module) -> int:
    """Past samples a stride-1 causal conv reads: its left pad (a private the package's streaming decoder reads too)."""
    pad = 2 * getattr(conv, "_CausalConv1d__padding", 0) - getattr(conv, "_CausalConv1d__output_padding", 0)
    span = conv.dilation[0] * (conv.kernel_size[0] - 1)
    if conv.stride[0] != 1 or pad != span:  # not causal-same: a look-ahead this count does not cover
        raise VoxCPMCheckpointError(f"VAE decoder conv {conv} is not a causal stride-1 conv")
    return pad


def decoder_context_frames(model: nn.Module) -> int:
    """Latent frames of left context that make a chunk's decode equal the whole decode's samples.

    The decoder is exactly causal: every conv pads on the left only (left pad = its dilated
    span) and each causal transposed conv trims its last stride samples, so sample j depends on
    latent frames <= j // hop and a future frame never changes a past sample. Its reach into the
    past is the receptive field, walked from the output back: a stride-1 conv adds its left pad
    (at its own rate), a transposed conv (kernel k, stride s) maps a reach of a samples to
    floor((a + k - 1) / s) input steps (worst case at the first sample of a frame, which every
    level attains at once, so the count is tight). Residual skips read no further than their
    branch; Snake, tanh and the v2 rate conditioning are per sample.
    """
    convs = [m for m in model.audio_vae.decoder.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    reach = 0
    for conv in reversed(convs):  # module order is execution order in these Sequentials
        if isinstance(conv, nn.ConvTranspose1d):
            if conv.padding[0] != 0 or conv.dilation[0] != 1:
                raise VoxCPMCheckpointError(f"VAE decoder transposed conv {conv} is not the package's causal one")
            reach = (reach + conv.kernel_size[0] - 1) // conv.stride[0]
        else:
            reach += _left_reach(conv)
    return reach


class VoxTextEmbeddingGraph(nn.Module):
    """ids (T,) -> (T, H) = embed_tokens(ids) * scale_emb (muP scales text embeddings only), as `_inference`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.base_lm.embed_tokens
        lm_config = model.config.lm_config
        self.scale = float(lm_config.scale_emb) if lm_config.use_mup else 1.0

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids) * self.scale


class VoxPatchEncoderGraph(nn.Module):
    """patches (N, P, D) -> (N, H) = enc_to_lm_proj(LocEnc(patches)): the CLS row of a bidirectional pass over P + 1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        encoder = model.feat_encoder
        self.in_proj, self.special_token = encoder.in_proj, encoder.special_token
        self.encoder = _Stack(encoder.encoder)
        self.enc_to_lm_proj = model.enc_to_lm_proj
        self.register_buffer("positions", torch.arange(model.patch_size + 1), persistent=False)

    def forward(self, patches: Tensor) -> Tensor:
        x = self.in_proj(patches)  # (N, P, He)
        cls = self.special_token.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        out, _, _ = self.encoder(torch.cat([cls, x], dim=1), self.positions, keep=slice(0, 1))
        return self.enc_to_lm_proj(out[:, 0])


class VoxLMGraph(nn.Module):
    """One call serves prefill (S = prefix rows) and each patch step (S = 1): base LM, FSQ, residual LM, heads.

    Inputs: embeds (1, S, H) (text rows scaled embeddings, patch rows the patch encoder's
    vectors), audio_mask (1, S) (1 at patch rows), past_keys/values (Lb + Lr, 1, Hkv, capacity,
    hd) with slots < position filled (the rest may hold any finite values: they are masked),
    position (1,). Rows sit at positions position .. position + S - 1 (RoPE and causal mask), as
    the package's prefill (from 0) and forward_step (kv_cache.step()) place them. Outputs: cond
    (1, Dc) = the feat_decoder's mu from the last row, stop_logit (1,) = logit(stop) - logit(go)
    on the last row's (FSQ'd at a patch row) base-LM output, new_keys/values (Lb + Lr, 1, Hkv, S,
    hd) to write at `position`. Capacity and positions must stay below the RoPE table's
    max_position_embeddings rows (lm_shape's max_positions).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fused = architecture_of(model) == "voxcpm2"
        self.base, self.residual = _Stack(model.base_lm), _Stack(model.residual_lm)
        self.base_layers = len(model.base_lm.layers)
        self.fsq_layer = model.fsq_layer
        self.fusion_concat_proj = model.fusion_concat_proj if self.fused else None
        self.lm_to_dit_proj, self.res_to_dit_proj = model.lm_to_dit_proj, model.res_to_dit_proj
        self.stop_proj, self.stop_actn, self.stop_head = model.stop_proj, model.stop_actn, model.stop_head

    def forward(
        self, embeds: Tensor, audio_mask: Tensor, past_keys: Tensor, past_values: Tensor, position: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows = torch.arange(embeds.shape[1], device=embeds.device)
        positions = position + rows  # (S,)
        # key j of (cache slots, new rows): a filled slot (j < position), or a new row at or before this one
        key = torch.arange(past_keys.shape[3] + embeds.shape[1], device=embeds.device)
        new = key - past_keys.shape[3]
        allowed = (key < position) | ((new >= 0) & (new.unsqueeze(0) <= rows.unsqueeze(1)))  # (S, slots + S)
        lb = self.base_layers
        base, keys, values = self.base(embeds, positions, slice(None), past_keys[:lb], past_values[:lb], allowed)
        audio = audio_mask.unsqueeze(-1)
        # as _inference: FSQ at patch rows, the LM output itself at text rows
        h = self.fsq_layer(base) * audio + base * (1.0 - audio)
        patch_embeds = audio * embeds
        # v1 adds the patch vectors, v2 projects the concatenation
        res_in = self.fusion_concat_proj(torch.cat([h, patch_embeds], dim=-1)) if self.fused else h + patch_embeds
        res, res_keys, res_values = self.residual(
            res_in, positions, slice(-1, None), past_keys[lb:], past_values[lb:], allowed
        )
        h_last, r_last = h[:, -1], res[:, -1]
        if self.fused:
            cond = torch.cat([self.lm_to_dit_proj(h_last), self.res_to_dit_proj(r_last)], dim=-1)
        else:
            cond = self.lm_to_dit_proj(h_last) + self.res_to_dit_proj(r_last)
        logits = self.stop_head(self.stop_actn(self.stop_proj(h_last)))  # (1, 2): the package stops on argmax 1
        stop_logit = logits[:, 1] - logits[:, 0]
        return cond, stop_logit, torch.stack(keys + res_keys), torch.stack(values + res_values)


class VoxLocDiTGraph(nn.Module):
    """x (B, P, D), t (B,), cond (B, Dc), history (B, P, D) -> velocity (B, P, D): the estimator call of solve_euler.

    dt is zero outside mean mode, so its embedding is one constant row (computed in the graph
    from a constant: folded at export). The unconditional guidance branch is cond = 0.
    Token layout v1: [mu + t, history, x]; v2: [mu_lm, mu_res, t, history, x]; the last P rows.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _refuse_mean_mode(model)
        estimator = model.feat_decoder.estimator
        self.split_cond = architecture_of(model) == "voxcpm2"
        self.in_proj, self.cond_proj, self.out_proj = estimator.in_proj, estimator.cond_proj, estimator.out_proj
        self.time_embeddings = estimator.time_embeddings  # sinusoidal: its node names carry "time_embed"
        self.time_mlp, self.delta_time_mlp = estimator.time_mlp, estimator.delta_time_mlp
        self.decoder = _Stack(estimator.decoder)
        self.patch_size = model.patch_size
        prefix = 3 if self.split_cond else 1
        self.register_buffer("positions", torch.arange(prefix + 2 * model.patch_size), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, history: Tensor) -> Tensor:
        x = self.in_proj(x)  # (B, P, Hd)
        history = self.cond_proj(history)
        time = self.time_mlp(self.time_embeddings(t))
        time = time + self.delta_time_mlp(self.time_embeddings(torch.zeros(1, dtype=t.dtype, device=t.device)))
        if self.split_cond:
            mu = cond.reshape(cond.shape[0], -1, x.shape[-1])  # (B, 2, Hd), as the package's mu.view
            tokens = torch.cat([mu, time.unsqueeze(1), history, x], dim=1)
        else:
            tokens = torch.cat([(cond + time).unsqueeze(1), history, x], dim=1)
        out, _, _ = self.decoder(tokens, self.positions, keep=slice(-self.patch_size, None))
        return self.out_proj(out)


GRAPHS: dict[str, type[nn.Module]] = {
    "vae_encoder": VoxVAEEncoderGraph,
    "vae_decoder": VoxVAEDecoderGraph,
    "text_embedding": VoxTextEmbeddingGraph,
    "patch_encoder": VoxPatchEncoderGraph,
    "lm": VoxLMGraph,
    "locdit": VoxLocDiTGraph,
}


def graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The kit's graphs (no locdit_sampler: that one is built on VoxLocDiTGraph) over one loaded model, in eval mode."""
    architecture_of(model)
    _refuse_mean_mode(model)
    return {name: graph(model).eval() for name, graph in GRAPHS.items()}


def lm_shape(model: nn.Module) -> dict[str, int]:
    """The LM graph's cache and condition sizes; base and residual LM share heads and head dim (one config)."""
    attn = model.base_lm.layers[0].self_attn
    cond_dim = model.lm_to_dit_proj.out_features * (2 if architecture_of(model) == "voxcpm2" else 1)
    return {
        "layers": len(model.base_lm.layers) + len(model.residual_lm.layers),
        "kv_heads": attn.num_key_value_heads,
        "head_dim": attn.head_dim,
        "dim": model.config.lm_config.hidden_size,
        "cond_dim": cond_dim,
        "max_positions": model.config.lm_config.max_position_embeddings,  # rows of the RoPE table
    }


def audio_shape(model: nn.Module) -> dict[str, Any]:
    """Rates and hops of the VAE: v1 decodes at its input rate, v2 at out_sample_rate (48 kHz in the release)."""
    vae = model.audio_vae
    return {
        "sample_rate": int(vae.sample_rate),
        "hop_length": math.prod(vae.encoder_rates),
        "output_sample_rate": int(getattr(vae, "out_sample_rate", vae.sample_rate)),
        "output_hop_length": math.prod(vae.decoder_rates),
        "latent_dim": int(vae.latent_dim),
        "decoder_context_frames": decoder_context_frames(model),
    }
