"""What running the vision tower as its own program saves: compile time per new tuple of grids.

A batch's image grids are static arguments of the vision tower. Compiled inside a pass's
program, every new tuple of grids compiled the whole pass again: vision tower, decoder and, for
the token cache, its backward. The passes (and the forward, `generate` and GPTQ's walk) now run the
vision tower first (`models.batch.embed_images`; `passes.device_inputs`) and give the decoder
its embeddings, so a new tuple of grids compiles only the vision program, and each pass's
program is compiled once per batch shape.

This script compiles both ways at Kimi-VL-A3B's real widths (configs/kimivl.py `reference`:
MoonViT 27 x 1152, DeepSeek-V3 `--layers` x 2048 with 64 experts; bf16) for abstract arguments
(no weights, no GPU needed), `--batch` images of `--grid` patches each (36x46: a 640x480
photo) plus 64 text tokens per row, and prints each program's compile time on this backend:

    python -m benchmarks.vision_compile
    python -m benchmarks.vision_compile --layers 27 --grid 32x46

It then compiles the vision program alone for `--runs` image counts, the images all of one
grid against grids alternating with their transpose (same patches): consecutive images of one
grid share one batched attention call per block (and one position table), where distinct
grids take one each.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.memory_plan import kimi_text_config
from mode_jax.calib import passes
from mode_jax.models import kimivl, moonvit
from mode_jax.models.batch import embed_split, split_embedder


def compile_seconds(lower) -> float:
    start = time.perf_counter()
    lower().compile()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=27, help="decoder layers (Kimi-VL-A3B: 27)")
    p.add_argument("--batch", type=int, default=4, help="rows, one image each")
    p.add_argument("--grid", default="36x46", help="each image's patches, h x w")
    p.add_argument("--runs", default="2,4,8", help="image counts of the one-grid against "
                   "alternating-grids comparison ('' skips it)")
    a = p.parse_args(argv)
    command = "python -m benchmarks.vision_compile " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    print("command:", command.strip())
    h, w = (int(v) for v in a.grid.split("x"))
    config = kimivl.KimiVLConfig(text=kimi_text_config(a.layers), vision=moonvit.VisionConfig())
    abstract = nnx.eval_shape(lambda: kimivl.KimiVL(config, param_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    grid = ((h, w),) * a.batch
    tokens = h * w // 4
    b, t, d = a.batch, -(-(tokens + 64) // 32) * 32, config.text.hidden_size
    patch = config.vision.patch_size
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    pixels = jax.ShapeDtypeStruct((b * h * w, 3, patch, patch), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    fused = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    split = {"input_ids": ids, "attention_mask": mask,
             "inputs_embeds": jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16), "additions": ()}
    scfg = passes.StatsConfig(config.media_placeholder_token_id, (1, 2, 3))
    print(f"Kimi-VL-A3B widths: MoonViT {config.vision.num_layers} layers, DeepSeek-V3 "
          f"{a.layers} layers; batch {b} x {t} tokens, {b} images of {h}x{w} patches "
          f"({tokens} tokens each); compiled for {jax.devices()[0].device_kind}")
    times = {
        "vision tower + embedding (split, per tuple of grids)":
            compile_seconds(lambda: embed_split.lower(*split_embedder(abstract), ids, pixels,
                                                      grid)),
        "frequency step, vision inside (before, per tuple of grids)":
            compile_seconds(lambda: passes._frequency_batch.lower(graphdef, state, fused, scfg,
                                                                  grid)),
        "frequency step on embeddings (split, per batch shape)":
            compile_seconds(lambda: passes._frequency_batch.lower(graphdef, state, split, scfg,
                                                                  None)),
        "token cache step, vision inside (before, per tuple of grids)":
            compile_seconds(lambda: passes._token_batch.lower(graphdef, state, fused, scfg,
                                                              grid, True)),
        "token cache step on embeddings (split, per batch shape)":
            compile_seconds(lambda: passes._token_batch.lower(graphdef, state, split, scfg,
                                                              None, True)),
    }
    for name, s in times.items():
        print(f"  {name:<62} {s:7.1f} s")
    keys = list(times)
    before = times[keys[1]] + times[keys[3]]
    print(f"per new tuple of grids, frequency + token cache: {before:.1f} s before, "
          f"{times[keys[0]]:.1f} s now ({before / times[keys[0]]:.1f}x less; the vision "
          f"program is shared by both passes and GPTQ's walk)")
    if a.runs:
        print("the vision program for n images: all of one grid (one batched attention call "
              "per block) against grids alternating with their transpose (one per image; same "
              "patches):")
        for n in (int(v) for v in a.runs.split(",")):
            secs = []
            for grids in (((h, w),) * n, tuple((h, w) if i % 2 == 0 else (w, h)
                                               for i in range(n))):
                # 32 more rows' tokens than above: a shape of its own, so nothing is cached
                rows = jax.ShapeDtypeStruct((n, -(-(tokens + 64) // 32) * 32 + 32), jnp.int32)
                patches = jax.ShapeDtypeStruct((n * h * w, 3, patch, patch), jnp.float32)
                secs.append(compile_seconds(lambda grids=grids, rows=rows, patches=patches:
                                            embed_split.lower(*split_embedder(abstract), rows,
                                                              patches, grids)))
            print(f"  {n} images: one grid {secs[0]:.1f} s, alternating {secs[1]:.1f} s "
                  f"({secs[1] / secs[0]:.2f}x)")


if __name__ == "__main__":
    main()
