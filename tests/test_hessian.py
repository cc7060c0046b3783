"""Streamed GPTQ Hessians against a plain per-expert numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.calib import hessian

E, D, F, K_TOP = 6, 16, 12, 2


def silu(v):
    return v / (1.0 + np.exp(-v))


def ref_expert_hessians(x, ids, mask, gate_up):
    """Per expert: (2 sum x x^T, 2 sum a a^T, count) over real tokens routed to it."""
    x64, gu = x.astype(np.float64), gate_up.astype(np.float64)
    h_gu, h_dn, count = np.zeros((E, D, D)), np.zeros((E, F, F)), np.zeros(E, int)
    for e in range(E):
        for t in range(x.shape[0]):
            if mask[t] and e in ids[t]:
                h = x64[t] @ gu[e]
                a = silu(h[:F]) * h[F:]
                h_gu[e] += 2 * np.outer(x64[t], x64[t])
                h_dn[e] += 2 * np.outer(a, a)
                count[e] += 1
    return h_gu, h_dn, count


def batch(t, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, D)).astype(np.float32)
    ids = np.stack([rng.choice(E - 1, K_TOP, replace=False) for _ in range(t)])  # E-1 unused
    mask = rng.random(t) > 0.25
    x[~mask] = np.nan  # padding content must never leak in
    return x, ids.astype(np.int32), mask


@pytest.mark.parametrize("blocks", [True, False])  # CPU's blocked scan; ragged_dot_general
def test_expert_hessians_match_numpy_loop_over_batches(blocks):
    gate_up = (np.random.default_rng(0).normal(size=(E, D, 2 * F)) / 4).astype(np.float32)
    state = hessian.init_experts(E, D, F)
    batches = [batch(40, 1), batch(25, 2)]
    for x, ids, mask in batches:
        state = hessian.update_experts(state, x, ids, gate_up, mask, blocks=blocks)
    x, ids, mask = (np.concatenate(parts) for parts in zip(*batches, strict=True))
    ref_gu, ref_dn, ref_count = ref_expert_hessians(x, ids, mask, gate_up)
    np.testing.assert_array_equal(np.asarray(state.count), ref_count)
    assert ref_count[E - 1] == 0 and ref_count.sum() == K_TOP * mask.sum()
    np.testing.assert_allclose(np.asarray(state.gate_up), ref_gu, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.down), ref_dn, rtol=1e-5, atol=1e-4)

    h = np.asarray(hessian.finalize(state.gate_up, state.count))
    np.testing.assert_allclose(h[0], ref_gu[0] / ref_count[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h[E - 1], 0.0)  # no token: zero Hessian, count 0


@pytest.mark.parametrize("part", ["gate_up", "down"])
def test_one_part_adds_only_that_hessian(part):
    gate_up = (np.random.default_rng(5).normal(size=(E, D, 2 * F)) / 4).astype(np.float32)
    x, ids, mask = batch(30, 6)
    start = hessian.init_experts(E, D, F)
    start = start._replace(gate_up=start.gate_up + 1.0, down=start.down + 2.0)
    both = hessian.update_experts(start, x, ids, gate_up, mask)
    one = hessian.update_experts(start, x, ids, gate_up, mask, parts=part)
    other = "down" if part == "gate_up" else "gate_up"
    np.testing.assert_array_equal(*(np.asarray(getattr(s, part)) for s in (one, both)))
    np.testing.assert_array_equal(*(np.asarray(getattr(s, other)) for s in (one, start)))
    np.testing.assert_array_equal(np.asarray(one.count), np.asarray(both.count))
    with pytest.raises(ValueError, match="parts='up'"):
        hessian.update_experts(start, x, ids, gate_up, mask, parts="up")


def test_expert_hessians_accept_batch_and_sequence_dims():
    gate_up = np.random.default_rng(3).normal(size=(E, D, 2 * F)).astype(np.float32)
    x, ids, mask = batch(24, 4)
    flat = hessian.update_experts(hessian.init_experts(E, D, F), x, ids, gate_up, mask)
    shaped = hessian.update_experts(hessian.init_experts(E, D, F), x.reshape(2, 12, D),
                                    ids.reshape(2, 12, K_TOP), gate_up, mask.reshape(2, 12))
    for a, b in zip(flat, shaped, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_dense_hessian_streams_over_batches():
    state = hessian.init_dense(D)
    parts = [batch(30, 5), batch(17, 6)]
    for x, _, mask in parts:
        state = hessian.update_dense(state, x.reshape(3, -1, D) if len(x) == 30 else x,
                                     mask.reshape(3, -1) if len(x) == 30 else mask)
    real = np.concatenate([x[m] for x, _, m in parts]).astype(np.float64)
    assert int(state.count) == len(real)
    want = 2.0 / len(real) * real.T @ real
    got = np.asarray(hessian.finalize(state.h_sum, state.count))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_shape_mismatches_are_clear_errors():
    gate_up = np.zeros((E, D, 2 * F), np.float32)
    x, ids, mask = batch(8, 7)
    with pytest.raises(ValueError, match="does not match the state"):
        hessian.update_experts(hessian.init_experts(E, D, F + 1), x, ids, gate_up, mask)
    with pytest.raises(ValueError, match="token mask"):
        hessian.update_experts(hessian.init_experts(E, D, F), x, ids, gate_up, mask[:4])
    with pytest.raises(ValueError, match="Hessian dim"):
        hessian.update_dense(hessian.init_dense(D + 1), x, mask)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_path_lowers_for_gpu_and_tpu(platform):
    """The ragged_dot / ragged_dot_general path (GPU, TPU) is not run on CPU CI, but its lowering
    is: a shape or dimension-number error would show up here."""
    args = (hessian.init_experts(E, D, F), jax.ShapeDtypeStruct((40, D), jnp.float32),
            jax.ShapeDtypeStruct((40, K_TOP), jnp.int32),
            jax.ShapeDtypeStruct((E, D, 2 * F), jnp.float32), jax.ShapeDtypeStruct((40,), bool))
    fn = jax.jit(lambda s, x, i, w, m: hessian.update_experts(s, x, i, w, m, blocks=False))
    exported = jax.export.export(fn, platforms=[platform])(*args)
    assert "ragged_dot" in exported.mlir_module()
