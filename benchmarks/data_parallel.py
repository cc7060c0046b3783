"""Data parallelism of the calibration passes and of the packed model: the same batches on one
device and split over a mesh's "data" axis (`sharding.shard_batch`, which the passes and GPTQ's
walk apply to a model that `sharding.shard_model` placed).

Figures printed, side by side in one run, each the best of `--repeats` compiled runs (first
run, compilation included, in brackets): the vision program with the token embeddings
(each device runs its share of a batch's images when they are all of one grid), the
frequency pass, the token cache (with its
backward pass) and the token-level estimators on that cache (expert_mse, fisher, PMQ, GEMQ at
2/3/4 bits; each chunk of experts split over "data") in real tokens/s, GPTQ's walk over the
model (`--gptq`), and the forward of an RTN-packed model (2/3/4 bits; through the Pallas
kernels on GPU/TPU, the XLA dequantize path on CPU, where the kernels would only run
interpreted), on one device and on the mesh, with the ratio; then the packed experts' bytes
held per device (every bit group, padded with phantom experts to a multiple of the expert
axis, is split over it), whether the counts came out equal, the estimators' largest
difference, how many packed words differ and each GPTQ model's mean KL from the float model on
the same batches.

The model is the shipped testbed on random image-and-text batches (`sources.random_batches`,
one image of `--grid` patches and `--text_len` text tokens per sample).
All devices of the platform form the mesh (`--expert` of them along the expert axis, the rest
along "data"):

    python -m benchmarks.data_parallel                       # GPUs/TPUs: all of them
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.data_parallel
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.data_parallel \
        --expert 2 --no-gptq                                 # the packed experts split

On CPU, forced host devices share the same cores, so the second line measures the cost of
splitting (collectives, smaller matmuls), not a speed-up.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mode_jax
from benchmarks.stats import timed
from mode_jax import sharding
from mode_jax.calib import passes, sources
from mode_jax.models.batch import embed_images
from mode_jax.quant import apply


def embed(model, batch):
    """The vision program on `batch` placed where `model` is (`models.batch.embed_images`)."""
    placed = sharding.place_inputs(model, batch)
    grid = tuple(map(tuple, batch["image_grid_hws"]))
    return embed_images(model, placed["input_ids"], placed["pixel_values"], grid)[0]


def measure(model, packed, batches, scfg, bits, cache, args) -> dict:
    runs = {
        "vision + embedding": lambda: [embed(model, b) for b in batches],
        "frequency pass": lambda: passes.frequency_pass(model, batches, scfg),
        "token cache (+ backward)": lambda: passes.collect_tokens(model, batches, scfg),
        "token-level estimators": lambda: passes.token_costs(model, cache, CANDIDATE_BITS,
                                                             args.group_size),
        "packed forward": lambda: [packed(b).logits for b in batches],
    }
    if args.gptq:
        qc = apply.QuantConfig(group_size=args.group_size, block_size=args.group_size)
        runs["GPTQ walk"] = lambda: apply.quantize_model(model, batches, bits, qc)[0]
    return {name: timed(fn, args.repeats) for name, fn in runs.items()}


CANDIDATE_BITS = (2, 3, 4)


def packed_bytes_on_first_device(packed) -> int:
    """Bytes of the packed experts' arrays (code planes, scales, expert ids) held by
    `jax.devices()[0]`."""
    total = 0
    for _, m in apply.quantized_modules(packed):
        for a in jax.tree.leaves(nnx.state(m)):
            shards = getattr(a, "addressable_shards", None)
            total += sum(s.data.nbytes for s in shards if s.device == jax.devices()[0]) \
                if shards else a.nbytes
    return total


def mean_kl(fp, quantized, batches) -> float:
    """Mean over real tokens of KL(fp || quantized) of the next-token distributions."""
    total = count = 0.0
    for batch in batches:
        ref = jax.nn.log_softmax(fp(batch).logits.astype(jnp.float32), -1)
        out = jax.nn.log_softmax(quantized(batch).logits.astype(jnp.float32), -1)
        kl = np.asarray(jnp.sum(jnp.exp(ref) * (ref - out), -1))
        mask = np.asarray(batch["attention_mask"]).astype(bool)
        total, count = total + float(kl[mask].sum()), count + int(mask.sum())
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/testbed")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--text_len", type=int, default=240, help="text tokens per sample")
    ap.add_argument("--grid", default="4x4", help="each sample's image, h x w patches")
    ap.add_argument("--expert", type=int, default=1, help="devices along the expert axis")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--group_size", type=int, default=128)
    args = ap.parse_args()

    devices = jax.devices()
    mesh = sharding.make_mesh(expert=args.expert)
    if mesh.size < 2:
        raise SystemExit(f"{len(devices)} device: nothing to split over (see the module "
                         "docstring for forcing host devices)")
    model = mode_jax.load(args.checkpoint)
    cfg, text = model.config, model.config.text
    batches = sources.random_batches(cfg, n=args.samples, batch_size=args.batch_size, seed=0,
                                     grid=tuple(int(v) for v in args.grid.split("x")),
                                     text_len=args.text_len)
    tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in batches)
    scfg = passes.StatsConfig(image_token_id=cfg.media_placeholder_token_id)
    bits = np.random.default_rng(0).choice([2, 3, 4], (len(text.moe_layers),
                                                       text.n_routed_experts)).astype(np.int32)

    kernels = devices[0].platform != "cpu"
    packed = apply.quantize_model(model, None, bits, apply.QuantConfig(
        method="rtn", group_size=args.group_size, attention_bits=16, shared_expert_bits=16,
        dense_mlp_bits=16, use_kernels=kernels))[0]
    held = [packed_bytes_on_first_device(packed)]
    cache = passes.collect_tokens(model, batches, scfg)  # the estimators' input, on the host
    one = measure(model, packed, batches, scfg, bits, cache, args)
    sharding.shard_model(model, mesh)
    sharding.shard_model(packed, mesh)
    held.append(packed_bytes_on_first_device(packed))
    split = measure(model, packed, batches, scfg, bits, cache, args)

    print(f"{devices[0].platform}: {len(devices)} devices, mesh {dict(mesh.shape)}; "
          f"{args.samples} samples, batch {args.batch_size}, {tokens} real tokens")
    print(f"{'pass':<26} {'one device':>22} {'mesh':>22} {'speed-up':>9}")
    for name in one:
        (_, b1, f1), (_, b2, f2) = one[name], split[name]
        print(f"{name:<26} {tokens / b1:>10.0f} tok/s ({f1:5.1f} s) "
              f"{tokens / b2:>10.0f} tok/s ({f2:5.1f} s) {b1 / b2:>8.2f}x")
    print(f"packed experts on one device ({'kernels' if kernels else 'XLA path'}): "
          f"{held[0] / 2**20:.2f} MiB; on the mesh: {held[1] / 2**20:.2f} MiB "
          f"({held[0] / held[1]:.2f}x less)")
    counts_equal = all(np.array_equal(one["frequency pass"][0][k], split["frequency pass"][0][k])
                       for k in one["frequency pass"][0] if not k.startswith("weight"))
    print(f"frequency counts equal: {counts_equal}")
    worst = max(float(np.max(np.abs(split["token-level estimators"][0][k] - v)
                             / np.maximum(np.abs(v), 1e-30)))
                for k, v in one["token-level estimators"][0].items() if np.abs(v).max() > 0)
    print(f"token-level estimators: largest relative difference {worst:.1e}")
    if args.gptq:
        q_one, q_split = one["GPTQ walk"][0], split["GPTQ walk"][0]
        pairs = list(zip(*(jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(q)))
                           for q in (q_one, q_split)), strict=True))
        differ = sum(int((a != b).sum()) for a, b in pairs)
        print(f"GPTQ: {differ} of {sum(a.size for a, _ in pairs)} packed words and scales "
              "differ (the Hessian sums run in another order over the data slices; GPTQ's error "
              "feedback carries a flipped code on to later rows)")
        print(f"mean KL(fp || GPTQ) on the batches: one device {mean_kl(model, q_one, batches):.5f}"
              f", mesh {mean_kl(model, q_split, batches):.5f}")


if __name__ == "__main__":
    main()
