"""Per-expert bit allocation as a multiple-choice knapsack, solved by SCIP or an exact DP.

Every routed expert (layer l, expert e) picks one bit-width from `bits`; the program minimises
`sum cost[l, e, bits.index(b)]` subject to a bit budget. `budget_bits` is the average number of
bits per routed expert k, so the total is `E * k` per layer (scope "layer", one problem per MoE
layer, as MODE and MC-MoE do) or `L * E * k` over the model (scope "global", as GEMQ does). The
budget is met exactly (`equality=True`) or not exceeded. Optionally each of the
`top_levels_required` highest bit levels must hold at least one expert in every layer (MC-MoE
PMQ uses 2).

Inputs are checked first and a budget that cannot be met raises a ValueError that names the
nearest budgets that can: the budget is never silently changed. SCIP (pyscipopt) is the solver
the project names (it solves a core of the problem that a Lagrangian bound certifies, see
`_solve_scip`); `solver="dp"` solves the same problem exactly by dynamic programming over the
bit total and serves as its independent cross-check.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

SCOPES = ("layer", "global")
SOLVERS = ("scip", "dp")
_INT_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A solved allocation and its report.

    bits: [L, E] int32 chosen bit-widths. objective: sum of the input cost at those bits.
    gap: SCIP's relative optimality gap (on its shifted and scaled objective, see
    `_solve_scip`); 0 for the DP, which is exact. scip_binaries: binaries in SCIP's last
    (certified) core model, 0 for the DP. target_total_bits: the allowed bit total per problem
    (per layer for scope "layer", the whole model for "global"). used_total_bits: bits used in
    all.
    """

    bits: np.ndarray
    objective: float
    solver: str
    status: str
    gap: float
    solve_time_s: float
    scip_binaries: int
    scope: str
    equality: bool
    budget_bits: float
    target_total_bits: int
    used_total_bits: int
    used_average_bits: float
    top_levels_required: int

    def report(self) -> dict:
        """Everything but the array, JSON-ready."""
        out = dataclasses.asdict(self)
        del out["bits"]
        return out


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A checked problem, bit levels sorted ascending and expressed in integer steps.

    Choice j adds steps[j] = (bits[j] - bits[0]) / gcd of those differences; the budget becomes a
    number of steps per problem (`target_steps`), per layer or global.
    """

    cost: np.ndarray  # [L, E, B] float64, last axis in ascending-bit order
    bits: np.ndarray  # [B] int64 ascending
    steps: np.ndarray  # [B] int64
    scope: str
    equality: bool
    budget_bits: float
    top_levels_required: int
    target_total_bits: int
    target_steps: int


def solve(
    cost,
    bits,
    budget_bits: float,
    scope: str = "layer",
    *,
    equality: bool = True,
    top_levels_required: int = 0,
    solver: str = "scip",
    time_limit_s: float | None = None,
) -> np.ndarray:
    """Chosen bit-widths [L, E] (int32) for cost [L, E, B] over candidate `bits` [B].

    See `solve_with_report` for the arguments and the report.
    """
    return solve_with_report(
        cost,
        bits,
        budget_bits,
        scope,
        equality=equality,
        top_levels_required=top_levels_required,
        solver=solver,
        time_limit_s=time_limit_s,
    ).bits


def solve_with_report(
    cost,
    bits,
    budget_bits: float,
    scope: str = "layer",
    *,
    equality: bool = True,
    top_levels_required: int = 0,
    solver: str = "scip",
    time_limit_s: float | None = None,
) -> Allocation:
    """Solve the allocation and return the bit map with its report.

    cost: [L, E, B] finite floats, cost[l, e, j] of giving expert e of layer l bits[j].
    bits: [B] distinct positive integers, any order (cost's last axis follows it).
    budget_bits: average bits per routed expert, within [min(bits), max(bits)].
    scope: "layer" (each layer meets E * budget_bits) or "global" (L * E * budget_bits in all).
    top_levels_required: number of highest bit levels that must each hold >= 1 expert per layer.
    time_limit_s: SCIP only; when it stops early the status and gap say so.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; allowed: {', '.join(SOLVERS)}")
    problem = check_problem(cost, bits, budget_bits, scope, equality, top_levels_required)
    start = time.perf_counter()
    if solver == "scip":
        idx, status, gap, binaries = _solve_scip(problem, time_limit_s)
    else:
        idx, status, gap, binaries = _solve_dp(problem), "optimal", 0.0, 0
    elapsed = time.perf_counter() - start
    chosen = problem.bits[idx].astype(np.int32)
    _check_solution(problem, idx)
    objective = float(np.take_along_axis(problem.cost, idx[..., None], axis=-1).sum())
    return Allocation(
        bits=chosen,
        objective=objective,
        solver=solver,
        status=status,
        gap=float(gap),
        solve_time_s=elapsed,
        scip_binaries=binaries,
        scope=problem.scope,
        equality=problem.equality,
        budget_bits=problem.budget_bits,
        target_total_bits=problem.target_total_bits,
        used_total_bits=int(chosen.sum()),
        used_average_bits=float(chosen.mean()),
        top_levels_required=problem.top_levels_required,
    )


# ----------------------------------------------------------------------------- input checks


def check_problem(cost, bits, budget_bits, scope, equality, top_levels_required) -> _Problem:
    """Validate the inputs; raise one ValueError naming the bad value and what is allowed."""
    bits_arr = check_bits(bits)
    cost_arr = _check_cost(cost, bits_arr.size)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; allowed: {', '.join(SCOPES)}")
    num_layers, num_experts, num_bits = cost_arr.shape
    if not isinstance(top_levels_required, (int, np.integer)) or not (
        0 <= top_levels_required <= min(num_bits, num_experts)
    ):
        raise ValueError(
            f"top_levels_required={top_levels_required!r}; allowed: an integer in "
            f"[0, {min(num_bits, num_experts)}] (<= number of bit levels and of experts)"
        )
    order = np.argsort(bits_arr, kind="stable")
    sorted_bits = bits_arr[order]
    lo, hi = int(sorted_bits[0]), int(sorted_bits[-1])
    try:
        budget = float(budget_bits)
    except (TypeError, ValueError):
        raise ValueError(f"budget_bits={budget_bits!r} is not a number") from None
    if not math.isfinite(budget) or not lo <= budget <= hi:
        raise ValueError(
            f"budget_bits={budget_bits} is outside the candidate bit-widths "
            f"{sorted_bits.tolist()}: the average budget must lie in [{lo}, {hi}]"
        )
    unit = int(np.gcd.reduce(sorted_bits - lo)) or 1
    steps = (sorted_bits - lo) // unit
    n_items = num_experts if scope == "layer" else num_layers * num_experts
    reachable = _reachable_steps(
        num_layers if scope == "global" else 1, num_experts, steps, int(top_levels_required)
    )
    total = n_items * budget
    target_total, target_steps = _budget_target(
        total, n_items, lo, unit, reachable, bool(equality), budget, scope
    )
    return _Problem(
        cost=cost_arr[..., order],
        bits=sorted_bits,
        steps=steps,
        scope=scope,
        equality=bool(equality),
        budget_bits=budget,
        top_levels_required=int(top_levels_required),
        target_total_bits=target_total,
        target_steps=target_steps,
    )


def check_bits(bits) -> np.ndarray:
    """Candidate bit-widths as int64 [B]: non-empty, 1-D, distinct positive integers."""
    arr = np.asarray(bits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"bits={bits!r}: need a non-empty 1-D list of candidate bit-widths")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"bits={bits!r}: candidate bit-widths must be positive integers")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 1):
        raise ValueError(f"bits={bits!r}: candidate bit-widths must be positive integers")
    arr = arr.astype(np.int64)
    if np.unique(arr).size != arr.size:
        raise ValueError(f"bits={bits!r}: candidate bit-widths must be distinct")
    return arr


