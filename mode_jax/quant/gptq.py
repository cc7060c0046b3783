"""GPTQ as a pure, jit-able and vmap-able function of (weights, Hessian, bits).

Layout: `w [K, N]` is a kernel `[in, out]` (`y = x @ w`), so GPTQ walks the K input rows;
`hessian [K, K] = 2/n sum_t x_t x_t^T` over the tokens that reach the linear
(mode_jax.calib.hessian). Codes and scales follow mode_jax.quant.rtn (groups of `group_size`
consecutive input rows, one scale per output column, signed int8 codes).

Recipe (the GPTQ reference, method.md stage 4):
1. dead inputs (zero Hessian diagonal) get diagonal 1 and their weight rows are zeroed;
2. damping `damp * mean(diag H)` on the diagonal; U = upper Cholesky factor of (H + damp)^-1
   (computed as the inverse of the flipped Cholesky factor of the flipped H: one factorisation).
   If a factor has NaNs (H not positive definite in floating point) the relative damping is
   multiplied by 10, up to `max_damp_tries` attempts; if all fail, or H has no live input at
   all (an expert without calibration tokens), the result is round-to-nearest of the original
   weights (the same loop with U = I) and `fallback` is True;
3. rows are quantized one at a time; the error `(w - q) / U[i, i]` is spread over the rows
   not yet quantized, within a block of `block_size` rows eagerly and beyond it lazily, one
   matmul per block;
4. a group's scales are searched (rtn.group_params, same MSE grid) when its first row is
   reached, from the current error-updated rows of the group;
5. act-order (optional) visits rows by descending Hessian diagonal. Its scales are "static
   groups": searched up front from the natural-order weights, so the group layout of the
   format (consecutive input rows) is kept and each visited row uses its own group's scale.

`bits` may be traced (vmap over experts with different bits, one compilation);
`group_size`, `block_size`, `act_order`, `symmetric` and `mse_scale_search` are static.
K need not be a multiple of the block or group size: rows are padded with zero weights and
identity Hessian rows, which never couple to the real rows, and cut off at the end.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mode_jax.quant import rtn

HIGHEST = jax.lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
    """codes int8 [K, N]; scales [G, N]; zeros [G, N] (asymmetric mode, else None); weight: the
    dequantized kernel [K, N]; loss: 1/2 sum (w - q)^2 / U_ii^2 accumulated by the recursion
    (= 1/2 tr(dW^T H_damped dW); on fallback 1/2 ||dW||^2); damp: the relative damping of the
    last factorisation tried; fallback: True when round-to-nearest replaced GPTQ."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    weight: jax.Array
    loss: jax.Array
    damp: jax.Array
    fallback: jax.Array


def lazy_block_size(group_size: int, block_size: int, act_order: bool) -> int:
    """The lazy-update block: it must hold whole groups so scales see current rows."""
    if act_order or block_size % group_size == 0:
        return block_size
    if group_size % block_size == 0:
        return group_size  # same result, larger lazy batch
    raise ValueError(
        f"block_size {block_size} and group_size {group_size}: one must divide the other"
    )


