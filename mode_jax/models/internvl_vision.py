"""InternVL's vision side in Flax NNX: the InternViT tower and the pixel-shuffle projector.

Input: `pixel_values [N, C, S, S]`, the 448 x 448 tiles (`image_size`) that InternVL's image
processor cuts every image into (a grid of crops plus a thumbnail); each tile is encoded alone.
Output of `InternVLVision`: `[N * tokens_per_tile, text_hidden]`, the tiles' features in order,
one language-model token each.

Semantics follow transformers' `InternVLVisionModel` and `InternVLModel.get_image_features`:
- patch embedding: a Conv2d with kernel = stride = p is a linear map of each p x p patch
  flattened channel-major; a learned CLS token is prepended and the learned position table
  `[1 + (S/p)^2, D]` added (tiles always have the configured size, so it is never resized);
- pre-norm blocks (LayerNorm or RMSNorm, `layer_norm_eps`): attention with separate q/k/v
  projections (bias per `attention_bias`), an optional RMSNorm (eps 1e-6) over the whole q and
  k vectors before the heads are split, scale hd^-0.5, an output projection with bias; an MLP
  fc1 -> `hidden_act` -> fc2; each branch scaled by its learned `lambda` vector before the
  residual add;
- a final LayerNorm unless `use_mean_pooling` (then none); `vision_feature_layer` -1 takes that
  output, any other index k takes `hidden_states[k]` of the (embeddings, block 1, ..., block L)
  sequence, before any final norm;
- the CLS token is dropped (`vision_feature_select_strategy` "default"), the (S/p) x (S/p) grid
  is pixel-shuffled by `downsample_ratio` 1/r (each r x r window of patches becomes one token of
  width r^2 D: row offset outer, column offset inner), then LayerNorm (eps 1e-5), linear,
  `projector_hidden_act`, linear to the text width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mode_jax.models import field_types
from mode_jax.models.deepseek_v3 import RMSNorm
from mode_jax.models.qwen3_vl_vision import _ACTIVATIONS

NORM_TYPES = ("layer_norm", "rms_norm")


def _pair(value: Any, name: str) -> int:
    """One side from an int or a square (h, w) pair."""
    sides = tuple(value) if isinstance(value, list | tuple) else (value, value)
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ValueError(f"vision {name} must be square, got {value!r}")
    return int(sides[0])


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT + projector settings. Defaults are InternVL3.5-30B-A3B's (InternViT-300M)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    attention_bias: bool = True
    use_qk_norm: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    use_mean_pooling: bool = True
    vision_feature_layer: int = -1
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    text_hidden_size: int = 2048

    def __post_init__(self):
        field_types.check(self)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "image_size", "patch_size", "num_channels",
                     "text_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type {self.norm_type!r} is not one of {NORM_TYPES}")
        for name in ("hidden_act", "projector_hidden_act"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; "
                                 f"allowed: {sorted(_ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        r = self.shuffle
        if r < 1 or abs(1 / r - self.downsample_ratio) > 1e-9 or self.grid_side % r:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/r for an "
                             f"integer r dividing the {self.grid_side}-patch grid side")
        if not -(self.num_hidden_layers + 1) <= self.vision_feature_layer <= self.num_hidden_layers:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                             f"{self.num_hidden_layers + 1} hidden states")

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle(self) -> int:
        """r: the side of the patch window that pixel shuffle folds into one token."""
        return round(1 / self.downsample_ratio) if self.downsample_ratio > 0 else 0

    @property
    def tokens_per_tile(self) -> int:
        return (self.grid_side // self.shuffle) ** 2

    @property
    def blocks_run(self) -> int:
        """How many blocks the selected feature layer needs."""
        return self.vision_feature_layer % (self.num_hidden_layers + 1)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], text_hidden_size: int) -> VisionConfig:
        """From an `internvl` config.json dict (its `vision_config` plus the top-level projector
        settings). Raises ValueError for what this port does not implement."""
        v = dict(d["vision_config"])
        if v.get("use_absolute_position_embeddings", True) is not True:
            raise ValueError("vision use_absolute_position_embeddings=false is not supported")
        if v.get("use_mask_token"):
            raise ValueError("vision use_mask_token is not supported (pre-training only)")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; "
                             "only 'default' (drop the CLS token)")
        layer = d.get("vision_feature_layer", -1)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
        set_here = ("image_size", "patch_size", "vision_feature_layer", "downsample_ratio",
                    "projector_hidden_act", "text_hidden_size")
        names = {f.name for f in dataclasses.fields(cls)} - set(set_here)
        kept = {k: v[k] for k in names & set(v)}
        return cls(**kept,
                   image_size=_pair(v.get("image_size", 448), "image_size"),
                   patch_size=_pair(v.get("patch_size", 14), "patch_size"),
                   vision_feature_layer=layer,
                   downsample_ratio=float(d.get("downsample_ratio", 0.5)),
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                   text_hidden_size=text_hidden_size)


def _linear(n_in, n_out, dtype, rngs, bias=True):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _norm(cfg: VisionConfig, n: int, dtype, rngs):
    if cfg.norm_type == "rms_norm":
        return RMSNorm(n, cfg.layer_norm_eps, dtype)
    return nnx.LayerNorm(n, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=dtype, rngs=rngs)


class VisionLayer(nnx.Module):
    """One InternViT block (module docstring)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, _linear(d, d, dtype, rngs, cfg.attention_bias))
        self.q_norm = RMSNorm(d, 1e-6, dtype) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(d, 1e-6, dtype) if cfg.use_qk_norm else None
        self.projection_layer = _linear(d, d, dtype, rngs)
        self.fc1 = _linear(d, cfg.intermediate_size, dtype, rngs)
        self.fc2 = _linear(cfg.intermediate_size, d, dtype, rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.layernorm_before = _norm(cfg, d, dtype, rngs)
        self.layernorm_after = _norm(cfg, d, dtype, rngs)
        self.lambda_1 = nnx.Param(jnp.ones((d,), dtype))
        self.lambda_2 = nnx.Param(jnp.ones((d,), dtype))

    def attention(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        hd = d // self.heads
        q, k, v = (a.reshape(n, t, self.heads, hd) for a in (q, k, v))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) * hd**-0.5
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, d)
        return self.projection_layer(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.lambda_1[...] * self.attention(self.layernorm_before(x))
        return x + self.lambda_2[...] * self.fc2(self.act(self.fc1(self.layernorm_after(x))))


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """`[N, G, G, D]` -> `[N, G/r, G/r, r*r*D]`: each r x r window of patches becomes one vector,
    row offset outer, column offset inner (what HF's view/permute sequence computes)."""
    n, g, _, d = x.shape
    x = x.reshape(n, g // r, r, g // r, r, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g // r, g // r, r * r * d)


class InternVLVision(nnx.Module):
    """InternViT tower + pixel-shuffle MLP projector: tiles -> language-model tokens."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = _linear(cfg.num_channels * p * p, d, dtype, rngs)
        self.cls_token = nnx.Param(jnp.zeros((d,), dtype))
        self.pos_embed = nnx.Param(jnp.zeros((1 + cfg.grid_side**2, d), dtype))
        self.layers = nnx.List([VisionLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.final_norm = (None if cfg.use_mean_pooling
                           else nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps,
                                              use_fast_variance=False, dtype=dtype,
                                              param_dtype=dtype, rngs=rngs))
        wide = d * cfg.shuffle**2
        self.projector_norm = nnx.LayerNorm(wide, epsilon=1e-5, use_fast_variance=False,
                                            dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.projector_1 = _linear(wide, cfg.text_hidden_size, dtype, rngs)
        self.projector_2 = _linear(cfg.text_hidden_size, cfg.text_hidden_size, dtype, rngs)
        self.projector_act = _ACTIVATIONS[cfg.projector_hidden_act]

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        """The selected hidden state of each tile, CLS first: `[N, 1 + G^2, D]`."""
        cfg = self.config
        n, c = pixel_values.shape[:2]  # tile shape checked by `internvl.prepare_batch`
        p, g = cfg.patch_size, cfg.grid_side
        patches = pixel_values.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        x = self.patch_embed(patches.reshape(n, g * g, c * p * p).astype(self.pos_embed.dtype))
        cls = jnp.broadcast_to(self.cls_token[...], (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for layer in self.layers[:cfg.blocks_run]:
            x = layer(x)
        if cfg.vision_feature_layer == -1 and self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        x = self.encode(pixel_values)[:, 1:]
        g = cfg.grid_side
        x = pixel_shuffle(x.reshape(x.shape[0], g, g, -1), cfg.shuffle)
        x = self.projector_norm(x.reshape(-1, x.shape[-1]))
        return self.projector_2(self.projector_act(self.projector_1(x)))
