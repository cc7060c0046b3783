"""Seconds per Kimi-VL expert matrix for the JAX GPTQ core vs a plain PyTorch GPTQ, on CPU.

Both run the same algorithm on the same Hessian: symmetric, group 128, MSE-searched scales,
damping 0.01 x mean diag, block 128, no act-order. The PyTorch version below is a plain
reference written for this benchmark ([out, in] layout, as PyTorch stores weights).

    python -m benchmarks.gptq                 # gate/up (2048 -> 1408) and down (1408 -> 2048)
    python -m benchmarks.gptq --bits 2 --reps 3 --experts 4
    OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python -m benchmarks.gptq

Thread counts come from the environment (torch reads OMP_NUM_THREADS, XLA reads XLA_FLAGS);
on a shared, loaded machine the single-threaded run is the fairer comparison, since
oversubscribed OpenMP threads slow PyTorch's many small ops far more than XLA's fused loops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mode_jax.quant import gptq

SHAPES = {"gate_up": (2048, 1408), "down": (1408, 2048)}  # (K inputs, N outputs) per expert


def torch_scales(wg, bits):
    """MSE-searched symmetric scales of one group, wg [N, g] -> [N]."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = wg.abs().amax(dim=1)
    best = torch.full_like(amax, float("inf"))
    scale = torch.zeros_like(amax)
    for i in range(80):
        s = (100 - i) / 100 * amax / qmax
        safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
        q = torch.clamp(torch.round(wg / safe), qmin, qmax) * s[:, None]
        err = (q - wg).abs().pow(2.4).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
    return scale


def torch_gptq(w_kn, h, bits, group=128, block=128, damp=0.01):
    """GPTQ of a [K, N] kernel; returns (dequantized [K, N] kernel, codes [K, N])."""
    w = w_kn.T.clone().float()  # [N, K]: columns are inputs
    h = h.clone().float()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, codes = torch.zeros_like(w), torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                scale = torch_scales(w1[:, i:i + group], bits)
                safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            col = w1[:, i]
            c = torch.clamp(torch.round(col / safe), qmin, qmax)
            q = c * scale
            out[:, i1 + i], codes[:, i1 + i] = q, c
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return out.T, codes.T


def hessian_for(k, tokens, seed):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)).astype(np.float32) / np.sqrt(k)
    x = rng.normal(size=(tokens, k)).astype(np.float32) @ mix
    x += 0.1 * rng.normal(size=(tokens, k)).astype(np.float32)
    return (2.0 / tokens) * x.T @ x


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_shape(name, k, n, args):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    h = hessian_for(k, args.tokens, seed=1)
    wj, hj = jnp.asarray(w), jnp.asarray(h)

    def jax_call():
        return jax.block_until_ready(gptq.gptq_quantize(wj, hj, args.bits))

    t0 = time.perf_counter()
    jax_call()
    first = time.perf_counter() - t0
    t_jax, res = timed(jax_call, args.reps)
    with torch.no_grad():
        t_torch, (w_torch, c_torch) = timed(
            lambda: torch_gptq(torch.from_numpy(w), torch.from_numpy(h), args.bits), args.reps
        )
    w_torch, c_torch = w_torch.numpy(), c_torch.numpy()
    w_jax = np.asarray(res.weight)
    err_jax = float(gptq.hessian_error(w, w_jax, h))
    err_torch = float(gptq.hessian_error(w, w_torch, h))
    print(f"[{name}] K={k} N={n} bits={args.bits}: jax {t_jax:.3f} s (first call incl. "
          f"compile {first:.2f} s) | torch {t_torch:.3f} s | torch/jax {t_torch / t_jax:.2f}")
    print(f"[{name}]   max|W_jax - W_torch| = {np.abs(w_jax - w_torch).max():.3e} "
          f"(|W| max {np.abs(w).max():.3f}), codes equal "
          f"{np.mean(np.asarray(res.codes) == c_torch) * 100:.2f}%, "
          f"tr(dW^T H dW): jax {err_jax:.5e} torch {err_torch:.5e}")

    e = args.experts
    w_e = jnp.asarray(np.stack([w] * e) + rng.normal(size=(e, k, n)).astype(np.float32) * 1e-3)
    h_e = jnp.asarray(np.stack([hessian_for(k, args.tokens, seed=s) for s in range(e)]))
    bits_e = jnp.asarray(([2, 3, 4] * e)[:e])

    def vmapped():
        return jax.block_until_ready(gptq.gptq_quantize_experts(w_e, h_e, bits_e))

    t0 = time.perf_counter()
    vmapped()
    first_v = time.perf_counter() - t0
    t_v, _ = timed(vmapped, args.reps)
    print(f"[{name}]   vmap over {e} experts (bits {list(map(int, bits_e))}): {t_v:.3f} s = "
          f"{t_v / e:.3f} s per expert (first call incl. compile {first_v:.2f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--shapes", default="gate_up,down")
    args = parser.parse_args()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    for name in args.shapes.split(","):
        run_shape(name, *SHAPES[name], args)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "XLA_FLAGS") if k in os.environ]
    command = env + ["python -m benchmarks.gptq"] + sys.argv[1:]
    print("reproduce (from the repo root): " + " ".join(command))


if __name__ == "__main__":
    main()
