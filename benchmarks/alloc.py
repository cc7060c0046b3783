"""Solve times of the bit-allocation ILP at real model sizes, SCIP beside the exact DP.

Kimi-VL-A3B: 26 MoE layers x 64 experts, bits {2, 3, 4}, per layer and global.
Qwen3-VL-30B-A3B: 48 MoE layers x 128 experts, 4 bit choices, global.
Costs are synthetic: "smooth" = per-expert scale (lognormal) x 4^-b x lognormal noise, made
non-increasing in bits like measured sensitivities; "rough" = arbitrary normal numbers (no
structure, a harder case for SCIP). Times are wall-clock for the whole call (checks included),
median of --repeats. Goal: under 2 s each, optimal (SCIP's objective equal to the DP's).

    python -m benchmarks.alloc [--costs smooth|rough] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from mode_jax.alloc import solve_with_report

INSTANCES = [
    # name, layers, experts, bits, budget, scope, top levels required
    ("kimi-vl", 26, 64, (2, 3, 4), 3.0, "layer", 0),
    ("kimi-vl", 26, 64, (2, 3, 4), 3.0, "global", 0),
    ("kimi-vl pmq", 26, 64, (2, 3, 4), 2.5, "layer", 2),
    ("qwen3-vl", 48, 128, (1, 2, 3, 4), 2.5, "global", 0),
    ("qwen3-vl", 48, 128, (1, 2, 3, 4), 2.0, "global", 0),
]


def make_cost(rng, layers, experts, bits, kind):
    shape = (layers, experts, len(bits))
    if kind == "rough":
        return rng.normal(size=shape)
    scale = rng.lognormal(sigma=1.5, size=(layers, experts, 1))
    cost = scale * 4.0 ** (-np.asarray(bits)) * rng.lognormal(sigma=0.3, size=shape)
    return np.minimum.accumulate(cost, axis=-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", choices=["smooth", "rough"], default="smooth")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"command: python -m benchmarks.alloc --costs {args.costs} "
        f"--repeats {args.repeats} --seed {args.seed}"
    )
    header = (
        f"{'instance':<12} {'L x E x B':<12} {'budget':>6} {'scope':<6} {'solver':<5} "
        f"{'time s':>7} {'objective':>14} {'rel diff':>9} {'gap':>8} {'status':<8} "
        f"{'binaries':>8}"
    )
    print("binaries: SCIP's certified core model (the full model has L*E*B)")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(args.seed)
    for name, layers, experts, bits, budget, scope, top in INSTANCES:
        cost = make_cost(rng, layers, experts, bits, args.costs)
        results = {}
        for solver in ("dp", "scip"):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = solve_with_report(
                    cost, bits, budget, scope, top_levels_required=top, solver=solver
                )
                times.append(time.perf_counter() - start)
            results[solver] = (result, statistics.median(times))
        reference = results["dp"][0].objective
        for solver, (result, seconds) in results.items():
            rel = abs(result.objective - reference) / max(abs(reference), 1e-300)
            size = f"{layers}x{experts}x{len(bits)}"
            print(
                f"{name:<12} {size:<12} {budget:>6} {scope:<6} {solver:<5} {seconds:>7.3f} "
                f"{result.objective:>14.8g} {rel:>9.1e} {result.gap:>8.1e} "
                f"{result.status:<8} {result.scip_binaries:>8}"
            )
        scip = results["scip"][0]
        same = np.array_equal(results["dp"][0].bits, scip.bits)
        print(
            f"{'':<12} identical bit maps: {same}; SCIP used {scip.used_total_bits} bits "
            f"(average {scip.used_average_bits:g}); budget {scip.target_total_bits} bits "
            f"{'per layer' if scope == 'layer' else 'in all'}"
        )
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
