"""Frequency statistics against plain Python loops over tokens and experts."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.calib import frequency

IMG = 7
SPECIAL = (1, 2, 3)


def _batch(rng, b=3, t=40, vocab=20):
    ids = rng.integers(4, vocab, size=(b, t))
    mask = np.ones((b, t), dtype=np.int32)
    for i in range(b):
        start = rng.integers(1, 6)
        n_img = rng.integers(3, 15)
        ids[i, start : start + n_img] = IMG
        ids[i, start + n_img + 1] = SPECIAL[i % 3]
    mask[1, -5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _loop_key_mask(scores, image_mask, r):
    out = np.zeros_like(image_mask)
    for b in range(scores.shape[0]):
        pos = [j for j in range(scores.shape[1]) if image_mask[b, j]]
        if not pos:
            continue
        n_key = max(1, math.floor(r * len(pos)))
        ranked = sorted(pos, key=lambda j: (-scores[b, j], j))
        for j in ranked[:n_key]:
            out[b, j] = True
    return out


def test_key_mask_is_top_r_by_score():
    rng = np.random.default_rng(0)
    ids, mask = _batch(rng)
    image_mask = (ids == IMG) & mask.astype(bool)
    scores = rng.random(ids.shape).astype(np.float32)
    scores[0, 3] = scores[0, 4]  # a tie
    for r in (0.01, 0.2, 0.5, 1.0):
        got = np.asarray(frequency.key_token_mask(jnp.asarray(scores), jnp.asarray(image_mask), r))
        np.testing.assert_array_equal(got, _loop_key_mask(scores, image_mask, r))


def test_query_mask_rules():
    ids = np.array([[5, IMG, IMG, 6, 1, 8, 0], [5, IMG, IMG, 1, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    special = jnp.asarray(SPECIAL)
    q = np.asarray(frequency.query_mask(jnp.asarray(ids), jnp.asarray(mask), IMG, special))
    # sample 0: text after the image, minus the special token and padding
    np.testing.assert_array_equal(q[0], [0, 0, 0, 1, 0, 1, 0])
    # sample 1: only special tokens after the image -> fall back to all post-image text
    np.testing.assert_array_equal(q[1], [0, 0, 0, 1, 1, 0, 0])
    q_all = frequency.query_mask(jnp.asarray(ids), jnp.asarray(mask), IMG, special, "all_tokens")
    np.testing.assert_array_equal(np.asarray(q_all)[0], [0, 1, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("num_experts,k", [(8, 2), (5, 3)])
def test_counts_match_python_loop(num_experts, k):
    rng = np.random.default_rng(1)
    ids, mask = _batch(rng)
    b, t = ids.shape
    routed = np.stack([rng.permutation(num_experts)[:k] for _ in range(b * t)]).reshape(b, t, k)
    weights = rng.random((b, t, k)).astype(np.float32)
    key = frequency.key_token_mask(
        jnp.asarray(rng.random((b, t))), jnp.asarray((ids == IMG) & (mask == 1)), 0.3
    )
    masks = frequency.token_class_masks(jnp.asarray(ids), jnp.asarray(mask), IMG, key)
    got = frequency.routing_counts(jnp.asarray(routed), jnp.asarray(weights), masks, num_experts)

    key = np.asarray(key)
    want = {name: np.zeros(num_experts, np.int64) for name in frequency.TOKEN_CLASSES}
    wsum = np.zeros(num_experts)
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            classes = ["all"]
            if ids[i, j] == IMG:
                classes += ["image", "key" if key[i, j] else "redundant"]
            else:
                classes += ["text"]
            for slot in range(k):
                e = routed[i, j, slot]
                for c in classes:
                    want[c][e] += 1
                wsum[e] += weights[i, j, slot]
    for name in frequency.TOKEN_CLASSES:
        np.testing.assert_array_equal(np.asarray(got[f"count_{name}"]), want[name])
        assert int(got[f"count_{name}"].sum()) == int(got[f"num_tokens_{name}"]) * k
    np.testing.assert_allclose(np.asarray(got["weight_sum_all"]), wsum, rtol=1e-5)


def test_judge_layer_shares_one_key_set_and_rejects_bad_layer():
    rng = np.random.default_rng(2)
    image_mask = jnp.asarray(rng.random((2, 10)) < 0.6)
    scores = tuple(jnp.asarray(rng.random((2, 10))) for _ in range(3))
    keys = frequency.layer_key_masks(scores, (1, 2), image_mask, 0.3, "judge_layer", 0)
    want = frequency.key_token_mask(scores[0], image_mask, 0.3)
    for km in keys:
        np.testing.assert_array_equal(np.asarray(km), np.asarray(want))
    per = frequency.layer_key_masks(scores, (1, 2), image_mask, 0.3, "per_layer", 0)
    np.testing.assert_array_equal(
        np.asarray(per[1]), np.asarray(frequency.key_token_mask(scores[2], image_mask, 0.3))
    )
    with pytest.raises(ValueError, match="judge_layer 5"):
        frequency.layer_key_masks(scores, (1, 2), image_mask, 0.3, "judge_layer", 5)
    with pytest.raises(ValueError, match="unknown attention mode"):
        frequency.layer_key_masks(scores, (1, 2), image_mask, 0.3, "sideways", 0)


def test_normalized_frequency_uniform_when_empty():
    f = frequency.normalized_frequency(np.array([[2, 0, 2, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(f, [[0.5, 0, 0.5, 0], [0.25] * 4])