def _check_cost(cost, num_bits: int) -> np.ndarray:
    arr = np.asarray(cost)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"cost has shape {arr.shape}; expected [layers, experts, {num_bits}]")
    if arr.shape[-1] != num_bits:
        raise ValueError(
            f"cost has shape {arr.shape} but {num_bits} candidate bits were given: the last "
            f"axis must have one entry per candidate bit-width"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"cost has dtype {arr.dtype}; expected real numbers")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"cost has {int(bad.sum())} non-finite entries (NaN or inf), first at "
            f"[layer, expert, bit] = {first}; costs must be finite"
        )
    return arr


def _reachable_steps(num_layers: int, num_experts: int, steps, top_required: int) -> np.ndarray:
    """Boolean [num_layers * E * max_step + 1]: which step totals some allocation reaches."""
    layer = np.isfinite(
        _layer_tables(np.zeros((1, num_experts, steps.size)), steps, top_required)[0][0]
    )
    found = np.flatnonzero(layer)
    if found[-1] - found[0] + 1 == found.size:  # an interval: its L-fold sum is an interval
        out = np.zeros(num_layers * (layer.size - 1) + 1, dtype=bool)
        out[num_layers * found[0] : num_layers * found[-1] + 1] = True
        return out
    out = layer
    for _ in range(num_layers - 1):
        out = np.convolve(out.astype(np.float64), layer.astype(np.float64)) > 0.5
    return out


