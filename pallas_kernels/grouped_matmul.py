"""Grouped (ragged) matmuls over packed mixed-bit expert weights, dequantized tile by tile.

One call serves one bit-width group of G experts:
  x [M, K] (bf16), rows sorted by expert; group_sizes [G] int32, sum <= M (rows of group g are
  ``offsets[g]:offsets[g+1]`` with ``offsets = [0, cumsum(group_sizes)]``);
  weights: a stacked ``packing.PackedWeight`` (planes ``[G, Kg, R, Np]``, scales ``[G, Kg, Np]``).
Rows at or past ``sum(group_sizes)`` come out as zeros. ``weights`` may also be a sequence of
stacked ``PackedWeight`` (a layer's bit groups, which may differ in bits): their experts follow
one another in ``group_sizes``' order and run in one launch (see "Mixed bits" below). Ops:
  grouped_matmul(x, w [G, K, N], gs)      -> [M, N]   x_g @ W_g        (down projection)
  grouped_swiglu(x, w [G, K, 2F], gs)     -> [M, F]   silu(x Wg) * (x Wu), gate = cols [:F];
                                                      w packed with ``parts=2``.

Kernel (megablox-style bookkeeping): rows are cut into ``block_m`` tiles; a *visit* is one
(expert, row tile) pair, computed outside the kernel as ``tile_group[t], tile_m[t]`` for
``t < num_tiles <= M/block_m + G - 1`` (a tile straddling experts is visited once per expert;
empty experts are not visited). The grid is (N tiles, visits). Each program loops over the K
groups (``group_size`` rows, one scale row each): loads the x slice and the packed word tiles
of expert ``tile_group[t]``, unpacks them with shifts (``packing.unpack_tile``), multiplies in
bf16 with f32 accumulation and applies the group scale to the partial product; finally it
writes the rows of its expert. ``BlockConfig.dequant="registers"`` unpacks each group's rows in
the order the GPU tensor cores read them (``packing.register_order``, x permuted to match) so
the codes never pass through shared memory; ``benchmarks/kernel_sass.py`` reads the effect in
the compiled code. The Mosaic kernel unpacks 3-bit codes in ``packing.paired_word_order`` (x
permuted to match), so that every Mosaic reshape keeps whole (8, 128) tiles.
Mixed bits: a launch over several bit groups visits every expert of every group in one grid
(a decode step's layer then costs one launch per projection instead of one per bit group, and
no group's rows are moved to row 0; the "xla" fallback still runs one ``ragged_dot`` per group,
see ``_xla_per_bit_group``); each group occupies a static range of expert numbers, so a
visit's expert number picks its group's branch (``pl.when``) and index into that group's
arrays. Groups whose row order differs (registers mode, Mosaic's 3 bits) read their own
permuted copy of x. On Mosaic each group's weight blocks are indexed by the visit's expert
clamped into the group, and each x copy's row tile by its latest reader (``x_copy_tiles``), so
visits of other groups re-use the blocks already fetched.
Backends: "triton" (GPU; metadata read from memory, masked stores), "mosaic_tpu" (metadata by
scalar prefetch into the BlockSpec index maps, revisited output blocks), either in interpret
mode on CPU, and "xla" (dequantize + ``jax.lax.ragged_dot``), the fallback where no kernel runs.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import packing
from pallas_kernels.packing import PackedWeight

BACKENDS = ("auto", "triton", "mosaic_tpu", "xla")
DEQUANT_MODES = ("convert", "magic", "registers")
DECODE_MAX_TOKENS_PER_EXPERT = 32


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes: ``block_m`` rows of x, ``block_n`` output columns (powers of two).

    ``block_n`` is halved until it divides the padded column width (a multiple of 128).
    ``num_warps``/``num_stages`` are Triton's; Mosaic ignores them. ``dequant`` is how a tile's
    codes become matmul operands (all exact, so all give the same products):
      "convert"  int32 codes -> float32 -> x's dtype (int-to-float instructions);
      "magic"    float32 codes from exponent bits (``packing.unpack_tile_float``) -> x's dtype;
      "registers" (Triton) the codes' tile in ``packing.register_order`` so each thread
                 unpacks the words whose rows it feeds to the tensor cores: no trip through
                 shared memory. Up to 4 bits the operand is bf16 ``128 + u`` straight from
                 exponent bits and the offset comes off the product (``_registers_product``);
                 x's columns are permuted to match outside the kernel (3 bits: both planes
                 share the order, one dot). Mosaic, and group sizes without a register order,
                 run it as "magic".
    (Multiplying the float32 codes in TF32 instead was measured 2.5x slower on an H100.)
    """

    block_m: int = 16
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    dequant: str = "convert"

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 8 or v & (v - 1):
                raise ValueError(f"BlockConfig.{name}={v} must be a power of two >= 8")
        if self.dequant not in DEQUANT_MODES:
            raise ValueError(f"BlockConfig.dequant={self.dequant!r} is not one of {DEQUANT_MODES}")


