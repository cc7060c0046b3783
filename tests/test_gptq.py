"""GPTQ core: against a column-by-column numpy GPTQ, against RTN, and its damping fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rtn import ref_codes, ref_group_params

from mode_jax.quant import gptq, rtn


def ref_gptq(w, h, bits, group_size, damp=0.01, symmetric=True, act_order=False):
    """Plain GPTQ in its OBS form, float64: rows one at a time, the inverse Hessian downdated
    explicitly after each row (no Cholesky factor, no lazy blocks). Returns (codes, dequant,
    loss)."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    static = [ref_group_params(w[i:i + group_size], bits, symmetric)
              for i in range(0, k, group_size)]
    codes, deq, loss = np.zeros_like(w), np.zeros_like(w), 0.0
    for r in order:
        if act_order:
            s, z = static[r // group_size]
        elif r % group_size == 0:
            s, z = ref_group_params(w[r:r + group_size], bits, symmetric)
        codes[r] = ref_codes(w[r], s, z, bits)
        deq[r] = s * (codes[r] - z)
        d = hinv[r, r]
        delta = (w[r] - deq[r]) / d
        loss += np.sum((w[r] - deq[r]) ** 2) / d / 2
        w -= np.outer(hinv[:, r], delta)
        hinv -= np.outer(hinv[:, r], hinv[r, :]) / d
    return codes, deq, loss


def correlated_inputs(tokens, k, seed=0, dead=()):
    """Activations with a few strong directions and outlier channels (like real LLM inputs)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(tokens, k)) @ mix + 0.1 * rng.normal(size=(tokens, k))
    x[:, :4] *= 8.0
    x[:, list(dead)] = 0.0
    return x


def hessian_of(x):
    return 2.0 / x.shape[0] * x.T @ x


def output_error(x, w, w_hat):
    return float(np.sum((x @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))) ** 2))


CASES = [  # (K, N, group, block, act_order, symmetric)
    (256, 24, 128, 128, False, True),
    (200, 24, 64, 128, False, False),  # two groups per block, padded last block, asymmetric
    (200, 24, 64, 128, True, True),  # act-order with static groups, short last group
]


@pytest.mark.parametrize(("k", "n", "group", "block", "act_order", "symmetric"), CASES)
def test_matches_numpy_recursion(k, n, group, block, act_order, symmetric):
    x = correlated_inputs(512, k, seed=k, dead=(7,))
    h = hessian_of(x)
    w = np.random.default_rng(1).normal(size=(k, n))
    with jax.enable_x64(True):
        for bits in (1, 2, 3, 4):
            res = gptq.gptq_quantize(w, h, bits, group_size=group, block_size=block,
                                     act_order=act_order, symmetric=symmetric)
            ref_c, ref_w, ref_loss = ref_gptq(w, h, bits, group, act_order=act_order,
                                              symmetric=symmetric)
            assert not bool(res.fallback) and res.weight.dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(res.codes), ref_c)
            np.testing.assert_allclose(np.asarray(res.weight), ref_w, atol=1e-4, rtol=0)
            np.testing.assert_allclose(float(res.loss), ref_loss, rtol=1e-6)
            if bits > 1:  # a dead input's row is zeroed, and zero is exactly representable
                np.testing.assert_array_equal(np.asarray(res.weight)[7], 0.0)


def test_float32_follows_the_float64_reference():
    k, n = 256, 32
    x = correlated_inputs(512, k, seed=3)
    h = hessian_of(x)
    w = np.random.default_rng(2).normal(size=(k, n)).astype(np.float32)
    res = gptq.gptq_quantize(w, h.astype(np.float32), 3)
    ref_c, ref_w, _ = ref_gptq(w, h, 3, 128)
    # float32 rounding may flip a few codes at .5 boundaries; the outcome must not suffer.
    assert (np.asarray(res.codes) == ref_c).mean() > 0.97
    assert output_error(x, w, res.weight) <= 1.01 * output_error(x, w, ref_w)


def test_loss_is_half_the_damped_hessian_error():
    k, n = 256, 24
    h = hessian_of(correlated_inputs(512, k, seed=4))
    w = np.random.default_rng(3).normal(size=(k, n))
    with jax.enable_x64(True):
        res = gptq.gptq_quantize(w, h, 3)
        h_damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(k)
        dw = w - np.asarray(res.weight)
        np.testing.assert_allclose(float(res.loss), 0.5 * np.sum(dw * (h_damped @ dw)), rtol=1e-8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn_on_layer_output(bits):
    k, n = 256, 32
    x = correlated_inputs(1024, k, seed=5)
    h = hessian_of(x).astype(np.float32)
    w = np.random.default_rng(4).normal(size=(k, n)).astype(np.float32)
    e_gptq = output_error(x, w, gptq.gptq_quantize(w, h, bits).weight)
    e_rtn = output_error(x, w, rtn.fake_quantize(w, bits))
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)

    e_act = output_error(x, w, gptq.gptq_quantize(w, h, bits, act_order=True).weight)
    assert e_act <= e_rtn
    e_asym = output_error(x, w, gptq.gptq_quantize(w, h, bits, symmetric=False).weight)
    e_rtn_asym = output_error(x, w, rtn.fake_quantize(w, bits, symmetric=False))
    assert e_asym <= e_rtn_asym and e_asym <= e_rtn


def test_vmap_over_experts_with_different_bits():
    k, n = 128, 16
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, k, n)).astype(np.float32)
    h = np.stack([hessian_of(correlated_inputs(256, k, seed=s)) for s in (7, 8)]
                 + [np.zeros((k, k))]).astype(np.float32)  # expert 2 saw no token
    bits = np.array([2, 4, 3])
    res = gptq.gptq_quantize_experts(w, h, bits)
    assert res.codes.shape == (3, k, n) and res.scales.shape == (3, 1, n)
    np.testing.assert_array_equal(np.asarray(res.fallback), [False, False, True])
    for e in range(2):
        one = gptq.gptq_quantize(w[e], h[e], int(bits[e]))
        np.testing.assert_allclose(np.asarray(res.weight[e]), np.asarray(one.weight), atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.weight[2]), np.asarray(rtn.fake_quantize(w[2], 3)),
                               rtol=1e-6)


def test_singular_hessian_keeps_base_damping():
    k, n = 128, 16
    x = correlated_inputs(40, k, seed=9)  # 40 tokens: rank 40 < 128
    w = np.random.default_rng(10).normal(size=(k, n)).astype(np.float32)
    res = gptq.gptq_quantize(w, hessian_of(x).astype(np.float32), 3)
    assert not bool(res.fallback) and float(res.damp) == pytest.approx(0.01)
    assert np.isfinite(np.asarray(res.weight)).all()
    assert output_error(x, w, res.weight) < output_error(x, w, rtn.fake_quantize(w, 3))


def _indefinite(k, min_eig_ratio, seed=11):
    """A Hessian whose smallest eigenvalue is `min_eig_ratio * mean(diag)` (negative)."""
    h = hessian_of(correlated_inputs(512, k, seed=seed))
    eig, vec = np.linalg.eigh(h)
    eig[0] = min_eig_ratio * np.mean(np.diag(h))
    h = (vec * eig) @ vec.T
    ratio = np.linalg.eigvalsh(h)[0] / np.mean(np.diag(h))
    assert ratio == pytest.approx(min_eig_ratio, rel=0.01)
    return h.astype(np.float32)


def test_indefinite_hessian_escalates_damping():
    k, n = 128, 16
    h = _indefinite(k, -0.05)
    w = np.random.default_rng(12).normal(size=(k, n)).astype(np.float32)
    res = gptq.gptq_quantize(w, h, 3)
    assert not bool(res.fallback)
    assert float(res.damp) == pytest.approx(0.1)
    assert np.isfinite(np.asarray(res.weight)).all()


def test_nan_hessian_falls_back_to_rtn():
    k, n = 128, 16
    h = hessian_of(correlated_inputs(512, k, seed=11)).astype(np.float32)
    h[3, 5] = h[5, 3] = np.nan  # e.g. an overflowed accumulation: no damping can fix it
    w = np.random.default_rng(13).normal(size=(k, n)).astype(np.float32)
    res = gptq.gptq_quantize(w, h, 3)
    assert bool(res.fallback) and float(res.damp) == pytest.approx(10.0)  # 4 tries: 0.01..10
    np.testing.assert_allclose(np.asarray(res.weight), np.asarray(rtn.fake_quantize(w, 3)),
                               rtol=1e-6)


def test_bad_arguments_are_clear_errors():
    w, h = np.ones((128, 8), np.float32), np.eye(128, dtype=np.float32)
    with pytest.raises(ValueError, match="hessian"):
        gptq.gptq_quantize(w, np.eye(64), 3)
    with pytest.raises(ValueError, match="bits"):
        gptq.gptq_quantize(w, h, 9)
    with pytest.raises(ValueError, match="divide"):
        gptq.gptq_quantize(w, h, 3, group_size=48, block_size=128)
    with pytest.raises(ValueError, match="damp"):
        gptq.gptq_quantize(w, h, 3, damp=0.0)
    with pytest.raises(ValueError, match="unknown GPTQ options"):
        gptq.gptq_quantize_experts(w[None], h[None], np.array([3]), blocksize=64)
    with pytest.raises(ValueError, match=r"bits \[E\]"):
        gptq.gptq_quantize_experts(w[None], h[None], np.array([3, 3]))


def test_one_by_one_factorisation_equals_the_batched_one():
    """The vmap of `_upper_inverse_factor_each` (a `lax.map`, used on multi-device CPUs) gives
    the batched factor bit for bit, NaNs of a matrix that is not positive definite included;
    nested vmaps and an unbatched operand take the same rule."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 40, 16)).astype(np.float32)
    a = np.einsum("bctk,bctl->bckl", x, x) / 40
    a[1, 0] = -np.eye(16, dtype=np.float32)  # no Cholesky factor
    want = jax.vmap(jax.vmap(gptq._upper_inverse_factor))(a)
    got = jax.jit(jax.vmap(jax.vmap(gptq._upper_inverse_factor_each)))(a)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.isnan(np.asarray(got[1, 0])).all() and np.isfinite(np.asarray(got[0])).all()
    single = jax.vmap(gptq._upper_inverse_factor_each, in_axes=(None,), axis_size=2)(a[0, 0])
    np.testing.assert_array_equal(np.asarray(single[1]), np.asarray(want[0, 0]))
