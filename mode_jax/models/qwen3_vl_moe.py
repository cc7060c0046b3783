"""Qwen3-VL-MoE in Flax NNX: the Qwen3-VL vision tower writing image features (and DeepStack
features) into a Qwen3-MoE language model with M-RoPE.

`Qwen3VLMoe(config)(batch)` takes the dict Qwen3-VL's HF processor produces: `input_ids [B, T]`,
`attention_mask [B, T]` (1 = real; left or right padding), and optionally `pixel_values
[P, C * T * p * p]` with `image_grid_thw [N, 3]` and `mm_token_type_ids [B, T]` (1 = image
token; derived from `image_token_id` when absent). It returns the text model's `TextOutput`.
What it does, following transformers' `Qwen3VLMoeModel`:
- the i-th run of image tokens (row-major over the batch) receives image i's merged features,
  in order, and the DeepStack features are added at the same positions after the first
  decoder layers;
- positions (`rope_positions`, on the host): each real token gets (time, height, width)
  positions; a text run counts on from where the previous run ended, identically on the three
  axes; an image of merged grid (t, h, w) starting at position s gets (s + frame, s + row,
  s + col), and the next run starts at s + max(h, w) (Qwen3-VL's rule; frames of one image
  count 0..t-1). Pads get 0. `rope_delta = max position + 1 - real tokens` is what a KV-cached
  continuation adds to its token count (`qwen3_moe.KVCache.rope_delta`).
Images only: video inputs (`pixel_values_videos`, token type 2) are rejected with an error.
A `qwen3_moe` checkpoint (text only) builds the same class without a vision tower.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types
from mode_jax.models.batch import Embedder, Prepared, check_tokens, place_at_tokens, run_forward
from mode_jax.models.deepseek_v3 import TextOutput
from mode_jax.models.qwen3_moe import Qwen3MoeText, TextConfig
from mode_jax.models.qwen3_vl_vision import GridTHW, Qwen3VLVision, VisionConfig, normalize_grid

SUPPORTED_MODEL_TYPES = ("qwen3_vl_moe", "qwen3_moe")
IMAGE_TOKEN_ID = 151655  # <|image_pad|> in Qwen3-VL's tokenizer


@dataclasses.dataclass(frozen=True)
class Qwen3VLMoeConfig:
    """Text + vision configs and the image token id."""

    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = IMAGE_TOKEN_ID
    pad_token_id: int = 0

    def __post_init__(self):
        field_types.check(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> Qwen3VLMoeConfig:
        """From a checkpoint's config.json dict (model_type `qwen3_vl_moe` or `qwen3_moe`)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported here; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            if model_type == "qwen3_moe":
                return cls(text=TextConfig.from_hf(d), image_token_id=None,
                           pad_token_id=int(d.get("pad_token_id") or 0))
            for key in ("text_config", "vision_config"):
                if not isinstance(d.get(key), Mapping):
                    raise ValueError(f"qwen3_vl_moe config lacks the '{key}' object")
            # transformers ties by the top-level flag; text_config's own default is True
            text = dict(d["text_config"], model_type="qwen3_vl_moe_text",
                        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
            return cls(text=TextConfig.from_hf(text), vision=VisionConfig.from_hf(d),
                       image_token_id=int(d.get("image_token_id", IMAGE_TOKEN_ID)),
                       pad_token_id=int(d["text_config"].get("pad_token_id") or 0))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


class Qwen3VLMoeEmbedder(Embedder):
    """`Qwen3VLMoe`'s vision tower and token embeddings (`models.batch.Embedder`)."""

    def __init__(self, model: Qwen3VLMoe):
        super().__init__(model)
        self.visual = model.visual

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 grid_thw: GridTHW | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        h = self.embed_tokens(input_ids.astype(jnp.int32))
        if pixel_values is None:
            return h, ()
        if self.visual is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint)")
        features, deepstack = self.per_device_images(self.visual, pixel_values, grid_thw)
        image, zeros = self.config.image_token_id, jnp.zeros_like(h)
        return (place_at_tokens(h, input_ids, image, features),
                tuple(place_at_tokens(zeros, input_ids, image, f) for f in deepstack))


