"""The routed-expert FFN on CPU: `ragged_dot`, every expert on every token, and the blocks of
`mode_jax.models.grouped_matmul`, side by side on the same routed tokens (jitted; best of 5).

    python -m benchmarks.grouped_matmul
    python -m benchmarks.grouped_matmul --shape 2048,1408,64,6 --tokens 256   # Kimi-VL experts
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.models import grouped_matmul, moe


def ragged_ffn(x, ids, w, gate_up, down):
    f = down.shape[1]

    def ffn(xs, sizes):
        h = jax.lax.ragged_dot(xs, gate_up, sizes)
        return jax.lax.ragged_dot(jax.nn.silu(h[..., :f]) * h[..., f:], down, sizes)

    return moe.moe_sorted(x, ids, w, gate_up.shape[0], ffn)


def best(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="128,128,16,2", help="D,F,E,k (default: the testbed's)")
    p.add_argument("--tokens", default="1,16,256,1360,4096")
    a = p.parse_args(argv)
    d, f, e, k = (int(v) for v in a.shape.split(","))
    print("command: python -m benchmarks.grouped_matmul " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(f"jax {jax.__version__} ({jax.default_backend()}); experts D={d} F={f} E={e} top-{k}")
    rng = np.random.default_rng(0)
    gu = jnp.asarray(rng.normal(size=(e, d, 2 * f)) / np.sqrt(d), jnp.float32)
    dn = jnp.asarray(rng.normal(size=(e, f, d)) / np.sqrt(f), jnp.float32)
    impls = {"ragged_dot": jax.jit(ragged_ffn), "all experts": jax.jit(moe.experts_dense),
             "blocks": jax.jit(moe.experts_sorted)}
    print(f"{'tokens':>7} " + " ".join(f"{n:>14}" for n in impls) + "   blocks vs ragged_dot, "
          "vs all experts")
    for t in (int(v) for v in a.tokens.split(",")):
        x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
        ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]))
        w = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
        ref = impls["all experts"](x, ids, w, gu, dn)
        err = float(jnp.max(jnp.abs(impls["blocks"](x, ids, w, gu, dn) - ref)))
        ms = {n: 1e3 * best(fn, x, ids, w, gu, dn) for n, fn in impls.items()}
        ratios = f"{ms['ragged_dot'] / ms['blocks']:6.1f}x {ms['all experts'] / ms['blocks']:6.1f}x"
        print(f"{t:7d} " + " ".join(f"{v:11.2f} ms" for v in ms.values())
              + f"   {ratios}   (max |blocks - all experts| {err:.1e})")
    print(f"block size per token count: "
          f"{ {t: grouped_matmul.block_size(t * k, e) for t in (1, 16, 256, 4096)} }")


if __name__ == "__main__":
    main()