# Frozen defaults per backend and regime (decode: <= 32 tokens per expert on average), with
# per-op entries (fused = gate/up SwiGLU). Triton per-op entries: the fastest of
# ``benchmarks.kernels --sweep`` at Kimi-VL shapes, 4 bits, 1/16/512 tokens per expert, on an
# H100 (2026-11-24); the rest follow the layout (16-row dots at decode, 128-lane N tiles).
# Mosaic has one entry per regime for both ops. Re-run the sweep on new hardware.
DEFAULT_CONFIGS = {
    ("triton", "decode", True): BlockConfig(16, 128, num_warps=8, num_stages=2, dequant="magic"),
    ("triton", "decode", False): BlockConfig(16, 128, num_warps=4, num_stages=4, dequant="magic"),
    ("triton", "prefill", True): BlockConfig(128, 128, num_warps=8, num_stages=3, dequant="magic"),
    ("triton", "prefill", False): BlockConfig(128, 128, num_warps=4, num_stages=2),
    ("mosaic_tpu", "decode"): BlockConfig(block_m=16, block_n=256),
    ("mosaic_tpu", "prefill"): BlockConfig(block_m=128, block_n=256),
}


def default_config(backend: str, m: int, num_experts: int, fused: bool = False) -> BlockConfig:
    """The frozen config for ``backend``, the op and the regime given by tokens per expert."""
    regime = "decode" if m <= DECODE_MAX_TOKENS_PER_EXPERT * num_experts else "prefill"
    return DEFAULT_CONFIGS.get((backend, regime, fused)) or DEFAULT_CONFIGS[(backend, regime)]


def candidate_configs(backend: str) -> list[BlockConfig]:
    """Configs the autotuner tries on ``backend``."""
    if backend == "mosaic_tpu":
        return [BlockConfig(bm, bn) for bm in (16, 64, 128, 256) for bn in (128, 256, 512)]
    return [
        BlockConfig(bm, bn, warps, stages, dequant)
        for bm in (16, 32, 64, 128)
        for bn in (128, 256)
        for warps in (4, 8)
        for stages in (2, 4)
        for dequant in ("magic", "registers")
    ]


def resolve_backend(backend: str = "auto", interpret: bool = False) -> str:
    """Maps "auto" to this platform's kernel ("triton" on GPU, "mosaic_tpu" on TPU), else "xla".

    With ``interpret=True``, "auto" picks the kernel structure of the platform (Triton's
    off TPU) so it runs in interpret mode.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if interpret:
        return "mosaic_tpu" if platform == "tpu" else "triton"
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(platform, "xla")


# ---------------------------------------------------------------- public ops


def grouped_matmul(
    x: jax.Array,
    weights: PackedWeight | Sequence[PackedWeight],
    group_sizes: jax.Array,
    *,
    config: BlockConfig | None = None,
    backend: str = "auto",
    interpret: bool = False,
    dequant: str | None = None,
) -> jax.Array:
    """``out[i] = x[i] @ W[g(i)]`` for packed ``W [G, K, N]`` (or bit groups whose G add up);
    returns ``[M, N]`` in x.dtype.

    ``config=None`` takes the frozen default for the backend and regime; ``dequant`` (one of
    ``DEQUANT_MODES``) then replaces that config's dequant mode and keeps its tiles.
    """
    bit_groups = _check_inputs(x, weights, group_sizes, fused=False)
    config = _with_dequant(config, dequant)
    return _grouped(x, bit_groups, group_sizes, False, config, backend, interpret)


def grouped_swiglu(
    x: jax.Array,
    weights: PackedWeight | Sequence[PackedWeight],
    group_sizes: jax.Array,
    *,
    config: BlockConfig | None = None,
    backend: str = "auto",
    interpret: bool = False,
    dequant: str | None = None,
) -> jax.Array:
    """``silu(x Wg) * (x Wu)`` per expert for packed gate/up ``[G, K, 2F]`` (``parts=2``);
    ``config`` and ``dequant`` as in ``grouped_matmul``."""
    bit_groups = _check_inputs(x, weights, group_sizes, fused=True)
    config = _with_dequant(config, dequant)
    return _grouped(x, bit_groups, group_sizes, True, config, backend, interpret)


def _with_dequant(config: BlockConfig | None, dequant: str | None):
    """``config`` with its dequant mode replaced; a ``_DequantOnly`` marker when ``config`` is
    None, so the frozen default's tiles are still chosen per launch."""
    if dequant is None:
        return config
    if dequant not in DEQUANT_MODES:
        raise ValueError(f"dequant={dequant!r} is not one of {DEQUANT_MODES}")
    if config is None:
        return _DequantOnly(dequant)
    return dataclasses.replace(config, dequant=dequant)


