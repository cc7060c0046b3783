"""MODE stage 2: how much each routed expert's round-to-nearest quantization hurts, per modality.

Every estimator is `[E, B]` for one MoE layer (the drivers in `calib.passes` stack layers into
`[L_moe, E, B]`); B indexes the candidate bit-widths. With `E_e` expert e's SwiGLU FFN, `E_e^b`
the same with gate, up and down fake-quantized by `quant.rtn` at b bits, and `w_e(t)` the routing
weight token t gives e (0 if t does not pick e), the MoE-block output of token t changes by

    dz_t = w_e(t) * (E_e^b(x_t) - E_e(x_t))         when only expert e is quantized.

Estimators (M = text tokens, or the layer's key vision tokens):
- expert_mse_M: mean over the M-tokens routed to e and the hidden dims of (E_e^b(x) - E_e(x))^2.
- fisher_M: 0.5 * sum over M-tokens of sum_d g_td^2 dz_td^2 / samples, g the gradient of the
  fp model's last-position log-probability of its own argmax token w.r.t. the block output (the
  diagonal empirical-Fisher estimate of the KL below).
- logit_kl_M (exact): KL(p_fp || p_quant) of the last-position next-token distribution averaged
  over samples, when dz is added only to that layer's M-tokens (`layer_logit_kl`).
- pmq_err (MC-MoE PMQ): mean over all tokens and hidden dims of dz^2 (the block-output error).
- gemq_cost (GEMQ): sum over all tokens of sum_d g_td^2 dz_td^2 / samples, g the gradient of the
  summed next-token cross-entropy w.r.t. the block output.
- MoPEQ's per-expert Hessian trace: `hutchinson_block_traces`, or the trace of the Gauss-Newton
  part of that Hessian, `hutchinson_gauss_newton_block_traces` (positive semi-definite).

An expert with no M-token gets 0 for the M-estimators, and a logged note (never NaN).
Token-level estimators vmap over experts on padded per-expert buffers (`expert_buffers`) and
over bits; `logit_kl` folds (expert, bit, modality) variants into the batch of one suffix forward.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mode_jax import multihost, sharding
from mode_jax.calib import hessian
from mode_jax.models import moe
from mode_jax.quant import gptq, rtn

log = logging.getLogger(__name__)

TEXT, KEY, REDUNDANT, PAD = 0, 1, 2, -1  # token modality codes
MODALITIES = ("text", "vision")  # vision = the layer's key image tokens
MODALITY_CODES = (TEXT, KEY)


class LayerTokens(NamedTuple):
    """The cached full-precision real tokens of one MoE layer (rows = tokens, N of them).

    x [N, D] MoE-block input (post-attention norm); ids, weights [N, k] the routing the model
    chose; modality [N] int8 (TEXT, KEY or REDUNDANT); g2_fisher, g2_loss [N, D] float32 squared
    gradients of the two objectives w.r.t. the block output (None when not collected).
    """

    x: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    modality: np.ndarray
    g2_fisher: np.ndarray | None = None
    g2_loss: np.ndarray | None = None


class ExpertBuffers(NamedTuple):
    """Per-expert padded token lists: row e lists the tokens that chose expert e.

    index [E, C] int32 rows of LayerTokens; weight [E, C] float32 the routing weight of e for
    that token; valid [E, C] bool (False = padding). C is a power of two >= the busiest expert.
    """

    index: np.ndarray
    weight: np.ndarray
    valid: np.ndarray


def expert_buffers(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> ExpertBuffers:
    """Group the N*k (token, slot) pairs of `ids [N, k]` by expert (stable, token order)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids.min()}..{ids.max()}")
    flat, k = ids.reshape(-1), ids.shape[-1]
    counts = np.bincount(flat, minlength=num_experts)
    cap = int(2 ** np.ceil(np.log2(max(int(counts.max(initial=0)), 8))))
    order = np.argsort(flat, kind="stable")
    slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.zeros((num_experts, cap), np.int32)
    weight = np.zeros((num_experts, cap), np.float32)
    valid = np.zeros((num_experts, cap), bool)
    index[flat[order], slot] = order // k
    weight[flat[order], slot] = np.asarray(weights, np.float32).reshape(-1)[order]
    valid[flat[order], slot] = True
    return ExpertBuffers(index, weight, valid)


