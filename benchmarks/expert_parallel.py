"""The float model's forward on a mesh: its routed experts and routers partitioned per device
(`moe.experts_sorted_on_mesh`, `moe.route_on_mesh`: what `sharding.shard_model` sets up)
against the same placement left to XLA's partitioner. With the experts split over "expert"
(expert parallelism) XLA gathers every MoE layer's experts onto each device at every call;
with them whole on each device (`--expert 1`: data parallelism only) it gathers every row's
router scores, sorts all rows on each device and all-reduces each MoE layer's output.

Printed side by side in one run, for the float forward of the shipped testbed on random
image-and-text batches: the best of `--repeats` compiled runs per batch, the compiled
program's temporary bytes per device (XLA's buffer assignment, `memory_analysis()`), the
all-gathers and all-reduces in it, and the largest logit difference from one device. At
Kimi-VL-A3B's size the gathered experts are one MoE layer's, 1.1 GB in bf16, on top of what
the program needs.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.expert_parallel
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.expert_parallel \
        --expert 1                                             # rows split, experts whole
    python -m benchmarks.expert_parallel --expert 8          # on 8 GPUs

On CPU, forced host devices share the same cores: the times compare the two programs, they
are not a speed-up over one device.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

import mode_jax
from benchmarks.stats import timed
from mode_jax import sharding
from mode_jax.calib import sources
from mode_jax.models import moe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/testbed")
    ap.add_argument("--expert", type=int, default=0, help="devices along the expert axis "
                    "(0: all of them)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--text_len", type=int, default=240, help="text tokens per sample")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    mesh = sharding.make_mesh(expert=args.expert or jax.device_count())
    if mesh.size < 2:
        raise SystemExit("one device: nothing to split (see the module docstring for forcing "
                         "host devices)")
    model = mode_jax.load(args.checkpoint)
    batch = sources.random_batches(model.config, n=args.batch_size,
                                   batch_size=args.batch_size, seed=0,
                                   text_len=args.text_len)[0]
    grid = tuple(map(tuple, batch["image_grid_hws"]))
    forward = nnx.jit(lambda m, ids, mask, px: m.forward(ids, mask, px, grid).logits)
    one = np.asarray(forward(model, batch["input_ids"], batch["attention_mask"],
                             batch["pixel_values"]))

    sharding.shard_model(model, mesh)
    placed = sharding.shard_batch(batch, mesh)
    inputs = (placed["input_ids"], placed["attention_mask"], placed["pixel_values"])
    partitioned = [m for _, m in nnx.iter_graph(model) if isinstance(m, moe.UsesMesh)]
    rows = {}
    for name, parallel in (("per device (shard_map)", True), ("XLA's partitioner", False)):
        for m in partitioned:
            m.mesh = mesh if parallel else None
        compiled = forward.lower(model, *inputs).compile()
        hlo = compiled.as_text().splitlines()
        collectives = [sum(f"{op}(" in line or f"{op}-start(" in line for line in hlo)
                       for op in ("all-gather", "all-reduce")]
        logits, best, first = timed(lambda: forward(model, *inputs), args.repeats)
        diff = float(np.max(np.abs(np.asarray(logits) - one)))
        rows[name] = (best, first, compiled.memory_analysis().temp_size_in_bytes, *collectives,
                      diff)

    tokens = int(np.asarray(batch["attention_mask"]).sum())
    print(f"{jax.devices()[0].platform}: {jax.device_count()} devices, mesh "
          f"{dict(mesh.shape)}; float forward of {args.checkpoint}, batch {args.batch_size}, "
          f"{tokens} real tokens")
    print(f"{'experts and routers':<26} {'forward':>22} {'temp/device':>12} {'all-gathers':>12} "
          f"{'all-reduces':>12} {'max |dlogit|':>13}")
    for name, (best, first, temp, gathers, reduces, diff) in rows.items():
        print(f"{name:<26} {best * 1e3:>8.1f} ms ({first:5.1f} s) {temp / 2**20:>8.2f} MiB "
              f"{gathers:>12d} {reduces:>12d} {diff:>13.1e}")
    (ours, *_), (xla, *_) = rows.values()
    print(f"per device / XLA's partitioner: {xla / ours:.2f}x the speed")


if __name__ == "__main__":
    main()