def _upper_inverse_factor(a):
    """Upper U with U^T U = a^-1 (NaNs where a is not positive definite in floating point).

    a^-1 = U^T U  <=>  a = M M^T with M = U^-1 upper triangular, and M is the flipped lower
    Cholesky factor of the flipped matrix: one factorisation, one triangular solve."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    flipped = jnp.linalg.cholesky(a[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(flipped[::-1, ::-1], eye, lower=False)


@jax.custom_batching.custom_vmap
def _upper_inverse_factor_each(a):
    """`_upper_inverse_factor`, whose vmap runs the matrices one after another (`lax.map`).

    XLA:CPU runs every device's program on one shared thread pool, and a batched LAPACK call
    (jaxlib's Cholesky and triangular solve) hands its matrices out to that pool and blocks
    until they are done. With as many devices as pool threads (two forced host devices on two
    cores) every thread can end up blocked waiting for work only a free thread would run: GPTQ
    of a stack of experts hung about one run in five that way. One matrix per call is computed
    in the calling thread."""
    return _upper_inverse_factor(a)


@_upper_inverse_factor_each.def_vmap
def _(axis_size, in_batched, a):
    if not in_batched[0]:
        return _upper_inverse_factor_each(a), False
    return jax.lax.map(_upper_inverse_factor_each, a), True


def _factor_fn():
    """The factorisation for this process: one matrix at a time on a multi-device CPU
    (`_upper_inverse_factor_each` says why), batched elsewhere (GPU/TPU solvers, one device)."""
    if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
        return _upper_inverse_factor_each
    return _upper_inverse_factor


def _inverse_cholesky(h, mean_diag, damp, max_tries):
    """Upper U with U^T U = (h + r * mean_diag * I)^-1, r = damp * 10^i for the first i < max_tries
    that gives a finite factor. Returns (U, r, ok)."""
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    factor = _factor_fn()

    def attempt(ratio):
        return factor(h + ratio * mean_diag * eye)

    def finite(u):
        return jnp.all(jnp.isfinite(u))

    def cond(carry):
        i, u, _ = carry
        return (i < max_tries) & ~finite(u)

    def body(carry):
        i, _, _ = carry
        ratio = (damp * 10.0 ** i).astype(h.dtype)
        return i + 1, attempt(ratio), ratio

    not_yet = jnp.full_like(h, jnp.nan)
    _, u, ratio = jax.lax.while_loop(cond, body, (0, not_yet, jnp.asarray(damp, h.dtype)))
    return u, ratio, finite(u)


def _column_step(r, state, u1, scale, zero, bits, valid):
    """Quantize row r of the block and spread its error over the later rows of the block."""
    w1, err1, codes1, loss = state
    w = jax.lax.dynamic_index_in_dim(w1, r, keepdims=False)
    u_row = jax.lax.dynamic_index_in_dim(u1, r, keepdims=False)
    d = jax.lax.dynamic_index_in_dim(u_row, r, keepdims=False)
    q_codes = rtn.quantize_rows(w, scale, zero, bits)
    q = scale * (q_codes - zero)
    err = (w - q) / d
    w1 = w1 - u_row[:, None] * err[None, :]
    loss = loss + jnp.where(valid, jnp.sum((w - q) ** 2) / (2.0 * d * d), 0.0)
    put = functools.partial(jax.lax.dynamic_update_index_in_dim, index=r, axis=0)
    return w1, put(err1, err), put(codes1, q_codes), loss


def _lazy_update(w, u, err1, i1, block):
    """Apply a finished block's errors to every later row: one [K, B] x [B, N] matmul."""
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=0)
    return w - jnp.matmul(u_rows.T, err1, precision=HIGHEST)


