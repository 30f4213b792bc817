"""DiTAR, the PyTorch reference: speech VAE, patch aggregator, causal LM, LocDiT, stop head.

Read top to bottom: shared Transformer parts, then each piece of the system, then `DiTAR`
which owns them all. Every graph the kit exports is one of these modules' `forward`, and
the KV cache is an explicit argument, never hidden state, so that what runs here is what
the ONNX graphs compute. Shapes: B batch, S sequence, D width, H heads, K keys, F frames,
P frames per patch, C latent channels, L layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditarkit.runtime.config import DiTARConfig, TransformerConfig, VAEConfig

# Additive attention mask. Finite and within fp16 range, so an fp16 graph never meets inf.
MASK_VALUE = -30_000.0


# --------------------------------------------------------------------------------------
# Transformer parts
# --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RotaryEmbedding(nn.Module):
    """cos and signed sin tables (S, head_dim) for positions (S,). A module of its own so that the
    fp16 export can find it by name and keep it in fp32 (angles reach hundreds of radians)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and the sign-folded sin that `apply_rotary` takes."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (S, hd/2)
        sin = angles.sin()
        return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate-half rotary positions, x * cos + [-x2, x1] * sin, with the minus sign carried
    by the table (the same numbers: one Neg per call less, computed once per sequence)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.record_probs = False  # training only: keep attention maps for the alignment loss
        self.probs: Tensor | None = None

    def forward(
        self,
        x: Tensor,  # (B, S, D)
        cos: Tensor,  # (S, hd)
        sin: Tensor,
        mask: Tensor | None,  # (S, K) additive, K = past + S
        past_k: Tensor | None = None,  # (B, Hkv, M, hd)
        past_v: Tensor | None = None,
        queries: int | None = None,  # only the last `queries` positions ask (all still answer)
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        n = s if queries is None else queries
        q = self.q(x[:, s - n :]).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, hd)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[s - n :], sin[s - n :]), apply_rotary(k, cos, sin)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # (B, Hkv, K, hd)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        keys, values = self._repeat_kv(keys), self._repeat_kv(values)  # (B, H, K, hd)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, S, K)
        if mask is not None:
            scores = scores + mask[mask.shape[0] - n :]  # the rows of the asking positions
        probs = scores.softmax(dim=-1)  # (B, H, S, K)
        self.probs = probs if self.record_probs else None
        out = probs @ values  # (B, H, n, hd)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.o(out), k, v

    def _repeat_kv(self, x: Tensor) -> Tensor:
        """Grouped-query attention: each KV head serves heads // kv_heads query heads."""
        rep = self.heads // self.kv_heads
        if rep == 1:
            return x
        b, h, k, d = x.shape
        return x[:, :, None].expand(b, h, rep, k, d).reshape(b, h * rep, k, d)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_dim)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None, queries=None):
        attn, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v, queries)
        x = x[:, x.shape[1] - attn.shape[1] :] + attn
        return x + self.mlp(self.mlp_norm(x)), k, v


class Transformer(nn.Module):
    """Pre-norm stack with a final norm. Causality, if any, comes in through `mask`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)

    def forward(
        self,
        x: Tensor,  # (B, S, D)
        positions: Tensor,  # (S,)
        mask: Tensor | None = None,  # (S, K)
        past_keys: Tensor | None = None,  # (L, B, Hkv, M, hd)
        past_values: Tensor | None = None,
        outputs: int | None = None,  # only the last `outputs` positions are wanted
    ) -> tuple[Tensor, Tensor, Tensor]:
        """With `outputs`, the last block computes queries, attention output and MLP for
        those positions alone (the rest still give it keys and values): the same numbers for
        a fraction of the last block's work."""
        if outputs is not None and not 0 < outputs <= x.shape[1]:
            raise ValueError(f"outputs={outputs} is not within the {x.shape[1]} positions")
        cos, sin = self.rotary(positions)
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            past_k = None if past_keys is None else past_keys[i]
            past_v = None if past_values is None else past_values[i]
            queries = outputs if i == len(self.blocks) - 1 else None
            x, k, v = block(x, cos, sin, mask, past_k, past_v, queries)
            new_keys.append(k)
            new_values.append(v)
        return self.norm(x), torch.stack(new_keys), torch.stack(new_values)  # keys (L, B, Hkv, S, hd)


