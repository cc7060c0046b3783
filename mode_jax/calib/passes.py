"""Drivers that run a model over calibration batches for MODE stages 1 and 2.

A batch is the HF-processor dict of docs/design.md (`input_ids [B, T]`, `attention_mask [B, T]`,
optional `pixel_values`, `image_grid_hws`); a text model may instead take `inputs_embeds
[B, T, D]` with image placeholders in `input_ids` marking the vision tokens. Each per-batch step
is one `jax.jit` over `(graphdef, state, batch)`, compiled once per batch shape; everything the
MODE config decides (key ratio, attention mode, judge layer, image and special token ids) comes
in a `StatsConfig`, never from globals.

- `frequency_pass`: per MoE layer, key vision tokens from that layer's text-to-image attention,
  then expert-selection counts per token class, summed into the `[L_moe, E]` statistics arrays.
- `collect_tokens`: the per-layer token cache of the token-level sensitivity estimators (MoE
  inputs, routing, modality and, from one backward pass, squared gradients at each MoE output).
- `token_costs`, `logit_kl_pass`, `hessian_trace_pass`: the `[L_moe, E, B]` estimators.
- `sensitivity_pass`: all of them as the stage artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax import multihost, progress, sharding
from mode_jax.calib import frequency, sensitivity
from mode_jax.calib.sensitivity import LayerPrefix, LayerTokens
from mode_jax.models.batch import embed_split, split_embedder
from mode_jax.models.deepseek_v3 import DeepseekV3
from mode_jax.models.qwen3_moe import Qwen3MoeText

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "inputs_embeds", "pixel_values", "image_grid_hws",
              "image_grid_thw", "positions")
TEXT_MODELS = (DeepseekV3, Qwen3MoeText)
# Per cached token and MoE layer: x, g2_fisher, g2_loss (D floats each) + routing. For Kimi-VL
# (D = 2048, 26 MoE layers, float32) 16384 tokens are about 10 GiB of host memory.
DEFAULT_MAX_TOKENS = 16384
ESTIMATORS = ("expert_mse", "fisher", "logit_kl")
QUANTIZERS = ("rtn", "gptq")  # what the sensitivity copies of the experts are quantized with
CURVATURES = ("hessian", "gauss_newton")  # what MoPEQ's per-expert trace is taken of


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """The MODE statistics settings (method.md stage 1); hashable, so static under jit."""

    image_token_id: int
    special_token_ids: tuple[int, ...] = ()
    key_ratio: float = 0.2
    attention_mode: str = "per_layer"
    judge_layer: int = -1

    def __post_init__(self):
        if self.attention_mode not in frequency.ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {frequency.ATTENTION_MODES}, "
                             f"got {self.attention_mode!r}")
        if not 0.0 < self.key_ratio <= 1.0:
            raise ValueError(f"key_ratio must be in (0, 1], got {self.key_ratio}")
        object.__setattr__(self, "special_token_ids",
                           tuple(int(i) for i in np.asarray(self.special_token_ids).reshape(-1)))


# ---------------------------------------------------------------- model access


def text_model(model):
    """The MoE decoder of `model` (itself, or a multimodal model's `language_model`): a
    `DeepseekV3` or a `Qwen3MoeText`, which share the interface the passes use."""
    if isinstance(model, TEXT_MODELS):
        return model
    inner = getattr(model, "language_model", None)
    if isinstance(inner, TEXT_MODELS):
        return inner
    raise ValueError(f"expected a DeepseekV3/Qwen3MoeText text model or a model with one as "
                     f"`language_model`, got {type(model).__name__}")


def embed_inputs(model, batch, grid=None) -> tuple[jax.Array, tuple]:
    """The decoder input `[B, T, D]` (inputs_embeds, token embeddings, or for a multimodal
    model token embeddings with the image features at the placeholders) and the per-layer
    additions (Qwen3-VL's DeepStack; `models.batch`)."""
    text = text_model(model)
    if "inputs_embeds" in batch:
        return batch["inputs_embeds"].astype(text.dtype), tuple(batch.get("additions", ()))
    if model is text:
        return text.embed(batch["input_ids"]), ()
    return model.embed_inputs(batch["input_ids"], batch.get("pixel_values"), grid)


def decoder_context(text, batch):
    """The text model's rotary tables and mask for `batch` (its M-RoPE positions if any)."""
    ctx, _ = text.context(batch["attention_mask"], batch.get("positions"))
    return ctx


def device_batch(model, batch: dict) -> tuple[dict[str, jax.Array], tuple | None]:
    """The model inputs of a batch as jnp arrays, and the static image grid (or None). On a
    model split over a mesh, the batch is split over its "data" axis (`sharding.shard_batch`).

    ValueError for a missing or misshapen key (a multimodal model checks images and
    placeholders, and works out M-RoPE positions, with its own `prepare`).
    """
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise ValueError(f"calibration batch lacks {key!r}; it has {sorted(batch)}")
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the "
                         "same [B, T] shape")
    grid = None
    if hasattr(model, "prepare") and "inputs_embeds" not in batch:
        p = model.prepare(batch)
        out = {"input_ids": p.input_ids, "attention_mask": p.attention_mask,
               "pixel_values": p.pixel_values, "positions": p.positions}
        out, grid = {k: v for k, v in out.items() if v is not None}, p.grid
    else:
        out = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS if k in batch}
        out["input_ids"] = out["input_ids"].astype(jnp.int32)
    return sharding.place_inputs(model, out), grid