def quantize_layer(gate_up, down, bits, group_size: int):
    """Fake-quantized copies of a layer's experts at every candidate bit-width (rtn).

    gate_up [E, D, 2F], down [E, F, D], bits [B] -> (gate_up_q [B, E, D, 2F],
    down_q [B, E, F, D]); one jitted call vmapped over the bits.
    """
    return _quantize_layer(gate_up, down, check_bits(bits), group_size)


# Experts fake-quantized together: the quantizer's clipping search keeps about 18 expert-sized
# temporaries per expert (XLA's figure for a Kimi-VL layer, `benchmarks.memory_plan`), so a
# whole layer at once would need 18 GiB beside its 3 GiB of copies.
QUANTIZE_EXPERTS_PER_STEP = 8


@functools.partial(jax.jit, static_argnames="group_size")
def _quantize_layer(gate_up, down, bits, group_size: int):
    bits = jnp.asarray(bits, jnp.int32)

    def expert(w):
        gu, dn = w
        return jax.vmap(lambda b: (rtn.fake_quantize(gu, b, group_size),
                                   rtn.fake_quantize(dn, b, group_size)))(bits)

    e = gate_up.shape[0]
    step = math.gcd(e, QUANTIZE_EXPERTS_PER_STEP)  # divides E: every step is full
    # Step i takes experts i, i + E/step, ...: with the experts split over a mesh in contiguous
    # blocks, every device holds its share of every step and none waits for another's.
    strided = [w.reshape(step, e // step, *w.shape[1:]).swapaxes(0, 1) for w in (gate_up, down)]
    guq, dnq = jax.lax.map(jax.vmap(expert), tuple(strided))  # [E/step, step, B, ...]
    return tuple(jnp.moveaxis(q.swapaxes(0, 1).reshape(e, *q.shape[2:]), 0, 1)
                 for q in (guq, dnq))


def gptq_quantize_layer(gate_up, down, bits, group_size: int, x, ids, *, damp: float = 0.01):
    """GPTQ copies of a layer's experts at every candidate bit-width, shaped as `quantize_layer`'s.

    An ablation of method.md stage 2, whose sensitivity uses round-to-nearest [ref] although the
    experts are then GPTQ-quantized: RTN costs can rank bit-widths differently from what GPTQ
    delivers (GPTQ recovers more at 2 bits than at 1). Hessians come from the cached tokens
    (x [N, D] MoE-block inputs, ids [N, k] their experts), i.e. the sensitivity samples, not the
    quantize stage's GPTQ set; down's Hessian is recomputed through the quantized gate_up at each
    bit, as the quantize stage does. Experts without a token fall back to round-to-nearest.
    """
    bits = check_bits(bits)
    gate_up, down, x, ids = (jnp.asarray(a) for a in (gate_up, down, x, ids))
    e, d, two_f = gate_up.shape

    def hessian_of(part, gu):  # gate_up's needs only x; down's, the activations through gu
        acc = hessian.update_experts(hessian.init_experts(e, d, two_f // 2), x, ids, gu,
                                     parts=part)
        return hessian.finalize(getattr(acc, part), acc.count)

    h_gate_up = hessian_of("gate_up", gate_up)
    opts = {"group_size": group_size, "damp": damp, "block_size": group_size}
    gu_q, dn_q = [], []
    for b in bits:
        per_expert = jnp.full((e,), b, jnp.int32)
        gu = gptq.gptq_quantize_experts(gate_up, h_gate_up, per_expert, **opts).weight
        h_down = hessian_of("down", gu)
        dn = gptq.gptq_quantize_experts(down, h_down, per_expert, **opts).weight
        gu_q.append(gu.astype(gate_up.dtype))
        dn_q.append(dn.astype(down.dtype))
    return jnp.stack(gu_q), jnp.stack(dn_q)


def check_bits(bits) -> np.ndarray:
    """Candidate bits as an int32 array; one ValueError for anything rtn cannot quantize."""
    arr = np.asarray(bits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"bits must be a non-empty 1-D list of bit-widths, got {bits!r}")
    rtn.check_bits(arr)
    return arr.astype(np.int32)


def expert_deltas(x, gate_up, down, gate_up_q, down_q):
    """E_e^b(x) - E_e(x) for one expert at every bit: x [C, D], *_q [B, ...] -> [B, C, D] f32."""
    y = moe.swiglu(x, gate_up, down).astype(jnp.float32)
    yq = jax.vmap(moe.swiglu, in_axes=(None, 0, 0))(x, gate_up_q, down_q)
    return yq.astype(jnp.float32) - y


def _expert_sums(rows, w, valid, x, modality, g2f, g2l, gate_up, down, gate_up_q, down_q):
    """Sums over one expert's tokens (rows [C] into the layer cache) for every bit."""
    diff = expert_deltas(x[rows], gate_up, down, gate_up_q, down_q) * valid[None, :, None]
    mod = modality[rows]
    is_m = jnp.stack([valid & (mod == c) for c in MODALITY_CODES], -1).astype(jnp.float32)
    sq = diff * diff  # [B, C, D]
    dz2 = sq * (w * w)[None, :, None]
    out = {
        "mse": jnp.einsum("bc,cm->bm", sq.mean(-1), is_m),
        "pmq": dz2.sum((1, 2)),
    }
    if g2f is not None:
        out["fisher"] = jnp.einsum("bcd,cd,cm->bm", dz2, g2f[rows], is_m)
        out["gemq"] = jnp.einsum("bcd,cd->b", dz2, g2l[rows])
    return out


@functools.partial(jax.jit, static_argnames="group_size")
def _layer_sums(tokens, sel, index, weight, valid, gate_up, down, gate_up_q, down_q, qsel,
                bits, group_size):
    """`_expert_sums` vmapped over the experts `sel` [e] (index etc. [e, C]; the weights are the
    whole layer's, gathered here so that a chunk costs one dispatch). The copies are
    `gate_up_q[:, qsel]`; without them (None) the chunk's experts are fake-quantized here at
    `bits`, so a layer's copies never exist outside this computation."""
    gu, dn = gate_up[sel], down[sel]
    if gate_up_q is None:
        guq, dnq = _quantize_layer(gu, dn, bits, group_size)
    else:
        guq, dnq = gate_up_q[:, qsel], down_q[:, qsel]

    def one(rows, w, ok, gu, dn, guq, dnq):
        return _expert_sums(rows, w, ok, tokens.x, tokens.modality, tokens.g2_fisher,
                            tokens.g2_loss, gu, dn, guq, dnq)

    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 1, 1))(index, weight, valid, gu, dn, guq, dnq)


class _Launched(NamedTuple):
    """One layer's chunked sums, dispatched and not yet waited for."""

    parts: list  # per chunk, a dict of device arrays [e, B, ...]
    order: np.ndarray  # the experts of the concatenated parts
    counts: np.ndarray  # [E, 2] text / key-vision tokens per expert
    shape: tuple[int, int]  # (tokens, hidden dim) of the layer cache


def _launch(tokens: LayerTokens, gate_up, down, gate_up_q, down_q, chunk: int, bits=None,
            group_size: int = 0) -> _Launched:
    """Dispatch `_layer_sums` over chunks of `chunk` experts taken busiest first, each chunk's
    buffers cut to its own busiest expert (rounded up to a power of two): padding is bounded by
    the load imbalance within a chunk rather than across the layer. Nothing here waits for the
    device, so the layers of a pass overlap and the host syncs once (`_collect`).

    Copies on the host (numpy) travel a chunk at a time; None: round-to-nearest at `bits`,
    made per chunk on the device. With the experts on a mesh with a "data" axis, each chunk's
    experts are split over it (the chunk padded with repeats of its last expert to a multiple,
    their sums dropped): each device fake-quantizes its own and sums all their tokens, so
    nothing is repeated or added across devices; the token cache is replicated."""
    if gate_up_q is None and bits is None:
        raise ValueError("give the quantized copies or the bits to fake-quantize at")
    on_host = isinstance(gate_up_q, np.ndarray)
    bits = None if bits is None else jnp.asarray(check_bits(bits))
    buffers = expert_buffers(tokens.ids, tokens.weights, gate_up.shape[0])
    mesh = sharding.array_mesh(gate_up)
    if mesh is not None and mesh.shape["data"] == 1:
        mesh = None  # experts split over "expert" alone: XLA moves each chunk's own
    data = mesh.shape["data"] if mesh is not None else 1
    place = (lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))) if mesh is not None \
        else (lambda a, _: jax.device_put(a))
    dev = place(tokens, P())
    counts = buffers.valid.sum(1)
    order = np.argsort(-counts, kind="stable")
    parts = []
    for start in range(0, len(order), chunk):
        sel = order[start:start + chunk]
        cap = min(buffers.index.shape[1], int(2 ** np.ceil(np.log2(max(counts[sel].max(), 8)))))
        pad = -len(sel) % data
        sel_p = np.concatenate([sel, np.repeat(sel[-1:], pad)]).astype(np.int32)
        lists = [np.pad(a[sel, :cap], ((0, pad), (0, 0))) for a in buffers]
        cut = (place(sel_p, P("data")), *(place(a, P("data")) for a in lists))
        guq, dnq, qsel = gate_up_q, down_q, cut[0]
        if on_host:
            guq, dnq = jax.device_put((gate_up_q[:, sel], down_q[:, sel]))
            qsel = jnp.minimum(jnp.arange(len(sel_p), dtype=jnp.int32), len(sel) - 1)
        sums = _layer_sums(dev, *cut, gate_up, down, guq, dnq, qsel, bits, group_size)
        parts.append({k: v[:len(sel)] for k, v in sums.items()} if pad else sums)
    return _Launched(parts, order, modality_counts(tokens, buffers), tokens.x.shape)


