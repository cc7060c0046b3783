"""Bit allocation: per-expert bit-widths under a memory budget (stage 3 of docs/method.md).

`solve(cost, bits, budget_bits, scope)` returns the bit map [L, E]; `solve_with_report` also
returns objective, solve time, gap and the budget used. `allocators` builds the cost for MODE
and the baselines; `bitmap` saves and summarises the result.
"""

from mode_jax.alloc.ilp import Allocation, solve, solve_with_report

__all__ = ["Allocation", "solve", "solve_with_report"]
