"""VoxCPM's graph wrappers against the `voxcpm` package's own modules, in torch and through ONNX Runtime.

Tiny random models of both architectures (tests/voxcpm_oracle.py), loaded by the strict loader.
The LM graph is checked against the package's own prefill + fill_caches + forward_step loop
as `_inference` runs it, called module by module here.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest

from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError, import_voxcpm

with contextlib.suppress(VoxCPMCheckpointError):  # the loader's placeholders for voxcpm's unused imports
    import_voxcpm("voxcpm")
pytest.importorskip("voxcpm", reason="voxcpm==2.0.3 (the oracle for the VoxCPM graphs) is not installed")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from voxcpm_oracle import FORMATS, build_package_model, tiny_config, write_checkpoint  # noqa: E402

from ditarkit.export.voxcpm import load_voxcpm  # noqa: E402
from ditarkit.export.voxcpm.graphs import (  # noqa: E402
    VoxLMGraph,
    VoxLocDiTGraph,
    audio_shape,
    decoder_context_frames,
    graph_modules,
    lm_shape,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

# Explicit matmul-softmax attention against SDPA's kernel, and the graphs' row slicing against
# whole-sequence ops: the same fp32 math in another summation order, ~1e-6 at these magnitudes
# (|values| up to ~10); 10x headroom. FSQ rounds, so a value within this of a level boundary
# would jump a level: at 1e-6 errors that is a ~1e-6 chance per value, never seen here.
TORCH_ATOL = 1e-5
# The VAE wrappers call the package's own conv layers on the same inputs: bit for bit but for
# kernels choosing another algorithm on another length.
VAE_ATOL = 1e-6
# A chunk decoded with its left context against the whole decode: the same convs over shorter
# inputs (another conv algorithm may sum in another order).
CONTEXT_ATOL = 1e-5
# ONNX Runtime's MatMul/Conv/Softmax kernels against torch's, fp32, relative to max(1, |reference|).
ONNX_RTOL = 1e-5

VARIANTS = ("voxcpm", "voxcpm2", "voxcpm2-no-rope")  # the last: v2 with residual_lm_no_rope
ARCHS = VARIANTS[:2]


def _config(variant: str) -> dict:
    config = tiny_config(variant.removesuffix("-no-rope"))
    config["residual_lm_no_rope"] = variant.endswith("-no-rope")  # v1's config ignores the key
    return config


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    """Each variant written as a release folder (fp32 weights) and loaded strictly: fp32, eval, weight norm folded."""
    root = tmp_path_factory.mktemp("voxcpm-graphs")
    loaded = {}
    for seed, variant in enumerate(VARIANTS):
        config = _config(variant)
        folder = write_checkpoint(root / variant, config, build_package_model(config, seed=seed), FORMATS[1])
        loaded[variant] = load_voxcpm(folder)[0]
    return loaded


def _err(actual: Tensor, expected: Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual - expected).abs().max().item()


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- each graph against the package module it wraps -------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_vae_graphs_match_package(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    vae, graphs, shape = model.audio_vae, graph_modules(model), audio_shape(model)
    audio = _randn(1, 24 * shape["hop_length"], scale=0.3)
    latents = graphs["vae_encoder"](audio)
    assert latents.shape == (1, 24, shape["latent_dim"])
    assert _err(latents, vae.encode(audio, shape["sample_rate"]).transpose(1, 2)) <= VAE_ATOL
    z = _randn(1, 12, shape["latent_dim"], seed=1)
    audio_out = graphs["vae_decoder"](z)
    assert audio_out.shape == (1, 12 * shape["output_hop_length"])
    assert _err(audio_out, vae.decode(z.transpose(1, 2))[:, 0]) <= VAE_ATOL  # v2: at its default out_sample_rate


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_context_is_exact_and_tight_and_decoder_causal(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    decoder, shape = graph_modules(model)["vae_decoder"], audio_shape(model)
    ctx, hop, patch = decoder_context_frames(model), shape["output_hop_length"], model.patch_size
    assert shape["decoder_context_frames"] == ctx
    frames = ctx + 4 * patch  # the tiny VAE's small strides make its context longer than a release's
    z = _randn(1, frames, shape["latent_dim"], seed=2)
    whole = decoder(z)
    for k in (ctx, ctx + patch + 1):  # frames [k:] and one patch [k:k + P] (as a stream decodes) with context
        for end in (frames, k + patch):
            chunk = decoder(z[:, k - ctx : end])
            assert _err(chunk[:, ctx * hop :], whole[:, k * hop : end * hop]) <= CONTEXT_ATOL
    assert _err(decoder(z[:, : ctx + 1]), whole[:, : (ctx + 1) * hop]) <= CONTEXT_ATOL  # the future changes nothing
    # Structurally: the first sample of frame k reads frame k - ctx but not k - ctx - 1 (tight),
    # and no later frame (causal). Gradients through non-read inputs are exactly zero.
    k = ctx + 2
    z = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(decoder(z)[0, k * hop], z)
    reads = grad.abs().sum(dim=-1)[0]
    assert reads[k - ctx] > 0 and torch.all(reads[: k - ctx] == 0) and torch.all(reads[k + 1 :] == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_encoder_and_locdit_graphs_match_package(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    graphs = graph_modules(model)
    config, p, d = model.config, model.patch_size, model.feat_dim
    ids = torch.tensor([5, 101, 0, 16, 103, 104, 127])
    scale = config.lm_config.scale_emb if config.lm_config.use_mup else 1.0  # as _inference
    assert _err(graphs["text_embedding"](ids), model.base_lm.embed_tokens(ids) * scale) == 0.0

    patches = _randn(5, p, d, seed=3)
    expected = model.enc_to_lm_proj(model.feat_encoder(patches[None]))[0]
    assert _err(graphs["patch_encoder"](patches), expected) <= TORCH_ATOL

    cond_dim = lm_shape(model)["cond_dim"]
    x, history = _randn(3, p, d, seed=4), _randn(3, p, d, seed=5)
    t = torch.tensor([1.0, 0.37, 0.0])
    cond = _randn(3, cond_dim, seed=6, scale=3.0)
    cond[1] = 0.0  # the unconditional guidance branch
    estimator = model.feat_decoder.estimator
    expected = estimator(x.transpose(1, 2), cond, t, history.transpose(1, 2), torch.zeros(3)).transpose(1, 2)
    assert _err(graphs["locdit"](x, t, cond, history), expected) <= TORCH_ATOL


# -- the LM graph against the package's prefill + forward_step loop -----------------------------


def _prefix(model: nn.Module, arch: str) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (1, T), feats (1, T, P, D), audio mask (1, T)): v2's reference layout, v1's continuation."""
    text = [16, 9, 10, 5]
    if arch == "voxcpm":  # [text ids, 101, prompt patches]
        tokens, audio = text + [101, 0, 0, 0], [0] * 5 + [1] * 3
    else:  # [103, reference patches, 104, text ids, 101]
        tokens, audio = [103, 0, 0, 0, 104, *text, 101], [0, 1, 1, 1] + [0] * 6
    mask = torch.tensor([audio], dtype=torch.float32)
    feats = _randn(1, len(tokens), model.patch_size, model.feat_dim, seed=7) * mask[..., None, None]
    return torch.tensor([tokens]), feats, mask


