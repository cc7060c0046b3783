"""Placing a model and its batches on a `jax.sharding.Mesh` with axes ("data", "expert").

Routed-expert stacks (`experts.gate_up [E, D, 2F]`, `experts.down [E, F, D]`, and a packed
model's bit groups) are split along their expert axis over "expert" (expert parallelism: they
hold ~95% of a MoE model's bytes); everything else is replicated. Batches are split along
their batch axis over "data" (data parallelism: the calibration passes, GPTQ's walk, the model
families' `__call__` and greedy generation put each batch where the model is,
`place_inputs`). XLA propagates these placements through the jitted forwards (axis types are
Auto) and inserts the collectives, except where a module partitions its own forward with a
`jax.shard_map` (`use_mesh`): the float routed experts (`StackedExperts`: left to XLA, the
sorted path would gather every layer's experts onto each device, or with replicated experts
sort every row on each device and all-reduce the output), the routers (XLA gathers every row's
scores for the top-k) and the packed model's experts and dense layers (`QuantizedExperts`,
`QLinear`: XLA cannot split a Pallas kernel).
Multi-host jobs call `multihost.initialize()` first (main.py --distributed), after
which `jax.devices()` spans every host and the same mesh code applies.
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mode_jax.convert.mapping import path_str

log = logging.getLogger(__name__)
EXPERT_PARAMS = ("experts.gate_up", "experts.down")
# A packed model's bit groups (`quant.quantized_moe`): code planes and scales, expert axis first.
PACKED_EXPERT_PARAM = re.compile(r"experts\.groups\.b\d+\.(gate_up|down)\.(planes\.\d+|scales)$")


def make_mesh(expert: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "expert") mesh over `devices` (default all); data = devices / expert."""
    devices = list(devices if devices is not None else jax.devices())
    if expert < 1 or len(devices) % expert:
        raise ValueError(f"expert axis {expert} does not divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // expert, expert)
    return jax.sharding.Mesh(grid, ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


def param_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Expert stacks (float, or a packed bit group's planes and scales) over "expert" when their
    expert count divides evenly; else replicated."""
    n = mesh.shape["expert"]
    expert_stack = path.endswith(EXPERT_PARAMS) or PACKED_EXPERT_PARAM.search(path)
    if expert_stack and n > 1 and shape[0] % n == 0:
        return PartitionSpec("expert")
    return PartitionSpec()


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Move every parameter of `model` to its placement on `mesh` (in place; returns model).
    Modules that partition their own forward (`use_mesh`: the routed experts, float or packed,
    and the packed dense layers) are told the mesh first."""
    partitioned = [node for _, node in nnx.iter_graph(model)
                   if isinstance(node, nnx.Module) and hasattr(node, "use_mesh")]
    for node in partitioned:  # first: they may pad their arrays to split evenly
        node.use_mesh(mesh)
    placed, whole = [], set()
    for p, v in nnx.to_flat_state(nnx.state(model)):
        value = v[...]
        spec = param_spec(path_str(p), np.shape(value), mesh)
        split = mesh.shape["expert"] > 1 and path_str(p).endswith(EXPERT_PARAMS)
        if split and spec == PartitionSpec():
            whole.add(np.shape(value)[0])
        placed.append((p, v.replace(jax.device_put(value, NamedSharding(mesh, spec)))))
    nnx.update(model, nnx.from_flat_state(placed))
    if whole:  # valid, but the memory expert parallelism was asked for is not saved
        log.warning("routed-expert stacks of %s experts do not split evenly over the mesh's "
                    "expert axis of %d devices, so every device holds them whole; pick an "
                    "expert axis that divides the expert count", sorted(whole),
                    mesh.shape["expert"])
    return model


def model_mesh(model: nnx.Module) -> jax.sharding.Mesh | None:
    """The mesh `shard_model` placed `model` on, or None: a model on one device, or placed
    by other code on a mesh without a "data" axis (its batches are left as they come)."""
    for _, node in nnx.iter_graph(model):  # called per forward: reads the first array only
        if not isinstance(node, nnx.Variable):
            continue
        s = getattr(node.get_value(), "sharding", None)
        if s is None:
            continue
        # `shard_model` places every variable, so the first tells where the model is
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh if "data" in s.mesh.axis_names else None
        return None
    return None


def per_device(fn, arrays: tuple, mesh: jax.sharding.Mesh | None, **options):
    """`fn(*arrays, **options)` for work that is independent along the arrays' leading axis
    (GPTQ's per-expert solves: on replicated experts every device would repeat all of them),
    run as one `jax.shard_map` program per device of `mesh` on its share of that axis. Nothing
    inside crosses devices (left to XLA's partitioner, a split stack's compiled solve still
    held an all-gather on 2 host devices). Plainly `fn(*arrays, **options)` without a mesh or
    when the axis does not divide evenly; the outputs' leading axes are that axis. `fn` and the
    (hashable) `options` key the compiled program, so a walk over many stacks compiles once."""
    axes = () if mesh is None else tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    if not axes or any(np.shape(a)[0] % mesh.size for a in arrays):
        return fn(*arrays, **options)
    return _per_device(fn, tuple(arrays), mesh, axes, tuple(sorted(options.items())))


@functools.partial(jax.jit, static_argnames=("fn", "mesh", "axes", "options"))
def _per_device(fn, arrays, mesh, axes, options):
    spec = PartitionSpec(axes)
    return jax.shard_map(functools.partial(fn, **dict(options)), mesh=mesh,
                         in_specs=(spec,) * len(arrays), out_specs=spec,
                         check_vma=False)(*arrays)


def array_mesh(value) -> jax.sharding.Mesh | None:
    """The ("data", "expert") mesh of more than one device that `value` lies on, or None."""
    s = getattr(value, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1 and "data" in s.mesh.axis_names:
        return s.mesh
    return None


# The batch axis of each model input that has one (M-RoPE positions are [3, B, T]); the image
# grids are static metadata, read on the host.
BATCH_AXES = {"input_ids": 0, "attention_mask": 0, "inputs_embeds": 0, "positions": -2,
              "image_query_mask": 0}
HOST_KEYS = ("image_grid_hws", "image_grid_thw", "image_num_patches")


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Model inputs on `mesh`: batch-major arrays split over "data" along their batch axis when
    it divides evenly (each data slice of devices runs its share of the samples), every other
    array replicated; static metadata (image grids, None) stays as it is.

    `pixel_values` holds all images' patches concatenated (ragged per sample), so it stays
    replicated. A multi-process job passes the same batch on every process (the runner checks
    that they computed the same), and each process keeps its own devices' share.
    """
    n = mesh.shape["data"]
    out = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, (np.ndarray, jax.Array)) or key in HOST_KEYS:
            continue
        axis = BATCH_AXES.get(key)
        spec = PartitionSpec()
        if axis is not None and n > 1 and value.ndim >= 2 and value.shape[axis] % n == 0:
            axis %= value.ndim
            spec = PartitionSpec(*([None] * axis), "data")
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


def place_inputs(model: nnx.Module, arrays: dict) -> dict:
    """`arrays` (a model's inputs) where `model` is: split over its mesh's "data" axis by
    `shard_batch`, or unchanged for a model on one device."""
    mesh = model_mesh(model)
    return arrays if mesh is None else shard_batch(arrays, mesh)