def _collect(launched: list[_Launched], num_samples: int, layers) -> list[dict[str, np.ndarray]]:
    """Wait once for every launched layer and turn its sums into the estimators."""
    fetched = jax.device_get(multihost.tree_to_host([run.parts for run in launched]))
    out = []
    for run, parts, layer in zip(launched, fetched, layers, strict=True):
        back = np.argsort(run.order)  # chunk order -> expert order
        sums = {k: np.concatenate([p[k] for p in parts])[back] for k in parts[0]}
        note_empty(run.counts, layer)
        out.append(_estimators(sums, run.counts, run.shape, num_samples))
    return out


def _estimators(sums, counts, shape, num_samples: int) -> dict[str, np.ndarray]:
    mse = np.asarray(sums["mse"], np.float64) / np.maximum(counts, 1)[:, None, :]
    n_tok, dim = shape
    out = {f"expert_mse_{m}": mse[..., i] for i, m in enumerate(MODALITIES)}
    out["pmq_err"] = np.asarray(sums["pmq"], np.float64) / max(n_tok * dim, 1)
    if "fisher" in sums:
        fisher = 0.5 * np.asarray(sums["fisher"], np.float64) / max(num_samples, 1)
        out.update({f"fisher_{m}": fisher[..., i] for i, m in enumerate(MODALITIES)})
        out["gemq_cost"] = np.asarray(sums["gemq"], np.float64) / max(num_samples, 1)
    return out


