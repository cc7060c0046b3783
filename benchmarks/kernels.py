"""Mixed-bit grouped expert matmuls at Kimi-VL expert shapes against bf16 baselines.

Shapes: 64 experts; gate/up = SwiGLU over [2048, 2 x 1408] (-> [M, 1408]); down = [1408, 2048]
(`--shapes qwen3_30b_a3b`: the 128 experts of 2048 x 768 that Qwen3-VL-30B-A3B and
InternVL3.5-30B-A3B share).
For each op, bit width and tokens per expert (1, 4, 16, 64, 512; routing spread evenly) it
prints the median time, the packed weight bytes (codes + bf16 scales), the achieved bandwidth on
those bytes, the fraction of the bandwidth floor (packed bytes / measured copy bandwidth), and
the speed ratio to bf16 ``jax.lax.ragged_dot``, to the same kernel on bf16 weights (with fewer
pipeline stages where its frozen tiles exceed shared memory) and to dequantizing the weights to
bf16 then running that kernel (``x_predeq``: above 1 the fused kernel is faster), all in one
run. Without a GPU/TPU the kernel backend resolves to the XLA fallback (dequantize +
ragged_dot); use ``--small`` there.

  python -m benchmarks.kernels                      # full Kimi-VL shapes (GPU/TPU)
  python -m benchmarks.kernels --small --bits 2,3,4 # reduced shapes, e.g. on CPU
  python -m benchmarks.kernels --shapes qwen3_30b_a3b # Qwen3-VL / InternVL3.5 MoE experts
  python -m benchmarks.kernels --dequant magic,registers # dequant modes side by side
  python -m benchmarks.kernels --sweep --bits 4 --tokens 1 # time block configs (autotune)
  python -m benchmarks.kernels --mixed 2+3+4 --bits 4      # + one launch over bit groups

``--mixed 2+3+4`` adds, per op and token count, rows for a layer whose experts are split
evenly over those widths: one launch over all the bit groups (what ``QuantizedExperts`` runs)
against one launch per group on its rows rolled to row 0 and back (what it ran before
2026-12-06), with the bandwidth floor of all groups' packed bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import packing


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="1,2,3,4,8", help="comma-separated bit widths")
    p.add_argument("--tokens", default="1,4,16,64,512", help="tokens per expert")
    p.add_argument("--ops", default="gate_up,down", help="gate_up and/or down")
    p.add_argument("--backend", default="auto", choices=gm.BACKENDS)
    p.add_argument("--small", action="store_true", help="8 experts, K=512, F=256, N=512")
    p.add_argument("--shapes", default="kimi_vl", choices=sorted(EXPERT_SHAPES),
                   help="model whose expert shapes to time (ignored with --small)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--queued", type=int, default=10, help="calls dispatched per timing sample "
                   "before waiting (1: a host round trip per call)")
    p.add_argument("--dequant", default="", help="comma-separated BlockConfig.dequant modes "
                   "(rows per mode; with --sweep, the modes swept); default: the frozen "
                   "config's (--sweep: all)")
    p.add_argument("--sweep", action="store_true", help="autotune block configs and dequant "
                   "modes per (op, bits, tokens) and print the fastest, instead of the table")
    p.add_argument("--interpret", action="store_true", help="run the kernels in Pallas "
                   "interpret mode (CPU): exercises every path of this script, no real timing")
    p.add_argument("--mixed", default="", help="bit groups of one layer, e.g. 2+3+4: add rows "
                   "timing one launch over them against one launch per group")
    return p.parse_args(argv)


EXPERT_SHAPES = {"kimi_vl": (64, 2048, 1408), "qwen3_30b_a3b": (128, 2048, 768)}


def op_shapes(small: bool, shapes: str = "kimi_vl"):
    """op -> (experts, K, weight columns, output columns, fused)."""
    experts, d, f = (8, 512, 256) if small else EXPERT_SHAPES[shapes]
    return {"gate_up": (experts, d, 2 * f, f, True), "down": (experts, f, d, d, False)}


def measure_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device copy (read + write) of ``nbytes``: the floor's bandwidth."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = gm.time_call(jax.jit(lambda v: v + 1), a, repeats=repeats, queued=2)
    return 2 * a.nbytes / seconds


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def random_packed(key, experts, k, cols, bits, parts):
    """Random full-range codes and bf16 scales, packed on the device."""
    kq, ks = jax.random.split(key)
    half = 1 << (bits - 1)
    if bits == 1:
        codes = 2 * jax.random.bernoulli(kq, shape=(experts, k, cols)).astype(jnp.int32) - 1
    else:
        codes = jax.random.randint(kq, (experts, k, cols), -half, half)
    scales = jax.random.uniform(ks, (experts, -(-k // 128), cols), jnp.float32, 0.5, 1.5)
    scales = (scales / (k**0.5 * half)).astype(jnp.bfloat16)
    return packing.pack(codes, scales, bits, parts=parts)


def run(args) -> None:
    bits_list = [int(b) for b in args.bits.split(",")]
    backend = gm.resolve_backend(args.backend, args.interpret)
    device = jax.devices()[0]
    bandwidth = measure_copy_bandwidth(1 << (26 if args.small else 30))
    fallback_note = "  (XLA fallback: dequantize + ragged_dot)" if backend == "xla" else ""
    if args.interpret:
        fallback_note = "  (Pallas interpret mode: checks the script's paths, times nothing real)"
    print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}")
    print(f"backend: {backend}{fallback_note}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print("command: python -m benchmarks.kernels " + " ".join(sys.argv[1:]))
    print(f"times: median per call over {args.repeats} samples of {args.queued} queued calls")
    print(
        f"{'op':8} {'bits':>4} {'dequant':>9} {'tok/exp':>7} {'M':>6} {'time_us':>10} "
        f"{'packed_MB':>9} "
        f"{'GB/s':>7} {'%floor':>6} {'x_ragged_bf16':>13} {'x_kernel_bf16':>13} "
        f"{'x_predeq':>9} {'err':>8}"
    )
    key = jax.random.key(0)
    for op_name in args.ops.split(","):
        experts, k, cols, out_cols, fused = op_shapes(args.small, args.shapes)[op_name]
        w_bf16 = jax.random.normal(key, (experts, k, cols), jnp.bfloat16) / k**0.5
        packed = {b: random_packed(key, experts, k, cols, b, 2 if fused else 1) for b in bits_list}
        mixed = mixed_groups(args.mixed, experts, k, cols, fused) if args.mixed else None
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = jax.random.normal(key, (experts * tokens, k), jnp.bfloat16)
            sizes = jnp.full((experts,), tokens, jnp.int32)
            if args.sweep:
                sweep(op_name, fused, x, sizes, packed, backend, args)
            else:
                t_ragged = bench_tokens(op_name, fused, x, sizes, w_bf16, packed, backend,
                                        bandwidth, args)
                if mixed:
                    bench_mixed(op_name, fused, x, mixed, backend, bandwidth, t_ragged, args)
        print(f"  ({op_name}: bf16 weights {w_bf16.size * 2 / 1e6:.1f} MB, {cols} -> {out_cols})")


def bench_tokens(op_name, fused, x, sizes, w_bf16, packed, backend, bandwidth, args):
    """One table row per bit width at one token count, with the bf16 baselines timed once;
    returns the ``ragged_dot`` bf16 time."""
    repeats = args.repeats
    timer = functools.partial(gm.time_call, repeats=repeats, queued=args.queued)
    t_ragged = timer(_ragged_bf16, x, w_bf16, sizes, fused)
    t_dense = None if backend == "xla" else _dense_baseline(fused, x, w_bf16, sizes, backend,
                                                            timer, args.interpret)
    op = gm.grouped_swiglu if fused else gm.grouped_matmul
    fallback = jax.jit(functools.partial(op, backend="xla"))
    tokens = x.shape[0] // sizes.shape[0]
    for bits, w in packed.items():
        # dequantize to bf16 then the bf16 kernel: the alternative to fusing at prefill
        t_predeq = t_dense and t_dense + timer(_dequantize_bf16, w)
        for mode, config in _mode_configs(backend, x.shape[0], sizes.shape[0], fused, args):
            kernel = jax.jit(functools.partial(op, backend=backend, config=config,
                                               interpret=args.interpret))
            seconds = timer(kernel, x, w, sizes)
            err = _relative_error(kernel(x, w, sizes), fallback(x, w, sizes))
            nbytes = packing.nbytes(w)
            floor = nbytes / bandwidth
            vs_dense = f"{t_dense / seconds:13.2f}" if t_dense else f"{'n/a':>13}"
            vs_predeq = f"{t_predeq / seconds:9.2f}" if t_predeq else f"{'n/a':>9}"
            print(
                f"{op_name:8} {bits:4d} {mode:>9} {tokens:7d} {x.shape[0]:6d} "
                f"{seconds * 1e6:10.1f} {nbytes / 1e6:9.1f} {nbytes / seconds / 1e9:7.1f} "
                f"{floor / seconds:6.1%} {t_ragged / seconds:13.2f} {vs_dense} {vs_predeq} "
                f"{err:8.1e}"
            )
    return t_ragged


def _dense_baseline(fused, x, w_bf16, sizes, backend, timer, interpret=False):
    """Seconds of the same kernel on bf16 weights: the frozen tiles, or with fewer pipeline
    stages where those exceed shared memory (bf16 tiles are 4-16x the packed ones); None if
    nothing fits."""
    default = gm.default_config(backend, x.shape[0], sizes.shape[0], fused)
    for stages in sorted({default.num_stages, 2, 1}, reverse=True):
        config = dataclasses.replace(default, num_stages=stages, dequant="convert")
        dense = functools.partial(gm.grouped_matmul_dense, fused=fused, backend=backend,
                                  config=config, interpret=interpret)
        try:
            seconds = timer(jax.jit(dense), x, w_bf16, sizes)
        except Exception as e:  # e.g. its tiles exceed shared memory at prefill
            print(f"  (bf16 kernel, {stages} stages, failed: {str(e).splitlines()[0][:90]})")
            continue
        if stages != default.num_stages:
            print(f"  (bf16 kernel baseline ran with num_stages={stages})")
        return seconds
    return None


@jax.jit
def _dequantize_bf16(w):
    return packing.dequantize(w, jnp.bfloat16)


def _mode_configs(backend, m, experts, fused, args):
    """(dequant mode, config) per row: the frozen config in each ``--dequant`` mode (its own mode
    without the flag); ("-", None) on the XLA path."""
    if backend == "xla":
        return [("-", None)]
    base = gm.default_config(backend, m, experts, fused)
    modes = args.dequant.split(",") if args.dequant else [base.dequant]
    return [(mode, dataclasses.replace(base, dequant=mode)) for mode in modes]


def mixed_groups(mixed: str, experts, k, cols, fused):
    """A layer's experts split evenly over the widths of ``mixed`` ("2+3+4"), packed per group."""
    widths = [int(b) for b in mixed.split("+")]
    split = [experts // len(widths) + (i < experts % len(widths)) for i in range(len(widths))]
    keys = jax.random.split(jax.random.key(1), len(widths))
    return tuple(random_packed(key, g, k, cols, b, 2 if fused else 1)
                 for key, g, b in zip(keys, split, widths, strict=True))


def bench_mixed(op_name, fused, x, groups, backend, bandwidth, t_ragged, args):
    """Rows for one layer's experts in bit ``groups``: one launch over all of them against one
    launch per group, in each dequant mode."""
    experts = sum(w.scales.shape[0] for w in groups)
    tokens = x.shape[0] // experts
    sizes = jnp.full((experts,), tokens, jnp.int32)
    nbytes = sum(packing.nbytes(w) for w in groups)
    op = gm.grouped_swiglu if fused else gm.grouped_matmul
    timer = functools.partial(gm.time_call, repeats=args.repeats, queued=args.queued)
    ref = jax.jit(functools.partial(op, backend="xla"))(x, groups, sizes)
    split = "/".join(str(w.scales.shape[0]) for w in groups)
    print(f"  mixed {args.mixed} ({split} experts): one launch vs one per "
          f"bit group; {'time_us':>10} {'per_group_us':>12} {'x_per_group':>11} {'packed_MB':>9} "
          f"{'%floor':>6} {'x_ragged_bf16':>13} {'err':>8}")
    for mode, config in _mode_configs(backend, x.shape[0], experts, fused, args):
        kw = dict(backend=backend, config=config, interpret=args.interpret)
        one = jax.jit(functools.partial(op, **kw))
        per_group = jax.jit(functools.partial(per_group_launches, op, **kw))
        t_one, t_groups = timer(one, x, groups, sizes), timer(per_group, x, groups, sizes)
        err = _relative_error(one(x, groups, sizes), ref)
        err = max(err, _relative_error(per_group(x, groups, sizes), ref))
        print(f"{op_name:8} {args.mixed:>5} {mode:>9} {tokens:7d} {x.shape[0]:6d} "
              f"{t_one * 1e6:10.1f} {t_groups * 1e6:12.1f} {t_groups / t_one:11.2f} "
              f"{nbytes / 1e6:9.1f} {nbytes / bandwidth / t_one:6.1%} "
              f"{t_ragged / t_one:13.2f} {err:8.1e}")


def per_group_launches(op, x, groups, sizes, **kw):
    """One launch per bit group, its rows rolled to row 0 and back (rows past a group's sizes
    come out as zeros, so the groups' outputs add up)."""
    y, first = None, 0
    for w in groups:
        size = w.scales.shape[0]
        start = jnp.sum(sizes[:first])
        out = op(jnp.roll(x, -start, axis=0), w, sizes[first : first + size], **kw)
        out = jnp.roll(out, start, axis=0)
        y = out if y is None else y + out
        first += size
    return y


def sweep(op_name, fused, x, sizes, packed, backend, args):
    """Autotunes every (bits) at this token count; prints the five fastest and the default."""
    op = gm.grouped_swiglu if fused else gm.grouped_matmul
    default = gm.default_config(backend, x.shape[0], sizes.shape[0], fused)
    decode = default.block_m <= 16
    candidates = [
        gm.BlockConfig(bm, bn, warps, stages, mode)
        for bm in ((16,) if decode else (64, 128))
        for bn in (128, 256)
        for warps in (4, 8)
        for stages in ((2, 4) if decode else (2, 3))
        for mode in (args.dequant.split(",") if args.dequant else gm.DEQUANT_MODES)
    ]
    for bits, w in packed.items():
        _, timings = gm.autotune(op, x, w, sizes, candidates=[default, *candidates],
                                 backend=backend, interpret=args.interpret,
                                 repeats=args.repeats, queued=args.queued)
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        tokens = x.shape[0] // sizes.shape[0]
        print(f"{op_name} {bits}-bit, {tokens} tokens/expert: default {default} "
              f"{timings[default] * 1e6:.1f} us")
        for cfg, seconds in ranked[:5]:
            print(f"    {seconds * 1e6:9.1f} us  {cfg}")


@functools.partial(jax.jit, static_argnums=3)
def _ragged_bf16(x, w, sizes, fused):
    y = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    if fused:
        f = w.shape[-1] // 2
        y = jax.nn.silu(y[:, :f]) * y[:, f:]
    return y.astype(x.dtype)


def _relative_error(out, ref) -> float:
    """Max |out - ref| / max |ref| against the XLA dequantize path (0 when it is the path)."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
