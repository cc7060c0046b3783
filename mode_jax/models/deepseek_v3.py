"""DeepSeek-V3 language model (Kimi-VL's text model) in Flax NNX.

Semantics follow transformers' `DeepseekV3ForCausalLM` (5.23) and Kimi-VL's published modeling
code: MLA attention with the compressed KV latent, interleaved rotary (optionally YaRN), a dense
SwiGLU MLP in the first `first_k_dense_replace` layers and a routed MoE with shared experts after.

Parameter tree (dense weights are `kernel [in, out]`; see docs/design.md):

    embed_tokens.embedding [V, D]
    layers.{l}.input_layernorm.scale, layers.{l}.post_attention_layernorm.scale [D]
    layers.{l}.self_attn.{q_proj | q_a_proj, q_a_layernorm.scale, q_b_proj}.kernel
    layers.{l}.self_attn.{kv_a_proj_with_mqa, kv_b_proj, o_proj}.kernel, kv_a_layernorm.scale
    dense layers: layers.{l}.mlp.{gate_proj, up_proj, down_proj}.kernel
    MoE layers:   layers.{l}.mlp.gate.kernel [D, E], layers.{l}.mlp.gate.e_score_correction_bias
                  [E] float32 (topk_method "noaux_tc" only),
                  layers.{l}.mlp.experts.gate_up [E, D, 2F], layers.{l}.mlp.experts.down [E, F, D],
                  layers.{l}.mlp.shared_experts.{gate_proj, up_proj, down_proj}.kernel
                  (width n_shared * F; absent when n_shared_experts = 0)
    norm.scale [D], lm_head.kernel [D, V]

The decoder is exposed in pieces (`embed`, `context`, `run_layers`, `logits`) so calibration can
cache a layer's input and re-run only layers `[l:]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types, moe

# ---------------------------------------------------------------- config

_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The hyper-parameters the text model reads (names as in the HF deepseek_v3 config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 1
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0

    def __post_init__(self):
        field_types.check(self)
        if self.scoring_func not in moe.SCORINGS:
            raise ValueError(
                f"scoring_func must be one of {moe.SCORINGS}, got {self.scoring_func!r}"
            )
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(
                f"topk_method must be one of {_TOPK_METHODS}, got {self.topk_method!r}"
            )
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type must be 'default' or 'yarn', got {self.rope_type!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.n_routed_experts:
            self.router_config()  # validates the routing hyper-parameters

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder-layer indices of the MoE layers (the order of `routing` outputs)."""
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def router_config(self) -> moe.RouterConfig:
        grouped = self.topk_method != "greedy"
        return moe.RouterConfig(
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            scoring=self.scoring_func,
            n_group=self.n_group if grouped else 1,
            topk_group=self.topk_group if grouped else 1,
            group_score="top2_sum" if self.topk_method == "noaux_tc" else "max",
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any) -> TextConfig:
        """From an HF deepseek_v3 config (dict, or an object with `to_dict()`).

        Raises ValueError naming the key for values this port does not implement.
        """
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"deepseek_v3 config lacks required keys: {', '.join(missing)}")
        _reject(d, "hidden_act", lambda v: v not in (None, "silu"), "only 'silu' is supported")
        _reject(d, "attention_bias", bool, "attention biases are not supported")
        _reject(d, "tie_word_embeddings", bool, "tied embeddings are not supported")
        kw = {k: d[k] for k in required}
        optional = ("q_lora_rank", "moe_intermediate_size", "n_routed_experts",
                    "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
                    "moe_layer_freq", "n_group", "topk_group", "scoring_func", "topk_method",
                    "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "rope_interleave")
        for k in optional:
            if d.get(k) is not None:
                kw[k] = d[k]
        kw.update(_rope_fields(d))
        try:
            return cls(**kw)
        except ValueError as err:
            raise ValueError(f"unsupported deepseek_v3 config: {err}") from None


def _reject(d, key, bad, why):
    if key in d and bad(d[key]):
        raise ValueError(f"unsupported deepseek_v3 config {key}={d[key]!r}: {why}")


def _rope_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` (published)."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(theta), "rope_type": kind}
    if kind == "default":
        return out
    if kind != "yarn":
        raise ValueError(f"unsupported deepseek_v3 rope type {kind!r}: only default and yarn")
    if rope.get("attention_factor") is not None:
        raise ValueError(
            f"unsupported yarn rope parameter attention_factor={rope['attention_factor']!r}: "
            "the published code derives it from mscale and mscale_all_dim"
        )
    if rope.get("partial_rotary_factor") not in (None, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor={rope['partial_rotary_factor']!r}")
    if rope.get("truncate", True) is not True:
        raise ValueError("unsupported yarn rope parameter truncate=False")
    if rope.get("factor") is None:
        raise ValueError("yarn rope parameters need 'factor'")
    mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not ((mscale and all_dim) or (not all_dim and mscale in (None, 1))):
        # transformers and the published code derive different cos/sin scales here.
        raise ValueError(
            "yarn rope parameters must give both mscale and mscale_all_dim (non-zero), or "
            f"neither (got mscale={mscale!r}, mscale_all_dim={all_dim!r})"
        )
    original = rope.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if original is None:
        raise ValueError("yarn rope parameters need original_max_position_embeddings")
    out.update(
        rope_factor=float(rope["factor"]),
        rope_original_max_position=int(original),
        rope_beta_fast=float(rope.get("beta_fast") or 32),
        rope_beta_slow=float(rope.get("beta_slow") or 1),
        rope_mscale=float(mscale or 1.0),
        rope_mscale_all_dim=float(all_dim or 0.0),
    )
    return out


# ---------------------------------------------------------------- rotary


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies `[qk_rope_head_dim / 2]` float32 (YaRN-blended when configured)."""
    dim = cfg.qk_rope_head_dim
    pos = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extra = np.float32(1.0) / pos
    if cfg.rope_type == "default":
        return extra
    inter = np.float32(1.0) / (np.float32(cfg.rope_factor) * pos)

    def corr_dim(rot):
        num = dim * math.log(cfg.rope_original_max_position / (rot * 2 * math.pi))
        return num / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(corr_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extra_w = (np.float32(1.0) - ramp).astype(np.float32)
    return (inter * (1 - extra_w) + extra * extra_w).astype(np.float32)


def rope_attention_factor(cfg: TextConfig) -> float:
    """The scale YaRN applies to cos and sin (1 without YaRN)."""
    if cfg.rope_type == "default":
        return 1.0
    return _yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / _yarn_mscale(
        cfg.rope_factor, cfg.rope_mscale_all_dim
    )


def softmax_scale(cfg: TextConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        m = _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def rotary_cos_sin(positions: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, qk_rope_head_dim / 2]` in `dtype` for integer positions `[B, T]`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    factor = rope_attention_factor(cfg)
    return (jnp.cos(freqs) * factor).astype(dtype), (jnp.sin(freqs) * factor).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotate `x [..., R]` with cos/sin broadcastable to `[..., R/2]`.

    Interleaved (DeepSeek): pairs (x0, x1), (x2, x3)... rotate together and the output is laid
    out de-interleaved, `[even rotated, odd rotated]`, exactly as transformers and the published
    code produce it (queries and keys share the layout, so scores are unchanged). Otherwise the
    pairs are (x_i, x_{i + R/2}) (`rotate_half`).
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------------- building blocks


class RMSNorm(nnx.Module):
    """RMS norm computed in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def _linear(n_in, n_out, param_dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, param_dtype=param_dtype, rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(dim, hidden, param_dtype, rngs)
        self.up_proj = _linear(dim, hidden, param_dtype, rngs)
        self.down_proj = _linear(hidden, dim, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(moe.UsesMesh, nnx.Module):
    """Router `kernel [D, E]` (+ `e_score_correction_bias [E]` float32), computed in float32."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.n_routed_experts
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d, e), param_dtype))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        else:
            self.e_score_correction_bias = None
        self.config = cfg.router_config()

    def logits(self, x: jax.Array) -> jax.Array:
        """Router logits `[N, E]` float32 for `x [N, D]` (full f32 precision, no TF32 on GPU,
        so near-tie routing decisions match PyTorch's float32 router)."""
        kernel = self.kernel[...].astype(jnp.float32)
        return jnp.matmul(x.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
        return moe.route_on_mesh(self.logits(x), self.config, bias, self.mesh)


class StackedExperts(moe.UsesMesh, nnx.Module):
    """Full-precision routed experts `gate_up [E, D, 2F]`, `down [E, F, D]`.

    `__call__(x [N, D], ids [N, k], weights [N, k]) -> [N, D]` is the interface a quantized
    replacement must keep. `impl` is "sorted" (ragged_dot) or "dense" (all experts).
    """

    def __init__(self, num_experts, dim, hidden, param_dtype, rngs: nnx.Rngs, impl="sorted"):
        if impl not in ("sorted", "dense"):
            raise ValueError(f"experts impl must be 'sorted' or 'dense', got {impl!r}")
        # The dense MLPs' init (nnx.Linear: LeCun normal) per expert: at a fixed N(0, 0.02) a
        # routed expert's SwiGLU output starts ~100x below the shared expert's, and a model
        # trained from scratch then learns its skills outside the routed experts.
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.gate_up = nnx.Param(init(rngs.params(), (num_experts, dim, 2 * hidden), param_dtype))
        self.down = nnx.Param(init(rngs.params(), (num_experts, hidden, dim), param_dtype))
        self.impl = impl

    def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        """On a mesh (`use_mesh`) the sorted path runs partitioned (`moe.experts_sorted_on_mesh`:
        experts split over its "expert" axis when that splits them evenly, rows over "data")."""
        if self.impl == "sorted" and self.mesh is not None:
            return moe.experts_sorted_on_mesh(x, ids, weights, self.gate_up[...],
                                              self.down[...], mesh=self.mesh)
        fn = moe.experts_sorted if self.impl == "sorted" else moe.experts_dense
        return fn(x, ids, weights, self.gate_up[...], self.down[...])


class MoE(nnx.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs, experts_impl="sorted"):
        d, f = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Router(cfg, param_dtype, rngs)
        self.experts = StackedExperts(cfg.n_routed_experts, d, f, param_dtype, rngs, experts_impl)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(d, f * cfg.n_shared_experts, param_dtype, rngs)
        else:
            self.shared_experts = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x `[B, T, D]` -> (y `[B, T, D]`, (ids `[B, T, k]`, weights `[B, T, k]`))."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        ids, weights = self.gate(flat)
        y = self.experts(flat, ids, weights).reshape(b, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, (ids.reshape(b, t, -1), weights.reshape(b, t, -1))


class Context(NamedTuple):
    """What every layer needs besides the hidden state.

    cos, sin `[B, T, R/2]`; mask `[B, 1, T, S]` bool (True = may attend); cache_index: int32
    scalar where this call's keys are written in a KV cache (0 without one).
    """

    cos: jax.Array
    sin: jax.Array
    mask: jax.Array
    cache_index: jax.Array


class Attention(nnx.Module):
    """Multi-head latent attention (MLA) with an optional query LoRA."""

    def __init__(self, cfg: TextConfig, param_dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = _linear(d, h * cfg.qk_head_dim, param_dtype, rngs)
        else:
            self.q_a_proj = _linear(d, cfg.q_lora_rank, param_dtype, rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, param_dtype)
            self.q_b_proj = _linear(cfg.q_lora_rank, h * cfg.qk_head_dim, param_dtype, rngs)
        self.kv_a_proj_with_mqa = _linear(
            d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, param_dtype, rngs
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, param_dtype)
        self.kv_b_proj = _linear(
            cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), param_dtype, rngs
        )
        self.o_proj = _linear(h * cfg.v_head_dim, d, param_dtype, rngs)

    def __call__(
        self,
        x: jax.Array,
        ctx: Context,
        *,
        image_query_mask: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array] | None]:
        """x `[B, T, D]` -> (out `[B, T, D]`, image_scores `[B, S]` or None, updated kv or None).

        kv: this layer's cache `(ckv [B, S, kv_lora_rank], k_rot [B, S, R])`; MLA caches the
        normalised latent and the rotated shared key, so cached decoding repeats exactly the
        full forward's arithmetic.
        """
        c = self.cfg
        b, t, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, c.num_attention_heads, c.qk_head_dim)
        q_nope, q_rot = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]

        latent = self.kv_a_proj_with_mqa(x)
        ckv = self.kv_a_layernorm(latent[..., : c.kv_lora_rank])
        k_rot = latent[..., c.kv_lora_rank :]

        cos, sin = ctx.cos[:, :, None, :], ctx.sin[:, :, None, :]
        q_rot = apply_rotary(q_rot, cos, sin, c.rope_interleave)
        k_rot = apply_rotary(k_rot, ctx.cos, ctx.sin, c.rope_interleave)
        if kv is not None:
            start = (0, ctx.cache_index, 0)
            ckv = jax.lax.dynamic_update_slice(kv[0], ckv.astype(kv[0].dtype), start)
            k_rot = jax.lax.dynamic_update_slice(kv[1], k_rot.astype(kv[1].dtype), start)
            kv = (ckv, k_rot)

        s = ckv.shape[1]
        expanded = self.kv_b_proj(ckv).reshape(b, s, c.num_attention_heads, -1)
        k_nope, v = expanded[..., : c.qk_nope_head_dim], expanded[..., c.qk_nope_head_dim :]
        k_rot_heads = jnp.broadcast_to(k_rot[:, :, None, :], (*k_nope.shape[:-1], k_rot.shape[-1]))
        k = jnp.concatenate([k_nope, k_rot_heads], axis=-1)
        q = jnp.concatenate([q_nope, q_rot], axis=-1)

        scores = jnp.einsum("bthd,bshd->bhts", q, k) * softmax_scale(c)
        scores = jnp.where(ctx.mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
        out = self.o_proj(out.reshape(b, t, -1))
        image_scores = None
        if image_query_mask is not None:
            image_scores = key_scores(probs, image_query_mask)
        return out, image_scores, kv


def key_scores(probs: jax.Array, query_mask: jax.Array) -> jax.Array:
    """Mean over heads and masked queries of `probs [B, H, T, S]`: `[B, S]` float32.

    A row whose `query_mask [B, T]` selects no query scores 0 everywhere.
    """
    qm = query_mask.astype(jnp.float32)
    total = jnp.einsum("bhts,bt->bs", probs.astype(jnp.float32), qm)
    count = jnp.maximum(qm.sum(-1, keepdims=True), 1.0) * probs.shape[1]
    return total / count


class LayerOut(NamedTuple):
    """One decoder layer's extras; None for what was not asked for."""

    routing: tuple[jax.Array, jax.Array] | None
    image_scores: jax.Array | None
    mlp_input: jax.Array | None
    kv: tuple[jax.Array, jax.Array] | None


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + attn(norm(h)), then + mlp(norm(.)); `mlp` is an MLP or a MoE.

    `attention`/`moe`: the classes of another model family built on the same block (Qwen3-MoE).
    """

    def __init__(self, cfg, layer: int, param_dtype, rngs: nnx.Rngs,
                 experts_impl: str = "sorted", *, attention=None, moe=None):
        d = cfg.hidden_size
        self.is_moe = cfg.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype)
        self.self_attn = (attention or Attention)(cfg, param_dtype, rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype)
        if self.is_moe:
            self.mlp = (moe or MoE)(cfg, param_dtype, rngs, experts_impl)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, param_dtype, rngs)

    def __call__(
        self,
        h: jax.Array,
        ctx: Context,
        *,
        image_query_mask: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
        return_mlp_input: bool = False,
    ) -> tuple[jax.Array, LayerOut]:
        a, scores, kv = self.self_attn(
            self.input_layernorm(h), ctx, image_query_mask=image_query_mask, kv=kv
        )
        h = h + a
        x = self.post_attention_layernorm(h)
        routing = None
        if self.is_moe:
            y, routing = self.mlp(x)
        else:
            y = self.mlp(x)
        return h + y, LayerOut(routing, scores, x if return_mlp_input else None, kv)


# ---------------------------------------------------------------- the model


class KVCache(NamedTuple):
    """Per-layer MLA cache plus the bookkeeping for padded batches.

    ckv `[B, S, kv_lora_rank]` and k_rot `[B, S, qk_rope_head_dim]` per layer (model dtype);
    key_mask `[B, S]` bool marks written real tokens; length (int32 scalar) is how many
    positions are written; num_real `[B]` int32 counts real tokens per row (the next default
    position).
    """

    ckv: tuple[jax.Array, ...]
    k_rot: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array
    num_real: jax.Array

    def layer_kv(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.ckv[i], self.k_rot[i]

    def with_kv(self, per_layer: list[tuple[jax.Array, jax.Array]]) -> KVCache:
        return self._replace(ckv=tuple(a for a, _ in per_layer),
                             k_rot=tuple(b for _, b in per_layer))

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        n = cfg.num_hidden_layers
        return cls(
            ckv=tuple(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype) for _ in range(n)),
            k_rot=tuple(jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype) for _ in range(n)),
            key_mask=jnp.zeros((batch, max_len), bool),
            length=jnp.zeros((), jnp.int32),
            num_real=jnp.zeros((batch,), jnp.int32),
        )


class Span(NamedTuple):
    """What `attention_span` works out for one call: default positions `[B, T]` int32, the
    causal + padding mask `[B, 1, T, S]`, the cache index `start`, and the advanced cache."""

    positions: jax.Array
    mask: jax.Array
    start: jax.Array
    cache: Any


def attention_span(attention_mask: jax.Array, cache=None) -> Span:
    """Mask and positions of a call over `attention_mask [B, T]` (1 = real token).

    `cache`: any NamedTuple with `key_mask [B, S]`, `length` and `num_real [B]` (the text
    models' KV caches); it comes back with this call's tokens counted. Default positions count
    real tokens, `num_real + cumsum(mask) - 1` (0 on left pads), as HF generation does.
    """
    real = attention_mask.astype(bool)
    b, t = real.shape
    if cache is None:
        start, key_mask, before = jnp.zeros((), jnp.int32), real, 0
    else:
        start, before = cache.length, cache.num_real[:, None]
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, real, (0, start))
        cache = cache._replace(
            key_mask=key_mask,
            length=start + t,
            num_real=cache.num_real + real.sum(-1).astype(jnp.int32),
        )
    positions = jnp.maximum(before + jnp.cumsum(real, axis=-1) - 1, 0)
    s = key_mask.shape[1]
    causal = jnp.arange(s)[None, :] <= (start + jnp.arange(t))[:, None]  # [T, S]
    mask = causal[None, None] & key_mask[:, None, None, :]
    return Span(positions, mask, start, cache)


class TextOutput(NamedTuple):
    """logits `[B, T, V]` float32; the rest None unless asked for.

    routing: per MoE layer (ids `[B, T, k]` int32, weights `[B, T, k]` float32);
    image_scores: per decoder layer `[B, S]` float32 (S = T without a cache);
    mlp_inputs: per decoder layer `[B, T, D]`, the MLP/MoE block input (post-attention norm);
    hidden: per decoder layer `[B, T, D]`, the residual stream entering that layer;
    cache: the updated KVCache when one was passed.
    """

    logits: jax.Array
    routing: tuple | None = None
    image_scores: tuple | None = None
    mlp_inputs: tuple | None = None
    hidden: tuple | None = None
    cache: KVCache | None = None


def run_decoder_layers(
    layers,
    h: jax.Array,
    ctx: Context,
    *,
    start: int = 0,
    stop: int | None = None,
    image_query_mask: jax.Array | None = None,
    cache=None,
    additions: tuple[jax.Array, ...] = (),
    return_routing: bool = False,
    return_mlp_inputs: bool = False,
    return_hidden: bool = False,
) -> tuple[jax.Array, TextOutput]:
    """Decoder `layers[start:stop]` on the residual stream `h [B, T, D]` (any text model whose
    layers return `(h, LayerOut)` and whose cache has `layer_kv`/`with_kv`).

    `additions[i]` `[B, T, D]` is added to the stream after layer i (Qwen3-VL's DeepStack).
    Returns the stream after the last layer run and a TextOutput (logits None) whose tuples
    cover only the layers run.
    """
    stop = len(layers) if stop is None else stop
    routing, scores, mlp_in, hidden = [], [], [], []
    kvs = [cache.layer_kv(i) for i in range(len(layers))] if cache is not None else None
    for i in range(start, stop):
        if return_hidden:
            hidden.append(h)
        kv = kvs[i] if cache is not None else None
        h, out = layers[i](h, ctx, image_query_mask=image_query_mask, kv=kv,
                           return_mlp_input=return_mlp_inputs)
        if i < len(additions):
            h = h + additions[i].astype(h.dtype)
        if out.routing is not None:
            routing.append(out.routing)
        scores.append(out.image_scores)
        mlp_in.append(out.mlp_input)
        if cache is not None:
            kvs[i] = out.kv
    if cache is not None:
        cache = cache.with_kv(kvs)
    return h, TextOutput(
        logits=None,
        routing=tuple(routing) if return_routing else None,
        image_scores=tuple(scores) if image_query_mask is not None else None,
        mlp_inputs=tuple(mlp_in) if return_mlp_inputs else None,
        hidden=tuple(hidden) if return_hidden else None,
        cache=cache,
    )


class DeepseekV3(nnx.Module):
    """DeepSeek-V3 causal LM: embeddings, decoder layers (`nnx.List`), final norm, lm_head.

    param_dtype is also the compute dtype (bf16 weights -> bf16 activations, as in PyTorch);
    routers, norms and softmax compute in float32. experts_impl: "sorted" (ragged_dot) or
    "dense" (every expert on every token; vmappable).
    """

    def __init__(
        self,
        cfg: TextConfig,
        *,
        param_dtype=jnp.float32,
        experts_impl: str = "sorted",
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = param_dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, param_dtype, rngs, experts_impl)
             for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, param_dtype, rngs)

    # -- pieces -------------------------------------------------------------------------------

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, D]` in the model dtype."""
        return self.embed_tokens(input_ids.astype(jnp.int32))

    def init_cache(self, batch: int, max_len: int, rope_delta=None) -> KVCache:
        """An empty MLA cache in the model dtype (`rope_delta`: for the M-RoPE models' call;
        must be None or zeros here)."""
        if rope_delta is not None and np.any(np.asarray(rope_delta)):
            raise ValueError("DeepSeek-V3 has no M-RoPE: rope_delta must be zero")
        return KVCache.init(self.config, batch, max_len, self.dtype)

    def context(
        self,
        attention_mask: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Context, KVCache | None]:
        """Rotary tables and the causal + padding mask for `attention_mask [B, T]`.

        Default positions count real tokens: `num_real + cumsum(mask) - 1` (0 on left pads),
        as HF generation does for padded batches. With a cache, returns it with the key mask,
        length and real-token counts advanced by this call (the layers fill ckv/k_rot).
        """
        span = attention_span(attention_mask, cache)
        positions = span.positions if positions is None else positions
        cos, sin = rotary_cos_sin(positions, self.config, self.dtype)
        return Context(cos, sin, span.mask, span.start), span.cache

    def run_layers(
        self,
        h: jax.Array,
        ctx: Context,
        *,
        start: int = 0,
        stop: int | None = None,
        image_query_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        additions: tuple[jax.Array, ...] = (),
        return_routing: bool = False,
        return_mlp_inputs: bool = False,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, TextOutput]:
        """Run decoder layers `[start:stop]` on the residual stream `h [B, T, D]`.

        Returns the residual stream after the last layer run and a TextOutput (logits None)
        whose tuples cover only the layers run.
        """
        return run_decoder_layers(
            self.layers, h, ctx, start=start, stop=stop, image_query_mask=image_query_mask,
            cache=cache, additions=additions, return_routing=return_routing,
            return_mlp_inputs=return_mlp_inputs, return_hidden=return_hidden)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and lm_head: `[B, T, D]` -> `[B, T, V]` float32."""
        return self.lm_head(self.norm(h)).astype(jnp.float32)

    # -- the whole forward --------------------------------------------------------------------

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        image_query_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        additions: tuple[jax.Array, ...] = (),
        return_routing: bool = False,
        return_mlp_inputs: bool = False,
        return_hidden: bool = False,
        logits_window: int = 0,
    ) -> TextOutput:
        """Logits for `input_ids [B, T]` or `inputs_embeds [B, T, D]` (exactly one).

        attention_mask `[B, T]` (1 = real token; left or right padding; default all ones);
        positions `[B, T]` (default: counted over real tokens, see `context`); cache: a
        `KVCache` to prefill or extend (the call then attends to everything cached before).
        The return_* flags and image_query_mask `[B, T]` bool add the TextOutput extras; they
        are Python-level switches (static under jit) and cost nothing when off.
        logits_window > 0: logits of the last `logits_window` positions only (`[B, w, V]`), for
        callers that score a few final positions without a `[B, T, V]` array (static).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        if h.ndim != 3 or h.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs must be [B, T] ids or [B, T, {self.config.hidden_size}] embeddings, "
                f"got shape {h.shape}"
            )
        b, t = h.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask must be {(b, t)}, got {attention_mask.shape}")
        if cache is not None:
            check_cache_room(cache, t)
        ctx, cache = self.context(attention_mask, positions, cache)
        h, out = self.run_layers(
            h, ctx, image_query_mask=image_query_mask, cache=cache, additions=additions,
            return_routing=return_routing, return_mlp_inputs=return_mlp_inputs,
            return_hidden=return_hidden,
        )
        return out._replace(logits=self.logits(last_positions(h, logits_window)))


def last_positions(h: jax.Array, window: int) -> jax.Array:
    """`h [B, T, D]` cut to its last `window` positions (all of them for window 0)."""
    if window < 0:
        raise ValueError(f"logits_window must be >= 0, got {window}")
    return h[:, -window:] if window else h


def check_cache_room(cache: KVCache, t: int) -> None:
    """Raise if the cache cannot take t more positions (only when its length is concrete)."""
    try:
        length = int(cache.length)
    except jax.errors.ConcretizationTypeError:
        return
    if length + t > cache.key_mask.shape[1]:
        raise ValueError(
            f"KV cache holds {cache.key_mask.shape[1]} positions, {length} used; "
            f"cannot add {t} more"
        )


def forward(model: DeepseekV3, input_ids=None, **kwargs) -> TextOutput:
    """`model(input_ids, **kwargs)` under `nnx.jit` (the return_* flags are static)."""
    cache = kwargs.get("cache")
    if cache is not None:  # checked here, where the cache length is still concrete
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        check_cache_room(cache, x.shape[1])
    return _forward_jit(model, input_ids, **kwargs)


@nnx.jit(static_argnames=("return_routing", "return_mlp_inputs", "return_hidden",
                          "logits_window"))
def _forward_jit(model, input_ids, **kwargs):
    return model(input_ids, **kwargs)
