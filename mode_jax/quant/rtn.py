"""Round-to-nearest group quantizer: the exact quantizer of method.md stage 4.

Shared by the sensitivity stage, the evaluation (fake quantization from a bit map) and GPTQ
(which calls `group_params` / `quantize_rows` on its error-updated weights).

Format (docs/design.md): a kernel `w [..., K, N]` (`y = x @ w`) is split along K (axis -2) into
groups of `group_size` consecutive input rows; each group has one scale per output column, so
`scales [..., G, N]` with `G = ceil(K / group_size)`. Codes are signed int8:

- b >= 2, symmetric: `q in [-2^(b-1), 2^(b-1) - 1]`, `w ~ q * s`; `s` is searched over the
  candidates `p * max|w| / qmax`, p = 1.00, 0.99, ..., 0.21, keeping the one with the smallest
  `sum |Q(w) - w|^2.4` (ties keep the larger p).
- b >= 2, asymmetric: same signed code range, `w ~ s * (q - z)` with an integer zero point `z`
  from the candidates `[p * min(w, 0), p * max(w, 0)]` (the GPTQ reference's grid).
- b = 1: `q = sign(w)` (0 -> +1), `s = mean |w|` of the group, `z = 0`.

K need not be a multiple of `group_size`: the last group is short. It is padded with zero rows
internally; zeros quantize to zero at every candidate scale, so they never change the scale
search, and the 1-bit mean divides by the real row count. Codes come back with K rows and the
short group keeps its own scale row.

`bits` may be a traced integer (one compiled function serves every bit-width; vmap over
experts or over bit choices). Concrete bits are checked: 1..8, and `fake_quantize*` also take
16 (= keep the weights as they are, for "only this expert is quantized" variants).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NORM = 2.4
SHRINK_STEPS = 80  # p = 1.00, 0.99, ..., 0.21
QUANT_BITS = tuple(range(1, 9))
KEEP_BITS = 16


def shrink_factor(i):
    """Candidate i of the scale grid: p = (100 - i) / 100."""
    return (100 - i) / 100


def check_bits(bits, allow_keep: bool = False) -> None:
    """Raise ValueError for concrete bit-widths outside 1..8 (or 16 when allow_keep)."""
    if isinstance(bits, jax.core.Tracer):
        return
    values = np.unique(np.asarray(bits))
    allowed = set(QUANT_BITS) | ({KEEP_BITS} if allow_keep else set())
    bad = [int(v) for v in values if int(v) not in allowed or v != int(v)]
    if bad:
        raise ValueError(f"bits {bad} not supported; allowed bit-widths: {sorted(allowed)}")


def check_group_size(group_size) -> None:
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def code_range(bits):
    """(qmin, qmax) as floats for a (possibly traced) bit-width: -2^(b-1), 2^(b-1) - 1."""
    half = jnp.exp2(jnp.asarray(bits, jnp.float32) - 1.0)
    return -half, half - 1.0


def _multi_bit_codes(w, scale, zero, qmin, qmax):
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe) + zero, qmin, qmax)


def quantize_rows(w, scale, zero, bits):
    """Float codes of `w [..., N]` (or rows `[..., R, N]` with scale/zero broadcast)."""
    qmin, qmax = code_range(bits)
    multi = _multi_bit_codes(w, scale, zero, qmin.astype(w.dtype), qmax.astype(w.dtype))
    one = jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)
    return jnp.where(jnp.asarray(bits) == 1, one, multi)


def group_params(wg, bits, count, *, symmetric: bool = True, mse: bool = True):
    """Scale and zero point per output column of one or many groups.

    wg: `[..., g, N]` rows of the group(s) (floating); count: real rows per group (for the 1-bit
    mean), broadcastable to `[..., N]`. Returns `(scale, zero)`, each `[..., N]` in wg's dtype.
    """
    dtype = wg.dtype
    qmin, qmax = code_range(bits)
    qmin, qmax = qmin.astype(dtype), qmax.astype(dtype)
    wmax = jnp.max(wg, axis=-2)
    wmin = jnp.min(wg, axis=-2)
    if symmetric:
        amax = jnp.maximum(wmax, -wmin)
        qmax_safe = jnp.maximum(qmax, 1.0)

        def candidate(p):
            return p * amax / qmax_safe, jnp.zeros_like(amax)
    else:
        hi, lo = jnp.maximum(wmax, 0.0), jnp.minimum(wmin, 0.0)
        levels = qmax - qmin

        def candidate(p):
            s = p * (hi - lo) / levels
            z = jnp.round(-p * lo / jnp.where(s > 0, s, 1.0)) + qmin
            return s, z

    def error(s, z):
        s_, z_ = s[..., None, :], z[..., None, :]
        deq = s_ * (_multi_bit_codes(wg, s_, z_, qmin, qmax) - z_)
        # |d|^2.4 as exp(2.4 log|d|): XLA vectorises exp/log but calls scalar powf (12x slower
        # on CPU); log(0) = -inf gives exactly 0.
        return jnp.sum(jnp.exp(NORM * jnp.log(jnp.abs(deq - wg))), axis=-2)

    def step(i, carry):
        best, s_best, z_best = carry
        s, z = candidate(jnp.asarray(shrink_factor(i), dtype))
        err = error(s, z)
        better = err < best
        pick = lambda new, old: jnp.where(better, new, old)
        return pick(err, best), pick(s, s_best), pick(z, z_best)

    s0, z0 = candidate(jnp.asarray(1.0, dtype))
    steps = SHRINK_STEPS if mse else 1
    _, scale, zero = jax.lax.fori_loop(1, steps, step, (error(s0, z0), s0, z0))

    mean_abs = jnp.sum(jnp.abs(wg), axis=-2) / jnp.maximum(jnp.asarray(count, dtype), 1.0)
    is_one = jnp.asarray(bits) == 1
    return jnp.where(is_one, mean_abs, scale), jnp.where(is_one, 0.0, zero).astype(dtype)


def split_groups(w, group_size: int):
    """Pad K to a multiple of group_size: `[..., G, g, N]` and the real row counts `[G]`."""
    k, n = w.shape[-2:]
    g_count = -(-k // group_size)
    pad = g_count * group_size - k
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])
    counts = np.minimum(group_size, k - np.arange(g_count) * group_size)
    return w.reshape(w.shape[:-2] + (g_count, group_size, n)), counts


@functools.partial(jax.jit, static_argnames=("group_size", "symmetric", "mse"))
def quantize_float(w, bits, group_size: int, symmetric: bool = True, mse: bool = True):
    """Float codes `[..., K, N]`, scales and zeros `[..., G, N]` (shared by RTN and GPTQ)."""
    if w.ndim < 2:
        raise ValueError(f"weights must be [..., K, N], got shape {w.shape}")
    check_group_size(group_size)
    k = w.shape[-2]
    compute = jnp.promote_types(w.dtype, jnp.float32)
    wg, counts = split_groups(w.astype(compute), group_size)
    scale, zero = group_params(wg, bits, counts[:, None], symmetric=symmetric, mse=mse)
    codes = quantize_rows(wg, scale[..., None, :], zero[..., None, :], bits)
    codes = codes.reshape(codes.shape[:-3] + (-1, codes.shape[-1]))[..., :k, :]
    return codes, scale, zero


def quantize(w, bits, group_size: int = 128):
    """Symmetric RTN: `w [..., K, N]` -> `(codes int8 [..., K, N], scales [..., G, N])`."""
    check_bits(bits)
    codes, scale, _ = quantize_float(w, bits, group_size, symmetric=True)
    return codes.astype(jnp.int8), scale


def quantize_asymmetric(w, bits, group_size: int = 128):
    """Asymmetric RTN: `(codes int8 [..., K, N], scales [..., G, N], zeros [..., G, N])`."""
    check_bits(bits)
    codes, scale, zero = quantize_float(w, bits, group_size, symmetric=False)
    return codes.astype(jnp.int8), scale, zero


def dequantize(codes, scales, group_size: int = 128, zeros=None, dtype=jnp.float32):
    """`scales * (codes - zeros)` with each scale row repeated over its group, `[..., K, N]`."""
    k = codes.shape[-2]
    if scales.shape[-2] != -(-k // group_size):
        raise ValueError(
            f"scales {scales.shape} do not match codes {codes.shape} at group_size {group_size}"
        )
    s = jnp.repeat(scales, group_size, axis=-2)[..., :k, :]
    q = codes.astype(s.dtype)
    if zeros is not None:
        q = q - jnp.repeat(zeros, group_size, axis=-2)[..., :k, :]
    return (s * q).astype(dtype)


def fake_quantize(w, bits, group_size: int = 128, symmetric: bool = True):
    """Quantize-dequantize `w [..., K, N]` in its own dtype; bits 16 returns w unchanged."""
    check_bits(bits, allow_keep=True)
    return _fake_quantize(w, bits, group_size, symmetric)


@functools.partial(jax.jit, static_argnames=("group_size", "symmetric"))
def _fake_quantize(w, bits, group_size, symmetric):
    codes, scale, zero = quantize_float(w, bits, group_size, symmetric)
    k = w.shape[-2]
    s = jnp.repeat(scale, group_size, axis=-2)[..., :k, :]
    z = jnp.repeat(zero, group_size, axis=-2)[..., :k, :]
    deq = (s * (codes - z)).astype(w.dtype)
    return jnp.where(jnp.asarray(bits) >= KEEP_BITS, w, deq)


def fake_quantize_stack(w, bits, group_size: int = 128):
    """Fake-quantize a stack of expert kernels `w [E, K, N]` with per-expert `bits [E]`."""
    bits = jnp.asarray(bits)
    if w.ndim != 3 or bits.shape != (w.shape[0],):
        raise ValueError(f"expected w [E, K, N] and bits [E], got {w.shape} and {bits.shape}")
    check_bits(bits, allow_keep=True)
    return jax.vmap(fake_quantize, in_axes=(0, 0, None))(w, bits, group_size)


def fake_quantize_experts(gate_up, down, bits, group_size: int = 128):
    """One MoE layer's routed experts (`gate_up [E, D, 2F]`, `down [E, F, D]`) at `bits [E]`."""
    gate_up_q = fake_quantize_stack(gate_up, bits, group_size)
    return gate_up_q, fake_quantize_stack(down, bits, group_size)
