"""Pure routing and routed-expert math shared by the MoE language models.

Routing (`route`) turns router logits `[T, E]` into expert ids `[T, k]` int32 and weights
`[T, k]` float32. Routed experts are stacked per layer, `gate_up [E, D, 2F]` (gate columns `[:F]`,
up columns `[F:]`) and `down [E, F, D]`, and computed two ways that agree:

- `experts_dense`: every expert on every token, then a weighted sum (simple; vmaps; O(E) work);
- `experts_sorted`: tokens sorted by expert and fed to a grouped matmul (`jax.lax.ragged_dot`
  on GPU/TPU, blocks on CPU: `grouped_matmul`), O(k) work. `jax.vmap` over `ragged_dot` is not
  implemented on CPU: flatten batch and tokens.

The sorted path is split into `dispatch` -> a `GroupedFFN` -> `combine`, so a quantized expert
implementation only has to supply its own grouped FFN `(x_sorted [N, D], group_sizes [E]) ->
[N, D]` and can reuse the dispatch and the float32 combine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mode_jax.models import field_types, grouped_matmul

GroupedFFN = Callable[[jax.Array, jax.Array], jax.Array]

SCORINGS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How router logits choose experts.

    Attributes:
      num_experts: E.
      top_k: experts per token.
      scoring: "sigmoid" (DeepSeek-V3, Kimi-VL) or "softmax" (Qwen3-MoE) scores over experts.
      n_group, topk_group: group-limited routing: experts are split into n_group contiguous
        groups, only the topk_group best groups may be chosen (n_group = 1 disables it).
      group_score: how a group is ranked: "top2_sum" (sum of its two best biased scores,
        DeepSeek-V3 `noaux_tc`) or "max" (its best score, DeepSeek-V2 `group_limited_greedy`).
      norm_topk_prob: renormalise the k chosen (unbiased) scores to sum to one (+1e-20).
      routed_scaling_factor: multiplies the final weights.
    """

    num_experts: int
    top_k: int
    scoring: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        field_types.check(self)
        e, k, g = self.num_experts, self.top_k, self.n_group
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if not 1 <= k <= e:
            raise ValueError(f"top_k must be in [1, num_experts={e}], got {k}")
        if g < 1 or e % g:
            raise ValueError(f"n_group={g} must be >= 1 and divide num_experts={e}")
        if not 1 <= self.topk_group <= g:
            raise ValueError(f"topk_group must be in [1, n_group={g}], got {self.topk_group}")
        if g > 1 and self.topk_group * (e // g) < k:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {e // g} experts cannot hold top_k={k}"
            )
        if g > 1 and self.group_score == "top2_sum" and e // g < 2:
            raise ValueError(f"group_score 'top2_sum' needs >= 2 experts per group, got {e // g}")