def device_inputs(model, batch: dict, embedder) -> tuple[dict[str, jax.Array], None]:
    """`device_batch` with its images already through the vision tower (`inputs_embeds`, and
    Qwen3-VL's DeepStack `additions`), and no static grid left; `embedder` is
    `models.batch.split_embedder(model)`, made once per pass.

    A batch's image grids are static arguments of the vision tower, so inside a pass's program
    every new tuple of grids compiled the whole pass again, decoder and backward included. Run
    apart (`models.batch.embed_split`, the program GPTQ's walk and the forward use too), only
    the vision tower is compiled per tuple of grids, and each pass's program per batch shape."""
    dev, grid = device_batch(model, batch)
    if "pixel_values" in dev:
        dev["inputs_embeds"], dev["additions"] = embed_split(
            *embedder, dev["input_ids"], dev.pop("pixel_values"), grid)
    return dev, None


def check_model(model, cfg: StatsConfig) -> None:
    """One clear error for a model the passes cannot use with `cfg`: no routed experts, or a
    multimodal model whose image placeholder id is not `cfg.image_token_id`."""
    if not text_model(model).config.moe_layers:
        raise ValueError("the model has no MoE layer (n_routed_experts = 0): nothing to count")
    config = getattr(model, "config", None)
    placeholder = getattr(config, "media_placeholder_token_id",
                          getattr(config, "image_token_id", None))
    if placeholder is not None and placeholder != cfg.image_token_id:
        raise ValueError(f"StatsConfig.image_token_id={cfg.image_token_id} but the model's "
                         f"image placeholder id is {placeholder}")


class Trace(NamedTuple):
    """One fp forward, per MoE layer: MoE inputs, routing, token classes, residual after it."""

    logits: jax.Array
    x: tuple
    routing: tuple
    classes: tuple  # frequency.token_class_masks per MoE layer
    h_after: tuple
    additions: tuple = ()  # the model's per-layer additions (DeepStack), for re-runs


