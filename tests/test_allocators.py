"""Allocators on hand-made statistics whose right answer follows from the scenario."""

import itertools

import numpy as np
import pytest

from mode_jax.alloc import allocators

# One MoE layer, four experts, bits {2, 4}, budget 3: exactly two experts keep 4 bits.
# Expert 0 serves only text; 1 mostly key image tokens; 2 and 3 mostly redundant image tokens.
# Vision dominates the token count, so total frequency ranks expert 0 last among the used.
COUNT_TEXT = [[90, 0, 0, 10]]
COUNT_KEY = [[0, 80, 5, 15]]
COUNT_REDUNDANT = [[0, 20, 395, 185]]
STATS = {
    "count_text": np.array(COUNT_TEXT),
    "count_key": np.array(COUNT_KEY),
    "count_redundant": np.array(COUNT_REDUNDANT),
    "count_image": np.array(COUNT_KEY) + np.array(COUNT_REDUNDANT),
    "count_all": np.array(COUNT_TEXT) + np.array(COUNT_KEY) + np.array(COUNT_REDUNDANT),
}
# Same sensitivity for every expert and modality: 2 bits hurt (1.0), 4 bits do not (0.0),
# so the ranking is decided by the frequencies alone.
DELTA = np.tile(np.array([1.0, 0.0]), (1, 4, 1))


@pytest.mark.parametrize(
    "key,mix,expected",
    [
        ("text+key", 0.5, [4, 4, 2, 2]),  # text-only expert 0 and key expert 1 keep 4 bits
        ("total", 0.5, [2, 2, 4, 4]),  # modality-blind: the text-only expert loses
        ("text+all-image", 0.5, [4, 2, 4, 2]),
        ("text+redundant", 0.5, [4, 2, 4, 2]),  # redundant tokens pick expert 2 over 1
        ("text+key", 0.0, [4, 2, 2, 4]),  # text only: experts 0 and 3 are the text users
        ("text+key", 1.0, [2, 4, 2, 4]),  # key vision only: experts 1 and 3
    ],
)
def test_mode_keeps_the_experts_its_frequency_key_values(key, mix, expected):
    for solver in ("scip", "dp"):
        result = allocators.allocate_mode(
            STATS, DELTA, DELTA, [2, 4], 3, key=key, vision_mix=mix, solver=solver
        )
        assert result.bits.tolist() == [expected]


def test_mode_uses_each_modalitys_own_sensitivity():
    # Expert 0 is used by text only but is insensitive on text; expert 1 is used by key vision
    # tokens and very sensitive to them: it must win the single 4-bit slot.
    stats = dict(STATS, count_text=np.array([[10, 0]]), count_key=np.array([[0, 10]]))
    delta_text = np.array([[[0.1, 0.0], [5.0, 0.0]]])
    delta_vision = np.array([[[5.0, 0.0], [1.0, 0.0]]])
    result = allocators.allocate_mode(stats, delta_text, delta_vision, [2, 4], 3)
    assert result.bits.tolist() == [[2, 4]]


def test_layer_frequency_is_uniform_without_tokens():
    freq = allocators.layer_frequency([[0, 0, 0, 0], [1, 3, 0, 0]])
    np.testing.assert_allclose(freq, [[0.25] * 4, [0.25, 0.75, 0, 0]])


def test_mode_rejects_unknown_keys_and_missing_statistics():
    with pytest.raises(ValueError, match="allowed: total, text\\+all-image"):
        allocators.mode_cost(STATS, DELTA, DELTA, key="key")
    with pytest.raises(ValueError, match="lacks 'count_key'"):
        allocators.mode_cost({"count_text": STATS["count_text"]}, DELTA, DELTA)
    with pytest.raises(ValueError, match=r"count_text has shape \(1, 4\); expected \[2, 4\]"):
        allocators.mode_cost(STATS, np.ones((2, 4, 2)), np.ones((2, 4, 2)))
    with pytest.raises(ValueError, match="vision_mix"):
        allocators.mode_cost(STATS, DELTA, DELTA, vision_mix=1.5)