def route(
    logits: jax.Array, cfg: RouterConfig, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Choose experts: ids `[T, k]` int32 and weights `[T, k]` float32 from logits `[T, E]`.

    `bias [E]` (the `noaux_tc` correction bias) is added to the scores only to *choose* experts
    (groups and top-k); the weights come from the unbiased scores. Ties among exactly equal
    scores go to the lower expert index (`lax.top_k`); torch.topk breaks such ties in an
    unspecified order, so only the chosen values, not the indices, are defined there. Experts
    outside the chosen groups are excluded with -inf (as transformers does; Kimi-VL's published
    code fills 0.0 instead, which differs only when a biased score in a chosen group is < 0
    and n_group > 1).
    """
    logits = logits.astype(jnp.float32)
    if cfg.scoring == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        choice = _limit_to_groups(choice, cfg)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return ids.astype(jnp.int32), weights.astype(jnp.float32)


def route_on_mesh(logits: jax.Array, cfg: RouterConfig, bias: jax.Array | None,
                  mesh: jax.sharding.Mesh | None) -> tuple[jax.Array, jax.Array]:
    """`route`, on a mesh as one `jax.shard_map` program per device on its own rows
    (`row_spec`): XLA's partitioner would all-gather every token's scores for the top-k."""
    P = jax.sharding.PartitionSpec
    rows = P() if mesh is None else row_spec(logits.shape[0], mesh)
    if rows == P():  # one device, or rows the data axis does not split
        return route(logits, cfg, bias)
    return jax.shard_map(lambda x, b: route(x, cfg, b), mesh=mesh, in_specs=(rows, P()),
                         out_specs=(rows, rows), check_vma=False)(logits, bias)


class UsesMesh:
    """A module that partitions its own forward over its model's mesh (`jax.shard_map`):
    the routers and the float routed experts. `sharding.shard_model` calls `use_mesh`;
    `self.mesh` None: one device, or no mesh."""

    mesh = None

    def use_mesh(self, mesh: jax.sharding.Mesh) -> None:
        self.mesh = mesh if mesh.size > 1 else None


def _limit_to_groups(choice: jax.Array, cfg: RouterConfig) -> jax.Array:
    """Set the scores of experts outside the topk_group best groups to -inf."""
    t, e = choice.shape
    grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
    if cfg.group_score == "top2_sum":
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        group_scores = grouped.max(-1)
    _, best = jax.lax.top_k(group_scores, cfg.topk_group)
    keep = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
    keep = jnp.repeat(keep, e // cfg.n_group, axis=1)
    return jnp.where(keep, choice, -jnp.inf)


# ---------------------------------------------------------------- routed experts


def swiglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """One expert: `x [N, D]`, `gate_up [D, 2F]`, `down [F, D]` -> `[N, D]` in x's dtype."""
    f = down.shape[0]
    h = x @ gate_up
    return (jax.nn.silu(h[..., :f]) * h[..., f:]) @ down


def experts_dense(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """Weighted sum of the chosen experts, computing every expert for every token.

    x `[T, D]`, ids/weights `[T, k]`, gate_up `[E, D, 2F]`, down `[E, F, D]` -> `[T, D]`.
    """
    e, f = down.shape[0], down.shape[1]
    h = jnp.einsum("td,edf->etf", x, gate_up)
    y = jnp.einsum("etf,efd->etd", jax.nn.silu(h[..., :f]) * h[..., f:], down)  # [E, T, D]
    mix = jnp.zeros((x.shape[0], e), jnp.float32)
    mix = mix.at[jnp.arange(x.shape[0])[:, None], ids].add(weights.astype(jnp.float32))
    return jnp.einsum("te,etd->td", mix, y.astype(jnp.float32)).astype(x.dtype)


class Dispatch(NamedTuple):
    """Tokens sorted by expert: `x_sorted [T*k, D]`, `group_sizes [E]` int32, `order [T*k]`.

    `order[i]` is the flat `(token * k + slot)` index of sorted row i.
    """

    x_sorted: jax.Array
    group_sizes: jax.Array
    order: jax.Array


def dispatch(x: jax.Array, ids: jax.Array, num_experts: int) -> Dispatch:
    """Sort the `T*k` (token, slot) pairs by expert id (stable) and gather their inputs."""
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Dispatch(x[order // k], group_sizes, order)


def combine(y_sorted: jax.Array, d: Dispatch, weights: jax.Array) -> jax.Array:
    """Undo the sort and sum the k expert outputs per token in float32: -> `[T, D]`."""
    t, k = weights.shape
    y = jnp.zeros_like(y_sorted).at[d.order].set(y_sorted).reshape(t, k, -1)
    out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights.astype(jnp.float32))
    return out.astype(y_sorted.dtype)


def swiglu_grouped(gate_up: jax.Array, down: jax.Array) -> GroupedFFN:
    """The grouped FFN of full-precision stacked experts: `jax.lax.ragged_dot`, or on CPU both
    matmuls block by block in one padded layout (`grouped_matmul.blocked_apply`)."""
    f = down.shape[1]

    def ffn(x_sorted, group_sizes):
        if grouped_matmul.use_blocks():
            return grouped_matmul.blocked_apply(x_sorted, group_sizes, swiglu, (gate_up, down),
                                                down.shape[-1])
        h = jax.lax.ragged_dot(x_sorted, gate_up, group_sizes)
        a = jax.nn.silu(h[..., :f]) * h[..., f:]
        return jax.lax.ragged_dot(a, down, group_sizes)

    return ffn


def moe_sorted(
    x: jax.Array, ids: jax.Array, weights: jax.Array, num_experts: int, ffn: GroupedFFN
) -> jax.Array:
    """Dispatch -> any grouped FFN -> combine: x `[T, D]`, ids/weights `[T, k]` -> `[T, D]`."""
    d = dispatch(x, ids, num_experts)
    return combine(ffn(d.x_sorted, d.group_sizes), d, weights)


def experts_sorted(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """Same result as `experts_dense`, computing only the chosen (token, expert) pairs."""
    return moe_sorted(x, ids, weights, gate_up.shape[0], swiglu_grouped(gate_up, down))


def row_spec(rows: int, mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
    """How the token rows of a layer partitioned per device (`jax.shard_map`) are split: over
    "data" when it divides them (where `sharding.shard_batch` put the batch, so nothing
    moves), else replicated (one token of a decode step). Not over "expert" too: the rest of
    the model repeats its work across that axis, and splitting only here would add an
    all-gather of the outputs to every call."""
    data = mesh.shape.get("data", 1)
    return jax.sharding.PartitionSpec("data") if data > 1 and rows % data == 0 else \
        jax.sharding.PartitionSpec()


def experts_sorted_on_mesh(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array, *,
    mesh: jax.sharding.Mesh,
) -> jax.Array:
    """`experts_sorted` as one `jax.shard_map` program per device of `mesh`. Left to XLA's
    partitioner, the sorted path would all-gather every layer's experts onto every device at
    each call (expert axis), or gather the routing of every token, sort all of them on each
    device and all-reduce the layer's output (data axis).

    Tokens: rows split as `row_spec` says. Experts: with an "expert" axis that splits them
    (expert parallelism) each device runs only its own E/n experts, on the (token, slot) pairs
    routed to them, and the weighted partial outputs are summed over "expert" in float32, which
    equals `experts_sorted` to float rounding (a token's k expert outputs are added in another
    order). Otherwise every device holds them all and runs `experts_sorted` on its own rows,
    as one device would. Differentiable (the Fisher and Hessian passes take gradients through
    it).
    """
    n, e = mesh.shape["expert"], gate_up.shape[0]
    P = jax.sharding.PartitionSpec
    rows = row_spec(x.shape[0], mesh)
    if n == 1 or e % n:
        return jax.shard_map(experts_sorted, mesh=mesh, in_specs=(rows, rows, rows, P(), P()),
                             out_specs=rows, check_vma=False)(x, ids, weights, gate_up, down)
    per_device = e // n

    def local(x, ids, weights, gate_up, down):
        first = jax.lax.axis_index("expert") * per_device
        mine = (ids >= first) & (ids < first + per_device)
        slots = jnp.where(mine, ids - first, per_device)  # others: an overflow bucket
        d = dispatch(x, slots, per_device + 1)
        y = swiglu_grouped(gate_up, down)(d.x_sorted, d.group_sizes[:per_device])  # bucket: 0
        return jax.lax.psum(combine(y.astype(jnp.float32), d, weights), "expert")

    out = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, P("expert"), P("expert")),
                        out_specs=rows, check_vma=False)(x, ids, weights, gate_up, down)
    return out.astype(x.dtype)
