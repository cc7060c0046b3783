"""The allocation ILP: SCIP and the DP against brute-force enumeration, budgets, errors."""

import itertools

import numpy as np
import pytest

from mode_jax.alloc import solve, solve_with_report


def brute_force(cost, bits, budget, scope, equality, top_levels=0):
    """Least objective over every assignment honouring the constraints (inf if none)."""
    num_layers, num_experts, num_bits = cost.shape
    combos = np.array(list(itertools.product(range(num_bits), repeat=num_layers * num_experts)))
    idx = combos.reshape(-1, num_layers, num_experts)
    chosen = np.asarray(bits)[idx]
    if scope == "layer":
        used, limit = chosen.sum(axis=2), num_experts * budget
    else:
        used, limit = chosen.sum(axis=(1, 2))[:, None], num_layers * num_experts * budget
    ok = np.all(np.isclose(used, limit) if equality else used <= limit + 1e-9, axis=1)
    top = np.argsort(bits)[len(bits) - top_levels :]
    for j in top:
        ok &= np.all((idx == j).any(axis=2), axis=1)
    values = cost[np.arange(num_layers)[:, None], np.arange(num_experts), idx].sum(axis=(1, 2))
    return values[ok].min() if ok.any() else np.inf


def feasible_budgets(bits, n_items):
    """Average budgets whose total an assignment of n_items experts can reach."""
    totals = {sum(c) for c in itertools.product(bits, repeat=n_items)}
    return sorted(t / n_items for t in totals)


def check_budget(result, bits_arr, budget, scope, equality):
    used = bits_arr.sum(axis=1) if scope == "layer" else np.array([bits_arr.sum()])
    n = bits_arr.shape[1] if scope == "layer" else bits_arr.size
    if equality:
        assert np.all(used == round(n * budget))
    else:
        assert np.all(used <= n * budget + 1e-9)
    assert result.used_total_bits == bits_arr.sum()


CASES = [
    (scope, equality, top, seed)
    for scope in ("layer", "global")
    for equality in (True, False)
    for top in (0, 2)
    for seed in range(3)
]


@pytest.mark.parametrize("scope,equality,top,seed", CASES)
def test_scip_dp_and_brute_force_agree(scope, equality, top, seed):
    rng = np.random.default_rng(seed)
    bits = [4, 2, 3]  # deliberately unsorted: the cost's last axis follows this order
    cost = rng.normal(size=(2, 3, 3))
    n_items = 3 if scope == "layer" else 6
    options = [b for b in feasible_budgets(bits, n_items) if 2 < b < 4]
    budget = options[rng.integers(len(options))] + (0.0 if equality else 0.1)
    expected = brute_force(cost, bits, budget, scope, equality, top)
    if not np.isfinite(expected):  # the brute force found no allocation: both solvers say so
        for solver in ("scip", "dp"):
            with pytest.raises(ValueError, match="feasible"):
                solve(cost, bits, budget, scope, equality=equality, top_levels_required=top,
                      solver=solver)
        return
    for solver in ("scip", "dp"):
        result = solve_with_report(
            cost, bits, budget, scope, equality=equality, top_levels_required=top, solver=solver
        )
        np.testing.assert_allclose(result.objective, expected, rtol=1e-9, atol=1e-12)
        chosen = result.bits
        assert chosen.shape == (2, 3) and chosen.dtype == np.int32
        check_budget(result, chosen, budget, scope, equality)
        for level in (4, 3)[:top]:
            assert np.all((chosen == level).any(axis=1))
        objective = sum(cost[l, e, bits.index(chosen[l, e])] for l in range(2) for e in range(3))
        np.testing.assert_allclose(objective, result.objective, rtol=1e-12)
        assert result.status == "optimal" and result.gap <= 1e-9


@pytest.mark.parametrize("bits", [(2, 4, 8), (2, 3, 8), (1, 2, 3, 4)])
def test_sparse_bit_sets_match_brute_force(bits):
    rng = np.random.default_rng(7)
    cost = rng.lognormal(size=(1, 5, len(bits)))
    for budget in feasible_budgets(bits, 5)[1:-1:2]:
        expected = brute_force(cost, bits, budget, "global", True)
        for solver in ("scip", "dp"):
            got = solve_with_report(cost, bits, budget, "global", solver=solver)
            np.testing.assert_allclose(got.objective, expected, rtol=1e-9)
            assert got.bits.sum() == round(5 * budget)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ["smooth", "rough"])