def trace(model, batch, cfg: StatsConfig, grid=None, perturb=None) -> Trace:
    """Run the decoder one layer at a time, keeping what the statistics need.

    perturb: optional per-MoE-layer `[B, T, D]` added to the residual stream right after that
    layer (zeros, so gradients w.r.t. it are gradients w.r.t. the MoE-block output); grid:
    the static image grid of `device_batch`.
    """
    text = text_model(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = jnp.asarray(cfg.special_token_ids, jnp.int32).reshape(-1)
    query = frequency.query_mask(ids, mask, cfg.image_token_id, special, cfg.attention_mode)
    h, additions = embed_inputs(model, batch, grid)
    ctx = decoder_context(text, batch)
    moe_layers = text.config.moe_layers
    scores, xs, routing, h_after = [], [], [], []
    for i in range(len(text.layers)):
        h, out = text.run_layers(h, ctx, start=i, stop=i + 1, image_query_mask=query,
                                 additions=additions, return_routing=True,
                                 return_mlp_inputs=True)
        scores.append(out.image_scores[0])
        if i in moe_layers:
            if perturb is not None:
                h = h + perturb[len(xs)].astype(h.dtype)
            xs.append(out.mlp_inputs[0])
            routing.append(out.routing[0])
            h_after.append(h)
    image = (ids == cfg.image_token_id) & mask.astype(bool)
    keys = frequency.layer_key_masks(tuple(scores), moe_layers, image, cfg.key_ratio,
                                     cfg.attention_mode, cfg.judge_layer)
    classes = tuple(frequency.token_class_masks(ids, mask, cfg.image_token_id, k) for k in keys)
    return Trace(text.logits(h), tuple(xs), tuple(routing), classes, tuple(h_after), additions)


def modality_codes(classes: dict) -> jax.Array:
    """[B, T] int8: TEXT, KEY (vision), REDUNDANT or PAD from token_class_masks."""
    s = sensitivity
    code = jnp.where(classes["image"], s.REDUNDANT, s.PAD)
    code = jnp.where(classes["key"], s.KEY, code)
    return jnp.where(classes["text"], s.TEXT, code).astype(jnp.int8)


def _batches(batches) -> list:
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches were given")
    return batches


def _num_samples(batch) -> int:
    return int((np.asarray(batch["attention_mask"]).sum(1) > 0).sum())


# ---------------------------------------------------------------- stage 1: frequency


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "grid"))
def _frequency_batch(graphdef, state, batch, cfg, grid):
    model = nnx.merge(graphdef, state)
    tr = trace(model, batch, cfg, grid)
    e = text_model(model).config.n_routed_experts
    per_layer = [frequency.routing_counts(ids, w, c, e)
                 for (ids, w), c in zip(tr.routing, tr.classes, strict=True)]
    return {k: jnp.stack([c[k] for c in per_layer]) for k in per_layer[0]}


def frequency_pass(model, batches: Sequence[dict], cfg: StatsConfig) -> dict[str, np.ndarray]:
    """Routing statistics summed over batches (docs/design.md "statistics").

    Returns count_{all,text,image,key,redundant} `[L_moe, E]` int64, weight_sum_all `[L_moe, E]`
    float64, num_tokens_{...} int64 scalars (the same for every layer: each sample keeps
    max(1, floor(r * n_image)) key tokens in every layer) and num_samples.
    """
    check_model(model, cfg)
    graphdef, state = nnx.split(model)
    embedder = split_embedder(model)
    total: dict[str, np.ndarray] = {}
    samples = 0
    for batch in progress.track(_batches(batches), "frequency pass batches"):
        dev, grid = device_inputs(model, batch, embedder)
        out = jax.device_get(multihost.tree_to_host(
            _frequency_batch(graphdef, state, dev, cfg, grid)))
        for k, v in out.items():
            v = np.asarray(v, np.float64 if k.startswith("weight") else np.int64)
            total[k] = total[k] + v if k in total else v
        samples += _num_samples(batch)
    result = {k: (v[0] if k.startswith("num_tokens") else v) for k, v in total.items()}
    result["num_samples"] = np.int64(samples)
    return result


# ---------------------------------------------------------------- stage 2: token cache


