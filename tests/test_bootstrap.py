"""Paired bootstrap intervals (eval.bootstrap) and the report rows that use them."""

import numpy as np
import pytest

from mode_jax import report
from mode_jax.eval import bootstrap


def test_resampled_ratio_equals_a_loop_over_drawn_indices():
    rng = np.random.default_rng(1)
    n, r = 37, 50
    sums, counts = rng.random(n), rng.integers(1, 5, n).astype(float)
    idx = rng.integers(0, n, (r, n))
    weights = np.stack([np.bincount(i, minlength=n) for i in idx]).astype(float)
    want = [sums[i].sum() / counts[i].sum() for i in idx]
    np.testing.assert_allclose(bootstrap.resampled(sums, counts, weights), want, rtol=1e-12)


def test_draws_are_multiplicities_of_n_samples():
    w = bootstrap.draws(10, 300, seed=3)
    assert w.shape == (300, 10)
    np.testing.assert_array_equal(w.sum(1), 10)
    np.testing.assert_array_equal(w, bootstrap.draws(10, 300, seed=3))  # seeded
    assert not np.array_equal(w, bootstrap.draws(10, 300, seed=4))


def test_accuracy_intervals_cover_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, trials, p = 200, 300, 0.8
    weights = bootstrap.draws(n, 1000, seed=1)
    covered = 0
    for _ in range(trials):
        correct = (rng.random(n) < p).astype(float)
        ci = bootstrap.interval(correct, np.ones(n), weights)
        assert ci.low <= ci.estimate <= ci.high
        covered += ci.low <= p <= ci.high
    assert 0.90 <= covered / trials <= 0.99, covered / trials


def test_pairing_resolves_a_difference_that_separate_intervals_cannot():
    """Two models share each question's difficulty; b is worse by a small constant. Their own
    intervals overlap, the paired difference excludes 0."""
    rng = np.random.default_rng(2)
    n = 300
    difficulty = rng.exponential(1.0, n)
    tokens = np.ones(n)
    a, b = difficulty, difficulty + 0.05
    w = bootstrap.draws(n, 2000)
    ia, ib = bootstrap.interval(a, tokens, w), bootstrap.interval(b, tokens, w)
    assert ia.high > ib.low  # separately: no visible difference
    cmp = bootstrap.compare((a, tokens), (b, tokens), w)
    assert cmp["difference"].high < 0
    assert cmp["difference"].estimate == pytest.approx(-0.05)
    assert cmp["share_a_lower"] == 1.0
    assert cmp["ratio"].high < 1


def test_a_model_against_itself_differs_by_exactly_nothing():
    x, t = np.array([0.1, 0.5, 0.0, 2.0]), np.array([1.0, 2.0, 1.0, 3.0])
    cmp = bootstrap.compare((x, t), (x, t), bootstrap.draws(4, 100))
    assert cmp["difference"].as_list() == [0.0, 0.0, 0.0]
    assert cmp["ratio"].as_list() == [1.0, 1.0, 1.0]
    assert cmp["share_a_lower"] == 0.0


def test_a_zero_reference_has_no_ratio():
    x, t = np.array([0.1, 0.5]), np.ones(2)
    assert bootstrap.compare((x, t), (np.zeros(2), t), bootstrap.draws(2, 10))["ratio"] is None


@pytest.mark.parametrize("sums, counts, match", [
    ([0.1, np.nan], [1, 1], "NaN"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "must be"),
    ([0.1, 0.2], [0, 0], "sum to zero"),
])
def test_bad_input_is_named(sums, counts, match):
    with pytest.raises(ValueError, match=match):
        bootstrap.interval(sums, counts, bootstrap.draws(2, 10))


def test_draws_need_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap.draws(0)


def _row(method, fp, digest="d1", budget=3.0):
    allocator = method.split("/")[0].split(" ")[0]  # "mode/text+key (...)" -> "mode"
    return {"method": method, "allocator": allocator, "evaluate": fp, "budget_bits": budget,
            "quantizer": "gptq", "router_finetune": False, "eval_digest": digest, "n": 6,
            "estimator": None, "average_bits": budget, "families": ["text", "vision"]}


