"""QuantizedExperts and QLinear against plain numpy references built from the same codes.

The references dequantize the generated codes themselves (`q * s`, scales rounded to bf16 as
stored) and compute the MoE output token by token, so they share no code with the packed path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mode_jax.quant import apply
from mode_jax.quant import quantized_moe as qmoe
from mode_jax.quant.qlinear import QLinear
from pallas_kernels import packing

GS = 32


def random_codes(rng, shape, bits):
    if bits == 1:
        return rng.choice(np.array([-1, 1]), size=shape)
    return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=shape)


def random_scales(rng, shape):
    s = rng.uniform(0.5, 1.5, size=shape) * 0.05
    return np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))  # stored values


def dequant(codes, scales, gs=GS):
    rows = np.repeat(scales, gs, axis=-2)[..., : codes.shape[-2], :]
    return codes * rows


def make_experts(rng, bits, d=64, f=36, gs=GS, **kw):
    """QuantizedExperts from random codes, plus the float weights the codes stand for."""
    e = len(bits)
    gu = np.stack([random_codes(rng, (d, 2 * f), b) for b in bits])
    dn = np.stack([random_codes(rng, (f, d), b) for b in bits])
    gu_s = random_scales(rng, (e, -(-d // gs), 2 * f))
    dn_s = random_scales(rng, (e, -(-f // gs), d))
    experts = qmoe.from_codes(bits, gu, jnp.asarray(gu_s, jnp.bfloat16), dn,
                              jnp.asarray(dn_s, jnp.bfloat16), group_size=gs, **kw)
    return experts, dequant(gu, gu_s, gs), dequant(dn, dn_s, gs)


def moe_reference(x, ids, weights, gate_up, down):
    """Token by token: sum_j w_j * down_e(silu(x Wg_e) * x Wu_e), float64."""
    x = np.asarray(x, np.float64)
    f = down.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(np.asarray(ids[t]), np.asarray(weights[t]), strict=True):
            h = x[t] @ gate_up[e]
            a = h[:f] / (1 + np.exp(-h[:f])) * h[f:]
            out[t] += w * (a @ down[e])
    return out


def routing(rng, n, k, allowed):
    ids = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(n)])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32)


CASES = {
    # bits per expert, experts that receive tokens
    "mixed_234_empty_b3_group": ([2, 4, 2, 3, 4, 2, 3, 4], [0, 1, 2, 4, 5, 7]),
    "only_2_and_8": ([8, 2, 2, 8, 2, 8], [0, 1, 2, 3, 4, 5]),
    "with_1bit_and_idle_experts": ([1, 3, 3, 1, 4, 4], [0, 2, 4]),
    "one_width": ([3, 3, 3, 3], [1, 2]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_reference(name):
    bits, allowed = CASES[name]
    n_tokens = 1 if name == "one_width" else 11  # decode: one token
    rng = np.random.default_rng(len(name) + n_tokens)
    experts, gate_up, down = make_experts(rng, bits)
    assert experts.bits().tolist() == bits
    assert sorted(experts.groups) == [f"b{b}" for b in sorted(set(bits))]
    x = jnp.asarray(rng.standard_normal((n_tokens, 64)), jnp.float32)
    ids, weights = routing(rng, n_tokens, 2, allowed)
    out = experts(x, ids, weights)
    ref = moe_reference(x, ids, weights, gate_up, down)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the fake-quantized weights are the same numbers
    gu, dn = experts.dequantized()
    np.testing.assert_allclose(np.asarray(gu), gate_up, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(dn), down, rtol=1e-6, atol=0)


def test_kernel_path_matches_xla_path():
    """bf16 activations (the kernels' dtype); float32 runs in test_serialize's
    test_kernel_path_logits_match_xla_path."""
    dtype = jnp.bfloat16
    rng = np.random.default_rng(3)
    experts, _, _ = make_experts(rng, [2, 4, 2, 3, 4, 2, 3, 4])
    x = jnp.asarray(rng.standard_normal((9, 64)), dtype)
    ids, weights = routing(rng, 9, 2, [0, 1, 2, 4, 5, 7])  # the 3-bit group gets no token
    xla = experts(x, ids, weights)
    experts.use_kernels = True
    kernel = experts(x, ids, weights)
    assert kernel.dtype == dtype
    tol = 2e-2
    ref = np.asarray(xla, np.float32)
    np.testing.assert_allclose(np.asarray(kernel, np.float32), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["registers", "magic"])
def test_kernel_dequant_mode_matches_xla_path(mode):
    """The packed model's kernel dequant choice (`--config.eval.kernel_dequant`) at group 128,
    where "registers" applies at 2, 3 and 4 bits."""
    rng = np.random.default_rng(5)
    experts, _, _ = make_experts(rng, [2, 4, 3, 4, 2, 3], d=128, f=128, gs=128)
    x = jnp.asarray(rng.standard_normal((7, 128)), jnp.bfloat16)
    ids, weights = routing(rng, 7, 2, [0, 1, 2, 3, 4, 5])
    ref = np.asarray(experts(x, ids, weights), np.float32)
    apply.set_use_kernels(experts, True, mode)
    assert experts.kernel_dequant == mode
    out = np.asarray(experts(x, ids, weights), np.float32)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    with pytest.raises(ValueError, match="'lut' is not one of"):
        apply.set_use_kernels(experts, True, "lut")


def test_jitted_decode_step_and_zero_weights():
    """Under nnx.jit (as in decoding) with one token; a zero routing weight contributes 0."""
    rng = np.random.default_rng(4)
    experts, gate_up, down = make_experts(rng, [2, 3, 4, 4])
    call = nnx.jit(lambda m, x, i, w: m(x, i, w))
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
    ids = jnp.asarray([[2, 0]], jnp.int32)
    weights = jnp.asarray([[0.7, 0.0]], jnp.float32)
    out = call(experts, x, ids, weights)
    ref = moe_reference(x, ids[:, :1], weights[:, :1], gate_up, down)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-6)


def test_hadamard_matrix_and_rotation():
    for n in (1, 2, 8, 32):
        h = qmoe.hadamard_matrix(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
        np.testing.assert_allclose(h, h.T)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    assert qmoe.hadamard_block(1408, 128) == 128 and qmoe.hadamard_block(36, 32) == 4
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 96))
    r = np.kron(np.eye(3), qmoe.hadamard_matrix(32))  # block-diagonal R
    np.testing.assert_allclose(np.asarray(qmoe.rotate(jnp.asarray(x), 32)), x @ r, atol=1e-5)
    w = rng.standard_normal((2, 96, 5))
    np.testing.assert_allclose(np.asarray(qmoe.rotate_rows(jnp.asarray(w), 32)), r @ w,
                               atol=1e-5)
    h = rng.standard_normal((96, 96))
    np.testing.assert_allclose(np.asarray(qmoe.rotate_hessian(jnp.asarray(h), 32)), r @ h @ r,
                               atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        qmoe.hadamard_matrix(12)


def test_rotated_experts_equal_unrotated_weights():
    """Codes of R W with online rotation = experts with the weights R^T (R W) = the codes'
    float weights rotated back."""
    rng = np.random.default_rng(6)
    experts, gate_up_rot, down_rot = make_experts(rng, [2, 3, 4], rotate_in=32, rotate_mid=4)
    r_in = np.kron(np.eye(2), qmoe.hadamard_matrix(32))
    r_mid = np.kron(np.eye(9), qmoe.hadamard_matrix(4))
    gate_up, down = r_in @ gate_up_rot, r_mid @ down_rot
    x = jnp.asarray(rng.standard_normal((7, 64)), jnp.float32)
    ids, weights = routing(rng, 7, 2, [0, 1, 2])
    ref = moe_reference(x, ids, weights, gate_up, down)
    out = experts(x, ids, weights)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    gu, dn = experts.dequantized()
    np.testing.assert_allclose(np.asarray(gu), gate_up, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dn), down, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qlinear_matches_matmul(bits):
    rng = np.random.default_rng(bits)
    k, n = 40, 50
    codes = random_codes(rng, (k, n), bits)
    scales = random_scales(rng, (2, n))
    w = dequant(codes, scales)
    lin = QLinear(packing.pack(codes, jnp.asarray(scales, jnp.bfloat16), bits, group_size=GS))
    assert (lin.in_features, lin.out_features) == (k, n)
    np.testing.assert_allclose(np.asarray(lin.dequantized_kernel()), w, rtol=1e-6)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    ref = x @ w
    out = lin(jnp.asarray(x))
    assert out.shape == (2, 3, n)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    lin.use_kernels = True
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), ref, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="inputs"):
        lin(jnp.ones((2, k + 1)))


def test_bad_groups_are_rejected():
    rng = np.random.default_rng(7)

    def group(ids, bits, parts=2):
        g = len(ids)
        gu = packing.pack(random_codes(rng, (g, 64, 72), bits),
                          jnp.ones((g, 2, 72), jnp.bfloat16), bits, group_size=GS, parts=parts)
        dn = packing.pack(random_codes(rng, (g, 36, 64), bits),
                          jnp.ones((g, 2, 64), jnp.bfloat16), bits, group_size=GS)
        return qmoe.GroupWeights(np.asarray(ids), gu, dn)

    with pytest.raises(ValueError, match="partition range"):
        qmoe.QuantizedExperts({2: group([0, 1], 2), 4: group([1, 2], 4)}, 3)
    with pytest.raises(ValueError, match="parts=2"):
        qmoe.QuantizedExperts({2: group([0, 1], 2, parts=1)}, 2)
    with pytest.raises(ValueError, match="holds"):
        qmoe.QuantizedExperts({3: group([0, 1], 2)}, 2)
    with pytest.raises(ValueError, match="bits must be"):
        qmoe.from_codes([2, 2], np.zeros((3, 64, 72), int), np.ones((3, 2, 72)),
                        np.zeros((3, 36, 64), int), np.ones((3, 2, 64)), group_size=GS)


def test_packed_arrays_are_not_params():
    """Optimizers over nnx.Param never see packed codes."""
    experts, _, _ = make_experts(np.random.default_rng(8), [2, 3])
    assert not jax.tree.leaves(nnx.state(experts, nnx.Param))
    assert all(a.dtype in (jnp.uint32, jnp.int32, jnp.bfloat16)
               for a in jax.tree.leaves(nnx.state(experts)))
