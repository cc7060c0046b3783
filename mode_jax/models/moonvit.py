"""MoonViT, Kimi-VL's native-resolution vision tower, and its projector, in Flax NNX.

Input: the patches of all images packed along one axis, `pixel_values [P, 3, p, p]` (p = 14),
and `grid_hws`, the (rows, cols) of patches per image, as static Python ints (shapes depend on
them). Output of `MoonViT`: `[sum(h * w) / 4, 4, D]`, each image's 2x2 patch groups in raster
order; `Projector` turns that into one text-width vector per group, `[N, text_hidden]`.

Semantics follow Kimi-VL's published modeling code (checked against vLLM's `moonvit.py`, which
is adapted from it):
- patch embedding: a 14x14 stride-14 conv on a 14x14 patch is a linear map of the flattened
  patch (channel-major, as PyTorch's conv weight `[D, 3, p, p]` flattens);
- learned position table `[H, W, D]` resampled per image with PyTorch's bicubic kernel
  (a = -0.75, align_corners=False, edge-clamped taps) as two small matrices, `A_h @ T @ A_w^T`;
- 2-D rotary on q and k with theta 10000: head dims form interleaved pairs (2j, 2j + 1); pair j
  turns by `col * f[j // 2]` for even j and `row * f[j // 2]` for odd j, f[i] = theta^(-4i/hd);
- attention confined to each image (the published flash/sdpa paths; its eager path leaks across
  images by adding the boolean mask as +1.0, which we treat as a bug);
- pre-norm blocks with LayerNorm eps 1e-5, GELU (tanh form) in the MLP, final LayerNorm,
  2x2 patch merge;
- projector: LayerNorm over the vision width, flatten the 2x2 group to 4x width, linear, exact
  (erf) GELU, linear to the text width.

Differences from transformers' `kimi_k25` MoonViT, which the converter absorbs:
- K2.5 splits `wqkv` into q/k/v projections and rotates (j, j + hd/2) pairs ("rotate half");
  its q/k output rows are a per-head permutation of Kimi-VL's, so conversion permutes them back
  (`half_to_interleaved_rows`) and one model serves both;
- K2.5's video path (t > 1: temporal pooling and a sinusoidal time table) does not exist in
  Kimi-VL; only t = 1 is accepted;
- K2.5's vision `hidden_act` and projector LayerNorm eps are config fields; Kimi-VL fixes them
  (tanh GELU, 1e-5), which are this config's defaults (`mlp_act`, `projector_eps`);
- K2.5 resamples the position table as if it were square (`pos_emb_height` per side); Kimi-VL
  (and this port) resize height and width separately, the same for square tables.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types

GridHWs = tuple[tuple[int, int], ...]

_ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# transformers' names for the same functions (K2.5 configs carry `hidden_act`).
_HF_ACT_NAMES = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """MoonViT + projector dimensions. Defaults are Kimi-VL-A3B's vision_config."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    merge_kernel: tuple[int, int] = (2, 2)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    mlp_act: str = "gelu_tanh"
    projector_act: str = "gelu"
    projector_eps: float = 1e-5

    def __post_init__(self):
        field_types.check(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not a multiple of "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rope)")
        for name in ("mlp_act", "projector_act"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ValueError(
                    f"vision {name}={getattr(self, name)!r}; allowed: {sorted(_ACTIVATIONS)}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_size(self) -> int:
        return self.merge_kernel[0] * self.merge_kernel[1]

    @classmethod
    def from_kimi_vl(cls, d: Mapping[str, Any]) -> VisionConfig:
        """From the `vision_config` dict of a published Kimi-VL `config.json`."""
        merge = d.get("merge_kernel_size", (2, 2))
        try:
            return cls(
                hidden_size=d["hidden_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                intermediate_size=d["intermediate_size"],
                patch_size=d.get("patch_size", 14),
                pos_emb_height=d.get("init_pos_emb_height", 64),
                pos_emb_width=d.get("init_pos_emb_width", 64),
                merge_kernel=tuple(merge) if isinstance(merge, list) else merge,
            )
        except KeyError as err:
            raise ValueError(f"vision_config lacks required field {err}") from None
        except ValueError as err:  # field_types names the field
            raise ValueError(f"vision_config: {err}") from None

    @classmethod
    def from_k25(cls, vision: Any, projection_layer_norm_eps: float = 1e-5) -> VisionConfig:
        """From transformers' `Kimi_K25VisionConfig` (an object with attributes)."""
        act = _HF_ACT_NAMES.get(vision.hidden_act)
        if act is None:
            raise ValueError(
                f"vision hidden_act {vision.hidden_act!r} is not supported; "
                f"allowed: {sorted(_HF_ACT_NAMES)}"
            )
        rope = getattr(vision, "rope_parameters", None) or {}
        return cls(
            hidden_size=vision.hidden_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            intermediate_size=vision.intermediate_size,
            patch_size=int(vision.patch_size),
            pos_emb_height=vision.pos_emb_height,
            pos_emb_width=vision.pos_emb_width,
            merge_kernel=tuple(int(k) for k in vision.merge_kernel_size),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            mlp_act=act,
            projector_eps=float(projection_layer_norm_eps),
        )


# ---------------------------------------------------------------- pure helpers (numpy, static)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights of taps at offsets -1, 0, 1, 2 for fraction t, `[n, 4]`."""
    a = np.float32(a)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """`[out_size, in_size]` float32 matrix M with `M @ x` = PyTorch's 1-D bicubic resize of x.

    Matches `F.interpolate(mode="bicubic", align_corners=False)`: source coordinate
    `(i + 0.5) * in / out - 0.5` (not clamped), four taps clamped to the edges, weights computed
    in float32 as PyTorch's CPU kernel does.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    left = np.floor(src)
    weights = _cubic_weights((src - left).astype(np.float32))
    taps = np.clip(left.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
    return m


def resample_pos_emb(table: jax.Array, h: int, w: int) -> jax.Array:
    """Position table `[H, W, D]` bicubically resized to `[h * w, D]` (raster order)."""
    if (h, w) == tuple(table.shape[:2]):
        return table.reshape(h * w, -1)
    a_h = jnp.asarray(bicubic_matrix(h, table.shape[0]), jnp.float32)
    a_w = jnp.asarray(bicubic_matrix(w, table.shape[1]), jnp.float32)
    out = jnp.einsum("ih,jw,hwd->ijd", a_h, a_w, table.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16 passes on accelerators
    return out.reshape(h * w, -1).astype(table.dtype)


def rope_angles(h: int, w: int, head_dim: int, theta: float) -> np.ndarray:
    """Rotation angle of each interleaved pair, `[h * w, head_dim // 2]` float32, raster order.

    Pair j uses the column index for even j and the row index for odd j, both with frequency
    `theta ** (-4 * (j // 2) / head_dim)`.
    """
    freqs = np.float32(1.0) / (
        np.float32(theta) ** (np.arange(0, head_dim, 4, dtype=np.float32) / np.float32(head_dim))
    )
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                             indexing="ij")
    col_ang = cols.reshape(-1, 1) * freqs[None, :]
    row_ang = rows.reshape(-1, 1) * freqs[None, :]
    return np.stack([col_ang, row_ang], axis=-1).reshape(h * w, head_dim // 2)


def rope_cos_sin(grid_hws: GridHWs, head_dim: int, theta: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every image's `rope_angles`, `[sum(h * w), 1, head_dim // 2]` float32,
    on the host: the angles are constants of the program, and XLA would otherwise fold their
    cos/sin at every compile (most of the vision program's compile time at Kimi-VL's widths:
    9.7 s against 3.8 s for 8 images, `benchmarks.vision_compile`). Computed in float64 and
    rounded once, which is what XLA's folding gives too."""
    angles = np.concatenate([rope_angles(h, w, head_dim, theta) for h, w in grid_hws], axis=0)
    angles = angles.astype(np.float64)[:, None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of `x [n, heads, hd]` by the angles whose `cos/sin`
    (`[n, 1, hd // 2]`) are given, in float32."""
    dtype = x.dtype
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)


def half_to_interleaved_rows(num_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking a rotate-half q/k projection (K2.5) to interleaved pairs (Kimi-VL).

    `w_interleaved = w_half[perm]` for a PyTorch weight `[heads * hd, in]` (or a bias): within
    each head, interleaved dim 2j comes from half-layout dim j and 2j + 1 from j + hd / 2.
    """
    half = head_dim // 2
    within = np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)
    return (np.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def merge_patches(x: jax.Array, h: int, w: int, kernel: tuple[int, int]) -> jax.Array:
    """An image's `[..., h * w, D]` -> `[..., (h / kh) * (w / kw), kh * kw, D]` groups in raster
    order (leading axes: several images of that grid)."""
    kh, kw = kernel
    d = x.shape[-1]
    lead = x.shape[:-2]
    x = x.reshape(*lead, h // kh, kh, w // kw, kw, d)
    x = jnp.moveaxis(x, -4, -3)  # (.., h / kh, w / kw, kh, kw, d)
    return x.reshape(*lead, (h // kh) * (w // kw), kh * kw, d)


def normalize_grid(grid: Any, merge_kernel: tuple[int, int] | None = None) -> GridHWs:
    """`image_grid_hws [N, 2]` or `image_grid_thw [N, 3]` (t = 1) as a tuple of (h, w) ints."""
    arr = np.asarray(grid)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(
            f"image grid must be [images, 2] (h, w) or [images, 3] (t, h, w); got shape {arr.shape}"
        )
    if arr.shape[1] == 3:
        if (arr[:, 0] != 1).any():
            raise ValueError(
                f"image_grid_thw has t != 1 ({arr[:, 0].tolist()}); Kimi-VL takes single images"
            )
        arr = arr[:, 1:]
    out = tuple((int(h), int(w)) for h, w in arr)
    for h, w in out:
        if h <= 0 or w <= 0:
            raise ValueError(f"image grid sizes must be positive, got {(h, w)}")
        if merge_kernel is not None and (h % merge_kernel[0] or w % merge_kernel[1]):
            raise ValueError(
                f"image grid {(h, w)} is not a multiple of the merge kernel {merge_kernel}"
            )
    return out


# ---------------------------------------------------------------- modules


def _linear(n_in, n_out, dtype, rngs):
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _layer_norm(n, eps, dtype, rngs):
    return nnx.LayerNorm(n, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype,
                         rngs=rngs)


class MoonViTBlock(nnx.Module):
    """Pre-norm transformer block; attention runs separately inside each image."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.norm0 = _layer_norm(d, cfg.layer_norm_eps, dtype, rngs)
        self.wqkv = _linear(d, 3 * d, dtype, rngs)
        self.wo = _linear(d, d, dtype, rngs)
        self.norm1 = _layer_norm(d, cfg.layer_norm_eps, dtype, rngs)
        self.fc0 = _linear(d, cfg.intermediate_size, dtype, rngs)
        self.fc1 = _linear(cfg.intermediate_size, d, dtype, rngs)

    def attention(self, x: jax.Array, runs: Sequence[tuple[int, int]],
                  rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Block-diagonal attention, each image on its own; `runs` are (patches, images) of
        consecutive images of one size, which go through one batched call: a batch of one
        grid compiles one attention per layer, not one per image."""
        cfg = self.cfg
        qkv = self.wqkv(x).reshape(x.shape[0], 3, cfg.num_heads, cfg.head_dim)
        q = apply_rope(qkv[:, 0], *rope)
        k = apply_rope(qkv[:, 1], *rope)
        v = qkv[:, 2]
        outs, start = [], 0
        for n, count in runs:
            sl = slice(start, start + n * count)
            q_, k_, v_ = (a[sl].reshape(count, n, *a.shape[1:]) for a in (q, k, v))
            outs.append(jax.nn.dot_product_attention(q_, k_, v_).reshape(n * count,
                                                                         *q.shape[1:]))
            start += n * count
        out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        return self.wo(out.reshape(x.shape[0], -1))

    def __call__(self, x: jax.Array, runs: Sequence[tuple[int, int]],
                 rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        x = x + self.attention(self.norm0(x), runs, rope)
        return x + self.fc1(_ACTIVATIONS[self.cfg.mlp_act](self.fc0(self.norm1(x))))


class MoonViT(nnx.Module):
    """Patches `[P, 3, p, p]` + static `grid_hws` -> merged groups `[P / 4, 4, D]`."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = _linear(3 * cfg.patch_size**2, d, dtype, rngs)
        self.pos_emb = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.pos_emb_height, cfg.pos_emb_width, d), dtype)
        )
        self.blocks = nnx.List([MoonViTBlock(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_layernorm = _layer_norm(d, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, pixel_values: jax.Array, grid_hws: GridHWs) -> jax.Array:
        cfg = self.cfg
        grid_hws = normalize_grid(grid_hws, cfg.merge_kernel)
        p = cfg.patch_size
        total = sum(h * w for h, w in grid_hws)
        if tuple(pixel_values.shape) != (total, 3, p, p):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; image grid {grid_hws} "
                f"needs ({total}, 3, {p}, {p})"
            )
        dtype = self.patch_embed.kernel[...].dtype
        x = self.patch_embed(pixel_values.reshape(total, -1).astype(dtype))
        table = self.pos_emb[...]
        runs = [(hw, len(list(same))) for hw, same in itertools.groupby(grid_hws)]
        x = x + jnp.concatenate([jnp.tile(resample_pos_emb(table, h, w), (count, 1))
                                 for (h, w), count in runs], axis=0)
        rope = tuple(map(jnp.asarray, rope_cos_sin(grid_hws, cfg.head_dim, cfg.rope_theta)))
        for block in self.blocks:
            x = block(x, [(h * w, count) for (h, w), count in runs], rope)
        x = self.final_layernorm(x)
        groups, start = [], 0
        for (h, w), count in runs:
            part = x[start:start + count * h * w].reshape(count, h * w, -1)
            merged = merge_patches(part, h, w, cfg.merge_kernel)
            groups.append(merged.reshape(-1, *merged.shape[2:]))
            start += count * h * w
        return jnp.concatenate(groups, axis=0) if len(groups) > 1 else groups[0]


class Projector(nnx.Module):
    """Merged groups `[N, k, D]` -> text-width features `[N, text_hidden]`."""

    def __init__(self, cfg: VisionConfig, text_hidden: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        wide = cfg.hidden_size * cfg.merge_size
        self.pre_norm = _layer_norm(cfg.hidden_size, cfg.projector_eps, dtype, rngs)
        self.linear_1 = _linear(wide, wide, dtype, rngs)
        self.linear_2 = _linear(wide, text_hidden, dtype, rngs)

    def __call__(self, groups: jax.Array) -> jax.Array:
        x = self.pre_norm(groups).reshape(groups.shape[0], -1)
        return self.linear_2(_ACTIVATIONS[self.cfg.projector_act](self.linear_1(x)))
