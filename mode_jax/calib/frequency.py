"""MODE stage 1: modality-decomposed routing frequency with key-vision-token filtering.

Everything here is a pure function of arrays, so one jitted call per batch turns the model's
routing outputs and text-to-image attention scores into per-expert counts:

  scores [B, T]  ->  key_token_mask      (top max(1, floor(r * n_image)) image tokens per sample)
  ids [B, T, k]  ->  routing_counts      (one histogram over experts per token class)

Nothing is pruned: the key mask only decides which image tokens count as "vision" (method.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

TOKEN_CLASSES = ("all", "text", "image", "key", "redundant")
ATTENTION_MODES = ("per_layer", "judge_layer", "all_tokens")


def query_mask(
    input_ids: jax.Array,
    attention_mask: jax.Array,
    image_token_id: int,
    special_token_ids: jax.Array,
    mode: str = "per_layer",
) -> jax.Array:
    """The queries whose attention scores image tokens, [B, T] bool.

    Text queries after the first image token, excluding template/special tokens; a sample left
    with none falls back to all post-image text. In `all_tokens` mode every real token from the
    first image token on is a query (image tokens included).
    """
    real = attention_mask.astype(bool)
    is_image = (input_ids == image_token_id) & real
    after_image = jnp.cumsum(is_image, axis=1) > 0
    if mode == "all_tokens":
        return real & after_image
    text_after = real & after_image & ~is_image
    special = jnp.isin(input_ids, special_token_ids)
    q = text_after & ~special
    has_q = q.any(axis=1, keepdims=True)
    return jnp.where(has_q, q, text_after)


def key_token_mask(scores: jax.Array, image_mask: jax.Array, key_ratio: float) -> jax.Array:
    """Top max(1, floor(r * n_image)) image tokens of each sample by score, [B, T] bool.

    Ties go to the earlier position (stable sort), so the set is deterministic.
    """
    masked = jnp.where(image_mask, scores, -jnp.inf)
    order = jnp.argsort(-masked, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    n_image = image_mask.sum(axis=1, keepdims=True)
    n_key = jnp.maximum(1, jnp.floor(key_ratio * n_image).astype(jnp.int32))
    return image_mask & (rank < n_key)


def token_class_masks(
    input_ids: jax.Array, attention_mask: jax.Array, image_token_id: int, key_mask: jax.Array
) -> dict[str, jax.Array]:
    """Boolean [B, T] masks of each class in TOKEN_CLASSES (padding belongs to none)."""
    real = attention_mask.astype(bool)
    image = (input_ids == image_token_id) & real
    return {
        "all": real,
        "text": real & ~image,
        "image": image,
        "key": key_mask & image,
        "redundant": image & ~key_mask,
    }


@functools.partial(jax.jit, static_argnames="num_experts")
def routing_counts(
    ids: jax.Array, weights: jax.Array, masks: dict[str, jax.Array], num_experts: int
) -> dict[str, jax.Array]:
    """Per-class expert-selection counts [E] and the all-token routing-weight sum [E].

    ids, weights: [B, T, k] as the model selected them. A token contributes one count to each of
    its k experts, so counts of a class sum to (tokens of that class) * k.
    """
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32)  # [B, T, k, E]
    per_token = onehot.sum(axis=2)  # [B, T, E]
    out = {f"count_{n}": (per_token * m[..., None]).sum(axis=(0, 1)) for n, m in masks.items()}
    w = (onehot * weights[..., None].astype(jnp.float32)).sum(axis=2)
    out["weight_sum_all"] = (w * masks["all"][..., None]).sum(axis=(0, 1))
    out.update({f"num_tokens_{name}": m.sum() for name, m in masks.items()})
    return out


def layer_key_masks(
    image_scores: tuple[jax.Array, ...],
    moe_layers: tuple[int, ...],
    image_mask: jax.Array,
    key_ratio: float,
    mode: str,
    judge_layer: int,
) -> list[jax.Array]:
    """The key mask used by each MoE layer, from the per-decoder-layer scores.

    per_layer / all_tokens: each MoE layer uses its own attention; judge_layer: one decoder
    layer's scores decide the key tokens for every layer.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    if mode == "judge_layer":
        n = len(image_scores)
        if not -n <= judge_layer < n:
            raise ValueError(f"judge_layer {judge_layer} is out of range for {n} decoder layers")
        key = key_token_mask(image_scores[judge_layer], image_mask, key_ratio)
        return [key for _ in moe_layers]
    return [key_token_mask(image_scores[l], image_mask, key_ratio) for l in moe_layers]


def normalized_frequency(counts: np.ndarray) -> np.ndarray:
    """Per-layer distribution over experts, [L, E]; a layer with no tokens gets uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / counts.shape[-1])
    return np.where(total > 0, counts / np.where(total > 0, total, 1.0), uniform)
