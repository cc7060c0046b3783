"""Qwen3-MoE text model in Flax NNX: the language model of Qwen3-VL-MoE and InternVL3.5-MoE.

Semantics follow transformers' `Qwen3MoeForCausalLM` (`qwen3_moe`) and `Qwen3VLMoeTextModel`
(`qwen3_vl_moe` text part), which differ only where this port has a switch:
- grouped-query attention with an RMSNorm over each head of q and k (before rotary), no bias
  by default, scale `head_dim ** -0.5`;
- rotary in rotate-half form over the whole head; Qwen3-VL's M-RoPE gives every token three
  positions (time, height, width) and builds one frequency vector from them, interleaved: of
  the head_dim/2 frequencies, index j takes the height position when `j % 3 == 1` and
  `j < 3 * mrope_section[1]`, the width position when `j % 3 == 2` and `j < 3 *
  mrope_section[2]`, else the time position (text tokens carry the same number three times);
- MoE blocks in every `decoder_sparse_step`-th layer outside `mlp_only_layers`: softmax router
  over all experts, top-k, renormalised when `norm_topk_prob` (always in Qwen3-VL), no shared
  expert; the rest are SwiGLU MLPs;
- DeepStack (Qwen3-VL): after decoder layer i < len(deepstack), the i-th vision feature is
  added to the hidden state at the image positions (`run_layers(additions=...)`, features
  already scattered into `[B, T, D]` with zeros elsewhere, which adds nothing there).

The model keeps the interface of `deepseek_v3.DeepseekV3` (`embed`, `context`, `run_layers`,
`logits`, `__call__` -> `TextOutput`, routers at `layers[i].mlp.gate`, routed experts at
`layers[i].mlp.experts` as `StackedExperts` `gate_up [E, D, 2F]` / `down [E, F, D]`), so the
calibration and quantization stages can walk either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types, moe
from mode_jax.models.deepseek_v3 import (
    Context,
    DecoderLayer,
    RMSNorm,
    StackedExperts,
    TextOutput,
    attention_span,
    check_cache_room,
    key_scores,
    last_positions,
    run_decoder_layers,
)

MODEL_TYPES = ("qwen3_moe", "qwen3_vl_moe_text")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Hyper-parameters (names as in the HF qwen3_moe config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] | None = None  # None: one position per token
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        field_types.check(self)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.mrope_section is not None and (
                len(self.mrope_section) != 3 or min(self.mrope_section) < 0):
            raise ValueError(f"mrope_section must be three sizes >= 0, got {self.mrope_section}")
        if self.num_experts:
            self.router_config()

    @property
    def n_routed_experts(self) -> int:
        """DeepSeek's name for `num_experts`, which the stages read."""
        return self.num_experts

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder-layer indices of the MoE layers (the order of `routing` outputs)."""
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def router_config(self) -> moe.RouterConfig:
        return moe.RouterConfig(num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                                scoring="softmax", norm_topk_prob=self.norm_topk_prob)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any) -> TextConfig:
        """From a `qwen3_moe` config or a `qwen3_vl_moe` `text_config` (dict, or an object with
        `to_dict()`). Raises ValueError naming what this port does not implement."""
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        model_type = d.get("model_type", "qwen3_moe")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"text model_type {model_type!r} is not one of {MODEL_TYPES}")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"{model_type} config lacks required keys: {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r}: only 'silu' is supported")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window: sliding-window attention is not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope type {rope.get('rope_type')!r}: only 'default' is supported")
        heads = d["num_attention_heads"]
        is_vl = model_type == "qwen3_vl_moe_text"
        section = rope.get("mrope_section", [24, 20, 20] if is_vl else None)
        if is_vl and rope.get("mrope_interleaved") is False:
            raise ValueError("mrope_interleaved=false (Qwen2-VL's chunked M-RoPE) is not supported")
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0),
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            moe_intermediate_size=d.get("moe_intermediate_size", 0),
            num_experts=d.get("num_experts", d.get("num_local_experts", 0)) or 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 1),
            norm_topk_prob=True if is_vl else bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 1e6))),
            mrope_section=tuple(section) if section is not None else None,
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        try:
            return cls(**kw)
        except ValueError as err:
            raise ValueError(f"unsupported {model_type} config: {err}") from None


# ---------------------------------------------------------------- rotary


def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which of the three positions (0 time, 1 height, 2 width) drives each frequency."""
    half = cfg.head_dim // 2
    axes = np.zeros(half, np.int32)
    if cfg.mrope_section is not None:
        j = np.arange(half)
        for axis in (1, 2):
            axes[(j % 3 == axis) & (j < 3 * cfg.mrope_section[axis])] = axis
    return axes