def causal_mask(steps: int, past: int, position: Tensor, device: torch.device) -> Tensor:
    """Additive mask (S, M + S): past slot j is visible if j < position (the cache may be a
    preallocated buffer longer than what is filled); new tokens see themselves causally."""
    past_slots = torch.arange(past, device=device)[None, :]  # (1, M)
    past_mask = torch.where(past_slots < position, 0.0, MASK_VALUE).expand(steps, past)
    new = torch.arange(steps, device=device)
    new_mask = torch.where(new[None, :] <= new[:, None], 0.0, MASK_VALUE)  # (S, S)
    return torch.cat([past_mask, new_mask], dim=1)


def isolated_history_mask(history: int, patch: int, device: torch.device) -> Tensor:
    """LocDiT's additive mask (1 + H + P, 1 + H + P) when history tokens attend only among
    themselves: the condition token and the patch see everything."""
    tokens = 1 + history + patch
    is_history = torch.zeros(tokens, dtype=torch.bool, device=device)
    is_history[1 : 1 + history] = True
    blocked = is_history[:, None] & ~is_history[None, :]  # (S, S): a history row, a non-history column
    return torch.where(blocked, MASK_VALUE, 0.0)


# --------------------------------------------------------------------------------------
# Causal LM with stop head
# --------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """Sequence: text tokens, prompt patch vectors, speech-start, generated patch vectors.
    The output at each position is h_i, the condition for the next patch. With a text cursor
    the advance head reads h_i too: how many characters patch i + 1 starts after patch i.
    With `cursor.advance_to_locdit`, LocDiT is conditioned on h_i plus an embedding of that
    advance (`condition`)."""

    def __init__(self, cfg: DiTARConfig) -> None:
        super().__init__()
        self.cfg = cfg.lm
        self.transformer = Transformer(cfg.lm)
        self.stop_head = nn.Linear(cfg.lm.dim, 1)
        self.advance_head = nn.Linear(cfg.lm.dim, cfg.cursor.max_advance + 1) if cfg.cursor else None
        self.advance_embedding = None
        if cfg.cursor and cfg.cursor.advance_to_locdit:
            self.advance_embedding = nn.Embedding(cfg.cursor.max_advance + 1, cfg.lm.dim)
            # zero: a model grown from one without it starts as that model, h_i alone
            nn.init.zeros_(self.advance_embedding.weight)

    def condition(self, hidden: Tensor, advance: Tensor | None) -> Tensor:
        """LocDiT's condition for the patch after each LM output: h_i, plus the embedded
        advance (int64, one per row of `hidden`) where the model has the embedding (a model
        with it has a cursor, so an advance; one without may pass None)."""
        if self.advance_embedding is None:
            return hidden
        return hidden + self.advance_embedding(advance)

    def forward(
        self,
        embeds: Tensor,  # (B, S, D)
        past_keys: Tensor | None = None,  # (L, B, Hkv, M, hd); None: no cache (training)
        past_values: Tensor | None = None,
        position: Tensor | None = None,  # (1,) int64: filled slots of the cache
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        steps, device = embeds.shape[1], embeds.device
        past = 0 if past_keys is None else past_keys.shape[3]
        start = torch.zeros(1, dtype=torch.int64, device=device) if position is None else position
        positions = start + torch.arange(steps, device=device)  # (S,)
        mask = causal_mask(steps, past, start, device)
        hidden, keys, values = self.transformer(embeds, positions, mask, past_keys, past_values)
        stop_logits = self.stop_head(hidden).squeeze(-1)  # (B, S)
        return hidden, stop_logits, keys, values  # keys, values: (L, B, Hkv, S, hd), new only


class TextCursor(nn.Module):
    """For each position i of a text's ids, the vector the LM input gets while character i is
    being spoken: the tokens from i - before to i + after, each offset with its own embedding
    table, summed (PAD beyond the text). One table of window x vocab rows, so the graph is one
    Gather and one ReduceSum."""

    def __init__(self, cfg: DiTARConfig) -> None:
        super().__init__()
        self.before, self.window, self.vocab = cfg.cursor.before, cfg.cursor.window, cfg.text.vocab_size
        self.pad = cfg.text.PAD
        self.embedding = nn.Embedding(self.window * self.vocab, cfg.lm.dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:  # (T,) -> (T, D)
        t, device = ids.shape[0], ids.device
        after = self.window - 1 - self.before
        padded = F.pad(ids, (self.before, after), value=self.pad)  # (T + window - 1,)
        offsets = torch.arange(self.window, device=device)
        windows = padded[torch.arange(t, device=device)[:, None] + offsets[None, :]]  # (T, window)
        return self.embedding(windows + offsets * self.vocab).sum(dim=1)


# --------------------------------------------------------------------------------------
# Aggregation encoder: P latent frames -> one LM input vector
# --------------------------------------------------------------------------------------
class PatchAggregator(nn.Module):
    def __init__(self, cfg: DiTARConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(cfg.audio.latent_dim, cfg.aggregator.dim)
        self.token = nn.Parameter(torch.randn(cfg.aggregator.dim) * 0.02)
        self.transformer = Transformer(cfg.aggregator)
        self.out_proj = nn.Linear(cfg.aggregator.dim, cfg.lm.dim)

    def forward(self, patches: Tensor) -> Tensor:  # (N, P, C) -> (N, D_lm)
        n = patches.shape[0]
        x = torch.cat([self.token.expand(n, 1, -1), self.in_proj(patches)], dim=1)  # (N, 1+P, d)
        y, _, _ = self.transformer(x, torch.arange(x.shape[1], device=x.device))  # bidirectional: no mask
        return self.out_proj(y[:, 0])


# --------------------------------------------------------------------------------------
# LocDiT: [h_i + time, history frames, noisy patch] -> velocity on the patch
# --------------------------------------------------------------------------------------
class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> (B, dim): sinusoidal features of 1000 t (like DDPM step indices), then
    an MLP. Kept in fp32 by the fp16 export, found by this module's name."""

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        half = features // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * 1000.0 * self.freqs[None, :]  # (B, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class LocDiT(nn.Module):
    def __init__(self, cfg: DiTARConfig) -> None:
        super().__init__()
        d, c = cfg.locdit.dim, cfg.audio.latent_dim
        self.patch_size, self.history_frames = cfg.patch_size, cfg.history_frames
        self.isolated_history = cfg.isolated_history
        self.cond_proj = nn.Linear(cfg.lm.dim, d)
        self.time_embed = TimestepEmbedding(cfg.diffusion.time_embed_dim, d)
        self.history_proj = nn.Linear(c, d)
        self.noisy_proj = nn.Linear(c, d)
        self.transformer = Transformer(cfg.locdit)
        self.out_proj = nn.Linear(d, c)
        nn.init.zeros_(self.out_proj.weight)  # start as "predict zero velocity": stable early steps
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: Tensor,  # (B, P, C) noisy patch at time t
        t: Tensor,  # (B,)
        cond: Tensor,  # (B, D_lm) LM output; zeros for the unguided branch
        history: Tensor,  # (B, H*P, C) clean previous frames
    ) -> Tensor:
        c = self.cond_proj(cond) + self.time_embed(t)  # (B, d)
        tokens = torch.cat([c[:, None], self.history_proj(history), self.noisy_proj(x)], dim=1)
        mask = (isolated_history_mask(self.history_frames, self.patch_size, x.device)
                if self.isolated_history else None)
        # Bidirectional; only the patch positions' velocities are read out.
        positions = torch.arange(tokens.shape[1], device=x.device)
        y, _, _ = self.transformer(tokens, positions, mask, outputs=self.patch_size)
        return self.out_proj(y)  # (B, P, C)

    def history_cache(self, history: Tensor) -> tuple[Tensor, Tensor]:
        """With isolated history, the history tokens' keys and values at every layer,
        (L, B, Hkv, H*P, hd) each. Those tokens attend only among themselves, so they are the
        same at every solver step and in both guidance branches of a patch: computed once
        per patch instead of 2 x NFE times."""
        if not self.isolated_history:
            raise ValueError("only a LocDiT whose history attends to itself alone can cache it")
        positions = torch.arange(1, 1 + self.history_frames, device=history.device)
        _, keys, values = self.transformer(self.history_proj(history), positions, outputs=1)
        return keys, values

    def forward_cached(self, x: Tensor, t: Tensor, cond: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """forward() with the history given as `history_cache` made it: the condition token
        and the patch, at their own positions, attend to the cached history and to each other."""
        c = self.cond_proj(cond) + self.time_embed(t)  # (B, d)
        tokens = torch.cat([c[:, None], self.noisy_proj(x)], dim=1)  # (B, 1 + P, d)
        first_patch = 1 + self.history_frames
        positions = torch.cat([torch.zeros(1, dtype=torch.int64, device=x.device),
                               torch.arange(first_patch, first_patch + self.patch_size, device=x.device)])
        y, _, _ = self.transformer(tokens, positions, None, keys, values, outputs=self.patch_size)
        return self.out_proj(y)  # (B, P, C)


# --------------------------------------------------------------------------------------
# Speech VAE: waveform <-> latent frames, one frame per hop
# --------------------------------------------------------------------------------------
def dft_basis(n_fft: int) -> tuple[Tensor, Tensor]:
    """Hann-windowed real DFT bases, scaled by 1/sqrt(n_fft) so spectra stay fp16-safe.

    analysis (2K, 1, n_fft): conv kernels giving [real; imag] of each frame.
    synthesis (2K, n_fft): [real, imag] @ synthesis = windowed inverse rDFT frame, and
    periodic Hann windows at 50% overlap sum to one, so overlap-add needs no envelope.
    """
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann
    angle = 2 * np.pi * k[:, None] * n[None, :] / n_fft  # (K, N)
    scale = 1.0 / math.sqrt(n_fft)
    analysis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window * scale
    weight = np.full(len(k), 2.0)
    weight[0] = weight[-1] = 1.0  # DC and Nyquist appear once in the full spectrum
    inverse = np.concatenate([np.cos(angle), -np.sin(angle)]) * np.tile(weight, 2)[:, None]
    synthesis = inverse * window / math.sqrt(n_fft)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return as_tensor(analysis[:, None, :]), as_tensor(synthesis)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, causal: bool, layer_scale: float) -> None:
        super().__init__()
        self.pad = (kernel - 1, 0) if causal else ((kernel - 1) // 2, kernel // 2)
        self.dwconv = nn.Conv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 3 * dim)
        self.pw2 = nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:  # (B, dim, F)
        y = self.dwconv(F.pad(x, self.pad)).transpose(1, 2)  # (B, F, dim)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.transpose(1, 2)


