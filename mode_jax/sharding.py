"""Placing a model and its batches on a `jax.sharding.Mesh` with axes ("data", "expert").

Routed-expert stacks (`experts.gate_up [E, D, 2F]`, `experts.down [E, F, D]`) are split along
their expert axis over "expert" (expert parallelism: they hold ~95% of a MoE model's bytes);
everything else is replicated. Batches are split along their batch axis over "data". The jitted
forward is unchanged: XLA propagates these placements (axis types are Auto) and inserts the
collectives. Multi-host jobs call `multihost.initialize()` first (main.py --distributed), after
which `jax.devices()` spans every host and the same mesh code applies.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mode_jax.convert.mapping import path_str

EXPERT_PARAMS = ("experts.gate_up", "experts.down")


def make_mesh(expert: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "expert") mesh over `devices` (default all); data = devices / expert."""
    devices = list(devices if devices is not None else jax.devices())
    if expert < 1 or len(devices) % expert:
        raise ValueError(f"expert axis {expert} does not divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // expert, expert)
    return jax.sharding.Mesh(grid, ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


def param_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Expert stacks over "expert" when their expert count divides evenly; else replicated."""
    n = mesh.shape["expert"]
    if path.endswith(EXPERT_PARAMS) and n > 1 and shape[0] % n == 0:
        return PartitionSpec("expert")
    return PartitionSpec()


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Move every parameter of `model` to its placement on `mesh` (in place; returns model)."""
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    placed = []
    for p, v in flat:
        value = v[...]
        spec = param_spec(path_str(p), np.shape(value), mesh)
        placed.append((p, v.replace(jax.device_put(value, NamedSharding(mesh, spec)))))
    nnx.update(model, nnx.from_flat_state(placed))
    return model


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Token arrays split over "data" along the batch axis when it divides; images replicated.

    `pixel_values` holds all images' patches concatenated (ragged per sample), so it stays
    replicated; `image_grid_hws` is static metadata and stays on the host.
    """
    n = mesh.shape["data"]
    out = dict(batch)
    for key in ("input_ids", "attention_mask"):
        if key in batch:
            a = np.asarray(batch[key])
            spec = PartitionSpec("data") if a.shape[0] % n == 0 else PartitionSpec()
            out[key] = jax.device_put(a, NamedSharding(mesh, spec))
    if "pixel_values" in batch:
        out["pixel_values"] = jax.device_put(np.asarray(batch["pixel_values"]),
                                             NamedSharding(mesh, PartitionSpec()))
    return out