def test_pmq_cost_and_its_top_two_levels_rule():
    # phi = [.4, .3, .2, .1], mean weight w = [.1, .4, .9, .5]: phi * w^1.5 ranks experts
    # 2 > 1 > 3 > 0, while frequency alone ranks 0 > 1 > 2 > 3.
    count = np.array([[40, 30, 20, 10]])
    weight_sum = count * np.array([[0.1, 0.4, 0.9, 0.5]])
    eps = np.tile(np.array([1.0, 0.5, 0.0]), (1, 4, 1))  # each extra bit halves the error
    cost = allocators.pmq_cost(count, weight_sum, eps)
    np.testing.assert_allclose(
        cost[0, :, 0], [0.4 * 0.1**1.5, 0.3 * 0.4**1.5, 0.2 * 0.9**1.5, 0.1 * 0.5**1.5]
    )
    stats = {"count_all": count, "weight_sum_all": weight_sum}
    # 12 bits for 4 experts: unconstrained the two top experts would take 4 bits each
    # ([2, 4, 4, 2]); PMQ must also keep one expert at 3 bits, so 2 -> 4 and 1, 3 -> 3.
    for solver in ("scip", "dp"):
        pmq = allocators.allocate_pmq(stats, eps, [2, 3, 4], 3, solver=solver)
        assert pmq.bits.tolist() == [[2, 3, 4, 3]]
        # routing weight ignored (b = 0): frequency decides
        by_frequency = allocators.allocate_pmq(stats, eps, [2, 3, 4], 3, b=0.0, solver=solver)
        assert by_frequency.bits.tolist() == [[4, 3, 3, 2]]


def test_pmq_matches_brute_force_with_the_top_levels_rule():
    rng = np.random.default_rng(0)
    count = rng.integers(0, 50, size=(2, 5))
    stats = {"count_all": count, "weight_sum_all": count * rng.uniform(size=(2, 5))}
    eps = np.sort(rng.uniform(size=(2, 5, 3)), axis=-1)[..., ::-1]
    cost = allocators.pmq_cost(stats["count_all"], stats["weight_sum_all"], eps)
    result = allocators.allocate_pmq(stats, eps, [2, 3, 4], 2.8)  # 14 bits per layer
    best = 0.0
    for l in range(2):
        options = [
            sum(cost[l, e, j] for e, j in enumerate(combo))
            for combo in itertools.product(range(3), repeat=5)
            if sum((2, 3, 4)[j] for j in combo) == 14 and 1 in combo and 2 in combo
        ]
        best += min(options)
    np.testing.assert_allclose(result.objective, best, rtol=1e-9)
    assert np.all((result.bits == 4).any(axis=1)) and np.all((result.bits == 3).any(axis=1))


def test_gemq_is_global_and_moves_bits_to_the_layer_that_needs_them():
    cost = np.zeros((2, 3, 2))
    cost[0, :, 0] = [5.0, 6.0, 7.0]  # layer 0: costly at 2 bits
    cost[1, :, 0] = [0.1, 0.2, 9.0]  # layer 1: only expert 2 cares
    result = allocators.allocate_gemq(cost, [2, 4], 3)  # 18 bits for 6 experts
    assert result.bits.tolist() == [[2, 4, 4], [2, 2, 4]]  # the three costliest 2-bit slots
    assert result.scope == "global" and result.used_total_bits == 18


def test_uniform():
    assert allocators.uniform(3, 5, 3, bits=[2, 3, 4]).tolist() == [[3] * 5] * 3
    with pytest.raises(ValueError, match="positive integer"):
        allocators.uniform(3, 5, 2.5)
    with pytest.raises(ValueError, match="not one of the candidate bits"):
        allocators.uniform(3, 5, 8, bits=[2, 3, 4])


def brute_force_kmeans(values, k):
    """Least within-cluster sum of squares over every labelling of the values into k groups."""
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(values)):
        labels = np.array(labels)
        sse = sum(
            ((values[labels == c] - values[labels == c].mean()) ** 2).sum()
            for c in range(k)
            if np.any(labels == c)
        )
        best = min(best, sse)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_1d_is_exact(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.lognormal(size=7), 1 if seed % 2 else 6)  # odd seeds: with ties
    for k in (2, 3):
        labels, centers = allocators.kmeans_1d(values, k)
        sse = ((values - centers[labels]) ** 2).sum()
        np.testing.assert_allclose(sse, brute_force_kmeans(values, k), rtol=1e-9, atol=1e-12)
        assert np.all(np.diff(centers) > 0)  # clusters numbered by ascending center
        for c in range(len(centers)):
            np.testing.assert_allclose(centers[c], values[labels == c].mean())


