"""Routed experts of one MoE layer, packed per bit-width group (docs/design.md).

`QuantizedExperts` keeps `StackedExperts`' call, `(x [N, D], ids [N, k], weights [N, k]) ->
[N, D]`, and holds one `BitGroup` per bit-width present in the layer (`groups["b3"]`):
`expert_ids [G]` int32 and the packed `gate_up [G, D, 2F]` (packed with parts=2: gate columns
first, the up half starting at a 128-aligned column) and `down [G, F, D]`. The expert ids of
all groups partition `range(E)`; a width no expert uses has no group.

Forward: the experts are renumbered so each bit group is contiguous (group order = ascending
bits, ids in each group's order), the (token, slot) pairs are sorted once by the new number
(`moe.dispatch`), and one grouped SwiGLU then one down projection from `pallas_kernels` run
over all groups at once (each call takes the groups' packed weights as a sequence, so a layer
costs two kernel launches whatever its mix of widths; the XLA path computes group by group).
`use_kernels=True` runs the Pallas kernel (interpret mode on CPU); False the XLA dequantize +
`ragged_dot` path. Groups or experts without tokens produce zeros, and decode (a few tokens)
takes the same path as prefill. On a mesh (`sharding.shard_model` calls `use_mesh`) each group
is padded with phantom experts to a multiple of the "expert" axis and split over it, and the
forward runs once per device on its experts and rows (`experts_forward_on_mesh`).

Optional rotation (`rotate_in`, `rotate_mid`: block sizes, 0 = off): a block-diagonal
normalised Hadamard matrix R (blocks of b rows, `R = R^T = R^-1`) applied to the input of
gate/up (x -> x R) and of down (a -> a R), with weights stored as `R W`, so
`(x R)(R W) = x W` exactly in real arithmetic. This is the per-group variant of QuaRot's
rotation: blocks no longer than the quantization group spread outliers across the rows that
share a scale and need no Hadamard order other than powers of two (Kimi-VL's F = 1408 = 11 x 128
has none at full width).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import moe
from mode_jax.quant.qlinear import (
    PackedTensor,
    QuantArray,
    abstract_packed,
    check_dequant,
    kernel_options,
)
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import packing
from pallas_kernels.packing import PackedWeight


class GroupWeights(NamedTuple):
    """One bit-width group: expert ids `[G]`, packed gate_up `[G, D, 2F]` (parts=2), down
    `[G, F, D]`."""

    expert_ids: Any
    gate_up: PackedWeight
    down: PackedWeight


# ---------------------------------------------------------------- Hadamard rotation


def hadamard_block(k: int, max_block: int) -> int:
    """The largest power of two <= max_block that divides k (1 means no rotation)."""
    b = 1
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    return b


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalised Sylvester Hadamard matrix `[n, n]` float32 (n a power of two): symmetric and
    orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotate(x: jax.Array, block: int) -> jax.Array:
    """`x [..., K] -> x R` with R block-diagonal Hadamard of `block` (0 or 1: identity)."""
    if block <= 1:
        return x
    k = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(block))
    y = jnp.matmul(x.reshape(*x.shape[:-1], k // block, block).astype(jnp.float32), h,
                   precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape).astype(x.dtype)


def rotate_rows(w: jax.Array, block: int) -> jax.Array:
    """`w [..., K, N] -> R w` (R symmetric, so this is the weight side of `rotate`)."""
    if block <= 1:
        return w
    return jnp.swapaxes(rotate(jnp.swapaxes(w, -1, -2), block), -1, -2)


def rotate_hessian(h: jax.Array, block: int) -> jax.Array:
    """`R H R` for `H [..., K, K]`: the Hessian of the rotated inputs `x R`."""
    return rotate(rotate_rows(h, block), block)


# ---------------------------------------------------------------- modules


class BitGroup(nnx.Module):
    """Experts quantized at one bit-width; on a mesh, followed by `padding` phantom experts."""

    def __init__(self, group: GroupWeights):
        self.expert_ids = QuantArray(jnp.asarray(group.expert_ids, jnp.int32))
        self.gate_up = PackedTensor(group.gate_up)
        self.down = PackedTensor(group.down)
        self.padding = 0

    @property
    def size(self) -> int:
        """Real experts (phantoms excluded)."""
        return self.expert_ids.shape[0] - self.padding

    def pad_to_multiple(self, n: int) -> None:
        """Append phantom experts (id -1, zero codes and scales: no token reaches them, and a
        zero scale makes their weights zero) until the stacked arrays split into n equal
        shares along the expert axis; n = 1 removes them. Readers of the group (`size`, the
        module's `bits`, `dequantized`, `layout`, serialization) see the real experts only."""
        size = self.size
        want = -size % n
        if want == self.padding:
            return
        for v in (self.expert_ids, *self.gate_up.planes, self.gate_up.scales,
                  *self.down.planes, self.down.scales):
            a = v[...][:size]
            fill = -1 if v is self.expert_ids else 0
            v.set_value(jnp.pad(a, [(0, want)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
                        if want else a)
        self.padding = want

    @property
    def bits(self) -> int:
        return self.gate_up.bits


class QuantizedExperts(nnx.Module):
    """Packed mixed-bit routed experts with `StackedExperts`' call (module docstring)."""

    def __init__(self, groups: Mapping[int, GroupWeights], num_experts: int, *,
                 rotate_in: int = 0, rotate_mid: int = 0, use_kernels: bool = False,
                 kernel_dequant: str = ""):
        groups = {int(b): g for b, g in groups.items()}
        _check_groups(groups, num_experts)
        self.groups = nnx.Dict({f"b{b}": BitGroup(groups[b]) for b in sorted(groups)})
        self.num_experts = num_experts
        first = groups[min(groups)]
        self.dim, self.hidden = first.gate_up.k, first.down.k
        self.rotate_in, self.rotate_mid = rotate_in, rotate_mid
        self.use_kernels = use_kernels
        self.kernel_dequant = check_dequant(kernel_dequant)
        self.mesh = None  # set by use_mesh

    def bits(self) -> np.ndarray:
        """Bits per expert `[E]` int32."""
        out = np.zeros(self.num_experts, np.int32)
        for g in self.groups.values():
            out[np.asarray(g.expert_ids[...])[: g.size]] = g.bits
        return out

    def dequantized(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """Full-size `gate_up [E, D, 2F]`, `down [E, F, D]` these codes stand for (rotation
        undone): the fake-quantized `StackedExperts` weights."""
        e = self.num_experts
        gate_up = jnp.zeros((e, self.dim, 2 * self.hidden), jnp.float32)
        down = jnp.zeros((e, self.hidden, self.dim), jnp.float32)
        for g in self.groups.values():
            ids = g.expert_ids[...][: g.size]
            gate_up = gate_up.at[ids].set(
                packing.dequantize(g.gate_up.packed, jnp.float32)[: g.size])
            down = down.at[ids].set(packing.dequantize(g.down.packed, jnp.float32)[: g.size])
        gate_up = rotate_rows(gate_up, self.rotate_in)
        down = rotate_rows(down, self.rotate_mid)
        return gate_up.astype(dtype), down.astype(dtype)

    def layout(self) -> dict[str, Any]:
        """JSON description from which `abstract_experts` rebuilds the module's shapes."""
        return {
            "num_experts": self.num_experts, "rotate_in": self.rotate_in,
            "rotate_mid": self.rotate_mid,
            "groups": {name: {"size": g.size,  # real experts: a mesh's padding is not stored
                              "gate_up": {**g.gate_up.layout(), "batch": [g.size]},
                              "down": {**g.down.layout(), "batch": [g.size]}}
                       for name, g in self.groups.items()},
        }

    def use_mesh(self, mesh: jax.sharding.Mesh) -> None:
        """Run the forward partitioned over `mesh` (`experts_forward_on_mesh`), each bit group
        padded with phantom experts to a multiple of the "expert" axis; called by
        `sharding.shard_model` before it splits the groups' packed arrays over that axis."""
        for g in self.groups.values():
            g.pad_to_multiple(mesh.shape["expert"])
        self.mesh = mesh

    def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        groups = tuple(
            GroupWeights(g.expert_ids[...], g.gate_up.packed, g.down.packed)
            for g in self.groups.values())
        options = dict(rotate_in=self.rotate_in, rotate_mid=self.rotate_mid,
                       use_kernels=self.use_kernels, kernel_dequant=self.kernel_dequant)
        if self.mesh is not None and self.mesh.size > 1:
            return experts_forward_on_mesh(groups, x, ids, weights, mesh=self.mesh, **options)
        return experts_forward(groups, x, ids, weights, **options)


@functools.partial(jax.jit,
                   static_argnames=("rotate_in", "rotate_mid", "use_kernels", "kernel_dequant"))
def experts_forward(groups: tuple[GroupWeights, ...], x, ids, weights, *, rotate_in: int = 0,
                    rotate_mid: int = 0, use_kernels: bool = False,
                    kernel_dequant: str = "") -> jax.Array:
    """The pure forward of `QuantizedExperts` (module docstring): x `[N, D]`, ids/weights
    `[N, k]` -> `[N, D]`; `groups` in the contiguous-renumbering order; `kernel_dequant` as in
    `qlinear.kernel_options`."""
    order = jnp.concatenate([g.expert_ids for g in groups])
    num_experts = order.shape[0]
    rank = jnp.zeros(num_experts, jnp.int32).at[order].set(
        jnp.arange(num_experts, dtype=jnp.int32))
    y, d = _grouped_ffn(groups, x, rank[ids], num_experts, rotate_in, rotate_mid,
                        kernel_options(use_kernels, kernel_dequant))
    return moe.combine(y, d, weights)


def _grouped_ffn(groups, x, slots, num_slots, rotate_in, rotate_mid, opts):
    """The groups' SwiGLU FFN on the (token, slot) pairs sorted by `slots [N, k]` (each pair's
    position in the groups' concatenated experts; `num_slots` = that length, or one more: an
    overflow bucket past every group, whose rows the kernels leave zero)."""
    x = rotate(x, rotate_in)
    d = moe.dispatch(x, slots, num_slots)
    sizes = d.group_sizes[: sum(g.expert_ids.shape[0] for g in groups)]
    gate_up = tuple(g.gate_up for g in groups)
    down = tuple(g.down for g in groups)
    a = rotate(gm.grouped_swiglu(d.x_sorted, gate_up, sizes, **opts), rotate_mid)
    return gm.grouped_matmul(a, down, sizes, **opts), d


@functools.partial(jax.jit, static_argnames=("mesh", "rotate_in", "rotate_mid", "use_kernels",
                                             "kernel_dequant"))
def experts_forward_on_mesh(groups: tuple[GroupWeights, ...], x, ids, weights, *,
                            mesh: jax.sharding.Mesh, rotate_in: int = 0, rotate_mid: int = 0,
                            use_kernels: bool = False, kernel_dequant: str = "") -> jax.Array:
    """`experts_forward` as one program per device of `mesh` (`jax.shard_map`), so that the
    Pallas kernels run on each device's share instead of on gathered operands (XLA does not
    partition a kernel call).

    Tokens: rows split as `moe.row_spec` says. Experts: each bit
    group's stacked arrays are split over "expert" (a device holds G/n experts, so a model
    larger than one device fits across several); `QuantizedExperts.use_mesh` pads the groups
    to multiples of n with phantom experts (id -1, never routed to). Each device runs the
    kernels on the (token, slot) pairs of its own experts (the others go to an overflow bucket
    the kernels skip), weights their outputs, and the partial sums are added over "expert" in
    float32. Equals `experts_forward` to float rounding, not bit for bit: a token's k weighted
    outputs are summed in another order (measured: 2e-9 on the tiny model's layer, 1e-7 on its
    logits). Summing the per-slot outputs `[N*k, D]` instead (each added to zeros only, then
    weighted as on one device) moves k/2 times the bytes and on XLA:CPU still differed by the
    same 2e-9, so it bought no exactness.
    """
    n = mesh.shape["expert"]
    P = jax.sharding.PartitionSpec
    rows = moe.row_spec(x.shape[0], mesh)
    sizes = [g.expert_ids.shape[0] for g in groups]
    if any(size % n for size in sizes):
        raise ValueError(f"bit groups of {sizes} experts do not split over {n} devices: "
                         "place the model with sharding.shard_model (it pads them)")
    experts = P("expert") if n > 1 else P()
    group_specs = tuple(GroupWeights(P(), experts, experts) for _ in groups)
    num_slots = sum(sizes)  # phantoms included: greater than every routed id
    opts = kernel_options(use_kernels, kernel_dequant)

    def local(groups, x, ids, weights):
        j = jax.lax.axis_index("expert")  # this device's share of each group (ids replicated)
        local_groups = tuple(
            g._replace(expert_ids=jax.lax.dynamic_slice_in_dim(g.expert_ids, j * m, m))
            for g, m in zip(groups, [size // n for size in sizes], strict=True))
        order = jnp.concatenate([g.expert_ids for g in local_groups])
        num_local = order.shape[0]
        slot = jnp.full(num_slots, num_local, jnp.int32).at[  # phantoms (-1) dropped
            jnp.where(order < 0, num_slots, order)].set(
                jnp.arange(num_local, dtype=jnp.int32), mode="drop")
        y, d = _grouped_ffn(local_groups, x, slot[ids], num_local + 1, rotate_in, rotate_mid,
                            opts)
        return jax.lax.psum(moe.combine(y.astype(jnp.float32), d, weights), "expert")

    out = jax.shard_map(local, mesh=mesh, in_specs=(group_specs, rows, rows, rows),
                        out_specs=rows, check_vma=False)(groups, x, ids, weights)
    return out.astype(x.dtype)


def from_codes(bits, gate_up_codes, gate_up_scales, down_codes, down_scales, *,
               group_size: int = 128, rotate_in: int = 0, rotate_mid: int = 0,
               use_kernels: bool = False) -> QuantizedExperts:
    """Pack per-expert codes into bit groups.

    bits `[E]`; gate_up codes `[E, D, 2F]` / scales `[E, ceil(D/gs), 2F]`; down codes
    `[E, F, D]` / scales `[E, ceil(F/gs), D]` (codes in each expert's signed range; the
    scales' dtype is the stored one). With rotation the codes are those of `R W`.
    """
    bits = np.asarray(bits)
    e = gate_up_codes.shape[0]
    if bits.shape != (e,):
        raise ValueError(f"bits must be [E={e}], got shape {bits.shape}")
    groups = {}
    for b in np.unique(bits):
        idx = np.flatnonzero(bits == b)
        groups[int(b)] = GroupWeights(
            idx,
            packing.pack(gate_up_codes[idx], gate_up_scales[idx], int(b),
                         group_size=group_size, parts=2),
            packing.pack(down_codes[idx], down_scales[idx], int(b), group_size=group_size),
        )
    return QuantizedExperts(groups, e, rotate_in=rotate_in, rotate_mid=rotate_mid,
                            use_kernels=use_kernels)


def abstract_experts(layout: Mapping[str, Any], use_kernels: bool = False) -> QuantizedExperts:
    """Zero-valued `QuantizedExperts` with `layout`'s shapes (call under nnx.eval_shape)."""
    groups = {}
    for name, g in layout["groups"].items():
        groups[int(name[1:])] = GroupWeights(
            jnp.zeros((g["size"],), jnp.int32), abstract_packed(g["gate_up"]),
            abstract_packed(g["down"]))
    return QuantizedExperts(groups, layout["num_experts"], rotate_in=layout["rotate_in"],
                            rotate_mid=layout["rotate_mid"], use_kernels=use_kernels)


def _check_groups(groups: dict[int, GroupWeights], num_experts: int) -> None:
    """Each group's shapes agree; concrete expert ids partition range(num_experts)."""
    if not groups:
        raise ValueError("QuantizedExperts needs at least one bit group")
    dims = set()
    for b, g in groups.items():
        if b not in packing.SUPPORTED_BITS:
            raise ValueError(f"bit group b{b}: allowed bits {packing.SUPPORTED_BITS}")
        if g.gate_up.bits != b or g.down.bits != b:
            raise ValueError(f"bit group b{b} holds {g.gate_up.bits}/{g.down.bits}-bit weights")
        if g.gate_up.parts != 2:
            raise ValueError(f"bit group b{b}: gate_up must be packed with parts=2")
        size = np.shape(g.expert_ids)[0]
        if g.gate_up.batch_shape != (size,) or g.down.batch_shape != (size,):
            raise ValueError(f"bit group b{b}: {size} expert ids but weights stacked "
                             f"{g.gate_up.batch_shape} / {g.down.batch_shape}")
        dims.add((g.gate_up.k, g.gate_up.n, g.down.k, g.down.n))
    (d, two_f, f, d_out), *rest = dims
    if rest or two_f != 2 * f or d_out != d:
        raise ValueError(f"bit groups disagree on expert shapes (D, 2F, F, D): {sorted(dims)}")
    ids = [g.expert_ids for g in groups.values()]
    if any(isinstance(i, jax.core.Tracer) for i in ids):
        return
    flat = np.sort(np.concatenate([np.asarray(i).reshape(-1) for i in ids]))
    if not np.array_equal(flat, np.arange(num_experts)):
        raise ValueError(f"expert ids of the bit groups must partition range({num_experts}); "
                         f"got {flat.tolist()}")
