"""Seconds per batch for one MoE layer's GPTQ Hessians: sorted (token, expert) pairs vs masking.

`hessian.update_experts` sorts the routed pairs by expert and builds each expert's Gram
matrices from its own rows (`grouped_matmul.grouped_gram`). The baseline below is the previous
implementation: every expert computes its activations and Grams on all tokens, with the tokens
not routed to it masked out (E/k times the work). Both produce the same sums (checked here).

    python -m benchmarks.hessian                      # Kimi-VL's 64 experts, top-6, width 1/4
    python -m benchmarks.hessian --hidden 2048 --intermediate 1408 --tokens 512   # full width

Kimi-VL-A3B's experts are 2048 -> 1408 (64 routed, top-6); the default shapes keep the routing
and divide both widths by 4 so the masked baseline fits a CPU run.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.calib import hessian

HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def masked_update(state: hessian.ExpertHessianState, x, ids, gate_up):
    """The masked baseline: each expert over all T tokens (x [T, D], ids [T, k])."""
    e, _, two_f = gate_up.shape
    member = (ids[None, :, :] == jnp.arange(e)[:, None, None]).any(-1)  # [E, T]

    def one_expert(args):
        w, m = args
        h = jnp.matmul(x, w, precision=HIGHEST)
        act = jax.nn.silu(h[:, :two_f // 2]) * h[:, two_f // 2:]
        xm, am = jnp.where(m[:, None], x, 0.0), jnp.where(m[:, None], act, 0.0)
        return (2.0 * jnp.matmul(xm.T, xm, precision=HIGHEST),
                2.0 * jnp.matmul(am.T, am, precision=HIGHEST))

    h_gu, h_dn = jax.lax.map(one_expert, (gate_up, member))
    return hessian.ExpertHessianState(state.gate_up + h_gu, state.down + h_dn,
                                      state.count + member.sum(-1, dtype=jnp.int32))


def seconds(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top_k", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    e, k, d, f, t = args.experts, args.top_k, args.hidden, args.intermediate, args.tokens
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ids = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jnp.int32)
    gate_up = jnp.asarray(rng.normal(size=(e, d, 2 * f)) / np.sqrt(d), jnp.float32)
    state = hessian.init_experts(e, d, f)

    sorted_s = seconds(lambda: hessian.update_experts(state, x, ids, gate_up), args.reps)
    masked_s = seconds(lambda: masked_update(state, x, ids, gate_up), args.reps)
    a = hessian.update_experts(state, x, ids, gate_up)
    b = masked_update(state, x, ids, gate_up)
    rel = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
              for u, v in ((a.gate_up, b.gate_up), (a.down, b.down)))
    assert np.array_equal(np.asarray(a.count), np.asarray(b.count))

    print(f"# {' '.join(['python -m benchmarks.hessian', *sys.argv[1:]])}")
    print(f"# backend {jax.default_backend()}; {e} experts, top-{k}, {d} -> {f}, {t} tokens; "
          f"best of {args.reps}")
    print("| path | seconds per batch | tokens/s |")
    print("| --- | --- | --- |")
    rows = (("sorted pairs (update_experts)", sorted_s), ("masked, every expert", masked_s))
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {t / s:,.0f} |")
    print(f"speed-up {masked_s / sorted_s:.1f}x (work ratio E/k = {e / k:.1f}); "
          f"max relative difference of the sums {rel:.1e}")


if __name__ == "__main__":
    main()
