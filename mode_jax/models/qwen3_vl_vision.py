"""Qwen3-VL-MoE's vision tower (transformers `Qwen3VLMoeVisionModel`) in Flax NNX.

Input: `pixel_values [P, C * T * p * p]`, the patches of all images and videos packed along one
axis exactly as the HF image/video processor emits them (each row is one patch flattened
channel-major, then temporal, then rows, then columns; within a frame the patches come in
merge-window order, see below), and `grid_thw`, the (t, h, w) patch grid of each image or
video as static Python ints (shapes depend on them). P = sum(t * h * w).
Output of `Qwen3VLVision`: `(embeds, deepstack)`, `embeds [P / m^2, out_hidden_size]` (one
vector per m x m window, m = spatial_merge_size, in the patches' order) and `deepstack`, a tuple
of arrays of the same shape taken after the blocks named in `deepstack_visual_indexes`.

Token order. The processor orders each frame's patches by m x m window: window rows, window
columns, then the m x m patches inside the window in raster order, so that the m^2 patches a
merger fuses are adjacent. Everything positional (the learned table, the rotary angles) is
therefore laid out in that order, and a video's t frames follow one another.

Semantics follow transformers' `modeling_qwen3_vl_moe.py` (5.x):
- patch embedding: a Conv3d with kernel = stride = (T, p, p) and a bias, applied to a single
  patch, is a linear map of the flattened patch (`[D, C, T, p, p]` flattens the same way);
- learned position table `[n, D]`, read as a square `side x side` grid (side = isqrt(n); rows
  past side^2 are never read, as in HF), resampled bilinearly with align-corners coordinates
  (`i * (side - 1) / (size - 1)`, in float32) to each frame's `h x w` as `A_h @ T @ A_w^T`,
  computed in float32 and added in the compute dtype; every frame of a video gets the same
  table;
- 2-D rotary in "rotate half" form, theta 10000: for head dim hd and f[i] = theta^(-4i/hd)
  (i < hd/4), the first hd/4 angles are `row * f`, the next hd/4 `col * f`, and dim j turns
  with dim j + hd/2 by angle j; applied to q and k in float32;
- attention confined to one frame (HF's `cu_seqlens` has one segment per frame, so the frames
  of a video do not see each other), softmax in float32, scale hd^-0.5;
- pre-norm blocks (LayerNorm eps 1e-6), fused qkv with bias, MLP with `hidden_act`;
- `merger`: LayerNorm over D, then m^2 adjacent tokens concatenated to D * m^2, linear, exact
  (erf) GELU, linear to `out_hidden_size`; the deepstack mergers concatenate first and
  normalise over D * m^2 ("post-shuffle" norm).

Videos (t > 1) are supported: they are t frames of one image size, as in HF.

Deepstack order: HF appends a deepstack feature after each block whose index is in
`deepstack_visual_indexes`, using the merger at that index's position in the list, so features
come in block order even if the list is not sorted; this port does the same. Duplicate or
out-of-range indexes (which HF silently turns into unused mergers or missing features) are
rejected by `VisionConfig`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types

GridTHW = tuple[tuple[int, int, int], ...]

# transformers' `ACT2FN` names -> the same function in jax.
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
_NORM_EPS = 1e-6  # fixed in HF (not a config field) for the blocks and every merger


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Vision tower dimensions. Defaults are Qwen3-VL-30B-A3B's vision_config."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self):
        field_types.check(self)
        object.__setattr__(self, "deepstack_visual_indexes",
                           tuple(int(i) for i in self.deepstack_visual_indexes))
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                     "temporal_patch_size", "in_channels", "spatial_merge_size",
                     "out_hidden_size", "num_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rope)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported; "
                             f"allowed: {sorted(_ACTIVATIONS)}")
        idx = self.deepstack_visual_indexes
        if len(set(idx)) != len(idx) or any(not 0 <= i < self.depth for i in idx):
            raise ValueError(f"deepstack_visual_indexes {list(idx)} must be distinct block "
                             f"indexes in [0, {self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square position grid HF reads from the `[n, D]` table."""
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | Any) -> VisionConfig:
        """From the `vision_config` dict of a Qwen3-VL(-MoE) `config.json` (a whole config with a
        `vision_config` key, or a transformers config object, also works).

        Fields missing from the dict take transformers' defaults, except the sizes that have no
        sensible default (depth, hidden_size, num_heads, intermediate_size, out_hidden_size).
        """
        if not isinstance(d, Mapping) and hasattr(d, "to_dict"):
            d = d.to_dict()
        if "vision_config" in d:
            d = d["vision_config"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "axial"):
            raise ValueError(f"vision rope_type {rope_type!r} is not supported; "
                             "Qwen3-VL's vision tower uses axial rope")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        try:
            depth = d["depth"] if "depth" in d else d["num_hidden_layers"]
            heads = d["num_heads"] if "num_heads" in d else d["num_attention_heads"]
            return cls(
                depth=_as_int(depth, "depth"),
                hidden_size=_as_int(d["hidden_size"], "hidden_size"),
                num_heads=_as_int(heads, "num_heads"),
                intermediate_size=_as_int(d["intermediate_size"], "intermediate_size"),
                patch_size=_as_int(d.get("patch_size", 16), "patch_size"),
                temporal_patch_size=_as_int(d.get("temporal_patch_size", 2),
                                            "temporal_patch_size"),
                in_channels=_as_int(d.get("in_channels", 3), "in_channels"),
                spatial_merge_size=_as_int(d.get("spatial_merge_size", 2), "spatial_merge_size"),
                out_hidden_size=_as_int(d["out_hidden_size"], "out_hidden_size"),
                num_position_embeddings=_as_int(d.get("num_position_embeddings", 2304),
                                                "num_position_embeddings"),
                deepstack_visual_indexes=tuple(
                    _as_int(i, "deepstack_visual_indexes")
                    for i in d.get("deepstack_visual_indexes", (8, 16, 24))),
                hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
                rope_theta=float(theta),
            )
        except KeyError as err:
            raise ValueError(f"vision_config lacks required field {err}") from None