@dataclasses.dataclass(frozen=True)
class _DequantOnly:
    """The frozen default tiles with this dequant mode (resolved in ``_run_kernel``)."""

    dequant: str


@functools.partial(jax.jit, static_argnames=("fused", "config", "backend", "interpret"))
def grouped_matmul_dense(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    fused: bool = False,
    config: BlockConfig | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """The same kernel on unquantized weights ``w [G, K, N]`` (the bf16 baseline).

    Needs K a multiple of 128 and N (each half of N when ``fused``) a multiple of 128.
    """
    g, k, n = w.shape
    if k % 128 or (n // (2 if fused else 1)) % 128 or (fused and n % 2):
        raise ValueError(f"dense weights {w.shape}: K and N per part must be multiples of 128")
    backend = resolve_backend(backend, interpret)
    if backend == "xla":
        y = lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
        return _finish_xla(y, n // 2 if fused else n, fused, x.dtype)
    spec = _Spec(None, 128, k // 128, fused, n // (2 if fused else 1), n // (2 if fused else 1))
    return _run_kernel(x, ((w,),), group_sizes, (spec,), config, backend, interpret)


# ---------------------------------------------------------------- references


@jax.jit
def grouped_matmul_reference(x, weights, group_sizes) -> jax.Array:
    """Plain jnp: dequantize every expert, multiply each expert's rows in float32."""
    w = _dequantize_all(weights, jnp.float32)  # [G, K, N]
    return _per_group_matmul(x, w, group_sizes).astype(x.dtype)


@jax.jit
def grouped_swiglu_reference(x, weights, group_sizes) -> jax.Array:
    """Plain jnp SwiGLU over ``grouped_matmul_reference``'s float32 product."""
    w = _dequantize_all(weights, jnp.float32)
    y = _per_group_matmul(x, w, group_sizes)
    f = w.shape[-1] // 2
    return (jax.nn.silu(y[:, :f]) * y[:, f:]).astype(x.dtype)


def _dequantize_all(weights, dtype) -> jax.Array:
    """``[sum G, K, N]``: every expert of one stacked ``PackedWeight`` or of a sequence."""
    bit_groups = (weights,) if isinstance(weights, PackedWeight) else tuple(weights)
    return jnp.concatenate([packing.dequantize(w, dtype) for w in bit_groups])


def _per_group_matmul(x, w, group_sizes):
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(x.shape[0])
    xf = x.astype(jnp.float32)
    out = jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32)
    for g in range(w.shape[0]):
        start = ends[g] - group_sizes[g]
        in_group = (rows >= start) & (rows < ends[g])
        y = jnp.dot(xf, w[g], precision=lax.Precision.HIGHEST)
        out = jnp.where(in_group[:, None], y, out)
    return out


# ---------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static shape of one launch. ``bits=None``: dense weights ``[G, Kp, Np]``."""

    bits: int | None
    group_size: int
    num_k_groups: int
    fused: bool
    out_n: int  # logical output columns (F when fused)
    part_padded: int  # column offset of the up half; output columns computed


@dataclasses.dataclass(frozen=True)
class _BitGroup:
    """One bit group of a launch: experts ``first .. first + size - 1`` in group_sizes' order,
    its ``num_arrays`` operands (planes, scales), dequant mode and x layout (``xs[x_index]``)."""

    spec: _Spec
    first: int
    size: int
    num_arrays: int
    dequant: str
    x_index: int


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _grouped(x, bit_groups: tuple[PackedWeight, ...], group_sizes, fused, config, backend,
             interpret):
    backend = resolve_backend(backend, interpret)
    first = bit_groups[0]  # all share K, N, group size and column parts (``_check_inputs``)
    if backend == "mosaic_tpu" and first.group_size % 128:
        backend = "xla"  # Mosaic needs 128-lane x slices; no kernel for smaller groups
    out_n = first.n // 2 if fused else first.n
    if backend == "xla":
        return _xla_per_bit_group(x, bit_groups, group_sizes, out_n, fused)
    specs = tuple(
        _Spec(w.bits, w.group_size, w.num_groups_k, fused, out_n, w.part_padded)
        for w in bit_groups
    )
    arrays = tuple((*w.planes, w.scales) for w in bit_groups)
    return _run_kernel(x, arrays, group_sizes, specs, config, backend, interpret)


def _xla_per_bit_group(x, bit_groups, group_sizes, out_n, fused):
    """Dequantize + ``ragged_dot``, one per bit group on its rows rolled to row 0 (rows past a
    group's sizes come out as zeros, so the groups' outputs add up). One ``ragged_dot`` over
    all groups would give the same values up to float rounding, but XLA:CPU sums differently
    with more groups, and GPTQ, fed the quantized layers' outputs, turns such differences into
    other codes: kept per group, the fallback's results do not depend on how a layer's bit
    groups are batched into calls."""
    y, first = None, 0
    for w in bit_groups:
        size = w.scales.shape[0]
        sizes = group_sizes[first : first + size]
        start = jnp.sum(group_sizes[:first]) if first else 0
        rows = jnp.roll(x, -start, axis=0) if first else x
        out = lax.ragged_dot(rows, packing.dequantize(w, x.dtype), sizes,
                             preferred_element_type=jnp.float32)
        out = _finish_xla(out, out_n, fused, x.dtype)
        out = jnp.roll(out, start, axis=0) if first else out
        y = out if y is None else y + out
        first += size
    return y


def _finish_xla(y, out_n, fused, dtype):
    if fused:
        y = jax.nn.silu(y[:, :out_n]) * y[:, out_n:]
    return y.astype(dtype)


def _run_kernel(x, arrays, group_sizes, specs: tuple[_Spec, ...], config, backend, interpret):
    """Pads x, lays out its copies, runs the backend's launch. ``arrays``/``specs``: per bit
    group."""
    m, k = x.shape
    spec = specs[0]  # the shape fields all bit groups share
    num_experts = sum(a[0].shape[0] for a in arrays)
    if config is None or isinstance(config, _DequantOnly):
        chosen = default_config(backend, m, num_experts, spec.fused)
        config = chosen if config is None else dataclasses.replace(chosen, dequant=config.dequant)
    bm = config.block_m
    bn = _fit_block_n(config.block_n, spec.part_padded)
    if backend == "mosaic_tpu" and bn % 128:
        raise ValueError(f"Mosaic TPU needs block_n a multiple of 128, got {config.block_n}")
    if backend == "triton" and bm < 16:
        raise ValueError(f"Triton dots need block_m >= 16, got {bm}")
    m_pad = max(_round_up(m, bm), bm)
    k_pad = spec.num_k_groups * spec.group_size
    x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k))) if (m_pad, k_pad) != (m, k) else x
    orders, bit_groups, first = [], [], 0
    for bg_spec, bg_arrays in zip(specs, arrays, strict=True):
        dequant = effective_dequant(config.dequant, bg_spec.bits, backend, spec.group_size)
        order = _tile_row_order(dequant, bg_spec.bits, backend, spec.group_size)
        key = None if order is None else tuple(order.tolist())
        if key not in orders:
            orders.append(key)
        size = bg_arrays[0].shape[0]
        bit_groups.append(
            _BitGroup(bg_spec, first, size, len(bg_arrays), dequant, orders.index(key)))
        first += size
    # x's columns in each bit group's row order of W, K group by K group
    groups = x.reshape(m_pad, spec.num_k_groups, spec.group_size)
    xs = tuple(x if order is None else groups[:, :, list(order)].reshape(m_pad, k_pad)
               for order in orders)
    meta = group_metadata(group_sizes, m_pad, bm)
    build = _triton_call if backend == "triton" else _mosaic_call
    flat = tuple(a for bg_arrays in arrays for a in bg_arrays)
    out = build(xs, flat, meta, tuple(bit_groups), bm, bn, config, interpret)
    rows = jnp.arange(m)
    return jnp.where((rows < meta[0][-1])[:, None], out[:m, : spec.out_n], 0).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def group_metadata(group_sizes: jax.Array, m_padded: int, block_m: int):
    """Tile-visit bookkeeping: ``(offsets [G+1], tile_group [T], tile_m [T], num_tiles [1])``.

    ``T = m_padded / block_m + G - 1`` (static bound); visits ``t >= num_tiles`` repeat the last
    real visit so a pipelined backend fetches nothing new. Group ends are clipped to
    ``m_padded``.
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    num_experts = sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(sizes), m_padded)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
    first = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    visit_end = jnp.cumsum(count)
    num_tiles = visit_end[-1]
    m_tiles = m_padded // block_m
    t = jnp.minimum(jnp.arange(m_tiles + num_experts - 1), jnp.maximum(num_tiles - 1, 0))
    # searchsorted(visit_end, t, side="right") as one comparison: jnp.searchsorted's default
    # is a loop, and a loop on GPU costs a host round trip per step (~0.3 ms per call here).
    group = jnp.sum(visit_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
    group = jnp.minimum(group, num_experts - 1)
    tile = first[group] + t - (visit_end[group] - count[group])
    tile = jnp.clip(tile, 0, m_tiles - 1).astype(jnp.int32)
    return offsets, group.astype(jnp.int32), tile, num_tiles.reshape(1).astype(jnp.int32)


# ---------------------------------------------------------------- kernel bodies


def _mosaic_word_rows(bits: int | None) -> bool:
    """Whether the Mosaic kernel unpacks in ``packing.paired_word_order`` (3-bit codes)."""
    return bits == 3


def _tile_row_order(dequant: str, bits: int | None, backend: str, group_size: int):
    """The in-group order in which a launch unpacks W's rows (x's columns follow), or None for
    the natural order: registers mode's, and Mosaic's word order for 3 bits."""
    if dequant == "registers":
        return packing.codes_register_order(bits, group_size)
    if backend == "mosaic_tpu" and _mosaic_word_rows(bits):
        return packing.paired_word_order(group_size)
    return None


def _tile_product(load_x, operands, spec: _Spec, bm, bn, out_dtype, *, static_loop: bool,
                  dequant: str = "convert", word_rows: bool = False):
    """Accumulates each operand's ``x @ W`` over K groups; SwiGLU when fused.

    ``operands``: per output (gate, up) a pair ``(load_words(kg) -> tuple | array,
    load_scale(kg) -> [1, bn] | None)``.
    """

    # float32 activations get true float32 products (not TF32); bf16 is exact either way.
    precision = lax.Precision.HIGHEST if jnp.dtype(out_dtype) == jnp.float32 else None

    def step(kg, accs):
        xk = load_x(kg)
        new = []
        for acc, (load_w, load_s) in zip(accs, operands, strict=True):
            if dequant == "registers":
                part = _registers_product(xk, load_w(kg), spec, precision)
            else:
                if spec.bits is None:
                    w = load_w(kg).astype(xk.dtype)
                elif dequant == "convert":
                    q = packing.unpack_tile(load_w(kg), spec.bits, spec.group_size,
                                            word_rows=word_rows)
                    w = q.astype(jnp.float32).astype(xk.dtype)
                else:
                    w = packing.unpack_tile_float(load_w(kg), spec.bits, spec.group_size,
                                                  word_rows=word_rows)
                    w = w.astype(xk.dtype)
                part = jnp.dot(xk, w, precision=precision, preferred_element_type=jnp.float32)
            new.append(acc + (part if load_s is None else part * load_s(kg).astype(jnp.float32)))
        return tuple(new)

    accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in operands)
    if static_loop:  # Mosaic: static ref offsets, unrolled for its scheduler
        for kg in range(spec.num_k_groups):
            accs = step(kg, accs)
    else:  # Triton: an scf.for that num_stages can software-pipeline
        accs = lax.fori_loop(0, spec.num_k_groups, step, accs)
    y = jax.nn.silu(accs[0]) * accs[1] if spec.fused else accs[0]
    return y.astype(out_dtype)


def _registers_product(x, words, spec: _Spec, precision):
    """``x @ q`` for one group from its plane tiles, unpacked in ``packing.register_order``.

    ``x``: the group's columns in that order. ``q = u - 2^(b-1)`` (1 bit: ``q = 2u - 1``). Up
    to 4 bits, ``0x4300 | u`` read as bf16 is ``128 + u`` (u < 128 fits the 7-bit mantissa),
    made two codes at a time in one 32-bit register (``packing.unpack_tile_registers_bf16``):
    no conversion; the dot then carries ``128 rowsum(x)``, taken off once per tile row instead
    of once per code. The bf16 products are exact and the float32 sums keep about 16 bits
    after that cancellation, beyond bf16's 8. 8-bit codes do not fit the mantissa and go
    through float32 exponent bits as in "magic".
    """
    bits = spec.bits
    dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)
    if bits == 8:
        u = packing.unpack_tile_registers(words, bits, spec.group_size)
        f = lax.bitcast_convert_type(u | 0x4B000000, jnp.float32) - (2.0**23 + 128)
        return dot(x, f.astype(x.dtype))
    v = packing.unpack_tile_registers_bf16(words, bits, spec.group_size)
    raw = dot(x, v.astype(x.dtype))  # x @ (128 + u)
    rowsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
    if bits == 1:  # q = 2u - 1
        return 2.0 * raw - 257.0 * rowsum
    return raw - float(128 + (1 << (bits - 1))) * rowsum


def effective_dequant(mode: str, bits: int | None, backend: str, group_size: int = 128) -> str:
    """The dequant a launch runs: "registers" only where it applies (see ``BlockConfig``)."""
    if mode == "registers" and (
        backend != "triton" or bits is None
        or not packing.codes_have_register_order(bits, group_size)
    ):
        return "magic"
    return mode


def _row_mask(start, end, tile_m, bm, bn):
    rows = tile_m * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    return (rows >= start) & (rows < end)


def _num_outputs(spec):
    return 2 if spec.fused else 1


def _column_blocks(spec, bn):
    return spec.part_padded // bn


def _triton_call(xs, arrays, meta, bit_groups, bm, bn, config, interpret):
    spec = bit_groups[0].spec
    gs = spec.group_size
    n_blocks = _column_blocks(spec, bn)

    def kernel(offs_ref, group_ref, tile_ref, count_ref, *refs):
        x_refs, w_refs, o_ref = refs[: len(xs)], refs[len(xs) : -1], refs[-1]
        n, t = pl.program_id(0), pl.program_id(1)

        @pl.when(t < count_ref[0])
        def _():
            g, mt = group_ref[t], tile_ref[t]
            rows = pl.ds(pl.multiple_of(mt * bm, bm), bm)

            def run(bg, bg_refs, local):
                x_ref = x_refs[bg.x_index]
                load_x = lambda kg: x_ref[rows, pl.ds(pl.multiple_of(kg * gs, gs), gs)]
                operands = []
                for i in range(_num_outputs(spec)):
                    cols = pl.ds(pl.multiple_of((n + i * n_blocks) * bn, bn), bn)
                    operands.append(_triton_operand(bg_refs, local, cols, bg.spec))
                y = _tile_product(load_x, operands, bg.spec, bm, bn, o_ref.dtype,
                                  static_loop=False, dequant=bg.dequant)
                mask = _row_mask(offs_ref[g], offs_ref[g + 1], mt, bm, bn)
                plgpu.store(o_ref.at[rows, pl.ds(pl.multiple_of(n * bn, bn), bn)], y, mask=mask)

            _each_bit_group(bit_groups, w_refs, g, run)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((xs[0].shape[0], spec.part_padded), xs[0].dtype),
        grid=(n_blocks, meta[1].shape[0]),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=_kernel_name(bit_groups),
    )(*meta, *xs, *arrays)


def _each_bit_group(bit_groups, w_refs, g, run, copies: int = 1):
    """Calls ``run(bit group, its refs, g's index in it)`` under the branch of ``g``'s bit group
    (a single group: no branch). Each owns ``copies * num_arrays`` consecutive refs."""
    start = 0
    for bg in bit_groups:
        bg_refs = w_refs[start : start + copies * bg.num_arrays]
        start += copies * bg.num_arrays
        if len(bit_groups) == 1:
            run(bg, bg_refs, g)
        else:
            inside = (g >= bg.first) & (g < bg.first + bg.size)
            pl.when(inside)(functools.partial(run, bg, bg_refs, g - bg.first))


def _triton_operand(w_refs, g, cols, spec):
    gs = spec.group_size
    if spec.bits is None:
        (w_ref,) = w_refs
        return (lambda kg: w_ref[g, pl.ds(pl.multiple_of(kg * gs, gs), gs), cols]), None
    *plane_refs, s_ref = w_refs
    load_w = lambda kg: tuple(p[g, kg, :, cols] for p in plane_refs)
    load_s = lambda kg: s_ref[g, pl.ds(kg, 1), cols]
    return load_w, load_s


def _mosaic_call(xs, arrays, meta, bit_groups, bm, bn, config, interpret):
    spec = bit_groups[0].spec
    gs = spec.group_size
    n_blocks = _column_blocks(spec, bn)
    n_out = _num_outputs(spec)
    if len(xs) > 1:  # each x copy's row tile per visit, so other groups' visits refetch none
        meta = (*meta, x_copy_tiles(meta[1], meta[2], bit_groups, len(xs)))
    n_meta = len(meta)

    def kernel(*refs):
        (offs_ref, group_ref, tile_ref, count_ref), refs = refs[:4], refs[n_meta:]
        x_refs, w_refs, o_ref = refs[: len(xs)], refs[len(xs) : -1], refs[-1]
        t = pl.program_id(1)

        @pl.when(t < count_ref[0])
        def _():
            g, mt = group_ref[t], tile_ref[t]

            def run(bg, bg_refs, _local):  # the index maps already picked the expert
                x_ref = x_refs[bg.x_index]
                load_x = lambda kg: x_ref[:, kg * gs : (kg + 1) * gs]
                per_out = bg.num_arrays
                operands = [_mosaic_operand(bg_refs[i * per_out : (i + 1) * per_out], bg.spec)
                            for i in range(n_out)]
                y = _tile_product(load_x, operands, bg.spec, bm, bn, o_ref.dtype,
                                  static_loop=True, dequant=bg.dequant,
                                  word_rows=_mosaic_word_rows(bg.spec.bits))
                mask = _row_mask(offs_ref[g], offs_ref[g + 1], mt, bm, bn)
                o_ref[...] = jnp.where(mask, y, o_ref[...])

            _each_bit_group(bit_groups, w_refs, g, run, copies=n_out)

    def weight_spec(a, bg, shift):
        block = (None, *a.shape[1:-1], bn)
        zeros = (0,) * (a.ndim - 2)

        def index(n, t, o, gr, tm, c, *_):
            expert = gr[t]
            if len(bit_groups) > 1:  # other groups' visits keep this group's block: no refetch
                expert = jnp.clip(expert - bg.first, 0, bg.size - 1)
            return (expert, *zeros, n + shift)

        return pl.BlockSpec(block, index)

    def x_spec(copy):
        if len(xs) == 1:
            return pl.BlockSpec((bm, xs[0].shape[1]), lambda n, t, o, gr, tm, c: (tm[t], 0))
        visits = meta[1].shape[0]
        return pl.BlockSpec((bm, xs[0].shape[1]),
                            lambda n, t, o, gr, tm, c, xt: (xt[copy * visits + t], 0))

    in_specs = [x_spec(i) for i in range(len(xs))]
    operands, start = [], 0
    for bg in bit_groups:
        bg_arrays = arrays[start : start + bg.num_arrays]
        start += bg.num_arrays
        for i in range(n_out):
            in_specs += [weight_spec(a, bg, i * n_blocks) for a in bg_arrays]
            operands += bg_arrays
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=n_meta,
        grid=(n_blocks, meta[1].shape[0]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda n, t, o, gr, tm, c, *_: (tm[t], n)),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((xs[0].shape[0], spec.part_padded), xs[0].dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name=_kernel_name(bit_groups),
    )(*meta, *xs, *operands)


def x_copy_tiles(tile_group, tile_m, bit_groups, num_copies: int) -> jax.Array:
    """``[num_copies * T]``: per x copy and visit, the row tile of the latest visit so far whose
    bit group reads that copy (before the first such visit: the first one's). A copy's block
    index then stays put through other groups' visits, so Mosaic fetches each copy's tiles only
    for the groups that read it."""
    visits = jnp.arange(tile_group.shape[0])
    copy = jnp.zeros_like(tile_group)
    for bg in bit_groups:
        inside = (tile_group >= bg.first) & (tile_group < bg.first + bg.size)
        copy = jnp.where(inside, bg.x_index, copy)
    out = []
    for c in range(num_copies):
        uses = copy == c
        last = lax.cummax(jnp.where(uses, visits, -1))
        out.append(tile_m[jnp.where(last >= 0, last, jnp.argmax(uses))])
    return jnp.concatenate(out).astype(jnp.int32)


def _mosaic_operand(w_refs, spec):
    gs = spec.group_size
    if spec.bits is None:
        (w_ref,) = w_refs
        return (lambda kg: w_ref[kg * gs : (kg + 1) * gs, :]), None
    *plane_refs, s_ref = w_refs
    load_w = lambda kg: tuple(p[kg] for p in plane_refs)
    load_s = lambda kg: s_ref[kg : kg + 1, :]
    return load_w, load_s


def _kernel_name(bit_groups):
    kind = "swiglu" if bit_groups[0].spec.fused else "matmul"
    widths = "_".join("bf16" if p.spec.bits is None else f"w{p.spec.bits}" for p in bit_groups)
    return f"grouped_{kind}_{widths}"


# ---------------------------------------------------------------- checks and helpers


def _check_inputs(x, weights, group_sizes, *, fused) -> tuple[PackedWeight, ...]:
    """The weights as a tuple of bit groups, after checking shapes; else a ValueError."""
    bit_groups = (weights,) if isinstance(weights, PackedWeight) else tuple(weights)
    if not bit_groups or not all(isinstance(w, PackedWeight) for w in bit_groups):
        raise ValueError("weights must be a packing.PackedWeight or a non-empty sequence of "
                         f"them, got {type(weights).__name__}")
    if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"x must be [M, K] bf16/f16/f32, got {x.shape} {x.dtype}")
    for w in bit_groups:
        if w.scales.ndim != 3:
            raise ValueError(
                f"weights must be stacked over experts ([G, ...]), got scales {w.scales.shape}"
            )
    shapes = {(w.k, w.n, w.group_size, w.parts) for w in bit_groups}
    if len(shapes) > 1:
        raise ValueError("bit groups of one call must agree on (K, N, group_size, parts); "
                         f"got {sorted(shapes)}")
    weights = bit_groups[0]
    if x.shape[1] != weights.k:
        raise ValueError(f"x has K={x.shape[1]} but the weights have K={weights.k}")
    num_experts = sum(w.scales.shape[0] for w in bit_groups)
    if group_sizes.shape != (num_experts,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be int [{num_experts}], got {group_sizes.shape} {group_sizes.dtype}"
        )
    if fused and weights.parts != 2:
        raise ValueError(
            "grouped_swiglu needs gate/up weights packed with parts=2 (gate = first half)"
        )
    if not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes)
        total = int(sizes.sum())
        if total > x.shape[0] or (sizes < 0).any():
            raise ValueError(
                f"group_sizes must be >= 0 with sum <= M={x.shape[0]}; got sum {total}"
            )
    return bit_groups


def _fit_block_n(block_n: int, width: int) -> int:
    while width % block_n:
        block_n //= 2
    return block_n


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------- timing and autotuning


def time_call(fn: Callable, *args, repeats: int = 20, warmup: int = 2, queued: int = 1) -> float:
    """Median seconds per call of ``fn(*args)`` (jit it first), after ``warmup`` untimed calls.

    Each sample times ``queued`` calls dispatched back to back and waited for once: with
    ``queued > 1`` the host's dispatch overlaps the device's work, as inside a jitted model
    step, so the figure is the device's time per call rather than a host round trip.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(queued)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - start) / queued)
    return statistics.median(samples)


def autotune(
    op: Callable,
    x: jax.Array,
    weights,
    group_sizes: jax.Array,
    *,
    candidates: Sequence[BlockConfig] | None = None,
    backend: str = "auto",
    interpret: bool = False,
    repeats: int = 10,
    queued: int = 1,
) -> tuple[BlockConfig, dict[BlockConfig, float]]:
    """Times ``op(x, weights, group_sizes, config=c)`` for each candidate on this backend.

    ``queued`` as in ``time_call``: above 1 each sample times that many calls dispatched back
    to back, the device's time per call rather than a host round trip's.

    Returns the fastest config and all timings (seconds; ``inf`` where a config failed to
    compile or run). Raises ValueError when the backend resolves to "xla" (nothing to tune).
    """
    resolved = resolve_backend(backend, interpret)
    if resolved == "xla":
        raise ValueError("autotune needs a kernel backend; this platform resolves to 'xla'")
    timings = {}
    for cfg in candidates or candidate_configs(resolved):
        call = functools.partial(op, config=cfg, backend=resolved, interpret=interpret)
        try:
            timings[cfg] = time_call(
                jax.jit(call), x, weights, group_sizes, repeats=repeats, queued=queued
            )
        except Exception:  # a config that does not lower or fit is skipped, not fatal
            timings[cfg] = float("inf")
    best = min(timings, key=timings.get)
    if timings[best] == float("inf"):
        raise ValueError(f"no candidate config ran on backend {resolved!r}")
    return best, timings