class Qwen3VLMoe(nnx.Module):
    """`visual` (Qwen3VLVision) and `language_model` (Qwen3MoeText)."""

    def __init__(self, config: Qwen3VLMoeConfig, *, param_dtype=jnp.float32,
                 experts_impl: str = "sorted", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.visual = (None if config.vision is None
                       else Qwen3VLVision(config.vision, dtype=param_dtype, rngs=rngs))
        self.language_model = Qwen3MoeText(config.text, param_dtype=param_dtype,
                                           experts_impl=experts_impl, rngs=rngs)

    def prepare(self, batch: Mapping[str, Any]) -> Prepared:
        """The checked batch with its M-RoPE positions and rope deltas (`models.batch`)."""
        a = prepare_batch(self.config, batch)
        return Prepared(a["input_ids"], a["attention_mask"], a["pixel_values"], a["grid_thw"],
                        a["positions"], a["rope_delta"])

    def embedder(self) -> Qwen3VLMoeEmbedder:
        """The modules `embed_inputs` reads, apart from the decoder (`models.batch.Embedder`)."""
        return Qwen3VLMoeEmbedder(self)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     grid_thw: GridTHW | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Token embeddings `[B, T, D]` with image features at the image tokens, and the
        DeepStack features scattered to `[B, T, D]` (zeros elsewhere; empty without images)."""
        return self.embedder()(input_ids, pixel_values, grid_thw)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, grid_thw=None,
                positions=None, *, image_query_mask=None, return_routing: bool = False,
                return_mlp_inputs: bool = False, return_hidden: bool = False,
                logits_window: int = 0, embedded: tuple | None = None) -> TextOutput:
        """The traceable forward (grid_thw and the flags static); `__call__` jits it.
        embedded: `embed_inputs`' result when computed apart (`models.batch.run_forward`)."""
        h, deepstack = (self.embed_inputs(input_ids, pixel_values, grid_thw) if embedded is None
                        else embedded)
        return self.language_model(
            inputs_embeds=h, attention_mask=attention_mask, positions=positions,
            additions=deepstack, image_query_mask=image_query_mask,
            return_routing=return_routing, return_mlp_inputs=return_mlp_inputs,
            return_hidden=return_hidden, logits_window=logits_window)

    def __call__(self, batch: Mapping[str, Any], *, return_routing: bool = False,
                 image_query_mask: Any = None, return_mlp_inputs: bool = False,
                 return_hidden: bool = False, logits_window: int = 0) -> TextOutput:
        """Check the batch and compute positions on the host, then run `forward` jitted (on
        a model split over a mesh, with the batch split over "data": `sharding.place_inputs`)."""
        args = prepare_batch(self.config, batch)
        args.pop("rope_delta")
        return run_forward(self, _forward_jit, args, image_query_mask,
                           return_routing=return_routing, return_mlp_inputs=return_mlp_inputs,
                           return_hidden=return_hidden, logits_window=logits_window)


@nnx.jit(static_argnames=("grid_thw", "return_routing", "return_mlp_inputs", "return_hidden",
                          "logits_window"))
def _forward_jit(model, input_ids, attention_mask, pixel_values, grid_thw, positions, **kw):
    return model.forward(input_ids, attention_mask, pixel_values, grid_thw, positions, **kw)


def rope_positions(token_types: np.ndarray, attention_mask: np.ndarray, grid_thw: GridTHW,
                   merge: int) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, B, T]` int32 and `rope_delta [B]` (module docstring).

    token_types `[B, T]`: 0 text, 1 image; grid_thw: the patch grid of each image in order.
    """
    b, t = token_types.shape
    positions = np.zeros((3, b, t), np.int32)
    deltas = np.zeros(b, np.int32)
    grids = iter(grid_thw)
    for row in range(b):
        real = np.flatnonzero(attention_mask[row])
        types = token_types[row, real]
        pieces, pos = [], 0
        for kind, run in itertools.groupby(types.tolist()):
            n = len(list(run))
            if kind == 0:
                pieces.append(np.broadcast_to(pos + np.arange(n), (3, n)))
                pos += n
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError("input_ids hold more image-token runs than image_grid_thw rows")
            gt, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
            if gt * gh * gw != n:
                raise ValueError(f"an image-token run of {n} tokens meets image grid {grid}, "
                                 f"which gives {gt * gh * gw} merged features")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(pos + np.stack([tt, hh, ww]).reshape(3, -1))
            pos += max(gh, gw)
        if pieces:
            flat = np.concatenate(pieces, axis=1)
            positions[:, row, real] = flat
            deltas[row] = flat.max() + 1 - len(real)
    return positions, deltas


def prepare_batch(config: Qwen3VLMoeConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an HF-style batch; returns forward's arrays (+ `grid_thw` static, positions
    `[3, B, T]` and `rope_delta [B]`)."""
    if batch.get("pixel_values_videos") is not None:
        raise ValueError("video inputs (pixel_values_videos) are not supported yet")
    ids, mask = check_tokens(batch, config.text.vocab_size)
    mask = mask.astype(bool)
    slots = (ids == config.image_token_id if config.image_token_id is not None
             else np.zeros(ids.shape, bool))
    types = np.asarray(batch.get("mm_token_type_ids", slots.astype(np.int32)))
    if types.shape != ids.shape:
        raise ValueError(f"mm_token_type_ids must be {ids.shape}, got {types.shape}")
    if (types == 2).any():
        raise ValueError("mm_token_type_ids mark video tokens (2); videos are not supported yet")
    if not np.array_equal(types == 1, slots):
        raise ValueError(f"mm_token_type_ids (1 = image) disagree with the image tokens "
                         f"(id {config.image_token_id}) in input_ids")
    pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    out = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask),
           "pixel_values": None, "grid_thw": None}
    if pixels is None or np.shape(pixels)[0] == 0:
        if slots.any():
            raise ValueError(f"input_ids hold {int(slots.sum())} image tokens "
                             f"(id {config.image_token_id}) but no pixel_values")
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
        return dict(out, positions=jnp.asarray(positions), rope_delta=np.zeros(len(ids), np.int32))
    if config.vision is None:
        raise ValueError("pixel_values given to a model without a vision tower")
    if grid is None:
        raise ValueError("pixel_values need 'image_grid_thw' [N, 3]")
    merge = config.vision.spatial_merge_size
    grid_thw = normalize_grid(grid, merge)
    n_features = sum(t * h * w for t, h, w in grid_thw) // merge**2
    if n_features != int(slots.sum()):
        raise ValueError(f"images give {n_features} features (grids {grid_thw}) but input_ids "
                         f"hold {int(slots.sum())} image tokens (id {config.image_token_id})")
    if (slots & ~mask).any():
        raise ValueError("image tokens under attention_mask = 0 (padding)")
    positions, deltas = rope_positions(types, mask, grid_thw, merge)
    return dict(out, pixel_values=jnp.asarray(pixels), grid_thw=grid_thw,
                positions=jnp.asarray(positions), rope_delta=deltas)