def _as_int(value: Any, name: str) -> int:
    """A config integer; lists (HF allows `patch_size: [a, b]`) and floats are refused, because
    HF's Conv3d kernel and reshapes only work for a single int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"vision_config {name} must be an int, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- pure helpers (static)


def normalize_grid(grid: Any, merge: int | None = None) -> GridTHW:
    """`grid_thw [N, 3]` (array, list or tuple) as a tuple of (t, h, w) Python ints, checked
    positive and, if `merge` is given, with h and w multiples of it."""
    arr = np.asarray(grid)
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"grid_thw must be integers shaped [images, 3] (t, h, w); got "
                         f"shape {arr.shape} dtype {arr.dtype}")
    out = tuple((int(t), int(h), int(w)) for t, h, w in arr)
    for thw in out:
        if min(thw) <= 0:
            raise ValueError(f"grid sizes must be positive, got (t, h, w) = {thw}")
        if merge is not None and (thw[1] % merge or thw[2] % merge):
            raise ValueError(f"grid (t, h, w) = {thw}: h and w must be multiples of "
                             f"spatial_merge_size {merge}")
    return out


def bilinear_matrix(out_size: int, side: int) -> np.ndarray:
    """`[out_size, side]` float32 matrix M with `M @ x` = HF's align-corners bilinear resize.

    Source coordinate `i * (side - 1) / max(out_size - 1, 1)` in float32 (the closed form of
    `torch.linspace(0, side - 1, out_size)` HF uses); taps floor and floor + 1 (clamped to the
    edge, where its weight is 0) with weights 1 - frac and frac.
    """
    i = np.arange(out_size, dtype=np.float32)
    src = i * np.float32(side - 1) / np.float32(max(out_size - 1, 1))
    lo = np.floor(src)
    frac = (src - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    m = np.zeros((out_size, side), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1) - frac)
    np.add.at(m, (rows, np.minimum(lo + 1, side - 1)), frac)
    return m


def window_order(x: jax.Array, merge: int) -> jax.Array:
    """`[h, w, ...]` -> `[h * w, ...]` in merge-window order (window row, window column, row
    in window, column in window): the order of the processor's patches."""
    h, w = x.shape[:2]
    rest = x.shape[2:]
    x = x.reshape(h // merge, merge, w // merge, merge, *rest)
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(h * w, *rest)


def resample_pos_embed(table: jax.Array, side: int, h: int, w: int, merge: int) -> jax.Array:
    """The `[n, D]` table read as `[side, side, D]`, bilinearly resized to `[h * w, D]` float32
    in merge-window order."""
    grid = table[: side * side].reshape(side, side, -1).astype(jnp.float32)
    a_h = jnp.asarray(bilinear_matrix(h, side))
    a_w = jnp.asarray(bilinear_matrix(w, side))
    out = jnp.einsum("ih,jw,hwd->ijd", a_h, a_w, grid,
                     precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16 passes on accelerators
    return window_order(out, merge)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`[head_dim // 4]` float32 frequencies, `1 / theta^(2i / (head_dim / 2))` as HF."""
    half = head_dim // 2
    return np.float32(1.0) / (
        np.float32(theta) ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))


def rope_angles(grid: GridTHW, merge: int, head_dim: int, theta: float) -> jax.Array:
    """Rotation angles `[sum(t * h * w), head_dim // 2]` float32: row angles then column
    angles, in merge-window order, repeated over each video's frames. Built from iotas so a
    large image puts no big constant into the compiled program."""
    inv = jnp.asarray(rope_inv_freq(head_dim, theta))
    parts = []
    for t, h, w in grid:
        rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (h, w))
        cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :], (h, w))
        pos = window_order(jnp.stack([rows, cols], axis=-1), merge)  # [h * w, 2]
        ang = (pos[:, :, None] * inv).reshape(h * w, -1)  # [h * f..., w * f...]
        parts.append(jnp.tile(ang, (t, 1)))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rope of `x [n, heads, hd]` with `cos/sin [n, 1, hd // 2]`, in float32:
    dim j and dim j + hd/2 turn together by angle j."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)


def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention of `[frames, n, heads, hd]` within each frame; softmax in float32 as HF's
    eager path, the products in the input dtype."""
    logits = jnp.einsum("fqhd,fkhd->fhqk", q, k) * jnp.asarray(scale, q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("fhqk,fkhd->fqhd", probs, v)


# ---------------------------------------------------------------- modules


def _linear(n_in, n_out, dtype, rngs):
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _layer_norm(n, dtype, rngs):
    return nnx.LayerNorm(n, epsilon=_NORM_EPS, use_fast_variance=False, dtype=dtype,
                         param_dtype=dtype, rngs=rngs)


class VisionBlock(nnx.Module):
    """Pre-norm transformer block; attention runs separately inside each frame."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.norm1 = _layer_norm(d, dtype, rngs)
        self.qkv = _linear(d, 3 * d, dtype, rngs)
        self.proj = _linear(d, d, dtype, rngs)
        self.norm2 = _layer_norm(d, dtype, rngs)
        self.linear_fc1 = _linear(d, cfg.intermediate_size, dtype, rngs)
        self.linear_fc2 = _linear(cfg.intermediate_size, d, dtype, rngs)

    def attention(self, x: jax.Array, grid: GridTHW, cos: jax.Array, sin: jax.Array):
        cfg = self.cfg
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, cfg.num_heads, cfg.head_dim)
        q = apply_rope(qkv[:, 0], cos, sin)
        k = apply_rope(qkv[:, 1], cos, sin)
        v = qkv[:, 2]
        outs, start = [], 0
        # block-diagonal: each frame on its own; consecutive images of one grid (and their
        # frames) go through one batched call, so a batch of one grid compiles one attention
        # per block, not one per image
        for (t, h, w), same in itertools.groupby(grid):
            frames = t * len(list(same))
            sl = slice(start, start + frames * h * w)
            shape = (frames, h * w, cfg.num_heads, cfg.head_dim)
            out = frame_attention(q[sl].reshape(shape), k[sl].reshape(shape),
                                  v[sl].reshape(shape), cfg.head_dim**-0.5)
            outs.append(out.reshape(frames * h * w, -1))
            start += frames * h * w
        out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        return self.proj(out)

    def __call__(self, x: jax.Array, grid: GridTHW, cos: jax.Array, sin: jax.Array):
        x = x + self.attention(self.norm1(x), grid, cos, sin)
        act = _ACTIVATIONS[self.cfg.hidden_act]
        return x + self.linear_fc2(act(self.linear_fc1(self.norm2(x))))


class PatchMerger(nnx.Module):
    """`[N, D]` tokens -> `[N / m^2, out_hidden_size]`, fusing each m^2 adjacent tokens.

    `postshuffle=False` (the final `merger`) normalises each token over D before fusing;
    `postshuffle=True` (the deepstack mergers) fuses first and normalises over D * m^2.
    """

    def __init__(self, cfg: VisionConfig, postshuffle: bool, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        wide = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = _layer_norm(wide if postshuffle else cfg.hidden_size, dtype, rngs)
        self.linear_fc1 = _linear(wide, wide, dtype, rngs)
        self.linear_fc2 = _linear(wide, cfg.out_hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        wide = self.linear_fc1.in_features
        if self.postshuffle:
            x = self.norm(x.reshape(-1, wide))
        else:
            x = self.norm(x).reshape(-1, wide)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVision(nnx.Module):
    """Patches `[P, C * T * p * p]` + static `grid_thw` -> `(embeds, deepstack)`, see module
    docstring. State paths: `patch_embed`, `pos_embed`, `blocks.{i}.*`, `merger.*`,
    `deepstack_merger_list.{j}.*`."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = _linear(cfg.patch_dim, d, dtype, rngs)
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_position_embeddings, d), dtype))
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List([
            PatchMerger(cfg, True, dtype=dtype, rngs=rngs)
            for _ in cfg.deepstack_visual_indexes])

    def embed(self, pixel_values: jax.Array, grid: GridTHW) -> jax.Array:
        """Patch embedding plus the resampled position table, `[P, D]` in the param dtype."""
        cfg = self.cfg
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != total or math.prod(pixel_values.shape[1:]) != cfg.patch_dim:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw {grid} needs "
                f"({total}, {cfg.patch_dim}) = (patches, C * T * p * p)")
        dtype = self.patch_embed.kernel[...].dtype
        x = self.patch_embed(jnp.asarray(pixel_values).reshape(total, -1).astype(dtype))
        table = self.pos_embed[...]
        pos = [jnp.tile(resample_pos_embed(table, cfg.grid_side, h, w, cfg.spatial_merge_size),
                        (t, 1)) for t, h, w in grid]
        pos = jnp.concatenate(pos, axis=0) if len(pos) > 1 else pos[0]
        return x + pos.astype(dtype)

    def __call__(self, pixel_values: jax.Array, grid_thw: Any
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg = self.cfg
        grid = normalize_grid(grid_thw, cfg.spatial_merge_size)
        x = self.embed(pixel_values, grid)
        angles = rope_angles(grid, cfg.spatial_merge_size, cfg.head_dim, cfg.rope_theta)
        cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, grid, cos, sin)
            if i in cfg.deepstack_visual_indexes:  # block order, merger by list position
                merger = self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), tuple(deepstack)
