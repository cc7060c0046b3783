"""What padding batches to a few lengths per doubling saves: programs to compile, and its cost.

Every distinct padded length of a batch is one more program to compile for each pass. The
evaluate stage scores held-out ShareGPT conversations one per forward, and their lengths
spread over hundreds of tokens (a Kimi-VL image is up to 1024 tokens, a caption a few hundred),
so padding to every multiple of 32 (`data.lengths_per_doubling=0`) compiles nearly one program
per conversation, twice (the full-precision and the quantized model) and again for each method
of a sweep. `data.padded_length` with 8 lengths per doubling (the default) pads at most 12.5%.

The script prints, for `--records` synthetic held-out conversations (image tokens from
Kimi-VL's own preprocessing, `preprocess.fit_image`, of seeded sizes: half COCO-like, half
random 300 to 2000 px a side; text tokens uniform in [100, 500), the range of ShareGPT4V
captions with their template; synthetic, not measured on real data):
- the distinct padded lengths (programs) and the padding's share of the tokens, for 0, 4, 8
  and 16 lengths per doubling;
- measured: a cold forward of the testbed model over those lengths (text-only token rows, one
  per forward, each setting in its own process), wall time including its compiles;
- measured: the compile time of one Kimi-VL-A3B decoder forward (configs/kimivl.py
  `reference` widths, `--layers`, bf16, abstract arguments: no weights) at two lengths, which
  is what each extra program costs at the real size on this backend.

    python -m benchmarks.length_buckets                # about 6 minutes here
    python -m benchmarks.length_buckets --records 64 --kimi_layers 0   # counts + testbed only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

SETTINGS = (0, 4, 8, 16)


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts of `n` whole conversations: one image each at Kimi-VL's settings."""
    from PIL import Image

    from benchmarks.image_grouping import NEAR_SIZES
    from mode_jax import preprocess

    rng = np.random.default_rng(seed)
    cfg = preprocess.ImageConfig()
    cache: dict[tuple[int, int], int] = {}
    out = []
    for i in range(n):
        if i % 2:
            size = NEAR_SIZES[rng.integers(len(NEAR_SIZES))]
        else:
            size = tuple(int(v) for v in rng.integers(300, 2001, 2))
        if size not in cache:
            w, h = preprocess.fit_image(Image.new("RGB", size), cfg).size
            cache[size] = (w // cfg.patch_size) * (h // cfg.patch_size) // 4
        out.append(cache[size] + int(rng.integers(100, 500)))
    return np.asarray(out)


def testbed_forward(lengths: list[int], per_doubling: int, checkpoint: str) -> dict:
    """Cold forwards of the testbed model, one row of random tokens per length."""
    import mode_jax
    from mode_jax.calib import data

    model = mode_jax.load(checkpoint)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    shapes = set()
    for t in lengths:
        padded = data.padded_length(t, 32, per_doubling)
        ids = np.zeros((1, padded), np.int32)
        row = rng.integers(10, model.config.text.vocab_size, t)
        ids[0, :t] = np.where(row == model.config.media_placeholder_token_id, 10, row)
        mask = np.zeros((1, padded), np.int32)
        mask[0, :t] = 1
        np.asarray(model({"input_ids": ids, "attention_mask": mask}).logits[0, t - 1])
        shapes.add(padded)
    return {"programs": len(shapes), "seconds": time.perf_counter() - start}


def kimi_compile_seconds(layers: int, lengths: tuple[int, ...]) -> list[float]:
    """Compile time of Kimi-VL-A3B's decoder forward on embeddings, batch 1, per length."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.memory_plan import kimi_text_config
    from mode_jax.models import deepseek_v3

    config = kimi_text_config(layers)
    abstract = nnx.eval_shape(lambda: deepseek_v3.DeepseekV3(config, param_dtype=jnp.bfloat16,
                                                             rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    @jax.jit
    def forward(state, embeds, mask):
        return nnx.merge(graphdef, state)(inputs_embeds=embeds, attention_mask=mask).logits

    out = []
    for t in lengths:
        embeds = jax.ShapeDtypeStruct((1, t, config.hidden_size), jnp.bfloat16)
        mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
        start = time.perf_counter()
        forward.lower(state, embeds, mask).compile()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=256, help="held-out conversations (the "
                   "evaluate stage's default at most)")
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--kimi_layers", type=int, default=27, help="decoder layers of the compile "
                   "timing (Kimi-VL-A3B: 27; 0 skips it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:  # one setting's cold testbed forward, in its own process
        per_doubling, lengths = json.loads(a.worker)
        print(json.dumps(testbed_forward(lengths, per_doubling, a.checkpoint)))
        return
    command = "python -m benchmarks.length_buckets " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    print("command:", command.strip())
    from mode_jax.calib import data

    lengths = synthetic_lengths(a.records)
    print(f"{a.records} synthetic conversations: {lengths.min()} to {lengths.max()} tokens, "
          f"median {int(np.median(lengths))}")
    print(f"{'lengths per doubling':>22} {'programs':>9} {'padding':>8} {'testbed cold':>13}")
    rows = {}
    for per in SETTINGS:
        padded = np.asarray([data.padded_length(int(t), 32, per) for t in lengths])
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.length_buckets", "--checkpoint", a.checkpoint,
             "--worker", json.dumps([per, lengths.tolist()])],
            capture_output=True, text=True, check=True)
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        programs = len(set(padded.tolist()))
        assert run["programs"] == programs
        rows[per] = (programs, padded.sum() / lengths.sum() - 1, run["seconds"])
        name = f"{per} (every 32)" if per == 0 else str(per)
        print(f"{name:>22} {rows[per][0]:>9} {100 * rows[per][1]:>7.1f}% "
              f"{rows[per][2]:>12.1f}s")
    print(f"8 per doubling against every 32: {rows[0][0] / rows[8][0]:.1f}x fewer programs, "
          f"testbed cold forward {rows[0][2] / rows[8][2]:.1f}x faster, "
          f"{100 * (rows[8][1] - rows[0][1]):.1f} points more padding")
    if a.kimi_layers:
        probe = (768, 1536)
        secs = kimi_compile_seconds(a.kimi_layers, probe)
        per_program = float(np.mean(secs))
        print(f"Kimi-VL-A3B decoder forward ({a.kimi_layers} layers, bf16, batch 1) compile: "
              + ", ".join(f"{s:.1f} s at {t}" for s, t in zip(secs, probe, strict=True)))
        print(f"so one model's forward programs for these conversations: about "
              f"{rows[0][0] * per_program / 60:.1f} min of compiling at every 32 against "
              f"{rows[8][0] * per_program / 60:.1f} min at 8 per doubling (estimate: programs x "
              f"{per_program:.1f} s), for the full-precision model and again per quantized one")


if __name__ == "__main__":
    main()