def modality_counts(tokens: LayerTokens, buffers: ExpertBuffers) -> np.ndarray:
    """[E, 2]: how many text / key-vision tokens chose each expert."""
    mod = np.asarray(tokens.modality)[buffers.index]
    return np.stack([(buffers.valid & (mod == c)).sum(-1) for c in MODALITY_CODES], -1)


def note_empty(counts: np.ndarray, layer, what: str = "expert_mse/fisher/logit_kl") -> None:
    """Log the experts that no token of a modality reached (their M-estimators are 0)."""
    for m, name in enumerate(MODALITIES):
        empty = np.flatnonzero(np.asarray(counts)[:, m] == 0)
        if empty.size:
            log.info("MoE layer %s: experts %s received no %s token; their %s_%s is 0",
                     layer, empty.tolist(), name, what, name)


def layer_costs(
    tokens: LayerTokens,
    gate_up,
    down,
    gate_up_q,
    down_q,
    *,
    num_samples: int,
    layer=None,
    chunk: int = 16,
    bits=None,
    group_size: int = 0,
) -> dict[str, np.ndarray]:
    """All token-level estimators of one MoE layer, each `[E, B]` (float64 numpy).

    gate_up [E, D, 2F], down [E, F, D] full precision; gate_up_q, down_q the `quantize_layer`
    copies [B, E, ...] (device or host arrays), or None to fake-quantize each chunk of experts
    at `bits` / `group_size` on the fly; num_samples: the samples `tokens` came from (for the
    per-sample averages of fisher and gemq). Returns expert_mse_{text,vision}, pmq_err and,
    when `tokens` carry gradients, fisher_{text,vision} and gemq_cost.
    """
    run = _launch(tokens, gate_up, down, gate_up_q, down_q, chunk, bits, group_size)
    return _collect([run], num_samples, [layer])[0]