def test_scip_matches_dp_on_larger_instances(scope, kind):
    """Instances too big to enumerate, large enough that SCIP's certified core is a strict
    subset of the problem: the certificate must still give the DP's exact optimum."""
    rng = np.random.default_rng(3)
    bits = np.array([2, 3, 4])
    shape = (4, 40, 3)
    if kind == "smooth":  # decreasing in bits, like measured sensitivities
        cost = (
            rng.lognormal(size=shape[:2] + (1,))
            * 4.0 ** (-bits)
            * rng.lognormal(sigma=0.3, size=shape)
        )
    else:  # arbitrary signs and ties: the LP relaxation is far from integral
        cost = rng.integers(-3, 4, size=shape).astype(np.float64)
    cores = []
    for budget, equality, top in [(3.0, True, 0), (2.5, True, 2), (3.3, False, 1)]:
        kw = dict(equality=equality, top_levels_required=top)
        scip = solve_with_report(cost, bits, budget, scope, solver="scip", **kw)
        dp = solve_with_report(cost, bits, budget, scope, solver="dp", **kw)
        np.testing.assert_allclose(scip.objective, dp.objective, rtol=1e-9, atol=1e-9)
        check_budget(scip, scip.bits, budget, scope, equality)
        check_budget(dp, dp.bits, budget, scope, equality)
        cores.append(scip.scip_binaries)
    if kind == "smooth":  # the certified core, not only the full model, was exercised
        assert min(cores) < cost.size // 2


def test_global_scope_moves_bits_between_layers():
    cost = np.zeros((2, 2, 2))
    cost[0, :, 0] = 10.0  # layer 0 suffers at 2 bits, layer 1 does not care
    cost[1, :, 0] = 1.0
    for solver in ("scip", "dp"):
        assert solve(cost, [2, 4], 3, "global", solver=solver).tolist() == [[4, 4], [2, 2]]
        layer = solve(cost, [2, 4], 3, "layer", solver=solver)
        assert layer.sum(axis=1).tolist() == [6, 6]


def test_report_fields():
    cost = np.random.default_rng(0).normal(size=(3, 4, 3))
    result = solve_with_report(cost, [2, 3, 4], 3.25, "global", equality=False)
    report = result.report()
    assert "bits" not in report
    assert report["target_total_bits"] == 39 and report["used_total_bits"] <= 39
    assert report["used_average_bits"] == pytest.approx(result.bits.mean())
    assert report["solver"] == "scip" and report["solve_time_s"] >= 0


def test_scip_is_quiet_and_deterministic(capfd):
    cost = np.random.default_rng(1).normal(size=(3, 16, 3))
    first = solve(cost, [2, 3, 4], 3, "global", solver="scip")
    second = solve(cost, [2, 3, 4], 3, "global", solver="scip")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget_bits=1.5), r"must lie in \[2, 4\]"),
        (dict(budget_bits=4.5), r"must lie in \[2, 4\]"),
        (dict(budget_bits=float("nan")), r"must lie in \[2, 4\]"),
        (dict(budget_bits=3.1), r"not an integer.*3 \(24 bits\), 3.125 \(25 bits\)"),
        (dict(bits=[]), "non-empty"),
        (dict(bits=[2, 2, 4]), "distinct"),
        (dict(bits=[2, 3.5, 4]), "positive integers"),
        (dict(bits=[2, 3]), r"cost has shape \(2, 8, 3\) but 2 candidate bits"),
        (dict(cost=np.zeros((8, 3))), r"expected \[layers, experts, 3\]"),
        (dict(scope="model"), "allowed: layer, global"),
        (dict(solver="gurobi"), "allowed: scip, dp"),
        (dict(top_levels_required=4), r"top_levels_required=4.*\[0, 3\]"),
    ],
)
def test_bad_inputs_name_what_is_allowed(kwargs, match):
    args = dict(cost=np.zeros((2, 8, 3)), bits=[2, 3, 4], budget_bits=3.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve(**args)


def test_nan_cost_is_rejected_with_its_position():
    cost = np.zeros((2, 8, 3))
    cost[1, 5, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite.*\(1, 5, 2\)"):
        solve(cost, [2, 3, 4], 3)


def test_unreachable_integer_total_names_nearest_budgets():
    # bits {2, 4}: totals are even, so 7 experts at 3 bits (21 bits) cannot be met exactly
    with pytest.raises(
        ValueError,
        match=r"totals 21 bits.*2.857142857 \(20 bits\), "
        r"3.142857143 \(22 bits\)",
    ):
        solve(np.zeros((1, 7, 2)), [2, 4], 3)
    # ... while an at-most budget of 3 bits simply uses 20 when 4 bits cost less
    cost = np.zeros((1, 7, 2))
    cost[..., 0] = 1.0  # 2 bits cost 1, 4 bits cost 0
    for solver in ("scip", "dp"):
        assert solve(cost, [2, 4], 3, equality=False, solver=solver).sum() == 20


@pytest.mark.parametrize("solver", ["scip", "dp"])
def test_top_levels_make_low_budgets_infeasible(solver):
    # one expert at 4 and one at 3 bits costs 3 bits over the minimum: average >= 2 + 3/4
    with pytest.raises(ValueError, match=r"smallest feasible total is 11 bits"):
        solve(np.zeros((1, 4, 3)), [2, 3, 4], 2.5, equality=False, top_levels_required=2,
              solver=solver)
    with pytest.raises(ValueError, match=r"nearest feasible budgets: 2.75 \(11 bits\)"):
        solve(np.zeros((1, 4, 3)), [2, 3, 4], 2.5, top_levels_required=2, solver=solver)