class TokenCache(NamedTuple):
    """LayerTokens per MoE layer from the first `num_samples` samples (whole samples only)."""

    layers: tuple[LayerTokens, ...]
    num_samples: int
    num_skipped: int


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "grid", "gradients"))
def _token_batch(graphdef, state, batch, cfg, grid, gradients):
    model = nnx.merge(graphdef, state)
    text = text_model(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not gradients:
        tr, g2f, g2l = trace(model, batch, cfg, grid), None, None
    else:
        shape = (*ids.shape, text.config.hidden_size)
        zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in text.config.moe_layers)

        def objectives(perturb):
            tr = trace(model, batch, cfg, grid, perturb)
            last = sensitivity.last_logits(tr.logits, sensitivity.last_positions(mask))
            nll = sensitivity.next_token_nll(tr.logits, ids, mask, cfg.image_token_id)
            return jnp.stack([sensitivity.argmax_logprob(last), nll]), tr

        _, pull, tr = jax.vjp(objectives, zeros, has_aux=True)
        g2f = tuple(g * g for g in pull(jnp.array([1.0, 0.0]))[0])
        g2l = tuple(g * g for g in pull(jnp.array([0.0, 1.0]))[0])
    return {
        "x": tr.x,
        "ids": tuple(r[0] for r in tr.routing),
        "weights": tuple(r[1] for r in tr.routing),
        "modality": tuple(modality_codes(c) for c in tr.classes),
        "g2_fisher": g2f,
        "g2_loss": g2l,
    }


def collect_tokens(model, batches: Sequence[dict], cfg: StatsConfig, *,
                   max_tokens: int = DEFAULT_MAX_TOKENS, gradients: bool = True) -> TokenCache:
    """Cache each MoE layer's real tokens for the token-level estimators.

    Whole samples are cached in order until the next one would pass `max_tokens` real tokens;
    the rest are skipped (logged), so memory is bounded (see DEFAULT_MAX_TOKENS). With
    `gradients`, one backward pass per batch gives, at every MoE-block output, the gradients of
    the fp last-position log p(argmax) (fisher) and of the summed next-token NLL (gemq).
    """
    check_model(model, cfg)
    graphdef, state = nnx.split(model)
    embedder = split_embedder(model)
    parts: list[dict] = []
    used = samples = skipped = 0
    for batch in progress.track(_batches(batches), "token cache batches"):
        mask = np.asarray(batch["attention_mask"]).astype(bool)
        lengths = mask.sum(1)
        if skipped or used + lengths[0] > max_tokens:
            skipped += _num_samples(batch)
            continue
        keep = np.cumsum(lengths) + used <= max_tokens
        keep &= np.cumsum(~keep) == 0
        dev, grid = device_inputs(model, batch, embedder)
        out = jax.device_get(multihost.tree_to_host(
            _token_batch(graphdef, state, dev, cfg, grid, gradients)))
        rows = mask & keep[:, None]
        parts.append(jax.tree.map(lambda a, rows=rows: np.asarray(a)[rows], out))
        used += int(rows.sum())
        samples += int((lengths[keep] > 0).sum())
        skipped += int((lengths[~keep] > 0).sum())
    if not parts:
        raise ValueError(f"max_tokens={max_tokens} is smaller than the first sample")
    if skipped:
        log.info("token cache: %d tokens from %d samples; %d samples skipped (max_tokens=%d)",
                 used, samples, skipped, max_tokens)
    layers = []
    for j in range(len(parts[0]["x"])):
        cat = {k: (None if parts[0][k] is None else np.concatenate([p[k][j] for p in parts]))
               for k in parts[0]}
        layers.append(LayerTokens(**cat))
    return TokenCache(tuple(layers), samples, skipped)


def _layer_experts(text: DeepseekV3, layer: int):
    experts = text.layers[layer].mlp.experts
    return experts.gate_up[...], experts.down[...]


