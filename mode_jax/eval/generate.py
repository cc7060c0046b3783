"""Batched greedy generation with a KV cache, stopping at an end token.

`greedy_generate(model, batch, max_new_tokens, eos_token_id)` takes the HF-style batch the
model takes (`input_ids [B, T]` left-padded, `attention_mask`, optional images), runs one
prefill over the prompt (image features written at the placeholders), then one cached step per
new token, all under one `nnx.jit`. A row stops at its first `eos_token_id` (or any of
`stop_token_ids`, e.g. the other end tokens a checkpoint's generation_config.json lists); the
loop ends when every row has stopped or after `max_new_tokens`. Any model family with
`prepare`/`embed_inputs` (`models.batch`) and a text model with `init_cache` works: Kimi-VL (MLA
cache) and Qwen3-VL-MoE (k/v cache; the prefill uses the M-RoPE positions and DeepStack
additions).

Each step feeds the chosen token back at position `num_real + rope_delta` (the row's count of
real tokens, shifted by what an image did to M-RoPE positions; 0 for Kimi-VL), so a
left-padded row continues exactly as it would unpadded. The result equals re-running the full
forward on the growing sequence and taking the argmax each time (tests/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax import multihost, sharding
from mode_jax.models import batch as batch_lib


class Generation(NamedTuple):
    """tokens `[B, N]` int32 (after a row's first stop token every slot holds eos), lengths
    `[B]` int32 (tokens before the stop, or N), scores `[B, N, V]` float32 logits or None."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray | None = None


def greedy_generate(model, batch: Mapping[str, Any], max_new_tokens: int,
                    eos_token_id: int, *, stop_token_ids: Sequence[int] = (),
                    return_scores: bool = False) -> Generation:
    """Greedy continuation of every prompt in `batch` (left padding; see the module doc)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.config.text.vocab_size
    stops = sorted({int(eos_token_id), *(int(i) for i in stop_token_ids)})
    outside = [i for i in stops if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"end token id(s) {outside} outside the vocabulary [0, {vocab})")
    p = model.prepare(batch)
    mask = np.asarray(p.attention_mask)
    if mask.shape[1] == 0 or not mask[:, -1].all():
        rows = np.flatnonzero(~mask[:, -1]) if mask.shape[1] else np.arange(mask.shape[0])
        raise ValueError(f"generation needs left-padded prompts ending in a real token; rows "
                         f"{rows.tolist()} end in padding (use padding_side='left')")
    rope_delta = None if p.rope_delta is None else jnp.asarray(p.rope_delta, jnp.int32)
    a = sharding.place_inputs(model, {"input_ids": p.input_ids, "attention_mask": p.attention_mask,
                                      "pixel_values": p.pixel_values, "positions": p.positions})
    embedded = batch_lib.embed_images(model, a["input_ids"], a["pixel_values"], p.grid)
    tokens, scores = _generate(model, a["attention_mask"], embedded, a["positions"],
                               rope_delta, max_new_tokens,
                               jnp.int32(eos_token_id), jnp.asarray(stops, jnp.int32),
                               return_scores)
    tokens = multihost.to_host(tokens)
    is_stop = np.isin(tokens, stops)
    lengths = np.where(is_stop.any(1), is_stop.argmax(1), tokens.shape[1]).astype(np.int32)
    return Generation(tokens, lengths, None if scores is None else multihost.to_host(scores))


@nnx.jit(static_argnames=("max_new_tokens", "return_scores"))
def _generate(model, attention_mask, embedded, positions, rope_delta, max_new_tokens, eos,
              stops, return_scores):
    """The loop on `embed_images`' result: compiled per batch shape, not per image grids."""
    lm = model.language_model
    h, additions = embedded
    b, t = attention_mask.shape
    cache = lm.init_cache(b, t + max_new_tokens, rope_delta)
    out = lm(inputs_embeds=h, attention_mask=attention_mask, positions=positions,
             additions=additions, cache=cache, logits_window=1)  # no [B, T, V] prefill
    logits = out.logits[:, -1]
    tokens = jnp.full((b, max_new_tokens), eos, jnp.int32)
    kept = max_new_tokens if return_scores else 0  # no [B, N, V] carry unless asked for
    scores = jnp.zeros((b, kept, logits.shape[-1]), jnp.float32)
    ones = jnp.ones((b, 1), bool)

    def record(i, logits, tokens, scores, done):
        token = jnp.where(done, eos, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, i].set(token)
        if return_scores:
            scores = scores.at[:, i].set(logits)
        return token, tokens, scores, done | jnp.isin(token, stops)

    token, tokens, scores, done = record(0, logits, tokens, scores, jnp.zeros((b,), bool))

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, tokens, scores, done = carry
        out = lm(token[:, None], attention_mask=ones, cache=cache)
        token, tokens, scores, done = record(i, out.logits[:, -1], tokens, scores, done)
        return i + 1, token, out.cache, tokens, scores, done

    carry = (jnp.int32(1), token, out.cache, tokens, scores, done)
    _, _, _, tokens, scores, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, scores if return_scores else None


def decode(tokenizer, generation: Generation) -> list[str]:
    """Each row's text up to (not including) its first stop token, special tokens skipped."""
    return [tokenizer.decode([int(x) for x in row[:n]], skip_special_tokens=True)
            for row, n in zip(generation.tokens, generation.lengths, strict=True)]


def pad_left(rows: Sequence[np.ndarray], pad_token_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad 1-D int rows to `[B, length]` (default the longest): (input_ids, attention_mask)."""
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest row ({longest})")
    ids = np.full((len(rows), length), pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return ids, mask