def test_report_pairs_each_method_with_uniform_on_the_same_samples():
    tokens = np.ones(6)
    family = np.array([0, 0, 0, 1, 1, 1], np.int8)  # text, then vision
    samples = {
        "u": {"correct": np.array([1, 1, 1, 0, 1, 1], np.int8), "kl": np.full(6, 0.2),
              "kl_tokens": tokens, "family": family},
        "m": {"correct": np.array([1, 1, 1, 1, 1, 1], np.int8),
              "kl": np.array([0.05, 0.05, 0.05, 0.15, 0.15, 0.15]), "kl_tokens": tokens,
              "family": family},
        "other": {"correct": np.ones(6, np.int8), "kl": np.full(6, 0.1), "kl_tokens": tokens,
                  "family": family},
    }
    rows = [_row("uniform", "u"), _row("mode/text+key", "m"), _row("pmq", "other", "d2"),
            _row("gemq", "old")]
    out = report.with_intervals(rows, {**samples, "old": None}, resamples=200)
    uniform, mode, other, old = out
    assert "vs_uniform" not in uniform and "kl_ci" in uniform
    vs = mode["vs_uniform"]
    est, low, high = vs["kl_ratio"]
    assert est == pytest.approx(0.5) and 0.25 <= low < 0.5 < high <= 0.75
    assert vs["kl_ratio_text"] == pytest.approx([0.25, 0.25, 0.25])  # each family on its own
    assert vs["kl_ratio_vision"] == pytest.approx([0.75, 0.75, 0.75])
    assert vs["share_kl_lower"] == 1.0
    assert vs["accuracy_points"][0] == pytest.approx(100 / 6)
    assert "vs_uniform" not in other  # scored on other samples: not paired
    assert "kl_ci" in other
    assert "kl_ci" not in old and "vs_uniform" not in old  # an artifact without per-sample data
    text = report._markdown({"results": out})
    assert "| mode/text+key | - | gptq | 3 | +16.7 [" in text
    assert "| 0.25 [0.25, 0.25] | 0.75 [0.75, 0.75] | 100% |" in text
    assert "text KL / uniform's | vision KL / uniform's" in text


def test_a_calibration_variant_of_uniform_is_a_reference_too_and_never_paired():
    tokens = np.ones(4)
    samples = {"u": {"kl": np.full(4, 0.2), "kl_tokens": tokens},
               "m": {"kl": np.full(4, 0.4), "kl_tokens": tokens}}
    rows = [_row("uniform (statistics on all tasks)", "u"),
            _row("mode/text+key (statistics on all tasks)", "m")]
    uniform, mode = report.with_intervals(rows, samples, resamples=50)
    assert "vs_uniform" not in uniform
    assert mode["vs_uniform"]["kl_ratio"] == pytest.approx([2.0, 2.0, 2.0])
    assert "accuracy_points" not in mode["vs_uniform"]  # next-token runs score no answers


def test_paired_table_shows_an_average_that_differs_from_the_budget():
    # MoPEQ's k-means ignores the budget: the comparison must say how many bits it spent.
    tokens = np.ones(4)
    samples = {"u": {"kl": np.full(4, 0.2), "kl_tokens": tokens},
               "k": {"kl": np.full(4, 0.1), "kl_tokens": tokens}}
    kmeans = {**_row("mopeq", "k"), "average_bits": 2.4375}
    out = report.with_intervals([_row("uniform", "u"), kmeans], samples, resamples=50)
    text = report._markdown({"results": out})
    assert "| mopeq | - | gptq | 3 (average 2.44) | - | 0.50 [0.50, 0.50] |" in text


def test_each_method_is_compared_with_every_draw_of_the_random_control():
    tokens = np.ones(4)
    kl = {"m": [0.1, 0.1, 0.1, 0.1], "r0": [0.2] * 4, "r1": [0.05] * 4, "r2": [0.1, 0.1, 0.1, 0.1],
          "other": [0.3] * 4}
    samples = {k: {"kl": np.array(v), "kl_tokens": tokens} for k, v in kl.items()}
    rows = [_row("mode/text+key", "m", budget=2.5), _row("random (seed 0)", "r0", budget=2.5),
            _row("random (seed 1)", "r1", budget=2.5), _row("random (seed 2)", "r2", budget=2.5),
            _row("pmq", "other", budget=3.0)]  # no draw at its budget
    out = report.with_intervals(rows, samples, resamples=50)
    vs = out[0]["vs_random"]
    assert vs["draws"] == 3
    assert vs["kl_ratio_range"] == pytest.approx([0.5, 2.0])
    assert (vs["draws_beaten"], vs["draws_lost"]) == (1, 1)  # ratio 1 to seed 2: neither
    assert all("vs_random" not in r for r in out[1:])
    text = report._markdown({"results": out})
    assert "| mode/text+key | - | gptq | 2.5 | 3 | 0.50-2.00 | 1 | 1 |" in text