def quantized_experts(model, bits, group_size: int, quantizer: str = "rtn",
                      cache: TokenCache | None = None) -> list | None:
    """Per MoE layer, the experts fake-quantized at every candidate bit (`[B, E, ...]` numpy
    pairs, held on the host), or None for round-to-nearest (method.md stage 2), which the
    estimators make on the device a layer or a chunk of experts at a time.

    B copies of every expert would be B times the experts' memory (about 86 GB for Kimi-VL-A3B
    in bf16 at three candidate bits), so copies never sit on the device for all layers at once.
    GPTQ copies (an ablation) need each layer's tokens: they are made layer by layer from the
    cache and moved to the host.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"sensitivity quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    bits = sensitivity.check_bits(bits)
    if quantizer == "rtn":
        return None
    if cache is None:
        raise ValueError("GPTQ sensitivity copies need the token cache (collect_tokens)")
    text = text_model(model)
    copies = []
    for layer, tokens in zip(text.config.moe_layers, cache.layers, strict=True):
        gu, dn = _layer_experts(text, layer)
        copies.append(jax.device_get(sensitivity.gptq_quantize_layer(
            gu, dn, bits, group_size, tokens.x, tokens.ids)))
    return copies


def token_costs(model, cache: TokenCache, bits, group_size: int, *, chunk: int = 16,
                quantized=None) -> dict[str, np.ndarray]:
    """The token-level estimators stacked over MoE layers, each `[L_moe, E, B]`.

    quantized: per layer `[B, E, ...]` copies to compare against (`quantized_experts`); None =
    round-to-nearest, made on the device a chunk of experts at a time.
    """
    bits = sensitivity.check_bits(bits)
    text = text_model(model)
    layers = text.config.moe_layers
    quantized = quantized if quantized is not None else [(None, None)] * len(layers)
    runs = []
    for tokens, layer, q in zip(cache.layers, layers, quantized, strict=True):
        runs.append((tokens, *_layer_experts(text, layer), *q))
    return sensitivity.stacked_costs(runs, num_samples=cache.num_samples, layer_ids=layers,
                                     chunk=chunk, bits=bits, group_size=group_size)


# ---------------------------------------------------------------- stage 2: exact logit KL


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "grid"))
def _prefix_batch(graphdef, state, batch, cfg, grid, index):
    """The fp forward's `LayerPrefix` of MoE layer number `index` (traced: one compile serves
    every layer; the other layers' prefixes are never returned)."""
    model = nnx.merge(graphdef, state)
    tr = trace(model, batch, cfg, grid)
    mask = batch["attention_mask"]
    last = sensitivity.last_logits(tr.logits, sensitivity.last_positions(mask))
    logp = jax.nn.log_softmax(last, -1)

    def pick(j):
        ids, w = tr.routing[j]
        return LayerPrefix(tr.h_after[j], tr.x[j], ids, w, modality_codes(tr.classes[j]), mask,
                           logp, batch.get("positions"), tr.additions)

    return jax.lax.switch(index, [functools.partial(pick, j) for j in range(len(tr.x))])


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "chunk"))
def _kl_layer(graphdef, state, prefix, gu, dn, guq, dnq, layer, chunk):
    text = text_model(nnx.merge(graphdef, state))
    return sensitivity.layer_logit_kl(text, layer, prefix, gu, dn, guq, dnq, chunk)


def logit_kl_pass(model, batches: Sequence[dict], cfg: StatsConfig, bits, group_size: int, *,
                  chunk: int = 8, quantized=None) -> dict[str, np.ndarray]:
    """Exact logit_kl_{text,vision} `[L_moe, E, B]`, averaged over the batches' samples.

    Layer by layer: the layer's B fake-quantized copies of its experts are made (or, from
    `quantized`, as `quantized_experts` returns them, sent) once and freed before the next
    layer, so the device holds one layer's copies, not the model's. For each batch one fp
    forward gives the layer's residual stream; its E * B variants then re-run only the later
    layers, `chunk` variants per folded batch. (The fp forward per layer and batch is cheap
    beside the E * B suffix re-runs it serves.)
    """
    bits = sensitivity.check_bits(bits)
    check_model(model, cfg)
    batches = _batches(batches)
    graphdef, state = nnx.split(model)
    embedder = split_embedder(model)
    text = text_model(model)
    layers = text.config.moe_layers
    n_exp = text.config.n_routed_experts
    sums = np.zeros((len(layers), n_exp, len(bits), 2))
    counts = np.zeros((len(layers), n_exp, 2), np.int64)
    samples = sum(_num_samples(batch) for batch in batches)
    steps = [(j, i) for j in range(len(layers)) for i in range(len(batches))]
    for j, i in progress.track(steps, "logit_kl (layer, batch) steps"):
        if i == 0:  # a new layer: its copies replace the previous layer's
            gu, dn = _layer_experts(text, layers[j])
            copies = None  # drop the last layer's before making these
            copies = (sensitivity.quantize_layer(gu, dn, bits, group_size) if quantized is None
                      else jax.device_put(quantized[j]))
        dev, grid = device_inputs(model, batches[i], embedder)
        prefix = _prefix_batch(graphdef, state, dev, cfg, grid, j)
        kl = _kl_layer(graphdef, state, prefix, gu, dn, *copies, layer=layers[j],
                       chunk=min(chunk, n_exp * len(bits)))
        sums[j] += multihost.to_host(kl).astype(np.float64)
        mod, ids = multihost.to_host(prefix.modality), multihost.to_host(prefix.ids)
        for m, code in enumerate(sensitivity.MODALITY_CODES):
            counts[j, :, m] += np.bincount(ids[mod == code].reshape(-1), minlength=n_exp)
    for j, layer in enumerate(layers):
        sensitivity.note_empty(counts[j], layer, "logit_kl")
    mean = sums / samples
    return {f"logit_kl_{m}": mean[..., i] for i, m in enumerate(sensitivity.MODALITIES)}