def _heads(model: nn.Module, arch: str, lm_hidden: Tensor, res_hidden: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, stop logits (1, 2)) as _inference computes them."""
    a, b = model.lm_to_dit_proj(lm_hidden), model.res_to_dit_proj(res_hidden)
    mu = a + b if arch == "voxcpm" else torch.cat((a, b), dim=-1)
    return mu, model.stop_head(model.stop_actn(model.stop_proj(lm_hidden)))


def _package_run(model: nn.Module, arch: str, steps: int) -> tuple[Tensor, list[Tensor], list, Tensor]:
    """(prefix embeds, step embeds, [(mu, stop logits)] per call, filled KV (2, L, 1, Hkv, len, hd)), as _inference."""
    tokens, feats, feat_mask = _prefix(model, arch)
    text_mask, fm = 1.0 - feat_mask, feat_mask.unsqueeze(-1)
    feat_embed = model.enc_to_lm_proj(model.feat_encoder(feats))
    scale = model.config.lm_config.scale_emb if model.config.lm_config.use_mup else 1.0
    combined = text_mask.unsqueeze(-1) * model.base_lm.embed_tokens(tokens) * scale + fm * feat_embed
    enc, kv = model.base_lm(inputs_embeds=combined, is_causal=True)
    model.base_lm.kv_cache.fill_caches(kv)
    enc = model.fsq_layer(enc) * fm + enc * text_mask.unsqueeze(-1)
    if arch == "voxcpm":
        res_in = enc + fm * feat_embed
    else:
        res_in = model.fusion_concat_proj(torch.cat((enc, fm * feat_embed), dim=-1))
    res, res_kv = model.residual_lm(inputs_embeds=res_in, is_causal=True)
    model.residual_lm.kv_cache.fill_caches(res_kv)
    lm_hidden, res_hidden = enc[:, -1], res[:, -1]
    outputs, step_embeds = [_heads(model, arch, lm_hidden, res_hidden)], []
    for i in range(steps):
        patch = _randn(1, 1, model.patch_size, model.feat_dim, seed=20 + i)
        embed = model.enc_to_lm_proj(model.feat_encoder(patch))[:, 0]
        step_embeds.append(embed)
        position = torch.tensor([model.base_lm.kv_cache.step()])
        lm_hidden = model.fsq_layer(model.base_lm.forward_step(embed, position).clone())
        res_in = lm_hidden + embed if arch == "voxcpm" else model.fusion_concat_proj(torch.cat((lm_hidden, embed), -1))
        res_hidden = model.residual_lm.forward_step(res_in, torch.tensor([model.residual_lm.kv_cache.step()])).clone()
        outputs.append(_heads(model, arch, lm_hidden, res_hidden))
    filled = model.base_lm.kv_cache.current_length
    caches = [lm.kv_cache.kv_cache[:, :, :, :, :filled] for lm in (model.base_lm, model.residual_lm)]
    return combined, step_embeds, outputs, torch.cat(caches, dim=1)


class _GraphCache:
    """The runtime's side: a (L, 1, Hkv, capacity, hd) cache whose unfilled slots hold large finite garbage."""

    def __init__(self, graph: VoxLMGraph, shape: dict[str, int], capacity: int = 24) -> None:
        self.graph, self.position = graph, 0
        dims = (shape["layers"], 1, shape["kv_heads"], capacity, shape["head_dim"])
        self.keys, self.values = _randn(*dims, seed=8, scale=1e3), _randn(*dims, seed=9, scale=1e3)

    def __call__(self, embeds: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
        cond, stop, new_k, new_v = self.graph(embeds, audio_mask, self.keys, self.values, torch.tensor([self.position]))
        end = self.position + embeds.shape[1]
        self.keys[:, :, :, self.position : end], self.values[:, :, :, self.position : end] = new_k, new_v
        self.position = end
        return cond, stop

    def filled(self) -> Tensor:
        return torch.stack([self.keys, self.values])[..., : self.position, :]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_graph_follows_the_package_prefill_and_steps(models: dict[str, nn.Module], variant: str) -> None:
    model, arch = models[variant], variant.removesuffix("-no-rope")
    assert (model.residual_lm.rope_emb is None) == variant.endswith("-no-rope")
    steps = 4
    combined, step_embeds, expected, expected_kv = _package_run(model, arch, steps)
    _, _, audio_mask = _prefix(model, arch)
    cache = _GraphCache(VoxLMGraph(model), lm_shape(model))
    got = [cache(combined, audio_mask)] + [cache(e[:, None], torch.ones(1, 1)) for e in step_embeds]
    for (cond, stop), (mu, logits) in zip(got, expected):
        assert _err(cond, mu) <= TORCH_ATOL
        assert _err(stop, logits[:, 1] - logits[:, 0]) <= TORCH_ATOL
        assert bool(torch.sigmoid(stop) > 0.5) == bool(logits.argmax(dim=-1) == 1)
    assert _err(cache.filled(), expected_kv) <= TORCH_ATOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_prefill_split_in_two_calls_equals_one(models: dict[str, nn.Module], variant: str) -> None:
    model, arch = models[variant], variant.removesuffix("-no-rope")
    combined, _, _, _ = _package_run(model, arch, steps=0)
    _, _, audio_mask = _prefix(model, arch)
    graph, shape = VoxLMGraph(model), lm_shape(model)
    whole = _GraphCache(graph, shape)
    cond, stop = whole(combined, audio_mask)
    split = _GraphCache(graph, shape)
    split(combined[:, :3], audio_mask[:, :3])
    cond2, stop2 = split(combined[:, 3:], audio_mask[:, 3:])
    assert _err(cond2, cond) <= TORCH_ATOL and _err(stop2, stop) <= TORCH_ATOL
    assert _err(split.filled(), whole.filled()) <= TORCH_ATOL


# -- through ONNX (TorchScript exporter, opset 17) and ONNX Runtime at another shape --------------


def _io(model: nn.Module, name: str, second: bool) -> tuple[dict[str, Tensor], list[str], dict]:
    """(inputs by name in forward order, output names, dynamic axes) at the export shape or a second one."""
    shape, a = audio_shape(model), lm_shape(model)
    p, d = model.patch_size, model.feat_dim
    if name == "vae_encoder":
        inputs, outputs = {"audio": _randn(1, (11 if second else 6) * shape["hop_length"], scale=0.3)}, ["latents"]
        return inputs, outputs, {"audio": {1: "samples"}, "latents": {1: "frames"}}
    if name == "vae_decoder":
        inputs, outputs = {"latents": _randn(1, 9 if second else 5, d)}, ["audio"]
        return inputs, outputs, {"latents": {1: "frames"}, "audio": {1: "samples"}}
    if name == "text_embedding":
        ids = torch.tensor([3, 101, 16, 127, 0, 9, 104, 5, 1][: 9 if second else 4])
        return {"ids": ids}, ["embeds"], {"ids": {0: "tokens"}, "embeds": {0: "tokens"}}
    if name == "patch_encoder":
        return {"patches": _randn(4 if second else 2, p, d)}, ["vectors"], {"patches": {0: "n"}, "vectors": {0: "n"}}
    if name == "locdit":
        b = 3 if second else 2
        inputs = {"x": _randn(b, p, d), "t": torch.linspace(0.9, 0.1, b), "cond": _randn(b, a["cond_dim"], seed=1),
                  "history": _randn(b, p, d, seed=2)}  # fmt: skip
        return inputs, ["velocity"], {k: {0: "batch"} for k in [*inputs, "velocity"]}
    steps, capacity, position = (5, 16, 7) if second else (3, 8, 2)
    kv = (a["layers"], 1, a["kv_heads"], capacity, a["head_dim"])
    inputs = {"embeds": _randn(1, steps, a["dim"], seed=3, scale=5.0),
              "audio_mask": torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0][:steps]]),
              "past_keys": _randn(*kv, seed=4), "past_values": _randn(*kv, seed=5),
              "position": torch.tensor([position])}  # fmt: skip
    lm = {"embeds": {1: "steps"}, "audio_mask": {1: "steps"}, "past_keys": {3: "capacity"},
          "past_values": {3: "capacity"}, "new_keys": {3: "steps"}, "new_values": {3: "steps"}}  # fmt: skip
    return inputs, ["hidden", "stop_logit", "new_keys", "new_values"], lm


