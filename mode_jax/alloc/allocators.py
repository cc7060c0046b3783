"""Allocators: turn calibration statistics and sensitivities into per-expert bit-widths.

Inputs are the stage artifacts of docs/design.md as plain arrays: counts `[L, E]`
(`count_all, count_text, count_image, count_key, count_redundant`), `weight_sum_all [L, E]`,
sensitivities `[L, E, B]` over candidate `bits [B]` (`delta_text, delta_vision, pmq_err,
gemq_cost`) and `hessian_trace [L, E]`. Every ILP allocator returns an `ilp.Allocation` (bit
map plus solver report); uniform and the MoPEQ k-means allocator need no solver and return the
bit map `[L, E]` int32 alone. `random` reads no statistic: it is the control.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mode_jax.alloc import ilp

# MODE frequency keys: which count array weighs the vision sensitivity (None: "total", one
# modality-blind frequency weighing both sensitivities).
MODE_KEYS = {
    "total": None,
    "text+all-image": "count_image",
    "text+key": "count_key",
    "text+redundant": "count_redundant",
}


def layer_frequency(counts) -> np.ndarray:
    """Per-layer routing frequency [L, E]: counts / layer total, uniform 1/E if the total is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"counts have shape {counts.shape}; expected [layers, experts]")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    totals = counts.sum(axis=1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / counts.shape[1])
    return np.divide(counts, totals, out=uniform, where=totals > 0)


def uniform(num_layers: int, num_experts: int, budget_bits, bits=None) -> np.ndarray:
    """Every routed expert at `budget_bits` (an integer, one of `bits` when given)."""
    k = float(budget_bits)
    if k != round(k) or k < 1:
        raise ValueError(f"uniform allocation needs a positive integer budget, got {budget_bits}")
    if bits is not None and int(k) not in {int(b) for b in np.asarray(bits).ravel()}:
        raise ValueError(f"budget_bits={budget_bits} is not one of the candidate bits {bits}")
    if num_layers < 1 or num_experts < 1:
        raise ValueError(f"need at least one layer and expert, got {num_layers} x {num_experts}")
    return np.full((num_layers, num_experts), int(k), dtype=np.int32)


def mode_cost(stats: Mapping, delta_text, delta_vision, key="text+key", vision_mix=0.5):
    """MODE cost [L, E, B]: modality frequency times modality sensitivity.

    cost = (1 - vision_mix) * f_t * delta_text + vision_mix * f_v * delta_vision, with f_t the
    per-layer text frequency and f_v the frequency of the image tokens named by `key`
    (key tokens for the paper's "text+key"). vision_mix = 0.5 is the paper's unweighted sum up
    to a factor 2 (same argmin). key "total" weighs the mixed sensitivity with the frequency
    over all tokens, blind to modality ([guess] for the paper's "total" ablation).
    """
    if key not in MODE_KEYS:
        raise ValueError(f"key={key!r}; allowed: {', '.join(MODE_KEYS)}")
    if not 0.0 <= float(vision_mix) <= 1.0:
        raise ValueError(f"vision_mix={vision_mix} must lie in [0, 1]")
    d_text = _sensitivity(delta_text, "delta_text")
    d_vision = _sensitivity(delta_vision, "delta_vision")
    if d_text.shape != d_vision.shape:
        raise ValueError(f"delta_text {d_text.shape} and delta_vision {d_vision.shape} differ")
    w = float(vision_mix)
    if key == "total":
        f_all = layer_frequency(_stat(stats, "count_all", d_text.shape[:2]))
        return f_all[..., None] * ((1 - w) * d_text + w * d_vision)
    f_t = layer_frequency(_stat(stats, "count_text", d_text.shape[:2]))
    f_v = layer_frequency(_stat(stats, MODE_KEYS[key], d_text.shape[:2]))
    return (1 - w) * f_t[..., None] * d_text + w * f_v[..., None] * d_vision


def allocate_mode(
    stats,
    delta_text,
    delta_vision,
    bits,
    budget_bits,
    *,
    key="text+key",
    vision_mix=0.5,
    scope="layer",
    equality=True,
    solver="scip",
):
    """MODE allocation: `mode_cost` solved per layer (paper) or globally."""
    cost = mode_cost(stats, delta_text, delta_vision, key=key, vision_mix=vision_mix)
    return ilp.solve_with_report(cost, bits, budget_bits, scope, equality=equality, solver=solver)