# ---------------------------------------------------------------- MoPEQ Hessian trace


def _is_routed_expert(path, _value) -> bool:
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in ("gate_up", "down")


def _routed_experts_of(layers):
    """nnx filter: the routed experts of the decoder layers `layers` only."""
    layers = frozenset(int(i) for i in layers)

    def is_selected(path, value) -> bool:
        if not _is_routed_expert(path, value) or "layers" not in path:
            return False
        return int(path[path.index("layers") + 1]) in layers

    return is_selected


# Each MoE layer a Hutchinson pass probes adds about this many float32 copies of its experts
# to the compiled pass (probe, product, gradient, tangents), whatever the weights' dtype: XLA
# puts it at 5.1 for float32 experts (`benchmarks.sensitivity_memory`) and 5.6 for Kimi-VL's
# bf16 ones (11.5 bf16 layer sizes, `benchmarks.memory_plan`, both on CPU). The auto block size
# lets them take half the free device memory, leaving the rest for the model and activations.
TRACE_ARRAYS_PER_PARAM = 6
TRACE_MEMORY_SHARE = 0.5


def layer_blocks(moe_layers, layers_per_pass: int) -> list[tuple[int, ...]]:
    """Consecutive blocks of `layers_per_pass` MoE layers (0: all of them in one block)."""
    moe_layers = tuple(moe_layers)
    if layers_per_pass < 0:
        raise ValueError(f"layers_per_pass must be >= 0 (0 = all), got {layers_per_pass}")
    k = layers_per_pass or len(moe_layers)
    return [moe_layers[i:i + k] for i in range(0, len(moe_layers), k)]


def auto_layers_per_pass(model, stats: dict | None | str = "device") -> int:
    """How many MoE layers' experts one Hutchinson pass can probe within the free memory of
    the first device (0 = all; also where the backend reports no memory figures, e.g. CPU).
    stats: `memory_stats()` figures to use instead of the device's. Every process of a
    multi-process run takes process 0's answer: the passes must be the same program."""
    if stats == "device":
        stats = jax.local_devices()[0].memory_stats()
    k = 0
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        text = text_model(model)
        per_layer = max(_device_bytes(text.layers[i].mlp.experts) for i in text.config.moe_layers)
        k = max(1, int(TRACE_MEMORY_SHARE * free // (TRACE_ARRAYS_PER_PARAM * max(per_layer, 1))))
        k = 0 if k >= len(text.config.moe_layers) else k
    return multihost.from_primary(k)


def _device_bytes(experts) -> int:
    """Float32 bytes of `experts`' routed weights on one device (one shard of each when
    sharded)."""
    total = 0
    for leaf in (experts.gate_up[...], experts.down[...]):
        shards = getattr(leaf, "addressable_shards", None)
        total += 4 * (shards[0].data.size if shards else leaf.size)
    return total


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "num_probes", "image_token_id",
                                             "curvature"))
