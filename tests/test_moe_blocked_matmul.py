"""mode_jax.models.grouped_matmul (the MoE layers' CPU blocked matmul) against
`jax.lax.ragged_dot` and a per-expert numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.models import grouped_matmul as gm
from mode_jax.models import moe


def loop_reference(x, w, sizes):
    """Row block g of x times w[g]; rows past sum(sizes) are zero (ragged_dot's semantics)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


CASES = {
    "balanced": [6, 6, 6, 6],
    "empty groups": [0, 9, 0, 15],
    "one row": [0, 0, 1, 0],
    "ragged, many rows in one expert": [3, 130, 1, 7],
    "rows past the groups": [2, 3, 0, 4],  # sum 9 of 12 rows
}


@pytest.mark.parametrize("name", CASES)
def test_blocked_matmul_matches_ragged_dot_and_a_loop(name):
    sizes = np.asarray(CASES[name], np.int32)
    rows = max(int(sizes.sum()), 1) + (3 if name == "rows past the groups" else 0)
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(rng.normal(size=(rows, 37)), jnp.float32)  # K not a multiple of anything
    w = jnp.asarray(rng.normal(size=(len(sizes), 37, 19)), jnp.float32)  # odd N
    got = np.asarray(gm.blocked_matmul(x, w, jnp.asarray(sizes)))
    np.testing.assert_allclose(got, loop_reference(x, w, sizes), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(jax.lax.ragged_dot(x, w, jnp.asarray(sizes))),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_grouped_gram_matches_a_per_group_loop(name, blocks):
    """x_g^T x_g per group, both paths; rows past the groups (here NaN) are never read."""
    sizes = np.asarray(CASES[name], np.int32)
    rows = max(int(sizes.sum()), 1) + (3 if name == "rows past the groups" else 0)
    rng = np.random.default_rng(len(name) + 1)
    x = rng.normal(size=(rows, 21)).astype(np.float32)
    x[int(sizes.sum()):] = np.nan
    got = np.asarray(gm.grouped_gram(jnp.asarray(x), jnp.asarray(sizes), blocks=blocks))
    want, start = np.zeros((len(sizes), 21, 21)), 0
    for g, n in enumerate(sizes):
        part = x[start:start + n].astype(np.float64)
        want[g] = part.T @ part
        start += n
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_blocked_matmul_keeps_bf16_and_preferred_type():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(20, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.bfloat16)
    sizes = jnp.asarray([5, 0, 15], jnp.int32)
    assert gm.blocked_matmul(x, w, sizes).dtype == jnp.bfloat16
    got = gm.blocked_matmul(x, w, sizes, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), loop_reference(x.astype(jnp.float32),
                                                               w.astype(jnp.float32), [5, 0, 15]),
                               rtol=2e-2, atol=2e-2)


def test_gradients_through_the_blocks_equal_the_dense_experts():
    """The Fisher pass differentiates through the sorted experts: same gradients as computing
    every expert for every token."""
    rng = np.random.default_rng(1)
    t, d, f, e, k = 40, 16, 12, 6, 2
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    wts = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    gu = jnp.asarray(rng.normal(size=(e, d, 2 * f)) / 4, jnp.float32)
    dn = jnp.asarray(rng.normal(size=(e, f, d)) / 4, jnp.float32)

    def loss(fn, x, gu, dn):
        return jnp.sum(jnp.sin(fn(x, ids, wts, gu, dn)))

    assert gm.use_blocks()  # the suite runs on CPU: experts_sorted takes the blocked path
    sorted_grads = jax.grad(lambda *a: loss(moe.experts_sorted, *a), argnums=(0, 1, 2))(x, gu, dn)
    dense_grads = jax.grad(lambda *a: loss(moe.experts_dense, *a), argnums=(0, 1, 2))(x, gu, dn)
    for a, b in zip(sorted_grads, dense_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_block_size_and_bound():
    assert gm.block_size(1, 64) == 8  # decode: one token
    assert gm.block_size(2720, 16) == 64
    assert gm.block_size(200, 16) == 16
    sizes = jnp.asarray([1, 0, 17, 9], jnp.int32)  # every group leaves a partial block
    lay = gm.layout(sizes, 27, 8)
    assert int(lay.num_active) == 1 + 3 + 2
    assert lay.block_expert.shape[0] == gm.num_blocks(27, 4, 8) >= int(lay.num_active)
    assert len(set(np.asarray(lay.position).tolist())) == 27  # no two rows share a slot