def _budget_target(total, n_items, lo, unit, reachable, equality, budget, scope):
    """The allowed bit total and step total, or a ValueError naming feasible budgets."""
    where = "per layer" if scope == "layer" else "in all"
    feasible = lo * n_items + unit * np.flatnonzero(reachable)  # reachable bit totals
    rounded = round(total)
    if equality:
        if abs(total - rounded) > _INT_TOL * max(1.0, abs(total)):
            raise ValueError(
                f"budget_bits={budget!r} x {n_items} experts ({where}) = {total:g} bits is "
                f"not an integer, so an equality budget cannot hold; "
                f"{_nearest(feasible, total, n_items)}"
            )
        if rounded not in set(feasible.tolist()):
            raise ValueError(
                f"no allocation of the candidate bits to {n_items} experts ({where}) totals "
                f"{rounded} bits (budget_bits={budget!r}) under the constraints given; "
                f"{_nearest(feasible, total, n_items)}"
            )
        return int(rounded), int((rounded - lo * n_items) // unit)
    allowed = math.floor(total + _INT_TOL * max(1.0, abs(total)))
    if feasible[0] > allowed:
        raise ValueError(
            f"budget_bits={budget!r} allows {allowed} bits for {n_items} experts ({where}) "
            f"but the smallest feasible total is {feasible[0]} bits "
            f"(budget_bits >= {feasible[0] / n_items:g})"
        )
    return int(allowed), int((allowed - lo * n_items) // unit)


def _nearest(feasible: np.ndarray, total: float, n_items: int) -> str:
    """The feasible bit totals just below and just above `total`, as average budgets."""
    below = feasible[feasible <= total][-1:].tolist()
    above = feasible[feasible >= total][:1].tolist()
    parts = [f"{t / n_items:.10g} ({t} bits)" for t in dict.fromkeys(below + above)]
    return "nearest feasible budgets: " + ", ".join(parts)


def _check_solution(problem: _Problem, idx: np.ndarray) -> None:
    """Refuse to return an allocation that breaks the budget or the top-level rule."""
    used = problem.bits[idx].sum(axis=1 if problem.scope == "layer" else None)
    target = problem.target_total_bits
    ok = np.all(used == target) if problem.equality else np.all(used <= target)
    levels = np.arange(problem.bits.size - problem.top_levels_required, problem.bits.size)
    has_top = all(np.all((idx == j).any(axis=1)) for j in levels)
    if not ok or not has_top:
        raise RuntimeError(f"solver returned an allocation that breaks the constraints: {used}")


# ----------------------------------------------------------------------------- exact DP


def _layer_tables(cost, steps, top_required):
    """Per layer, the least cost of every step total, by DP over the experts.

    cost [L, E, B], steps [B]. State: (step total c, mask of required top levels used).
    Returns curves [L, C + 1] (inf where unreachable, C = E * max step) and back-pointers
    choice / prev_mask [E, L, 2^t, C + 1] (int16) to recover the assignment.
    """
    num_layers, num_experts, num_bits = cost.shape
    width = num_experts * int(steps.max()) + 1
    masks = 1 << top_required
    level_bit = np.zeros(num_bits, dtype=np.int64)
    for r in range(top_required):
        level_bit[num_bits - 1 - r] = 1 << r
    dp = np.full((num_layers, masks, width), np.inf)
    dp[:, 0, 0] = 0.0
    choice = np.zeros((num_experts, num_layers, masks, width), dtype=np.int16)
    prev = np.zeros_like(choice)
    for e in range(num_experts):
        new = np.full_like(dp, np.inf)
        reach = e * int(steps.max()) + 1  # step totals reachable before expert e
        for j in range(num_bits):
            s = int(steps[j])
            for m in range(masks):
                m2 = m | int(level_bit[j])
                cand = dp[:, m, :reach] + cost[:, e, j][:, None]
                tgt = new[:, m2, s : s + reach]
                better = cand < tgt
                tgt[better] = cand[better]
                choice[e, :, m2, s : s + reach][better] = j
                prev[e, :, m2, s : s + reach][better] = m
        dp = new
    return dp[:, masks - 1], choice, prev


def _backtrack(choice, prev, steps, totals, top_required) -> np.ndarray:
    """Choice indices [L, E] that reach step total totals[l] in every layer."""
    num_experts, num_layers = choice.shape[:2]
    rows = np.arange(num_layers)
    c = np.asarray(totals, dtype=np.int64).copy()
    m = np.full(num_layers, (1 << top_required) - 1, dtype=np.int64)
    idx = np.zeros((num_layers, num_experts), dtype=np.int64)
    for e in range(num_experts - 1, -1, -1):
        j = choice[e, rows, m, c].astype(np.int64)
        m = prev[e, rows, m, c].astype(np.int64)
        idx[:, e] = j
        c = c - steps[j]
    return idx


def _min_plus_layers(curves: np.ndarray, cap: int):
    """Fold the per-layer curves into one by min-plus convolution, totals capped at `cap`.

    Returns the model curve [<= cap + 1] and, per added layer, the step total it took.
    """
    acc = curves[0, : cap + 1]
    picks = []
    for curve in curves[1:]:
        size = min(acc.size + curve.size - 1, cap + 1)
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int64)
        for k in np.flatnonzero(np.isfinite(curve[:size])):
            seg = acc[: size - k] + curve[k]
            tgt = new[k : k + seg.size]
            better = seg < tgt
            tgt[better] = seg[better]
            pick[k : k + seg.size][better] = k
        acc = new
        picks.append(pick)
    return acc, picks


def _solve_dp(problem: _Problem) -> np.ndarray:
    """Exact optimum as choice indices [L, E] (ascending-bit order)."""
    t = problem.top_levels_required
    curves, choice, prev = _layer_tables(problem.cost, problem.steps, t)
    target = problem.target_steps
    if problem.scope == "layer":
        head = curves[:, : target + 1]
        totals = np.full(curves.shape[0], target) if problem.equality else head.argmin(axis=1)
    else:
        model_curve, picks = _min_plus_layers(curves, target)
        total = target if problem.equality else int(model_curve.argmin())
        totals = np.zeros(curves.shape[0], dtype=np.int64)
        for l in range(curves.shape[0] - 1, 0, -1):
            totals[l] = picks[l - 1][total]
            total -= totals[l]
        totals[0] = total
    return _backtrack(choice, prev, problem.steps, totals, t)


# ----------------------------------------------------------------------------- SCIP


def _solve_scip(problem: _Problem, time_limit_s: float | None):
    """Solve with SCIP, on a core of the problem certified by a Lagrangian bound.

    The objective is shifted per expert (its cheapest choice to 0, which every allocation pays
    once) and scaled to [0, 1] so SCIP's tolerances see well-scaled numbers; the argmin is
    unchanged. Pricing bits at the best Lagrange multiplier of the budget gives a lower bound LB
    and, per choice, a reduced cost rc >= 0 such that any allocation costs at least
    LB + sum of its choices' rc. SCIP solves the core (choices with rc <= delta); if its
    optimum z <= LB + delta, no allocation outside the core can beat it, so z is optimal for
    the whole problem (up to float rounding of LB). Otherwise delta grows, up to the whole
    problem. The LP relaxation of these knapsacks is nearly integral, so the first core is
    usually tiny; SCIP's simplex on the full problem is what is slow (seconds at 48 x 128 x 4).
    """
    cost = problem.cost - problem.cost.min(axis=-1, keepdims=True)
    scale = float(cost.max())
    if scale > 0:
        cost = cost / scale
    lower, reduced = _lagrangian(cost, problem)
    positive = np.sort(reduced[reduced > 0])
    groups = cost.shape[0] if problem.scope == "layer" else 1
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
    count = 16 * groups
    while True:
        delta = positive[count - 1] if count <= positive.size else np.inf
        found = _scip_core(cost, reduced <= delta, problem, deadline)
        count *= 4
        if found is None:  # the core cannot meet the constraints: widen it
            if np.isinf(delta):
                raise RuntimeError("SCIP found the whole checked problem infeasible")
            continue
        idx, status, gap, binaries = found
        z = float(np.take_along_axis(cost, idx[..., None], axis=-1).sum())
        if status != "optimal" or z <= lower + delta:
            return idx, status, gap, binaries


def _lagrangian(cost: np.ndarray, problem: _Problem):
    """Lower bound and reduced costs [L, E, B] from the best bit price per budget row.

    With price lam per bit, L(lam) = sum_i min_j (c_ij - lam b_j) + lam T <= any feasible
    cost (for an at-most budget only lam <= 0 keeps this true). L is concave and piecewise
    linear with kinks at the pairwise slopes, so the best lam is found by bisection on them.
    The top-level rule is left out, which keeps the bound valid (a relaxation).
    """
    bits = problem.bits.astype(np.float64)
    rows = cost if problem.scope == "layer" else cost.reshape(1, -1, bits.size)
    target = float(problem.target_total_bits)
    lower, reduced = 0.0, np.empty_like(rows)
    first, second = np.triu_indices(bits.size, 1)
    for g, c in enumerate(rows):
        value = lambda lam, c=c: float((c - lam * bits).min(axis=1).sum() + lam * target)
        kinks = np.unique((c[:, second] - c[:, first]) / (bits[second] - bits[first]))
        if not problem.equality:
            kinks = np.union1d(kinks[kinks <= 0], [0.0])
        lam = 0.0
        if kinks.size:
            a, b = 0, kinks.size - 1
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (mid, b) if value(kinks[mid + 1]) >= value(kinks[mid]) else (a, mid)
            lam = max(kinks[a], kinks[b], key=value)
        lower += value(lam)
        priced = c - lam * bits
        reduced[g] = priced - priced.min(axis=1, keepdims=True)
    return lower, reduced.reshape(cost.shape)


def _scip_core(cost, keep, problem: _Problem, deadline):
    """Solve the problem restricted to the kept choices; None if that cannot be feasible.

    Binaries x[l, e, j] for kept choices of experts with more than one; the rest are constants.
    One choice per expert, each layer's bit total is an integer variable (a short global row:
    one long row of all binaries makes SCIP's propagation slow). Output hidden, one thread,
    fixed seed: runs are quiet and repeatable.
    """
    from pyscipopt import Model, quicksum

    num_layers, num_experts, num_bits = cost.shape
    bits = [int(b) for b in problem.bits]
    top = range(num_bits - problem.top_levels_required, num_bits)
    model = Model("bit_allocation")
    model.hideOutput()
    model.setParam("randomization/randomseedshift", 0)
    model.setParam("parallel/maxnthreads", 1)
    if deadline is not None:
        model.setParam("limits/time", max(deadline - time.perf_counter(), 0.0))
    free = keep.sum(axis=-1) > 1
    fixed_choice = keep.argmax(axis=-1)
    x, totals = {}, []
    for l in range(num_layers):
        fixed = ~free[l]
        terms = [
            bits[j] * n
            for j, n in enumerate(np.bincount(fixed_choice[l][fixed], minlength=num_bits))
        ]
        layer_bits = []
        for e in np.flatnonzero(free[l]):
            row = [
                (j, model.addVar(vtype="B", obj=float(cost[l, e, j])))
                for j in np.flatnonzero(keep[l, e])
            ]
            x.update({(l, e, j): v for j, v in row})
            model.addCons(quicksum(v for _, v in row) == 1)
            layer_bits.extend(bits[j] * v for j, v in row)
        for j in top:
            if np.any(fixed_choice[l][fixed] == j):
                continue
            at_j = [x[l, e, j] for e in np.flatnonzero(free[l]) if (l, e, j) in x]
            if not at_j:
                return None
            model.addCons(quicksum(at_j) >= 1)
        if problem.scope == "layer":
            ub = problem.target_total_bits
            lb = ub if problem.equality else num_experts * bits[0]
        else:
            lb, ub = num_experts * bits[0], num_experts * bits[-1]
        y = model.addVar(vtype="I", lb=lb, ub=ub)
        model.addCons(quicksum(layer_bits) + sum(terms) == y)
        totals.append(y)
    if problem.scope == "global":
        if problem.equality:
            model.addCons(quicksum(totals) == problem.target_total_bits)
        else:
            model.addCons(quicksum(totals) <= problem.target_total_bits)
    model.optimize()
    status = model.getStatus()
    if status == "infeasible":
        return None
    if model.getNSols() == 0:
        raise RuntimeError(f"SCIP found no allocation (status {status!r})")
    sol = model.getBestSol()
    idx = fixed_choice.astype(np.int64)
    for (l, e, j), v in x.items():
        if model.getSolVal(sol, v) > 0.5:
            idx[l, e] = j
    return idx, status, model.getGap(), len(x)