def _gptq_grouped(w, u, bits, k, group_size, block, symmetric, mse):
    """Natural row order; each group's scales come from its current rows at its start."""
    kp, n = w.shape
    groups_per_block = block // group_size

    def block_body(b, carry):
        w, codes, scales, zeros, loss = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=0)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))

        def group_body(j, inner):
            w1, err1, codes1, scales, zeros, loss = inner
            r0 = j * group_size
            start = i1 + r0
            wg = jax.lax.dynamic_slice_in_dim(w1, r0, group_size, axis=0)
            count = jnp.clip(k - start, 0, group_size)
            scale, zero = rtn.group_params(wg, bits, count, symmetric=symmetric, mse=mse)
            gi = start // group_size
            scales = jax.lax.dynamic_update_index_in_dim(scales, scale, gi, 0)
            zeros = jax.lax.dynamic_update_index_in_dim(zeros, zero, gi, 0)

            def col(i, state):
                r = r0 + i
                return _column_step(r, state, u1, scale, zero, bits, i1 + r < k)

            w1, err1, codes1, loss = jax.lax.fori_loop(
                0, group_size, col, (w1, err1, codes1, loss)
            )
            return w1, err1, codes1, scales, zeros, loss

        empty = jnp.zeros((block, n), w.dtype)
        _, err1, codes1, scales, zeros, loss = jax.lax.fori_loop(
            0, groups_per_block, group_body, (w1, empty, empty, scales, zeros, loss)
        )
        w = _lazy_update(w, u, err1, i1, block)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, codes1, i1, axis=0)
        return w, codes, scales, zeros, loss

    g_count = kp // group_size
    init = (
        w,
        jnp.zeros_like(w),
        jnp.zeros((g_count, n), w.dtype),
        jnp.zeros((g_count, n), w.dtype),
        jnp.zeros((), w.dtype),
    )
    _, codes, scales, zeros, loss = jax.lax.fori_loop(0, kp // block, block_body, init)
    return codes, scales, zeros, loss


def _gptq_act_order(w, u, row_scale, row_zero, bits, k, block):
    """Permuted row order with per-row (static group) scales `row_scale [Kp, N]`."""
    kp, n = w.shape

    def block_body(b, carry):
        w, codes, loss = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=0)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))

        def col(r, state):
            scale = jax.lax.dynamic_index_in_dim(row_scale, i1 + r, keepdims=False)
            zero = jax.lax.dynamic_index_in_dim(row_zero, i1 + r, keepdims=False)
            return _column_step(r, state, u1, scale, zero, bits, i1 + r < k)

        empty = jnp.zeros((block, n), w.dtype)
        _, err1, codes1, loss = jax.lax.fori_loop(0, block, col, (w1, empty, empty, loss))
        w = _lazy_update(w, u, err1, i1, block)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, codes1, i1, axis=0)
        return w, codes, loss

    init = (w, jnp.zeros_like(w), jnp.zeros((), w.dtype))
    _, codes, loss = jax.lax.fori_loop(0, kp // block, block_body, init)
    return codes, loss


def _pad_rows(w, kp):
    return jnp.pad(w, ((0, kp - w.shape[0]), (0, 0)))


def _pad_hessian(h, kp):
    """Identity rows up to kp: padded inputs never couple to the real ones."""
    pad = kp - h.shape[0]
    eye_tail = jnp.concatenate([jnp.zeros(h.shape[0], h.dtype), jnp.ones(pad, h.dtype)])
    return jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(eye_tail)


def _prepare(w, h, damp, max_tries, kp, perm):
    """Dead inputs, damping and the factor U [Kp, Kp] (rows in visiting order, padded).

    Returns (w [K, N] with dead rows zeroed, U, ratio, fallback). On fallback U = I and w is
    the original: with U = I the recursion never moves an error to another row, so the same
    loop *is* round-to-nearest.
    """
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    mean_diag = jnp.mean(jnp.diag(h))
    if perm is not None:
        h = h[perm][:, perm]
    u, ratio, ok = _inverse_cholesky(_pad_hessian(h, kp), mean_diag, damp, max_tries)
    fallback = ~ok | jnp.all(dead)
    u = jnp.where(fallback, jnp.eye(kp, dtype=u.dtype), u)
    w = jnp.where(dead[:, None] & ~fallback, 0.0, w)
    return w, u, ratio, fallback


@functools.partial(
    jax.jit,
    static_argnames=("group_size", "block", "act_order", "symmetric", "mse", "max_tries"),
)
def _gptq_core(w, h, bits, damp, *, group_size, block, act_order, symmetric, mse, max_tries):
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    w, h = w.astype(dtype), h.astype(dtype)
    k, _ = w.shape
    kp = -(-k // block) * block
    g_count = -(-k // group_size)

    if act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, u, ratio, fallback = _prepare(w, h, damp, max_tries, kp, perm)
        # static groups: scales from the natural-order rows, looked up by each visited row
        wg, counts = rtn.split_groups(w, group_size)
        scales, zeros = rtn.group_params(wg, bits, counts[:, None], symmetric=symmetric, mse=mse)
        row_scale = jnp.pad(scales[perm // group_size], ((0, kp - k), (0, 0)))
        row_zero = jnp.pad(zeros[perm // group_size], ((0, kp - k), (0, 0)))
        wp = _pad_rows(w[perm], kp)
        codes_p, loss = _gptq_act_order(wp, u, row_scale, row_zero, bits, k, block)
        codes = codes_p[:k][jnp.argsort(perm)]
    else:
        w, u, ratio, fallback = _prepare(w, h, damp, max_tries, kp, None)
        codes, scales, zeros, loss = _gptq_grouped(
            _pad_rows(w, kp), u, bits, k, group_size, block, symmetric, mse
        )
        codes, scales, zeros = codes[:k], scales[:g_count], zeros[:g_count]

    return GPTQResult(
        codes=codes.astype(jnp.int8),
        scales=scales,
        zeros=None if symmetric else zeros,
        weight=rtn.dequantize(codes, scales, group_size, zeros, dtype),
        loss=loss,
        damp=ratio,
        fallback=fallback,
    )


def _check_args(w_shape, h_shape, group_size, block_size, damp, max_damp_tries, act_order):
    if len(w_shape) != 2 or h_shape != (w_shape[0], w_shape[0]):
        raise ValueError(f"expected w [K, N] and hessian [K, K], got {w_shape} and {h_shape}")
    rtn.check_group_size(group_size)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(damp, jax.core.Tracer) and not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")
    if not isinstance(max_damp_tries, int) or max_damp_tries < 1:
        raise ValueError(f"max_damp_tries must be an int >= 1, got {max_damp_tries!r}")
    return lazy_block_size(group_size, block_size, act_order)


def gptq_quantize(
    w,
    hessian,
    bits,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    symmetric: bool = True,
    mse_scale_search: bool = True,
    max_damp_tries: int = 4,
) -> GPTQResult:
    """GPTQ-quantize one kernel `w [K, N]` given `hessian [K, K]`; see the module docstring."""
    w, hessian = jnp.asarray(w), jnp.asarray(hessian)
    block = _check_args(
        w.shape, hessian.shape, group_size, block_size, damp, max_damp_tries, act_order
    )
    rtn.check_bits(bits)
    return _gptq_core(
        w, hessian, bits, damp, group_size=group_size, block=block, act_order=act_order,
        symmetric=symmetric, mse=mse_scale_search, max_tries=max_damp_tries,
    )


def gptq_quantize_experts(w, hessian, bits, **options) -> GPTQResult:
    """vmap of gptq_quantize over stacked experts: `w [E, K, N]`, `hessian [E, K, K]`,
    `bits [E]` (may differ per expert). Every field of the result gains a leading E axis."""
    w, hessian, bits = jnp.asarray(w), jnp.asarray(hessian), jnp.asarray(bits)
    if w.ndim != 3 or hessian.shape[:1] != w.shape[:1] or bits.shape != w.shape[:1]:
        raise ValueError(
            f"expected w [E, K, N], hessian [E, K, K], bits [E]; got {w.shape}, "
            f"{hessian.shape}, {bits.shape}"
        )
    opts = dict(group_size=128, damp=0.01, block_size=128, act_order=False, symmetric=True,
                mse_scale_search=True, max_damp_tries=4)
    unknown = set(options) - set(opts)
    if unknown:
        raise ValueError(f"unknown GPTQ options {sorted(unknown)}; allowed: {sorted(opts)}")
    opts.update(options)
    block = _check_args(
        w.shape[1:], hessian.shape[1:], opts["group_size"], opts["block_size"], opts["damp"],
        opts["max_damp_tries"], opts["act_order"],
    )
    rtn.check_bits(bits)
    core = functools.partial(
        _gptq_core, group_size=opts["group_size"], block=block, act_order=opts["act_order"],
        symmetric=opts["symmetric"], mse=opts["mse_scale_search"],
        max_tries=opts["max_damp_tries"],
    )
    return jax.vmap(core, in_axes=(0, 0, 0, None))(w, hessian, bits, opts["damp"])


def hessian_error(w, w_hat, hessian):
    """tr((w - w_hat)^T H (w - w_hat)) = (2/n) ||X w - X w_hat||^2 for H = 2/n X^T X."""
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    dw = (w - w_hat).astype(dtype)
    return jnp.sum(dw * jnp.matmul(hessian.astype(dtype), dw, precision=HIGHEST))