# Bytes of layer caches (and host-held copies) sent to the device before the host waits for
# the oldest launched layer: a testbed pass stays one sync, while the 26 layer caches of a
# real model (about 1.6 GB each for Kimi-VL at 65536 tokens with gradients) never sit on the
# device together.
MAX_INFLIGHT_BYTES = 1 << 30


def _sent_bytes(layer) -> int:
    tokens, _, _, gate_up_q, down_q = layer
    total = sum(np.asarray(a).nbytes for a in tokens if a is not None)
    if isinstance(gate_up_q, np.ndarray):
        total += gate_up_q.nbytes + down_q.nbytes
    return total


def stacked_costs(layers, *, num_samples: int, layer_ids=None, chunk: int = 16, bits=None,
                  group_size: int = 0, max_inflight_bytes: int = MAX_INFLIGHT_BYTES
                  ) -> dict[str, np.ndarray]:
    """`layer_costs` of several MoE layers, each estimator stacked `[L, E, B]`.

    layers: one `(tokens, gate_up, down, gate_up_q, down_q)` per layer (copies None: made per
    chunk at `bits`). Layers are dispatched without waiting while what they send to the device
    (token caches, host-held copies) stays under `max_inflight_bytes`, so a small pass costs
    one device sync, not one per layer (on a GPU the syncs and small transfers, not the
    arithmetic, dominate at testbed size); past it the host waits for the oldest layer first.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("stacked_costs needs at least one layer")
    ids = list(layer_ids) if layer_ids is not None else list(range(len(layers)))
    launched, inflight = [], []  # inflight: (index into launched, bytes) not yet waited for
    for layer in layers:
        size = _sent_bytes(layer)
        while inflight and sum(b for _, b in inflight) + size > max_inflight_bytes:
            jax.block_until_ready(launched[inflight.pop(0)[0]].parts)
        launched.append(_launch(*layer, chunk, bits, group_size))
        inflight.append((len(launched) - 1, size))
    rows = _collect(launched, num_samples, ids)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def expert_mse(tokens: LayerTokens, gate_up, down, gate_up_q, down_q, *, layer=None,
               chunk: int = 16) -> dict[str, np.ndarray]:
    """{text, vision}: `[E, B]` mean squared expert-output error on the cached M-tokens."""
    plain = tokens._replace(g2_fisher=None, g2_loss=None)
    costs = layer_costs(plain, gate_up, down, gate_up_q, down_q, num_samples=1, layer=layer,
                        chunk=chunk)
    return {m: costs[f"expert_mse_{m}"] for m in MODALITIES}


# ---------------------------------------------------------------- objectives


def last_positions(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token, [B] (works for left and right padding)."""
    t = attention_mask.shape[1]
    return jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=1)


def last_logits(logits: jax.Array, last: jax.Array) -> jax.Array:
    """logits [B, T, V] at positions last [B] -> [B, V]."""
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def argmax_logprob(last_logits_: jax.Array) -> jax.Array:
    """Sum over samples of log p(argmax token) at the last position (the Fisher objective).

    The argmax is held fixed (no gradient): this is the model's own prediction.
    """
    target = jax.lax.stop_gradient(jnp.argmax(last_logits_, -1))
    logp = jax.nn.log_softmax(last_logits_.astype(jnp.float32), -1)
    return jnp.take_along_axis(logp, target[:, None], -1).sum()


