"""Routing against a numpy reference and transformers' router; dense vs sorted experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from mode_jax.models import moe
from mode_jax.models.moe import RouterConfig


def route_reference(logits, cfg: RouterConfig, bias=None):
    """Plain numpy, token by token: scores, biased choice, best groups, top-k, weights."""
    logits = logits.astype(np.float64)
    t, e = logits.shape
    ids = np.zeros((t, cfg.top_k), np.int64)
    weights = np.zeros((t, cfg.top_k))
    for i in range(t):
        if cfg.scoring == "sigmoid":
            scores = 1 / (1 + np.exp(-logits[i]))
        else:
            scores = np.exp(logits[i] - logits[i].max())
            scores /= scores.sum()
        choice = scores + (0 if bias is None else bias)
        size = e // cfg.n_group
        group_val = []
        for g in range(cfg.n_group):
            members = np.sort(choice[g * size:(g + 1) * size])[::-1]
            group_val.append(members[:2].sum() if cfg.group_score == "top2_sum" else members[0])
        best_groups = np.argsort(-np.array(group_val), kind="stable")[: cfg.topk_group]
        allowed = np.zeros(e, bool)
        for g in best_groups:
            allowed[g * size:(g + 1) * size] = True
        masked = np.where(allowed, choice, -np.inf)
        ids[i] = np.argsort(-masked, kind="stable")[: cfg.top_k]
        w = scores[ids[i]]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        weights[i] = w * cfg.routed_scaling_factor
    return ids, weights


def sort_by_id(ids, weights):
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


ROUTERS = [
    RouterConfig(16, 4, "sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    RouterConfig(12, 3, "sigmoid", n_group=3, topk_group=1, group_score="max"),
    RouterConfig(9, 2, "sigmoid", routed_scaling_factor=2.446),
    RouterConfig(8, 2, "softmax", norm_topk_prob=True),
    RouterConfig(8, 3, "softmax", norm_topk_prob=False),
    RouterConfig(7, 1, "sigmoid", norm_topk_prob=False, routed_scaling_factor=1.5),
]


@pytest.mark.parametrize("cfg", ROUTERS, ids=lambda c: f"{c.scoring}-E{c.num_experts}-g{c.n_group}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_numpy_reference(cfg, with_bias):
    rng = np.random.default_rng(cfg.num_experts * 10 + with_bias)
    logits = rng.standard_normal((64, cfg.num_experts)).astype(np.float32) * 2
    bias = rng.standard_normal(cfg.num_experts).astype(np.float32) * 0.3 if with_bias else None
    route = jax.jit(moe.route, static_argnums=1)
    ids, weights = route(jnp.asarray(logits), cfg, None if bias is None else jnp.asarray(bias))
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
    assert ids.shape == weights.shape == (64, cfg.top_k)
    ref_ids, ref_w = route_reference(logits, cfg, bias)
    got_ids, got_w = sort_by_id(np.asarray(ids), np.asarray(weights))
    ref_ids, ref_w = sort_by_id(ref_ids, ref_w)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-7)


def test_bias_only_chooses():
    """A large bias on expert 0 forces its choice, but its weight is its unbiased score."""
    cfg = RouterConfig(4, 2, "sigmoid", norm_topk_prob=False)
    logits = jnp.array([[-3.0, 1.0, 2.0, 0.5]])
    ids, weights = moe.route(logits, cfg, jnp.array([10.0, 0, 0, 0]))
    assert sorted(np.asarray(ids)[0].tolist()) == [0, 2]
    got = dict(zip(np.asarray(ids)[0].tolist(), np.asarray(weights)[0].tolist(), strict=True))
    np.testing.assert_allclose(got[0], 1 / (1 + np.exp(3.0)), rtol=1e-6)


def transformers_router(cfg: RouterConfig, weight, bias):
    hf = DeepseekV3Config(
        hidden_size=weight.shape[1], n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
    )
    router = DeepseekV3TopkRouter(hf)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(weight))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return router


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_route_matches_transformers_router(n_group, topk_group):
    cfg = RouterConfig(16, 4, "sigmoid", n_group=n_group, topk_group=topk_group,
                       routed_scaling_factor=2.5)
    rng = np.random.default_rng(n_group)
    x = rng.standard_normal((50, 12)).astype(np.float32)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    b = (rng.standard_normal(16) * 0.2).astype(np.float32)
    _, ref_w, ref_ids = transformers_router(cfg, w, b)(torch.from_numpy(x))
    ids, weights = moe.route(jnp.asarray(x @ w.T), cfg, jnp.asarray(b))
    got_ids, got_w = sort_by_id(np.asarray(ids), np.asarray(weights))
    ref_ids, ref_w = sort_by_id(ref_ids.numpy(), ref_w.detach().numpy())
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5)


def test_ties_choose_the_same_values_as_torch():
    """With exactly tied scores (tied groups too) the index set among equals is unspecified in
    torch.topk; what matters is that the chosen biased scores and the weights agree."""
    cfg = RouterConfig(8, 3, "sigmoid", n_group=4, topk_group=2)
    w = np.zeros((8, 4), np.float32)
    w[:, 0] = [1, 1, 1, 1, 0.5, 0.5, 2, -1]  # groups {0,1} and {2,3} tie exactly
    b = np.zeros(8, np.float32)
    x = np.array([[1, 0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    _, ref_w, ref_ids = transformers_router(cfg, w, b)(torch.from_numpy(x))
    ids, weights = moe.route(jnp.asarray(x @ w.T), cfg, jnp.asarray(b))
    scores = 1 / (1 + np.exp(-(x @ w.T)))
    got_vals = np.sort(np.take_along_axis(scores, np.asarray(ids), -1), -1)
    ref_vals = np.sort(np.take_along_axis(scores, ref_ids.numpy(), -1), -1)
    np.testing.assert_allclose(got_vals, ref_vals, rtol=1e-6)
    np.testing.assert_allclose(np.sort(np.asarray(weights), -1),
                               np.sort(ref_w.detach().numpy(), -1), rtol=1e-6)
    # our rule: among equal scores the lower index wins (row 2 has all scores 0.5)
    assert sorted(np.asarray(ids)[2].tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=8, top_k=9), "top_k"),
        (dict(num_experts=8, top_k=2, n_group=3), "divide"),
        (dict(num_experts=8, top_k=2, n_group=4, topk_group=5), "topk_group"),
        (dict(num_experts=8, top_k=5, n_group=4, topk_group=2), "cannot hold"),
        (dict(num_experts=4, top_k=1, n_group=4), "top2_sum"),
        (dict(num_experts=8, top_k=2, scoring="relu"), "scoring"),
    ],
)
def test_router_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


# ---------------------------------------------------------------- experts


def experts_reference(x, ids, weights, gate_up, down):
    """Token by token, chosen expert by chosen expert, in float64."""
    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    f = down.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t], strict=True):
            h = x[t] @ gate_up[e]
            a = h[:f] / (1 + np.exp(-h[:f])) * h[f:]
            out[t] += w * (a @ down[e])
    return out


def random_experts(seed, t=40, d=16, f=8, e=7, k=3, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    gate_up = (rng.standard_normal((e, d, 2 * f)) / np.sqrt(d)).astype(np.float32)
    down = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    # expert 3 never chosen: the sorted path must handle an empty group
    ids = np.stack([rng.choice([0, 1, 2, 4, 5, 6], k, replace=False) for _ in range(t)])
    weights = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), jnp.asarray(ids, jnp.int32), jnp.asarray(weights), cast(gate_up), cast(down)


def test_dense_and_sorted_match_reference_fp32():
    x, ids, w, gu, dn = random_experts(0)
    ref = experts_reference(x, np.asarray(ids), np.asarray(w), gu, dn)
    dense = jax.jit(moe.experts_dense)(x, ids, w, gu, dn)
    sorted_ = jax.jit(moe.experts_sorted)(x, ids, w, gu, dn)
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sorted_, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, sorted_, rtol=1e-6, atol=1e-6)


def test_dense_and_sorted_agree_bf16():
    x, ids, w, gu, dn = random_experts(1, dtype=jnp.bfloat16)
    dense = jax.jit(moe.experts_dense)(x, ids, w, gu, dn)
    sorted_ = jax.jit(moe.experts_sorted)(x, ids, w, gu, dn)
    assert dense.dtype == sorted_.dtype == jnp.bfloat16
    ref = experts_reference(x.astype(jnp.float32), np.asarray(ids), np.asarray(w),
                            gu.astype(jnp.float32), dn.astype(jnp.float32))
    scale = np.abs(ref).max()
    dense, sorted_ = np.asarray(dense, np.float32), np.asarray(sorted_, np.float32)
    assert np.abs(dense - sorted_).max() < 2e-2 * scale
    assert np.abs(sorted_ - ref).max() < 2e-2 * scale


def test_dispatch_groups_and_pluggable_ffn():
    x, ids, w, gu, dn = random_experts(2)
    d = moe.dispatch(x, ids, 7)
    np.testing.assert_array_equal(d.group_sizes, np.bincount(np.asarray(ids).ravel(), minlength=7))
    assert d.group_sizes[3] == 0
    flat_sorted = np.asarray(ids).ravel()[np.asarray(d.order)]
    assert np.all(np.diff(flat_sorted) >= 0)

    def per_expert_ffn(x_sorted, group_sizes):
        """A different grouped FFN (masked loop over experts) plugged into the same dispatch."""
        bounds = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes)])
        rows = jnp.arange(x_sorted.shape[0])
        out = jnp.zeros_like(x_sorted)
        for e in range(gu.shape[0]):
            inside = (rows >= bounds[e]) & (rows < bounds[e + 1])
            out = out + jnp.where(inside[:, None], moe.swiglu(x_sorted, gu[e], dn[e]), 0)
        return out

    plugged = jax.jit(lambda *a: moe.moe_sorted(*a, 7, per_expert_ffn))(x, ids, w)
    expected = jax.jit(moe.experts_sorted)(x, ids, w, gu, dn)
    np.testing.assert_allclose(plugged, expected, rtol=1e-6, atol=1e-6)


def test_dense_path_vmaps():
    """The dense path is the one to vmap (ragged_dot does not vmap on CPU)."""
    x, ids, w, gu, dn = random_experts(3, t=8)
    batched = jax.jit(jax.vmap(moe.experts_dense, in_axes=(0, 0, 0, None, None)))(
        jnp.stack([x, 2 * x]), jnp.stack([ids, ids]), jnp.stack([w, w]), gu, dn
    )
    single = jax.jit(moe.experts_dense)(2 * x, ids, w, gu, dn)
    # The batched and the single program may sum in different orders, and XLA:CPU's order
    # depends on the processor: on an AMD EPYC (2026-12-04) an output of 0.07 from terms near
    # 10 moved by 1e-7 of the largest output. Float32 rounding, scaled to the outputs.
    scale = float(np.abs(single).max())
    np.testing.assert_allclose(batched[1], single, rtol=1e-6, atol=1e-6 * scale)
    assert not np.allclose(batched[0], single, rtol=1e-3)  # the batch index is not ignored
