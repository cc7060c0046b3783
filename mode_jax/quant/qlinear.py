"""Packed quantized weights as NNX state, and the packed dense linear (`QLinear`).

A `PackedTensor` holds one `pallas_kernels.packing.PackedWeight` (its docstring has the bit
layout): the uint32 code planes and the scales are `QuantArray` variables, the layout (bits,
K, N, group size, parts) static attributes. `QuantArray` is not an `nnx.Param`, so optimizers
and Param filters (router fine-tuning) never touch packed codes.

`QLinear` replaces an `nnx.Linear` without bias (attention projections, shared experts, dense
MLPs): `y = x @ w` with `w [K, N] = q * s` dequantized from the packed codes (XLA path), or
through the Pallas grouped matmul with a single group (`use_kernels=True`; interpret mode on
CPU). On a mesh (`use_mesh`) the kernel runs once per device on that device's rows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mode_jax.models import moe
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import packing
from pallas_kernels.packing import PackedWeight


class QuantArray(nnx.Variable):
    """Frozen arrays of a quantized model: code planes, scales, expert ids."""


def kernel_options(use_kernels: bool, dequant: str = "") -> dict[str, Any]:
    """Keyword arguments for pallas_kernels' ops: the platform's Pallas kernel (interpret mode
    on CPU) or the XLA dequantize-then-matmul path. `dequant` ("" = the frozen default of the
    backend) picks how the kernel turns codes into operands (`gm.DEQUANT_MODES`)."""
    if not use_kernels:
        return {"backend": "xla", "interpret": False}
    return {"backend": "auto", "interpret": jax.default_backend() == "cpu",
            "dequant": dequant or None}


def check_dequant(dequant: str) -> str:
    """`dequant` if it names a kernel dequant mode ("" = the default), else a clear error."""
    if dequant and dequant not in gm.DEQUANT_MODES:
        raise ValueError(f"kernel dequant {dequant!r} is not one of {gm.DEQUANT_MODES} "
                         "(or '' for the backend's frozen default)")
    return dequant


class PackedTensor(nnx.Module):
    """NNX holder of a (possibly stacked) `PackedWeight`; `.packed` rebuilds it."""

    def __init__(self, packed: PackedWeight):
        if not isinstance(packed, PackedWeight):
            raise ValueError(f"expected a packing.PackedWeight, got {type(packed).__name__}")
        self.planes = nnx.List([QuantArray(p) for p in packed.planes])
        self.scales = QuantArray(packed.scales)
        self.bits, self.k, self.n = packed.bits, packed.k, packed.n
        self.group_size, self.parts = packed.group_size, packed.parts

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            tuple(p[...] for p in self.planes), self.scales[...], self.bits, self.k, self.n,
            self.group_size, self.parts,
        )

    def layout(self) -> dict[str, Any]:
        """JSON description from which `abstract_packed` rebuilds the shapes."""
        return {"bits": self.bits, "k": self.k, "n": self.n, "group_size": self.group_size,
                "parts": self.parts, "batch": list(self.scales.shape[:-2]),
                "scale_dtype": jnp.dtype(self.scales.dtype).name}

    def nbytes(self) -> int:
        return packing.nbytes(self.packed)


def abstract_packed(layout: dict[str, Any]) -> PackedWeight:
    """A zero-valued `PackedWeight` with the shapes of `layout` (use under nnx.eval_shape)."""
    batch = tuple(layout["batch"])
    k, n, gs = layout["k"], layout["n"], layout["group_size"]
    codes = jax.ShapeDtypeStruct((*batch, k, n), jnp.int32)
    scales = jax.ShapeDtypeStruct((*batch, -(-k // gs), n), jnp.dtype(layout["scale_dtype"]))

    def build(c, s):
        return packing.pack(c, s, layout["bits"], group_size=gs, parts=layout["parts"])

    shapes = jax.eval_shape(build, codes, scales)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


class QLinear(nnx.Module):
    """Packed replacement of a bias-free `nnx.Linear`: `x [..., K] -> [..., N]` in x's dtype."""

    def __init__(self, packed: PackedWeight, *, use_kernels: bool = False,
                 kernel_dequant: str = ""):
        if packed.scales.ndim != 2:
            raise ValueError(f"QLinear takes one [K, N] kernel, got scales {packed.scales.shape}")
        self.weight = PackedTensor(packed)
        self.use_kernels = use_kernels
        self.kernel_dequant = check_dequant(kernel_dequant)
        self.mesh = None

    def use_mesh(self, mesh: jax.sharding.Mesh) -> None:
        """Run the kernel path partitioned over `mesh` (`linear_on_mesh`); called by
        `sharding.shard_model`. The weight stays replicated: dense layers are a few percent
        of a MoE model's bytes."""
        self.mesh = mesh

    @property
    def in_features(self) -> int:
        return self.weight.k

    @property
    def out_features(self) -> int:
        return self.weight.n

    def dequantized_kernel(self, dtype=jnp.float32) -> jax.Array:
        """The kernel `[K, N]` these codes stand for."""
        return packing.dequantize(self.weight.packed, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight.packed
        if x.shape[-1] != w.k:
            raise ValueError(f"QLinear expects inputs [..., {w.k}], got {x.shape}")
        if not self.use_kernels:
            return x @ packing.dequantize(w, x.dtype)
        flat = x.reshape(-1, w.k)
        if self.mesh is not None and self.mesh.size > 1:
            y = linear_on_mesh(flat, w, mesh=self.mesh, kernel_dequant=self.kernel_dequant)
        else:
            y = linear(flat, w, kernel_dequant=self.kernel_dequant)
        return y.reshape(*x.shape[:-1], w.n)


def linear(x: jax.Array, w: PackedWeight, *, kernel_dequant: str = "") -> jax.Array:
    """`x [M, K] @ w` through the Pallas grouped matmul with one group of M rows."""
    stacked = jax.tree.map(lambda a: a[None], w)
    sizes = jnp.full((1,), x.shape[0], jnp.int32)
    return gm.grouped_matmul(x, stacked, sizes, **kernel_options(True, kernel_dequant))


@functools.partial(jax.jit, static_argnames=("mesh", "kernel_dequant"))
def linear_on_mesh(x: jax.Array, w: PackedWeight, *, mesh: jax.sharding.Mesh,
                   kernel_dequant: str = "") -> jax.Array:
    """`linear` as one program per device of `mesh` (`jax.shard_map`): XLA does not partition
    a Pallas kernel call, so without this it would gather every row onto each device and run
    the whole matmul there. Rows split as `moe.row_spec` says; the weight is replicated. Each
    row is computed as on one device (no collective)."""
    rows = moe.row_spec(x.shape[0], mesh)
    return jax.shard_map(functools.partial(linear, kernel_dequant=kernel_dequant), mesh=mesh,
                         in_specs=(rows, jax.sharding.PartitionSpec()), out_specs=rows,
                         check_vma=False)(x, w)
