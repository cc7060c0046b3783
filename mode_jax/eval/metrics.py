"""Evaluation metrics as pure functions of logits and token arrays (no model inside).

Conventions: `logits [B, T, V]` are a causal model's outputs, so the distribution at position t-1
predicts token t. `mask [B, T]` (bool) marks the *target* tokens to score (an answer, an option):
a metric reads the logits one position to their left. Token-level metrics return per-row sums and
counts so that batches and groups can be combined exactly (`breakdown`); reduce with
`ratio`/`perplexity`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check(logits, input_ids=None, mask=None) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    for name, arr in (("input_ids", input_ids), ("mask", mask)):
        if arr is not None and tuple(arr.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"{name} shape {tuple(arr.shape)} does not match logits [B, T] = "
                             f"{tuple(logits.shape[:2])}")


def _concrete_any(x) -> bool:
    """True if any element of a concrete array is set; False under tracing (no value checks)."""
    return not isinstance(x, jax.core.Tracer) and bool(jnp.any(x))


def _predicting(mask) -> jax.Array:
    """[B, T] bool: positions whose logits predict a masked target (the mask shifted left)."""
    mask = jnp.asarray(mask, dtype=bool)
    if _concrete_any(mask[:, :1]):
        raise ValueError("mask marks position 0 as a target, but no logits predict token 0")
    return jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


def token_logprobs(logits, input_ids) -> jax.Array:
    """[B, T] float32: log p(input_ids[:, t] | tokens < t); position 0 (no prediction) is 0."""
    _check(logits, input_ids)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(input_ids)[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def answer_nll(logits, input_ids, mask) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over each row's masked targets [B] float32, their count [B] int32)."""
    _check(logits, input_ids, mask)
    _predicting(mask)  # rejects a target at position 0
    return _answer_nll(logits, input_ids, jnp.asarray(mask, dtype=bool))


@jax.jit
def _answer_nll(logits, input_ids, mask):
    """One program (also when called eagerly), so the float32 log-softmax over `[B, T, V]` is
    fused into its reductions instead of held as arrays: at a 163,840-token vocabulary each is
    0.6 GB per 1000 positions."""
    lp = token_logprobs(logits, input_ids)
    return -jnp.sum(jnp.where(mask, lp, 0.0), axis=1), jnp.sum(mask, axis=1, dtype=jnp.int32)


def answer_kl(logits_ref, logits_cand, mask) -> tuple[jax.Array, jax.Array]:
    """(sum of KL(p_ref || p_cand) [B] float32, count [B] int32) over the masked targets.

    KL of the next-token distributions that predict each masked token (positions t-1), e.g. the
    full-precision model's against a quantized one's.
    """
    _check(logits_ref, mask=mask)
    if tuple(logits_ref.shape) != tuple(logits_cand.shape):
        raise ValueError(f"logits shapes differ: {tuple(logits_ref.shape)} vs "
                         f"{tuple(logits_cand.shape)}")
    return _answer_kl(logits_ref, logits_cand, _predicting(mask))


@jax.jit
def _answer_kl(logits_ref, logits_cand, at):
    """One program, as `_answer_nll`: log p, log q, p and their product are never whole
    `[B, T, V]` arrays."""
    lp = jax.nn.log_softmax(jnp.asarray(logits_ref, jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(jnp.asarray(logits_cand, jnp.float32), axis=-1)
    p = jnp.exp(lp)
    kl = jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), axis=-1)  # [B, T]
    return jnp.sum(jnp.where(at, kl, 0.0), axis=1), jnp.sum(at, axis=1, dtype=jnp.int32)


def option_scores(logits, input_ids, mask, *, normalize: bool = False) -> jax.Array:
    """[B] log-likelihood of each row's masked continuation (one row per candidate option).

    `normalize` divides by the continuation length (for options of different token lengths).
    """
    nll, count = answer_nll(logits, input_ids, mask)
    if _concrete_any(count == 0):
        raise ValueError("an option row has no masked continuation tokens")
    return -nll / count if normalize else -nll


def choose(scores: Sequence[Sequence[float]]) -> np.ndarray:
    """[N] index of the best-scoring option per question (ragged lists of option scores)."""
    if any(len(s) == 0 for s in scores):
        raise ValueError("a question has no option scores")
    return np.asarray([int(np.argmax(np.asarray(s, dtype=np.float64))) for s in scores])


def normalize_answer(text: str) -> str:
    """Lower case, trimmed, single spaces, no space before punctuation: what exact match compares.

    Word-level decoding puts spaces between all tokens ("east morvale", "A ."), so the spacing
    around punctuation is not taken as a difference.
    """
    text = " ".join(text.lower().split())
    return re.sub(r" (?=[^\w\s])", "", text)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """[N] bool: normalized prediction == normalized answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return np.asarray([normalize_answer(p) == normalize_answer(a)
                       for p, a in zip(predictions, answers, strict=True)], dtype=bool)


def answer_margins(logprobs: Sequence[np.ndarray], answer_ids: Sequence[Sequence[int]]
                   ) -> np.ndarray:
    """[N] per answer, the smallest gap over its positions between the answer token's log-prob
    and the best other token's (`logprobs[i]` is `[n_i, V]`, the teacher-forced distributions
    predicting answer i's `n_i` tokens). Positive iff greedy decoding reproduces every answer
    token; how far a perturbation moves it, against its size, says how close answers are to
    flipping."""
    if len(logprobs) != len(answer_ids):
        raise ValueError(f"{len(logprobs)} log-prob arrays for {len(answer_ids)} answers")
    out = np.empty(len(logprobs))
    for i, (lp, ids) in enumerate(zip(logprobs, answer_ids, strict=True)):
        lp, ids = np.asarray(lp, np.float64), np.asarray(ids)
        if lp.ndim != 2 or lp.shape[0] != len(ids) or not len(ids):
            raise ValueError(f"answer {i}: log-probs {lp.shape} for {len(ids)} answer tokens")
        rows = np.arange(len(ids))
        others = lp.copy()
        others[rows, ids] = -np.inf
        out[i] = float(np.min(lp[rows, ids] - others.max(axis=1)))
    return out


def ratio(sums, counts) -> float:
    """sum(sums) / sum(counts) (a token- or sample-weighted mean); nan when nothing counted."""
    total = float(np.sum(np.asarray(counts, dtype=np.float64)))
    return float(np.sum(np.asarray(sums, dtype=np.float64))) / total if total else float("nan")


def perplexity(nll_sums, counts) -> float:
    """exp(total negative log-likelihood / total target tokens)."""
    return float(np.exp(ratio(nll_sums, counts)))


def breakdown(sums, counts, groups: Mapping[str, Sequence[str]]) -> dict:
    """Per-group `ratio`: {"all": r, group_name: {label: r}} for each labelling in `groups`.

    `sums`, `counts` are per-sample [N] (accuracy: correct as sums, ones as counts; KL or NLL:
    the per-row sums and counts above). `groups` maps a grouping (e.g. "family", "task",
    "modality") to one label per sample.
    """
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    if sums.shape != counts.shape or sums.ndim != 1:
        raise ValueError(f"sums {sums.shape} and counts {counts.shape} must be equal [N] arrays")
    out: dict = {"all": ratio(sums, counts)}
    for name, labels in groups.items():
        labels = np.asarray(labels, dtype=object)
        if labels.shape != sums.shape:
            raise ValueError(f"group {name!r} has {labels.shape[0]} labels for "
                             f"{sums.shape[0]} samples")
        out[name] = {str(lab): ratio(sums[labels == lab], counts[labels == lab])
                     for lab in sorted(set(labels.tolist()))}
    return out