class VAEEncoder(nn.Module):
    """Waveform -> (mean, log-variance) per frame; log power spectrum, then ConvNeXt."""

    def __init__(self, cfg: VAEConfig, hop: int, latent_dim: int) -> None:
        super().__init__()
        self.hop, self.n_fft = hop, cfg.n_fft
        analysis, _ = dft_basis(cfg.n_fft)
        self.register_buffer("analysis", analysis, persistent=False)
        bins = cfg.n_fft // 2 + 1
        self.in_conv = nn.Conv1d(bins, cfg.dim, 1)
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(cfg.dim, cfg.kernel_size, False, 1 / cfg.encoder_layers)
              for _ in range(cfg.encoder_layers))
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, 2 * latent_dim)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:  # (B, T), T = F * hop
        pad = (self.n_fft - self.hop) // 2
        spec = F.conv1d(F.pad(audio[:, None], (pad, pad)), self.analysis, stride=self.hop)  # (B, 2K, F)
        real, imag = spec.chunk(2, dim=1)
        log_power = torch.log(torch.clamp(real * real + imag * imag, min=1e-6))  # (B, K, F)
        h = self.blocks(self.in_conv(log_power))  # (B, dim, F)
        mean, logvar = self.out(self.norm(h.transpose(1, 2))).chunk(2, dim=-1)  # (B, F, C) each
        return mean, logvar