def next_token_targets(input_ids, attention_mask, image_token_id: int) -> jax.Array:
    """[B, T-1] bool: position t predicts token t+1, both real and t+1 not an image placeholder
    (placeholders are not predictions of the model)."""
    real = attention_mask.astype(bool)
    return real[:, :-1] & real[:, 1:] & (input_ids[:, 1:] != image_token_id)


def next_token_nll(logits, input_ids, attention_mask, image_token_id: int) -> jax.Array:
    """Summed next-token cross-entropy over the `next_token_targets` pairs, []."""
    valid = next_token_targets(input_ids, attention_mask, image_token_id)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None].astype(jnp.int32), -1)[..., 0]
    return jnp.where(valid, nll, 0.0).sum()


def kl_last(logp_fp: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p_fp || p_q) per row: logp_fp [..., V] log-probabilities, logits_q [..., V]."""
    logq = jax.nn.log_softmax(logits_q.astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(logp_fp) * (logp_fp - logq), -1)


# ---------------------------------------------------------------- exact logit KL


class LayerPrefix(NamedTuple):
    """What the fp forward leaves for one MoE layer of one batch (decoder layer `layer`).

    h_after [B, T, D] residual stream after the layer; x [B, T, D] its MoE-block input;
    ids, weights [B, T, k]; modality [B, T] int8 (PAD on padding); attention_mask [B, T];
    logp_fp [B, V] the fp last-position log-probabilities; positions: the batch's M-RoPE
    positions `[3, B, T]` (None: counted over real tokens); additions: the model's per-layer
    additions `[B, T, D]` (Qwen3-VL's DeepStack), re-added when later layers re-run.
    """

    h_after: jax.Array
    x: jax.Array
    ids: jax.Array
    weights: jax.Array
    modality: jax.Array
    attention_mask: jax.Array
    logp_fp: jax.Array
    positions: jax.Array | None = None
    additions: tuple = ()


def layer_logit_kl(text, layer: int, prefix: LayerPrefix, gate_up, down, gate_up_q, down_q,
                   chunk: int) -> jax.Array:
    """Summed-over-samples KL for every (expert, bit, modality) of one layer: [E, B, 2].

    `text` is the DeepseekV3 module. Variant (e, b, M) adds dz (expert e at bits b) to the
    layer's M-tokens of `prefix.h_after` and re-runs decoder layers `layer+1..` and the head on
    the last positions only. `chunk` variants (x 2 modalities x batch) run as one folded batch;
    chunks run sequentially (`lax.map`). A sample whose M-tokens never chose e scores exactly 0.
    """
    num_bits, num_experts = gate_up_q.shape[:2]
    n_var = num_experts * num_bits
    n_chunks = -(-n_var // chunk)
    variant = jnp.minimum(jnp.arange(n_chunks * chunk), n_var - 1).reshape(n_chunks, chunk)
    masks = jnp.stack([prefix.modality == c for c in MODALITY_CODES])  # [2, B, T]
    b, t, d = prefix.x.shape
    last = last_positions(prefix.attention_mask)
    folded = chunk * 2
    positions = prefix.positions
    if positions is not None:  # [B, T] or [3, B, T]: tile the batch axis
        positions = jnp.tile(positions, (1,) * (positions.ndim - 2) + (folded, 1))
    ctx, _ = text.context(jnp.tile(prefix.attention_mask, (folded, 1)), positions)
    additions = tuple(jnp.tile(a, (folded, 1, 1)) for a in prefix.additions)

    def run_chunk(v):
        e, bit = v // num_bits, v % num_bits
        we = jnp.sum(jnp.where(prefix.ids[None] == e[:, None, None, None], prefix.weights, 0.0), -1)

        def delta(ei, bi, w):
            y = moe.swiglu(prefix.x, gate_up[ei], down[ei]).astype(jnp.float32)
            yq = moe.swiglu(prefix.x, gate_up_q[bi, ei], down_q[bi, ei]).astype(jnp.float32)
            return (yq - y) * w[..., None]

        dz = jax.vmap(delta)(e, bit, we)[:, None] * masks[None, ..., None]  # [c, 2, B, T, D]
        touched = jnp.any(dz != 0, axis=(-2, -1))  # [c, 2, B]
        h = (prefix.h_after.astype(jnp.float32)[None, None] + dz).astype(prefix.h_after.dtype)
        h, _ = text.run_layers(h.reshape(-1, t, d), ctx, start=layer + 1, additions=additions)
        idx = last[None, None, :, None, None]
        h_last = jnp.take_along_axis(h.reshape(chunk, 2, b, t, d), idx, axis=3)
        logits = text.logits(h_last[..., 0, :])  # [c, 2, B, V]
        kl = kl_last(prefix.logp_fp[None, None], logits)
        return jnp.where(touched, kl, 0.0).sum(-1)  # [c, 2]

    kl = jax.lax.map(run_chunk, variant).reshape(-1, 2)[:n_var]
    return kl.reshape(num_experts, num_bits, 2)


# ---------------------------------------------------------------- MoPEQ Hessian trace


def hutchinson_block_traces(loss_fn, params, num_probes: int, key: jax.Array):
    """Per-expert Hessian traces of `loss_fn` by Hutchinson's estimator.

    params: a pytree whose leaves are stacked expert tensors `[E, ...]`. Each probe draws one
    Rademacher vector v over all of them and forms Hv (forward-over-reverse); sum(v * Hv) over
    an expert's entries is an unbiased estimate of the trace of that expert's diagonal Hessian
    block, E[v_e . (Hv)_e] = tr(H_ee). Returns the same pytree with leaves `[E]` (mean over
    probes; add the leaves of one layer for the expert's total). Probes run sequentially.
    """
    grad = jax.grad(loss_fn)
    return _block_traces(lambda v: jax.jvp(grad, (params,), (v,))[1], params, num_probes, key)


def hutchinson_gauss_newton_block_traces(outputs_fn, output_hvp, params, num_probes: int,
                                         key: jax.Array):
    """Per-expert traces of the Gauss-Newton matrix G = J^T H_z J by Hutchinson's estimator.

    The loss's Hessian is G plus the network's own second derivatives weighted by the loss
    gradient; far from a minimum (MoPEQ's data-free random tokens) that second part dominates
    and makes most expert blocks' traces negative. G keeps only the loss's curvature in the
    outputs z = outputs_fn(params), so every diagonal block is positive semi-definite, and it
    equals the Hessian where the model fits its targets. output_hvp(z, u) returns H_z u. Probes
    are drawn exactly as in `hutchinson_block_traces` (same key, same vectors): each forms
    G v = J^T (H_z (J v)) with one forward-mode and one reverse-mode product.
    """
    z, pullback = jax.vjp(outputs_fn, params)

    def gv(v):
        return pullback(output_hvp(z, jax.jvp(outputs_fn, (params,), (v,))[1]))[0]

    return _block_traces(gv, params, num_probes, key)


def _block_traces(matvec, params, num_probes: int, key: jax.Array):
    """mean over probes of sum(v * matvec(v)) per expert, v Rademacher over all of `params`."""
    leaves, treedef = jax.tree.flatten(params)

    def probe(k):
        keys = jax.random.split(k, len(leaves))
        v = [jax.random.rademacher(kk, p.shape, p.dtype)
             for kk, p in zip(keys, leaves, strict=True)]
        mv = jax.tree.leaves(matvec(jax.tree.unflatten(treedef, v)))
        return [jnp.sum((a * b).reshape(a.shape[0], -1), -1)
                for a, b in zip(v, mv, strict=True)]

    traces = jax.lax.map(probe, jax.random.split(key, num_probes))
    return jax.tree.unflatten(treedef, [t.mean(0) for t in traces])


def next_token_output_hvp(input_ids, attention_mask, image_token_id: int, denominator):
    """H_z u for `next_token_nll / denominator` with z the logits of positions [:, :-1]: per
    counted position, the softmax cross-entropy's Hessian (diag(p) - p p^T) times u."""
    valid = next_token_targets(input_ids, attention_mask, image_token_id)[..., None]

    def hvp(z, u):
        p = jax.nn.softmax(z.astype(jnp.float32), -1)
        pu = p * u
        return jnp.where(valid, pu - p * pu.sum(-1, keepdims=True), 0.0) / denominator

    return hvp