GRAPH_NAMES = ("vae_encoder", "vae_decoder", "text_embedding", "patch_encoder", "lm", "locdit")


@pytest.mark.parametrize(
    ("variant", "name"), [(arch, name) for arch in ARCHS for name in GRAPH_NAMES] + [("voxcpm2-no-rope", "lm")]
)
def test_graph_exports_to_onnx_and_runs_in_onnxruntime(
    models: dict[str, nn.Module], variant: str, name: str, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = models[variant]
    graph = graph_modules(model)[name]
    inputs, outputs, axes = _io(model, name, second=False)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python ints taken from shapes
        torch.onnx.export(graph, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                          input_names=list(inputs), output_names=outputs, dynamic_axes=axes)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, _, _ = _io(model, name, second=True)
    expected = graph(*inputs.values())
    got = session.run(outputs, {k: v.numpy() for k, v in inputs.items()})
    for out_name, want, have in zip(outputs, expected if name == "lm" else [expected], got):
        err = _err(torch.from_numpy(have), want)
        assert err <= ONNX_RTOL * max(1.0, want.abs().max().item()), (out_name, err)


# -- shapes and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_helpers_follow_the_config(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    config, lm = model.config, lm_shape(model)
    assert lm["layers"] == config.lm_config.num_hidden_layers + config.residual_lm_num_layers
    assert (lm["kv_heads"], lm["dim"]) == (config.lm_config.num_key_value_heads, config.lm_config.hidden_size)
    assert lm["cond_dim"] == config.dit_config.hidden_dim * (2 if arch == "voxcpm2" else 1)
    audio, vae_config = audio_shape(model), config.audio_vae_config
    assert audio["hop_length"] == 4 and audio["output_sample_rate"] == (16000 if arch == "voxcpm" else 48000)
    assert audio["output_hop_length"] * audio["sample_rate"] == audio["hop_length"] * audio["output_sample_rate"]
    assert audio["latent_dim"] == vae_config.latent_dim == model.feat_dim
    assert sorted(graph_modules(model)) == sorted(GRAPH_NAMES)


@pytest.mark.parametrize("arch", ARCHS)
def test_dit_mean_mode_is_refused_in_one_line(arch: str) -> None:
    config = tiny_config(arch)
    if arch == "voxcpm":
        config["dit_mean_mode"] = True  # v1 reads it at the top level, v2 in dit_config
    else:
        config["dit_config"]["dit_mean_mode"] = True
    model = build_package_model(config)
    for build in (VoxLocDiTGraph, graph_modules):
        with pytest.raises(VoxCPMCheckpointError, match="mean mode is not supported") as err:
            build(model)
        assert "\n" not in str(err.value)