def pmq_cost(count_all, weight_sum_all, pmq_err, a=1.0, b=1.5) -> np.ndarray:
    """MC-MoE PMQ cost [L, E, B] = phi^a * w^b * eps.

    phi: per-layer routing frequency over all tokens; w: mean routing weight of the expert
    when selected (weight_sum_all / count_all, 0 if never selected); eps: block error pmq_err.
    """
    eps = _sensitivity(pmq_err, "pmq_err")
    counts = _stat({"count_all": count_all}, "count_all", eps.shape[:2])
    weights = _stat({"weight_sum_all": weight_sum_all}, "weight_sum_all", eps.shape[:2])
    mean_w = np.divide(weights, counts, out=np.zeros_like(weights), where=counts > 0)
    return (layer_frequency(counts) ** a * mean_w**b)[..., None] * eps


def allocate_pmq(stats, pmq_err, bits, budget_bits, *, a=1.0, b=1.5, solver="scip"):
    """MC-MoE PMQ: per layer, equality budget, >= 1 expert at each of the two top levels."""
    cost = pmq_cost(_get(stats, "count_all"), _get(stats, "weight_sum_all"), pmq_err, a, b)
    return ilp.solve_with_report(
        cost,
        bits,
        budget_bits,
        "layer",
        equality=True,
        top_levels_required=min(2, len(bits)),
        solver=solver,
    )


def allocate_gemq(gemq_cost, bits, budget_bits, *, scope="global", equality=True, solver="scip"):
    """GEMQ: the gradient-weighted block error as cost, one budget over all MoE layers."""
    cost = _sensitivity(gemq_cost, "gemq_cost")
    return ilp.solve_with_report(cost, bits, budget_bits, scope, equality=equality, solver=solver)


