"""The RTN group quantizer against a plain numpy implementation of method.md's quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.quant import rtn

GROUP = 128


def ref_group_params(wg, bits, symmetric=True):
    """Per-column (scale, zero) of one group `wg [rows, N]`, straight from the spec, float64."""
    wg = np.asarray(wg, np.float64)
    n = wg.shape[1]
    if bits == 1:
        return np.abs(wg).mean(axis=0), np.zeros(n)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best, best_s, best_z = np.full(n, np.inf), np.zeros(n), np.zeros(n)
    for i in range(80):
        p = (100 - i) / 100
        if symmetric:
            s = p * np.abs(wg).max(axis=0) / qmax
            z = np.zeros(n)
        else:
            hi, lo = np.maximum(wg.max(axis=0), 0), np.minimum(wg.min(axis=0), 0)
            s = p * (hi - lo) / (2**bits - 1)
            z = np.round(-p * lo / np.where(s > 0, s, 1)) + qmin
        err = ref_error(wg, s, z, bits)
        better = err < best
        best, best_s, best_z = np.where(better, err, best), np.where(better, s, best_s), \
            np.where(better, z, best_z)
    return best_s, best_z


def ref_codes(wg, s, z, bits):
    if bits == 1:
        return np.where(wg >= 0, 1.0, -1.0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.round(wg / np.where(s > 0, s, 1)) + z, qmin, qmax)


def ref_error(wg, s, z, bits):
    """sum over the group of |Q(w) - w|^2.4 per column."""
    return (np.abs(s * (ref_codes(wg, s, z, bits) - z) - wg) ** 2.4).sum(axis=0)


def ref_quantize(w, bits, group_size=GROUP, symmetric=True):
    """(codes [K, N], scales [G, N], zeros [G, N]) group by group."""
    w = np.asarray(w, np.float64)
    codes, scales, zeros = np.zeros_like(w), [], []
    for start in range(0, w.shape[0], group_size):
        wg = w[start:start + group_size]
        s, z = ref_group_params(wg, bits, symmetric)
        codes[start:start + group_size] = ref_codes(wg, s, z, bits)
        scales.append(s)
        zeros.append(z)
    return codes, np.stack(scales), np.stack(zeros)


def _weights(shape, seed=0):
    w = np.random.default_rng(seed).standard_t(df=4, size=shape).astype(np.float32)
    w[:5, :3] = 0.0  # exact zeros: sign(0) -> +1 in 1-bit, harmless elsewhere
    return w


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_numpy_reference_in_float64(symmetric):
    w = _weights((300, 24))  # K = 300: the last group has 44 rows
    with jax.enable_x64(True):
        for bits in (1, 2, 3, 4, 8):
            w64 = jnp.asarray(w, jnp.float64)
            codes, scales, zeros = rtn.quantize_float(w64, bits, GROUP, symmetric)
            ref_c, ref_s, ref_z = ref_quantize(w, bits, GROUP, symmetric)
            np.testing.assert_allclose(np.asarray(scales), ref_s, rtol=1e-12, atol=0)
            np.testing.assert_array_equal(np.asarray(zeros), ref_z)
            np.testing.assert_array_equal(np.asarray(codes), ref_c)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_float32_picks_the_reference_optimum(bits):
    w = _weights((256, 32), seed=1)
    codes, scales = rtn.quantize(w, bits, GROUP)
    ref_c, ref_s, _ = ref_quantize(w, bits)
    scales = np.asarray(scales, np.float64)
    same = np.isclose(scales, ref_s, rtol=1e-5)
    assert same.mean() > 0.99
    # Where float32 rounding picked another candidate, it must be a near-tie in the objective.
    for g, n in zip(*np.nonzero(~same), strict=True):
        wg = w[g * GROUP:(g + 1) * GROUP, n:n + 1].astype(np.float64)
        ours = ref_error(wg, scales[g, n:n + 1], np.zeros(1), bits)
        best = ref_error(wg, ref_s[g, n:n + 1], np.zeros(1), bits)
        assert ours <= best * (1 + 1e-4)
    assert codes.dtype == jnp.int8


def test_vmap_over_bits_equals_separate_calls_and_compiles_once():
    w = jnp.asarray(_weights((256, 16), seed=2))
    fq = jax.jit(rtn.fake_quantize, static_argnames=("group_size",))
    bits = jnp.array([1, 2, 3, 4, 8])
    stacked = jax.vmap(fq, in_axes=(None, 0))(w, bits)
    for i, b in enumerate([1, 2, 3, 4, 8]):
        # vmapped and scalar programs may round p * max|w| / qmax one ulp apart
        np.testing.assert_allclose(np.asarray(stacked[i]), np.asarray(fq(w, b)), rtol=1e-6)
    assert fq._cache_size() == 1  # every scalar bit-width reused one compilation


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_in_range_and_dequantize_roundtrip(bits):
    w = _weights((200, 16), seed=3)
    codes, scales = rtn.quantize(w, bits)
    c = np.asarray(codes)
    if bits == 1:
        assert set(np.unique(c)) <= {-1, 1}
    else:
        assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
    assert scales.shape == (2, 16)
    np.testing.assert_allclose(
        rtn.dequantize(codes, scales), rtn.fake_quantize(w, bits), rtol=1e-6, atol=1e-7
    )
    c, s, z = rtn.quantize_asymmetric(w, bits)
    assert int(c.min()) >= -(2 ** (bits - 1)) and int(c.max()) <= max(2 ** (bits - 1) - 1, 1)
    np.testing.assert_allclose(
        rtn.dequantize(c, s, zeros=z), rtn.fake_quantize(w, bits, symmetric=False), atol=1e-6
    )


def test_error_decreases_with_bits():
    w = _weights((256, 64), seed=4)
    errs = [float(jnp.mean((rtn.fake_quantize(w, b) - w) ** 2)) for b in (1, 2, 3, 4, 5, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_one_bit_is_sign_times_group_mean_abs():
    w = _weights((256, 8), seed=5)
    got = np.asarray(rtn.fake_quantize(w, 1))
    for g in range(2):
        wg = w[g * GROUP:(g + 1) * GROUP]
        want = np.where(wg >= 0, 1.0, -1.0) * np.abs(wg).mean(axis=0)
        np.testing.assert_allclose(got[g * GROUP:(g + 1) * GROUP], want, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_gives_zeros_not_nan(symmetric):
    w = _weights((256, 8), seed=6)
    w[:GROUP] = 0.0
    for bits in (1, 2, 3, 4, 8):
        out = np.asarray(rtn.fake_quantize(w, bits, symmetric=symmetric))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[:GROUP], 0.0)
        assert np.abs(out[GROUP:]).sum() > 0


@pytest.mark.parametrize("bits", [1, 3])
def test_short_last_group_is_quantized_on_its_own_rows(bits):
    w = _weights((GROUP + 5, 8), seed=7)
    whole = np.asarray(rtn.fake_quantize(w, bits))
    np.testing.assert_array_equal(whole[:GROUP], np.asarray(rtn.fake_quantize(w[:GROUP], bits)))
    np.testing.assert_array_equal(whole[GROUP:], np.asarray(rtn.fake_quantize(w[GROUP:], bits)))


def test_expert_stack_uses_each_experts_bits_and_16_keeps():
    rng = np.random.default_rng(8)
    gate_up = rng.normal(size=(4, 128, 32)).astype(np.float32)
    down = rng.normal(size=(4, 16, 128)).astype(np.float32)
    bits = np.array([2, 4, 16, 1])
    gu_q, dn_q = rtn.fake_quantize_experts(gate_up, down, bits, group_size=GROUP)
    for e, b in enumerate(bits):
        for got, w in ((gu_q, gate_up), (dn_q, down)):
            want = rtn.fake_quantize(w[e], int(b))
            np.testing.assert_allclose(np.asarray(got[e]), np.asarray(want), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(gu_q[2]), gate_up[2])


def test_keeps_dtype():
    w = jnp.asarray(_weights((128, 8)), jnp.bfloat16)
    assert rtn.fake_quantize(w, 3).dtype == jnp.bfloat16


def test_bad_input_is_a_clear_error():
    w = _weights((128, 8))
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="bits"):
            rtn.fake_quantize(w, bad)
    with pytest.raises(ValueError, match="bits"):
        rtn.quantize(w, 16)  # 16 means "keep" and has no codes
    with pytest.raises(ValueError, match="group_size"):
        rtn.quantize(w, 3, group_size=0)
    with pytest.raises(ValueError, match=r"\[E\]"):
        rtn.fake_quantize_stack(np.stack([w, w]), np.array([2, 3, 4]))
    with pytest.raises(ValueError, match="K, N"):
        rtn.quantize(np.ones(8), 3)
