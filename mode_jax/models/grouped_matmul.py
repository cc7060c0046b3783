"""Grouped (ragged) matmul of expert-sorted rows: `jax.lax.ragged_dot`, or blocks on CPU.

XLA:CPU has no grouped-matmul kernel: `ragged_dot` there does about E times the work of the
chosen (token, expert) pairs, which made the sorted MoE path slower than computing every expert
on every token (testbed shapes, 1360 tokens, 16 experts, top-2: ragged_dot 83 ms, all experts
35 ms, blocks 5.3 ms; `python -m benchmarks.grouped_matmul`, on a shared 2-core machine).
`blocked_matmul` instead pads each expert's rows to a multiple of a block, runs a `lax.scan`
of one `[block, K] x [K, N]` matmul per block with that block's expert's weights, and unpads:
the work is the routed rows plus at most one partial block per expert, and the scan
differentiates (the Fisher pass takes gradients through it). GPU and TPU keep `ragged_dot`,
which they lower to grouped kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_BLOCK = 64  # rows per block; 128 was 2x slower on the testbed shapes (more padding)
MIN_BLOCK = 8


class BlockLayout(NamedTuple):
    """Where sorted rows go in the padded layout: row i -> padded row `position[i]`; padded
    block b belongs to expert `block_expert[b]`; blocks from `num_active` on hold no row."""

    position: jax.Array  # [M] int32
    block_expert: jax.Array  # [num_blocks] int32
    num_active: jax.Array  # [] int32


def block_size(rows: int, num_experts: int) -> int:
    """A static block: the average rows per expert rounded up to a power of two, in [8, 64]."""
    per_expert = max(1, -(-rows // num_experts))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (per_expert - 1).bit_length())))


def num_blocks(rows: int, num_experts: int, block: int) -> int:
    """Static upper bound on padded blocks: every expert may leave one partial block."""
    return -(-rows // block) + num_experts


def layout(group_sizes: jax.Array, rows: int, block: int) -> BlockLayout:
    """The padded layout of `rows` sorted rows in groups of `group_sizes [E]` (sum <= rows)."""
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    end = jnp.cumsum(sizes)
    row = jnp.arange(rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(end, row, side="right"), e - 1)
    position = padded_end[group] - padded[group] + row - (end[group] - sizes[group])
    starts = jnp.arange(num_blocks(rows, e, block), dtype=jnp.int32) * block
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, starts, side="right"), e - 1)
    return BlockLayout(position.astype(jnp.int32), block_expert.astype(jnp.int32),
                       (padded_end[-1] // block).astype(jnp.int32))


def blocked_apply(x_sorted: jax.Array, group_sizes: jax.Array, fn, weights: tuple,
                  out_dim: int, out_dtype=None) -> jax.Array:
    """`fn(x_block [block, K], *weights_of_expert) -> [block, out_dim]` for every expert's rows:
    x_sorted `[M, K]`, group_sizes `[E]`, each of `weights` stacked `[E, ...]` -> `[M, out_dim]`.

    Blocks past the last routed row are skipped (`lax.cond`), so their cost is a branch; rows
    past `sum(group_sizes)` come out zero, as from `ragged_dot`.
    """
    m, k = x_sorted.shape
    e = group_sizes.shape[0]
    block = block_size(m, e)
    lay = layout(group_sizes, m, block)
    n = num_blocks(m, e, block)
    out_dtype = out_dtype or x_sorted.dtype
    xp = jnp.zeros((n * block, k), x_sorted.dtype).at[lay.position].set(x_sorted)
    xp = xp.reshape(n, block, k)

    def one(carry, inputs):
        xb, expert, index = inputs
        y = jax.lax.cond(
            index < lay.num_active,
            lambda: fn(xb, *(w[expert] for w in weights)).astype(out_dtype),
            lambda: jnp.zeros((block, out_dim), out_dtype))
        return carry, y

    _, yp = jax.lax.scan(one, None, (xp, lay.block_expert, jnp.arange(n)))
    routed = jnp.arange(m) < jnp.sum(group_sizes)
    return jnp.where(routed[:, None], yp.reshape(n * block, out_dim)[lay.position], 0)


def blocked_matmul(x_sorted: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   preferred_element_type=None) -> jax.Array:
    """Same result as `jax.lax.ragged_dot(x_sorted, w, group_sizes)`: `[M, K] x [E, K, N]`."""
    out_dtype = preferred_element_type or jnp.result_type(x_sorted.dtype, w.dtype)
    return blocked_apply(
        x_sorted, group_sizes,
        lambda xb, wb: jnp.dot(xb, wb, preferred_element_type=preferred_element_type),
        (w,), w.shape[-1], out_dtype)


def grouped_gram(x_sorted: jax.Array, group_sizes: jax.Array, blocks: bool | None = None
                 ) -> jax.Array:
    """`[E, K, K]`: `x_e^T x_e` over each group's rows of `x_sorted [M, K]` (rows past
    `sum(group_sizes)` ignored), in float32 at HIGHEST precision.

    The transposed grouped matmul (megablox's `tgmm`): per-expert Gram matrices for GPTQ
    Hessians at O(M K^2) work, not O(E M K^2) as masking every expert over all rows would be.
    `ragged_dot_general` with a ragged contracting dimension on GPU/TPU; on CPU, where that
    op is E times slower, a scan over the padded blocks of `layout` adding each block's Gram
    to its expert's (`blocks` forces either path).
    """
    m, k = x_sorted.shape
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    x = jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], x_sorted.astype(jnp.float32), 0.0)
    if not (use_blocks() if blocks is None else blocks):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(x, x, sizes, dims,
                                          precision=jax.lax.Precision.HIGHEST,
                                          preferred_element_type=jnp.float32)
    block = block_size(m, e)
    lay = layout(sizes, m, block)
    n = num_blocks(m, e, block)
    xp = jnp.zeros((n * block, k), jnp.float32).at[lay.position].set(x).reshape(n, block, k)

    def add_block(acc, inputs):
        xb, expert, index = inputs
        acc = jax.lax.cond(
            index < lay.num_active,
            lambda a: a.at[expert].add(
                jnp.matmul(xb.T, xb, precision=jax.lax.Precision.HIGHEST)),
            lambda a: a, acc)
        return acc, None

    acc, _ = jax.lax.scan(add_block, jnp.zeros((e, k, k), jnp.float32),
                          (xp, lay.block_expert, jnp.arange(n)))
    return acc


def use_blocks() -> bool:
    """Blocks where `ragged_dot` has no grouped kernel (CPU); `ragged_dot` elsewhere."""
    return jax.default_backend() == "cpu"