def rotary_cos_sin(positions: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, head_dim]` (rotate-half layout) for positions `[B, T]` or, with M-RoPE,
    `[3, B, T]` (a `[B, T]` array means the same position on all three axes)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if positions.ndim == 2:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    else:
        per_axis = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, hd/2]
        pick = jax.nn.one_hot(mrope_axes(cfg), 3, dtype=jnp.float32).T  # [3, hd/2]
        freqs = jnp.sum(per_axis * pick[:, None, None, :], axis=0)  # exact: one term is kept
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half_apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------- layers


class Router(moe.UsesMesh, nnx.Module):
    """Router `kernel [D, E]`. The logits are computed in the model dtype and the softmax in
    float32, as transformers' Qwen3-MoE does (DeepSeek-V3's router is float32 throughout)."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.num_experts),
                                     param_dtype))
        self.e_score_correction_bias = None
        self.config = cfg.router_config()

    def logits(self, x: jax.Array) -> jax.Array:
        """Router logits `[N, E]` float32 (rounded to the model dtype first, as in PyTorch)."""
        kernel = self.kernel[...]
        y = jnp.matmul(x.astype(kernel.dtype), kernel, precision=jax.lax.Precision.HIGHEST)
        return y.astype(jnp.float32)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return moe.route_on_mesh(self.logits(x), self.config, None, self.mesh)


class MoE(nnx.Module):
    """Softmax-routed experts, no shared expert (`shared_experts` is None for the walkers)."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs, experts_impl="sorted"):
        self.gate = Router(cfg, param_dtype, rngs)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size,
                                      cfg.moe_intermediate_size, param_dtype, rngs, experts_impl)
        self.shared_experts = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        b, t, d = x.shape
        ids, weights = self.gate(x.reshape(b * t, d))
        y = self.experts(x.reshape(b * t, d), ids, weights).reshape(b, t, d)
        return y, (ids.reshape(b, t, -1), weights.reshape(b, t, -1))


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs):
        d, h, kvh, hd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim)
        self.cfg = cfg

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=cfg.attention_bias, param_dtype=param_dtype,
                              rngs=rngs)

        self.q_proj = linear(d, h * hd)
        self.k_proj = linear(d, kvh * hd)
        self.v_proj = linear(d, kvh * hd)
        self.o_proj = linear(h * hd, d)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)

    def __call__(self, x: jax.Array, ctx: Context, *, image_query_mask: jax.Array | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None):
        """x `[B, T, D]` -> (out `[B, T, D]`, image_scores `[B, S]` or None, updated kv or
        None); kv: this layer's cache `(k, v)`, each `[B, S, kv_heads, head_dim]` (k rotated)."""
        c = self.cfg
        b, t, _ = x.shape
        cos, sin = ctx.cos[:, :, None, :], ctx.sin[:, :, None, :]
        q = self.q_norm(self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim))
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = rotate_half_apply(q, cos, sin), rotate_half_apply(k, cos, sin)
        if kv is not None:
            start = (0, ctx.cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        group = c.num_attention_heads // c.num_key_value_heads
        qg = q.reshape(b, t, c.num_key_value_heads, group, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * c.head_dim**-0.5
        scores = scores.reshape(b, c.num_attention_heads, t, -1)
        scores = jnp.where(ctx.mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        pg = probs.astype(v.dtype).reshape(b, c.num_key_value_heads, group, t, -1)
        out = jnp.einsum("bkgts,bskd->btkgd", pg, v).reshape(b, t, -1)
        image_scores = None if image_query_mask is None else key_scores(probs, image_query_mask)
        return self.o_proj(out), image_scores, kv


# ---------------------------------------------------------------- the model


class KVCache(NamedTuple):
    """Per-layer rotated keys and values `[B, S, kv_heads, head_dim]` plus the bookkeeping of
    `deepseek_v3.KVCache` (key_mask `[B, S]`, length, num_real `[B]`), and `rope_delta [B]`
    int32: M-RoPE positions run ahead of (or behind) the token count after an image by this
    much, so a cached step's default position is `num_real + rope_delta`."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array
    num_real: jax.Array
    rope_delta: jax.Array

    def layer_kv(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.k[i], self.v[i]

    def with_kv(self, per_layer: list[tuple[jax.Array, jax.Array]]) -> KVCache:
        return self._replace(k=tuple(a for a, _ in per_layer), v=tuple(b for _, b in per_layer))

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            key_mask=jnp.zeros((batch, max_len), bool),
            length=jnp.zeros((), jnp.int32),
            num_real=jnp.zeros((batch,), jnp.int32),
            rope_delta=jnp.zeros((batch,), jnp.int32),
        )


class Qwen3MoeText(nnx.Module):
    """Qwen3-MoE causal LM: embeddings, decoder layers (`nnx.List`), final norm, lm_head (or
    the embedding table when tied). param_dtype is also the compute dtype; routers, norms and
    softmax run in float32."""

    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, experts_impl: str = "sorted",
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = param_dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(cfg, i, param_dtype, rngs, experts_impl, attention=Attention, moe=MoE)
            for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids.astype(jnp.int32))

    def init_cache(self, batch: int, max_len: int, rope_delta=None) -> KVCache:
        """An empty cache in the model dtype; `rope_delta [B]` from `Prepared` (M-RoPE)."""
        cache = KVCache.init(self.config, batch, max_len, self.dtype)
        if rope_delta is not None:
            cache = cache._replace(rope_delta=jnp.asarray(rope_delta, jnp.int32))
        return cache

    def context(self, attention_mask: jax.Array, positions: jax.Array | None = None,
                cache: KVCache | None = None) -> tuple[Context, KVCache | None]:
        """Rotary tables and mask (`deepseek_v3.attention_span`); positions `[B, T]` or, for
        M-RoPE, `[3, B, T]`; by default counted over real tokens (+ the cache's rope_delta)."""
        span = attention_span(attention_mask, cache)
        if positions is None:
            positions = span.positions
            if cache is not None:
                positions = positions + cache.rope_delta[:, None]
        cos, sin = rotary_cos_sin(positions, self.config, self.dtype)
        return Context(cos, sin, span.mask, span.start), span.cache

    def run_layers(self, h: jax.Array, ctx: Context, *, start: int = 0, stop: int | None = None,
                   image_query_mask=None, cache: KVCache | None = None,
                   additions: tuple[jax.Array, ...] = (), return_routing: bool = False,
                   return_mlp_inputs: bool = False,
                   return_hidden: bool = False) -> tuple[jax.Array, TextOutput]:
        """Decoder layers `[start:stop]` on `h [B, T, D]`, as `DeepseekV3.run_layers`;
        `additions[i]` `[B, T, D]` (DeepStack) is added after layer i (absolute index)."""
        return run_decoder_layers(
            self.layers, h, ctx, start=start, stop=stop, image_query_mask=image_query_mask,
            cache=cache, additions=additions, return_routing=return_routing,
            return_mlp_inputs=return_mlp_inputs, return_hidden=return_hidden)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and lm_head: `[B, T, D]` -> `[B, T, V]` float32."""
        x = self.norm(h)
        y = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return y.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds=None,
                 attention_mask=None, positions=None, image_query_mask=None,
                 cache: KVCache | None = None, additions=(), return_routing: bool = False,
                 return_mlp_inputs: bool = False, return_hidden: bool = False,
                 logits_window: int = 0) -> TextOutput:
        """Logits for `input_ids [B, T]` or `inputs_embeds [B, T, D]` (exactly one); the other
        arguments as in `DeepseekV3.__call__` (`additions`: see `run_layers`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        if h.ndim != 3 or h.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs must be [B, T] ids or [B, T, {self.config.hidden_size}] "
                             f"embeddings, got shape {h.shape}")
        b, t = h.shape[:2]
        attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask must be {(b, t)}, got {attention_mask.shape}")
        if cache is not None:
            check_cache_room(cache, t)
        ctx, cache = self.context(attention_mask, positions, cache)
        h, out = self.run_layers(h, ctx, image_query_mask=image_query_mask, cache=cache,
                                 additions=additions, return_routing=return_routing,
                                 return_mlp_inputs=return_mlp_inputs,
                                 return_hidden=return_hidden)
        return out._replace(logits=self.logits(last_positions(h, logits_window)))
