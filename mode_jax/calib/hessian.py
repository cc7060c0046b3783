"""GPTQ Hessians, streamed over calibration batches as pure updates of running sums.

A state holds `sum_t 2 x_t x_t^T` over the real tokens seen so far and their count; `finalize`
divides, giving `H = 2/n sum_t x_t x_t^T` (the GPTQ reference's normalisation, over tokens).

- dense linears (attention projections, shared experts, dense MLPs): every real token;
- routed experts of one MoE layer (`gate_up [E, D, 2F]`, `down [E, F, D]`): expert e sees only
  the real tokens routed to it. Gate and up share the input x, so one `[E, D, D]` Hessian
  serves both; the down projection's `[E, F, F]` Hessian uses each expert's own intermediate
  activations `silu(x Wg_e) * (x Wu_e)` over its tokens (pass the already-quantized gate_up in
  layer-sequential GPTQ). The (token, slot) pairs are sorted by expert and each expert's Gram
  matrices are built from its own rows (`grouped_matmul.grouped_gram`), so the work is that of
  the routed pairs, not E/k times it as masking every expert over all tokens would be. An
  expert with no token keeps count 0 and a zero Hessian: gptq_quantize falls back to RTN for it.

Masked tokens are excluded with `where`, so padding may hold any value (even NaN).
All sums are float32 with HIGHEST matmul precision (no TF32/bf16 passes on accelerators).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mode_jax.models import grouped_matmul, moe

HIGHEST = jax.lax.Precision.HIGHEST


class HessianState(NamedTuple):
    """h_sum [D, D] = sum 2 x x^T over counted tokens; count [] int32."""

    h_sum: jax.Array
    count: jax.Array


class ExpertHessianState(NamedTuple):
    """gate_up [E, D, D], down [E, F, F]: sums of 2 x x^T per expert; count [E] int32."""

    gate_up: jax.Array
    down: jax.Array
    count: jax.Array


def init_dense(dim: int) -> HessianState:
    return HessianState(jnp.zeros((dim, dim), jnp.float32), jnp.zeros((), jnp.int32))


def init_experts(num_experts: int, hidden: int, intermediate: int) -> ExpertHessianState:
    return ExpertHessianState(
        jnp.zeros((num_experts, hidden, hidden), jnp.float32),
        jnp.zeros((num_experts, intermediate, intermediate), jnp.float32),
        jnp.zeros((num_experts,), jnp.int32),
    )


def _gram(x, mask):
    """2 * sum over masked rows of x x^T for x [T, D], mask [T] bool."""
    xm = jnp.where(mask[:, None], x, 0.0)
    return 2.0 * jnp.matmul(xm.T, xm, precision=HIGHEST)


def _tokens(x, mask, what):
    """Flatten leading dims: x [..., D] -> [T, D], mask [...] -> [T] bool (None = all real)."""
    lead = x.shape[:-1]
    if mask is None:
        mask = jnp.ones(lead, bool)
    elif mask.shape != lead:
        raise ValueError(f"{what}: token mask {mask.shape} does not match x {x.shape}[:-1]")
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32), mask.reshape(-1).astype(bool)


@jax.jit
def update_dense(state: HessianState, x, mask=None) -> HessianState:
    """Add the real tokens of `x [..., D]` (`mask [...]`, 1 = real) to a dense linear's sums."""
    if x.shape[-1] != state.h_sum.shape[0]:
        raise ValueError(f"x feature dim {x.shape[-1]} != Hessian dim {state.h_sum.shape[0]}")
    x, mask = _tokens(x, mask, "update_dense")
    return HessianState(state.h_sum + _gram(x, mask), state.count + mask.sum(dtype=jnp.int32))


PARTS = ("both", "gate_up", "down")


@functools.partial(jax.jit, static_argnames=("blocks", "parts"))
def update_experts(state: ExpertHessianState, x, ids, gate_up, mask=None,
                   blocks: bool | None = None, parts: str = "both") -> ExpertHessianState:
    """Add one batch to a MoE layer's per-expert sums.

    x [..., D] hidden states entering the experts, ids [..., k] routed expert ids (distinct per
    token, as top-k gives them), mask [...] (1 = real token), gate_up [E, D, 2F] (gate columns
    first). `blocks` picks the grouped-matmul path (None: blocks on CPU only). `parts` "gate_up"
    or "down" adds only that Hessian's sums (the other's stay as they are), for callers that
    need one of them per gate_up variant; the counts are added either way.
    """
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r}; allowed: {', '.join(PARTS)}")
    e, d, two_f = gate_up.shape
    if state.gate_up.shape != (e, d, d) or state.down.shape != (e, two_f // 2, two_f // 2):
        raise ValueError(
            f"gate_up {gate_up.shape} does not match the state's Hessians "
            f"{state.gate_up.shape} and {state.down.shape}"
        )
    if x.shape[-1] != d or ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"expected x [..., {d}] and ids [..., k] with the same leading dims, "
                         f"got {x.shape} and {ids.shape}")
    x, mask = _tokens(x, mask, "update_experts")
    ids = ids.reshape(-1, ids.shape[-1])
    # Padding tokens go to a pseudo-expert `e`: sorted last, outside every group, never read.
    sent = moe.dispatch(jnp.where(mask[:, None], x, 0.0),
                        jnp.where(mask[:, None], ids, e).astype(jnp.int32), e)
    sizes = sent.group_sizes
    use_blocks = grouped_matmul.use_blocks() if blocks is None else blocks
    h_gate_up = state.gate_up
    if parts != "down":
        h_gate_up = h_gate_up + 2.0 * grouped_matmul.grouped_gram(sent.x_sorted, sizes, use_blocks)
    if parts == "gate_up":
        return ExpertHessianState(h_gate_up, state.down, state.count + sizes)
    if use_blocks:
        h = grouped_matmul.blocked_matmul(sent.x_sorted, gate_up.astype(jnp.float32), sizes)
    else:
        h = jax.lax.ragged_dot(sent.x_sorted, gate_up.astype(jnp.float32), sizes,
                               precision=HIGHEST, preferred_element_type=jnp.float32)
    f = two_f // 2
    act = jax.nn.silu(h[:, :f]) * h[:, f:]
    return ExpertHessianState(
        h_gate_up,
        state.down + 2.0 * grouped_matmul.grouped_gram(act, sizes, use_blocks),
        state.count + sizes,
    )


def finalize(h_sum, count):
    """H = h_sum / count (2/n sum x x^T); zero where count is 0. Works on [D, D] / [] and on
    stacked [E, D, D] / [E]."""
    count = jnp.asarray(count)
    denom = jnp.maximum(count, 1).astype(h_sum.dtype)
    return h_sum / denom.reshape(denom.shape + (1, 1))