def test_mopeq_layerwise_and_modelwide():
    trace = np.array(
        [
            [1.0, 1.1, 5.0, 5.2, 20.0, 21.0],
            [100.0, 110.0, 500.0, 520.0, 2000.0, 2100.0],
        ]
    )
    layerwise = allocators.allocate_mopeq(trace, [2, 3, 4], scope="layer")
    assert layerwise.tolist() == [[2, 2, 3, 3, 4, 4]] * 2
    # model-wide, layer 0's traces are all tiny next to layer 1's
    modelwide = allocators.allocate_mopeq(trace, [2, 3, 4], scope="global")
    assert modelwide.tolist() == [[2] * 6, [2, 2, 3, 3, 4, 4]]
    # identical traces: one cluster, the middle level
    assert allocators.allocate_mopeq(np.ones((1, 4)), [2, 3, 4]).tolist() == [[3] * 4]


def test_mopeq_budget_meets_the_budget_and_follows_the_trace():
    rng = np.random.default_rng(2)
    trace = rng.lognormal(sigma=2.0, size=(3, 16))
    for scope in ("layer", "global"):
        result = allocators.allocate_mopeq_budget(trace, [2, 3, 4], 2.75, scope=scope)
        if scope == "layer":
            assert result.bits.sum(axis=1).tolist() == [44, 44, 44]
        else:
            assert result.bits.sum() == 132
        # exchange argument: for cost trace * 4^-b a higher trace never gets fewer bits
        groups = result.bits if scope == "layer" else result.bits.reshape(1, -1)
        traces = trace if scope == "layer" else trace.reshape(1, -1)
        for b, t in zip(groups, traces, strict=True):
            assert np.all(np.diff(b[np.argsort(t)]) >= 0)
    small = allocators.allocate_mopeq_budget(np.array([[1.0, 2.0, 3.0, 4.0]]), [2, 4], 3)
    assert small.bits.tolist() == [[2, 2, 4, 4]]


def test_allocate_dispatches_every_method_on_stage_artifacts():
    rng = np.random.default_rng(4)
    shape = (3, 8)
    counts = {k: rng.integers(0, 20, size=shape) for k in allocators.MODE_KEYS.values() if k}
    counts["count_text"] = rng.integers(0, 20, size=shape)
    counts["count_all"] = counts["count_text"] + counts["count_image"]
    counts["weight_sum_all"] = counts["count_all"] * rng.uniform(size=shape)
    errors = np.sort(rng.uniform(size=shape + (3,)), axis=-1)[..., ::-1]
    sens = {
        "bits": np.array([2, 3, 4]),
        "delta_text": errors,
        "delta_vision": errors[::-1],
        "pmq_err": errors,
        "gemq_cost": errors,
        "hessian_trace": rng.lognormal(size=shape),
    }
    for method in allocators.METHODS:
        bits, report = allocators.allocate(method, counts, sens, 3)
        assert bits.shape == shape and report["method"] == method
        assert set(np.unique(bits)) <= {2, 3, 4}
        if method != "mopeq":  # k-means sets its own average
            assert bits.sum() == 3 * bits.size
    direct = allocators.allocate_mode(counts, errors, errors[::-1], [2, 3, 4], 3, key="total")
    via = allocators.allocate("mode", counts, sens, 3, key="total")[0]
    np.testing.assert_array_equal(direct.bits, via)
    with pytest.raises(ValueError, match="allowed: uniform, mode"):
        allocators.allocate("hawq", counts, sens, 3)


def test_random_control_meets_the_budget_reads_no_statistic_and_follows_its_seed():
    shape, bits = (3, 8), np.array([2, 3, 4])
    a = allocators.allocate_random(*shape, bits, 2.5, seed=1).bits
    assert a.shape == shape and set(np.unique(a)) <= {2, 3, 4}
    np.testing.assert_array_equal(a.sum(1), [20, 20, 20])  # 2.5 bits in every layer
    np.testing.assert_array_equal(allocators.allocate_random(*shape, bits, 2.5, seed=1).bits, a)
    assert not np.array_equal(allocators.allocate_random(*shape, bits, 2.5, seed=2).bits, a)
    # the same draw whatever the artifacts hold: only their shape is read
    sens = {"bits": bits, "delta_text": np.zeros(shape + (3,))}
    got, report = allocators.allocate("random", {}, sens, 2.5, seed=1)
    np.testing.assert_array_equal(got, a)
    assert report["method"] == "random"