def _hessian_batch(graphdef, experts, rest, batch, grid, key, num_probes, image_token_id,
                   curvature):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = jnp.maximum(sensitivity.next_token_targets(ids, mask, image_token_id).sum(), 1)

    def logits(params):
        model = nnx.merge(graphdef, params, rest)
        text = text_model(model)
        h, additions = embed_inputs(model, batch, grid)
        h, _ = text.run_layers(h, decoder_context(text, batch), additions=additions)
        return text.logits(h)

    if curvature == "gauss_newton":
        hvp = sensitivity.next_token_output_hvp(ids, mask, image_token_id, targets)
        return sensitivity.hutchinson_gauss_newton_block_traces(
            lambda p: logits(p)[:, :-1].astype(jnp.float32), hvp, experts, num_probes, key)

    def loss(params):
        return sensitivity.next_token_nll(logits(params), ids, mask, image_token_id) / targets

    return sensitivity.hutchinson_block_traces(loss, experts, num_probes, key)


def hessian_trace_pass(model, batches: Sequence[dict], *, image_token_id: int,
                       num_probes: int = 100, seed: int = 0, curvature: str = "hessian",
                       layers_per_pass: int = 0) -> np.ndarray:
    """MoPEQ's per-expert Hessian trace `[L_moe, E]` (Hutchinson, `num_probes` probes).

    The Hessian is that of the mean next-token cross-entropy of each batch (labels = the
    inputs shifted by one; image-placeholder targets skipped) w.r.t. one expert's weights
    (gate, up and down; the trace is their sum), averaged over batches. MoPEQ calls itself
    data-free: pass `random_token_batches` for that, or calibration batches. `curvature`:
    "hessian" (as MoPEQ) or "gauss_newton", its positive semi-definite part
    (`sensitivity.hutchinson_gauss_newton_block_traces` says why).

    A probe and its Hessian-vector product are each as large as the experts they cover (about
    29 GB per vector for all of Kimi-VL-A3B's in bf16), so `layers_per_pass` > 0 probes that
    many MoE layers' experts per forward-over-backward pass (the rest held fixed), at one pass
    per block of layers: each block's estimate is unbiased, and the other blocks' cross terms
    no longer add variance. 0 = as many as fit the free device memory (`auto_layers_per_pass`:
    every layer on CPU or when they fit).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    moe_layers = text_model(model).config.moe_layers
    if not moe_layers:
        raise ValueError("the model has no MoE layer (n_routed_experts = 0): no expert Hessian")
    blocks = layer_blocks(moe_layers, layers_per_pass or auto_layers_per_pass(model))
    if len(blocks) > 1:
        log.info("hessian trace: %d passes of MoE layers %s", len(blocks), blocks)
    total = np.zeros((len(moe_layers), text_model(model).config.n_routed_experts))
    batches = _batches(batches)
    keys = jax.random.split(jax.random.key(seed), len(batches))
    embedder = split_embedder(model)  # for the vision tower's program (device_inputs)
    steps = [(b, i) for b in range(len(blocks)) for i in range(len(batches))]
    for b, i in progress.track(steps, "hessian trace (layer block, batch) steps"):
        if i == 0:  # a new block: its experts are the differentiated part
            graphdef, experts, rest = nnx.split(model, _routed_experts_of(blocks[b]), ...)
        key = keys[i] if len(blocks) == 1 else jax.random.fold_in(keys[i], b)
        dev, grid = device_inputs(model, batches[i], embedder)
        traces = _hessian_batch(graphdef, experts, rest, dev, grid, key, num_probes,
                                int(image_token_id), curvature)
        traces = jax.device_get(multihost.tree_to_host(traces))
        for path, value in jax.tree_util.tree_flatten_with_path(traces)[0]:
            names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
            layer = names[names.index("layers") + 1]
            total[moe_layers.index(int(layer))] += np.asarray(value, np.float64)
    return total / len(batches)


def nonnegative_trace(trace: np.ndarray) -> np.ndarray:
    """Hutchinson traces clipped at 0, with the clipped experts logged.

    The cross-entropy's Hessian is indefinite, so an expert with little curvature can get a
    negative estimate (on random tokens most do); the Gauss-Newton trace only through probe
    noise. MoPEQ ranks experts by curvature, and "none measurable" is 0 (the budgeted
    variant's cost, trace * 4^-b, would otherwise reward fewer bits).
    """
    negative = np.argwhere(trace < 0)
    if negative.size:
        log.info("hessian_trace: %d negative Hutchinson estimates set to 0 (MoE layer index, "
                 "expert): %s", len(negative), [tuple(int(i) for i in p) for p in negative])
    return np.maximum(trace, 0.0)


def random_token_batches(vocab_size: int, *, num_samples: int, length: int, batch_size: int,
                         seed: int = 0, exclude: Sequence[int] = ()) -> list[dict[str, np.ndarray]]:
    """Seeded uniformly random token sequences (no padding) for data-free estimators."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, np.int64))
    if allowed.size == 0:
        raise ValueError(f"exclude={list(exclude)} leaves no token of a vocab of {vocab_size}")
    rng = np.random.default_rng(seed)
    ids = rng.choice(allowed, size=(num_samples, length)).astype(np.int32)
    return [{"input_ids": ids[i:i + batch_size],
             "attention_mask": np.ones_like(ids[i:i + batch_size])}
            for i in range(0, num_samples, batch_size)]


# ---------------------------------------------------------------- the stage artifact


def sensitivity_pass(model, batches: Sequence[dict], cfg: StatsConfig, *, bits,
                     group_size: int, estimator: str = "expert_mse", baselines: bool = True,
                     max_tokens: int = DEFAULT_MAX_TOKENS, num_probes: int = 100,
                     seed: int = 0, quantizer: str = "rtn", curvature: str = "hessian",
                     trace_layers_per_pass: int = 0, trace_batch_size: int = 0,
                     kl_chunk: int = 8) -> dict[str, np.ndarray]:
    """The sensitivity artifact: bits, delta_{text,vision} (from `estimator`), every computed
    estimator under its own name, and with `baselines` pmq_err, gemq_cost, hessian_trace.
    `quantizer` makes the quantized expert copies every estimator compares against
    (`quantized_experts`).

    hessian_trace is data-free (MoPEQ): random tokens shaped like the calibration batches
    (`trace_batch_size` > 0 splits them into smaller batches: the same tokens and, with no
    padding, the same expected trace, for a pass that needs less memory); it is the trace of
    `curvature` (`hessian_trace_pass`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    batches = _batches(batches)
    bits = sensitivity.check_bits(bits)
    grads = baselines or estimator == "fisher"
    cache = collect_tokens(model, batches, cfg, max_tokens=max_tokens, gradients=grads)
    quantized = quantized_experts(model, bits, group_size, quantizer, cache)
    out = {"bits": bits, **token_costs(model, cache, bits, group_size, quantized=quantized)}
    if estimator == "logit_kl":
        out.update(logit_kl_pass(model, batches, cfg, bits, group_size, chunk=kl_chunk,
                                 quantized=quantized))
    if baselines:
        b, t = np.asarray(batches[0]["input_ids"]).shape
        n = sum(len(np.asarray(x["input_ids"])) for x in batches)
        rand = random_token_batches(text_model(model).config.vocab_size, num_samples=n,
                                    length=t, batch_size=trace_batch_size or b, seed=seed,
                                    exclude=(cfg.image_token_id,))
        trace = hessian_trace_pass(model, rand, image_token_id=cfg.image_token_id,
                                   num_probes=num_probes, seed=seed, curvature=curvature,
                                   layers_per_pass=trace_layers_per_pass)
        out["hessian_trace"] = nonnegative_trace(trace)
    else:
        out = {k: v for k, v in out.items() if k not in ("pmq_err", "gemq_cost")}
    for m in sensitivity.MODALITIES:
        out[f"delta_{m}"] = out[f"{estimator}_{m}"]
    out["num_samples"] = np.int64(cache.num_samples)
    return out