class VAEDecoder(nn.Module):
    """Latent frames -> waveform. Causal convolutions and causal overlap-add: the audio of
    frame n depends only on frames <= n, so streaming with enough left context is exact.
    The spectrum is predicted as log-magnitude and phase (Vocos); the inverse DFT is a
    matmul with a fixed basis, so the graph has no complex tensors and no ISTFT op."""

    def __init__(self, cfg: VAEConfig, hop: int, latent_dim: int) -> None:
        super().__init__()
        self.hop, self.kernel = hop, cfg.kernel_size
        self.max_log_magnitude = cfg.max_log_magnitude
        _, synthesis = dft_basis(cfg.n_fft)
        self.register_buffer("synthesis", synthesis, persistent=False)
        self.in_conv = nn.Conv1d(latent_dim, cfg.dim, cfg.kernel_size)
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(cfg.dim, cfg.kernel_size, True, 1 / cfg.decoder_layers)
              for _ in range(cfg.decoder_layers))
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 2 * (cfg.n_fft // 2 + 1))

    def forward(self, z: Tensor) -> Tensor:  # (B, F, C) -> (B, F * hop)
        b, frames, _ = z.shape
        h = self.in_conv(F.pad(z.transpose(1, 2), (self.kernel - 1, 0)))  # (B, dim, F)
        h = self.norm(self.blocks(h).transpose(1, 2))  # (B, F, dim)
        log_mag, phase = self.head(h).chunk(2, dim=-1)  # (B, F, K) each
        mag = torch.exp(torch.clamp(log_mag, max=self.max_log_magnitude))
        spectrum = torch.cat([mag * torch.cos(phase), mag * torch.sin(phase)], dim=-1)  # (B, F, 2K)
        frames_audio = spectrum @ self.synthesis  # (B, F, 2 * hop), windowed
        head, tail = frames_audio[..., : self.hop], frames_audio[..., self.hop :]
        tail = F.pad(tail, (0, 0, 1, 0))[:, :frames]  # frame n-1's second half lands on n
        return (head + tail).reshape(b, frames * self.hop)


class SpeechVAE(nn.Module):
    def __init__(self, cfg: DiTARConfig) -> None:
        super().__init__()
        c = cfg.audio.latent_dim
        self.encoder = VAEEncoder(cfg.vae, cfg.audio.hop_length, c)
        self.decoder = VAEDecoder(cfg.vae, cfg.audio.hop_length, c)
        # Per-channel statistics of the posterior means over the training corpus. Latents
        # seen by the LM and LocDiT are normalised with them; set after VAE training.
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))

    def encode(self, audio: Tensor) -> Tensor:  # (B, T) -> normalised latents (B, F, C)
        mean, _ = self.encoder(audio)
        return (mean - self.latent_mean) / self.latent_std

    def decode(self, latents: Tensor) -> Tensor:  # normalised (B, F, C) -> (B, F * hop)
        return self.decoder(latents * self.latent_std + self.latent_mean)


# --------------------------------------------------------------------------------------
# The whole system
# --------------------------------------------------------------------------------------
class DiTAR(nn.Module):
    def __init__(self, config: DiTARConfig) -> None:
        super().__init__()
        self.config = config
        self.vae = SpeechVAE(config)
        self.text_embedding = nn.Embedding(config.text.vocab_size, config.lm.dim)
        self.text_cursor = TextCursor(config) if config.cursor else None
        self.aggregator = PatchAggregator(config)
        self.lm = CausalLM(config)
        self.locdit = LocDiT(config)
        nn.init.normal_(self.text_embedding.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def perturb_weights(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add seeded Gaussian noise to every parameter: an untrained model whose every path
    (zero-initialised output layers included) carries signal, for parity tests and benches."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model