def kmeans_1d(values, k: int):
    """Exact 1-D k-means: (labels [n] int, centers [k']), clusters numbered by ascending center.

    Optimal k-means clusters in 1-D are contiguous in sorted order, so a DP over the sorted
    distinct values (weighted by multiplicity) is exact. Equal values always share a cluster,
    hence k' = min(k, number of distinct values).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("k-means needs a non-empty set of finite values")
    if int(k) < 1:
        raise ValueError(f"k={k} must be >= 1")
    uniq, inverse, weight = np.unique(x, return_inverse=True, return_counts=True)
    k = min(int(k), uniq.size)
    z = (uniq - uniq.mean()) / (np.ptp(uniq) or 1.0)  # centred and scaled for the prefix sums
    w = weight.astype(np.float64)
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * z, w * z * z))

    def sse(i, j):  # segments [i, j) for arrays of i and j
        n = s0[j] - s0[i]
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / n

    m = uniq.size
    best = np.full((k + 1, m + 1), np.inf)
    start = np.zeros((k + 1, m + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, m + 1) if c < k else [m]:
            i = np.arange(c - 1, j)
            total = best[c - 1, i] + sse(i, np.full_like(i, j))
            pick = int(np.argmin(total))
            best[c, j], start[c, j] = total[pick], i[pick]
    cluster_of_uniq = np.empty(m, dtype=np.int64)
    j = m
    for c in range(k, 0, -1):
        cluster_of_uniq[start[c, j] : j] = c - 1
        j = start[c, j]
    labels = cluster_of_uniq[inverse]
    centers = np.array([x[labels == c].mean() for c in range(k)])
    return labels, centers


def allocate_mopeq(hessian_trace, bits, scope="layer") -> np.ndarray:
    """MoPEQ: k-means of Hessian traces into len(bits) levels; higher trace, more bits.

    scope "layer" clusters each layer's experts separately, "global" all experts at once.
    The average bits follow from the clustering (no budget). With fewer distinct traces than
    levels, the k' clusters take levels spread evenly over the sorted bits (one cluster: the
    middle level).
    """
    trace = _stat({"hessian_trace": hessian_trace}, "hessian_trace", None)
    levels = np.sort(ilp.check_bits(bits))
    if scope not in ilp.SCOPES:
        raise ValueError(f"scope={scope!r}; allowed: {', '.join(ilp.SCOPES)}")
    groups = trace if scope == "layer" else trace.reshape(1, -1)
    out = np.empty(groups.shape, dtype=np.int32)
    for g, values in enumerate(groups):
        labels, centers = kmeans_1d(values, levels.size)
        n = centers.size
        spread = (
            np.round(np.arange(n) * (levels.size - 1) / (n - 1)).astype(int)
            if n > 1
            else np.array([(levels.size - 1) // 2])
        )
        out[g] = levels[spread[labels]]
    return out.reshape(trace.shape)


def mopeq_budget_cost(hessian_trace, bits) -> np.ndarray:
    """Budgeted MoPEQ cost [L, E, B] = trace * 4^-b: trace times the noise power of a b-bit
    uniform quantizer ([guess]; lets the ILP meet the budget exactly, trace order kept)."""
    trace = _stat({"hessian_trace": hessian_trace}, "hessian_trace", None)
    levels = ilp.check_bits(bits).astype(np.float64)
    return trace[..., None] * 4.0 ** (-levels)


def allocate_mopeq_budget(
    hessian_trace, bits, budget_bits, *, scope="layer", equality=True, solver="scip"
):
    """MoPEQ variant that meets the budget exactly: `mopeq_budget_cost` through the ILP."""
    cost = mopeq_budget_cost(hessian_trace, bits)
    return ilp.solve_with_report(cost, bits, budget_bits, scope, equality=equality, solver=solver)


def allocate_random(num_layers: int, num_experts: int, bits, budget_bits, *, seed=0,
                    scope="layer", equality=True, solver="scip"):
    """An uninformed control: seeded random importances u ~ U(0, 1) per expert, cost u * 4^-b
    through the same ILP, so it meets the budget as the informed methods do. What a method
    gains over it at the same budget is what its statistics are worth."""
    rng = np.random.default_rng(seed)
    importance = rng.random((num_layers, num_experts))
    return ilp.solve_with_report(mopeq_budget_cost(importance, bits), bits, budget_bits, scope,
                                 equality=equality, solver=solver)


METHODS = ("uniform", "mode", "pmq", "gemq", "mopeq", "mopeq-budget", "random")


def allocate(method: str, statistics: Mapping, sensitivity: Mapping, budget_bits, **options):
    """Run one allocator on the stage artifacts: (bits [L, E] int32, JSON-ready report).

    statistics: the calibrate artifact (count_*, weight_sum_all); sensitivity: the sensitivity
    artifact (bits, delta_text, delta_vision, pmq_err, gemq_cost, hessian_trace). `options`
    go to the allocator (e.g. key, vision_mix, scope, solver).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    bits = _get(sensitivity, "bits")
    if method == "uniform":
        out = uniform(*_layers_experts(sensitivity), budget_bits, bits=bits)
    elif method == "random":
        out = allocate_random(*_layers_experts(sensitivity), bits, budget_bits, **options)
    elif method == "mopeq":
        out = allocate_mopeq(_get(sensitivity, "hessian_trace"), bits, **options)
    elif method == "mode":
        d_text, d_vision = _get(sensitivity, "delta_text"), _get(sensitivity, "delta_vision")
        out = allocate_mode(statistics, d_text, d_vision, bits, budget_bits, **options)
    elif method == "pmq":
        out = allocate_pmq(statistics, _get(sensitivity, "pmq_err"), bits, budget_bits, **options)
    elif method == "gemq":
        out = allocate_gemq(_get(sensitivity, "gemq_cost"), bits, budget_bits, **options)
    else:
        trace = _get(sensitivity, "hessian_trace")
        out = allocate_mopeq_budget(trace, bits, budget_bits, **options)
    if isinstance(out, ilp.Allocation):
        return out.bits, {"method": method, **out.report()}
    return out, {"method": method, "used_average_bits": float(out.mean())}


def _layers_experts(sensitivity: Mapping) -> tuple[int, int]:
    """(L, E) of the artifacts, for the allocators that read no statistic."""
    return np.shape(_get(sensitivity, "delta_text"))[:2]


def _get(stats: Mapping, name: str):
    if name not in stats:
        raise ValueError(f"artifact lacks {name!r}; present: {sorted(stats)}")
    return stats[name]


def _stat(stats: Mapping, name: str, shape) -> np.ndarray:
    """A finite, non-negative [L, E] array from stats[name], of `shape` when given."""
    arr = np.asarray(_get(stats, name), dtype=np.float64)
    if arr.ndim != 2 or (shape is not None and arr.shape != tuple(shape)):
        want = list(shape) if shape is not None else "[layers, experts]"
        raise ValueError(f"{name} has shape {arr.shape}; expected {want}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


def _sensitivity(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} has shape {arr.shape}; expected [layers, experts, bits]")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return arr
