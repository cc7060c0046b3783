"""The host-side check of an HF-style batch, shared by the model families.

Each multimodal wrapper (`KimiVL`, `Qwen3VLMoe`, `InternVL`) turns a processor dict into a
`Prepared` with `model.prepare(batch)`, and `model.embed_inputs(input_ids, pixel_values, grid)`
gives `(h [B, T, D], additions)`: the residual stream entering the text model and the per-layer
additions (Qwen3-VL's DeepStack; empty for Kimi-VL and InternVL). Generation, calibration and
quantization use only these two and the text model's `context`/`run_layers`/`init_cache`, so
they run on every family. `model.embedder()` is `embed_inputs` as a module of its own (an
`Embedder`), which `embed_images` compiles apart from the decoder. `run_forward` is the rest of
each family's `model(batch)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax import multihost, sharding

# The static image-grid argument of each family's jitted forward (InternVL has none: its tiles'
# shape is the pixel values')
GRID_KEYS = ("grid_hws", "grid_thw")


class Prepared(NamedTuple):
    """A checked batch: `input_ids [B, T]` int32, `attention_mask [B, T]` bool, `pixel_values`
    or None, `grid` (the static image grids, or None), `positions` (`[3, B, T]` M-RoPE
    positions, or None to count real tokens) and `rope_delta [B]` (numpy) or None."""

    input_ids: jax.Array
    attention_mask: jax.Array
    pixel_values: jax.Array | None
    grid: tuple | None
    positions: jax.Array | None = None
    rope_delta: np.ndarray | None = None


def check_tokens(batch: Mapping[str, Any], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """`input_ids [B, T]` (integers in [0, vocab)) and `attention_mask` (default all ones) of
    an HF-style batch, as numpy, or a ValueError saying what is wrong."""
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids'; got keys {sorted(batch)}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer [B, T] array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}); got [{ids.min()}, {ids.max()}]")
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must be {ids.shape}, got {mask.shape}")
    return ids, mask


def run_forward(model, forward_jit, args: dict[str, Any], image_query_mask=None, **flags):
    """`forward_jit(model, **args, **flags)` for the checked batch `args` of a model family's
    `__call__`: the image query mask checked against the tokens, the inputs put where the model
    is (split over its mesh's "data" axis: `sharding.place_inputs`), the outputs gathered to
    every host."""
    if image_query_mask is not None:
        image_query_mask = jnp.asarray(image_query_mask, bool)
        if image_query_mask.shape != args["input_ids"].shape:
            raise ValueError(f"image_query_mask must be {args['input_ids'].shape}, "
                             f"got {image_query_mask.shape}")
        args = {**args, "image_query_mask": image_query_mask}
    args = sharding.place_inputs(model, args)
    if args.get("pixel_values") is not None:  # the vision tower apart: compiled per grid tuple
        grid_key = next((k for k in GRID_KEYS if k in args), None)
        embedded = embed_images(model, args["input_ids"], args["pixel_values"],
                                args[grid_key] if grid_key else None)
        args = {**args, "pixel_values": None, "embedded": embedded}
        if grid_key:
            args[grid_key] = None
    out = forward_jit(model, **args, **flags)
    return multihost.tree_to_host(out)


class Embedder(nnx.Module):
    """A family's `model.embedder()`: the modules its `embed_inputs` reads (vision tower,
    projector, token embeddings), held apart from the decoder, and called as
    `embedder(input_ids, pixel_values, grid) -> (h [B, T, D], additions)`.

    Quantization never touches these modules, so the full-precision model and every quantized
    copy of it (each method of a sweep) split to the same embedder graph and share the one
    compiled vision program (`embed_split`), where a program over the whole model is compiled
    again for each of them.

    A subclass calls `super().__init__(model)` (config, token embeddings, the model's mesh) and
    runs its vision tower through `per_device_images`."""

    def __init__(self, model):
        self.config = model.config
        self.embed_tokens = model.language_model.embed_tokens
        self.mesh = sharding.model_mesh(model)

    def per_device_images(self, fn, pixel_values: jax.Array, grid):
        """`fn(pixel_values, grid)` (a vision tower: an array, or a tuple of arrays, whose
        leading axis runs over the images' tokens in order), with the images split over the
        mesh's devices when they are all alike (one grid; InternVL's tiles always are): over
        every device when their count divides the mesh (the tower is replicated on all of
        them, the expert axis included), else over "data" when it divides that. `shard_batch`
        leaves the pixel values whole on every device, and without this every device would
        run the tower on all of the batch's images. Each image is computed as on one device;
        mixed grids, or counts neither divides, run whole."""
        count = pixel_values.shape[0] if grid is None else len(grid)
        grids = None if grid is None else tuple(tuple(np.ravel(g).tolist()) for g in grid)
        axes = _image_axes(self.mesh, count, pixel_values.shape[0])
        if not axes or (grids is not None and len(set(grids)) > 1):
            return fn(pixel_values, grid)
        share = None if grids is None else grids[:count // math.prod(self.mesh.shape[a]
                                                                     for a in axes)]
        spec = jax.sharding.PartitionSpec(axes)
        return jax.shard_map(lambda px: fn(px, share), mesh=self.mesh, in_specs=spec,
                             out_specs=spec, check_vma=False)(pixel_values)


def _image_axes(mesh, count: int, rows: int) -> tuple[str, ...]:
    """The mesh axes to split `count` alike images (`rows` pixel rows) over: all axes larger
    than one, else "data" alone, whichever first divides both; () for none."""
    if mesh is None:
        return ()
    every = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    for axes in (every, ("data",) if mesh.shape["data"] > 1 else ()):
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and count % n == 0 and rows % n == 0:
            return axes
    return ()


def place_at_tokens(base: jax.Array, input_ids: jax.Array, token_id: int, rows: jax.Array
                    ) -> jax.Array:
    """`base [B, T, D]` with `rows [N, D]` written, in order, at the `token_id` positions of
    `input_ids [B, T]` (row-major over the batch): how every family's embedder puts image
    features (and Qwen3-VL's DeepStack features) at the image placeholders."""
    slots = input_ids == token_id
    order = jnp.clip(jnp.cumsum(slots.reshape(-1)) - 1, 0, rows.shape[0] - 1)
    return jnp.where(slots[..., None], rows.astype(base.dtype)[order].reshape(base.shape), base)


def split_embedder(model) -> tuple[Any, Any] | None:
    """`nnx.split(model.embedder())`, or None for a text-only model (no `embedder`)."""
    make = getattr(model, "embedder", None)
    return None if make is None else nnx.split(make())


def embed_images(model, input_ids, pixel_values, grid):
    """`model.embed_inputs` as a program of its own: `(embeddings [B, T, D], additions)`.

    The image grids are static arguments of the vision tower (position tables, attention
    blocks), so a program holding it is compiled once per tuple of grids. Run apart, only this
    program is; the decoder's programs (forward, the calibration passes, GPTQ's walk) take the
    embeddings and are compiled once per batch shape."""
    graphdef, state = nnx.split(model.embedder())
    return embed_split(graphdef, state, input_ids, pixel_values, grid)


@functools.partial(jax.jit, static_argnames=("graphdef", "grid"))
def embed_split(graphdef, state, input_ids, pixel_values, grid):
    """`embed_images` on `split_embedder(model)`, for a caller that calls it once per batch
    (the calibration passes): the split is made once."""
    return nnx.merge(graphdef, state)(input_ids, pixel_values, grid)
