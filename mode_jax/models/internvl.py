"""InternVL (3.5-MoE) in Flax NNX: InternViT tiles written into a Qwen3-MoE language model.

`InternVL(config)(batch)` takes the dict InternVL's HF processor produces: `input_ids [B, T]`,
`attention_mask [B, T]` (1 = real; left or right padding) and optionally `pixel_values
[N, 3, S, S]`, the tiles of every image in order (`image_num_patches [I]`, tiles per image, is
checked when present). Each tile yields `tokens_per_tile` features; the k-th image token
(`<IMG_CONTEXT>`, row-major over the batch) receives the k-th feature, as transformers'
`masked_scatter` does. Positions are plain 1-D: each real token counts the real tokens before it
(what transformers' `generate` derives from the attention mask), pads get 0. No DeepStack, so
`embed_inputs` returns no additions. It returns the text model's `TextOutput`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax.models import field_types
from mode_jax.models.batch import Embedder, Prepared, check_tokens, place_at_tokens, run_forward
from mode_jax.models.deepseek_v3 import TextOutput
from mode_jax.models.internvl_vision import InternVLVision, VisionConfig
from mode_jax.models.qwen3_moe import Qwen3MoeText, TextConfig

IMAGE_TOKEN_ID = 151671  # <IMG_CONTEXT> in InternVL3.5's Qwen3 tokenizer


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """Text + vision configs and the image token id."""

    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = IMAGE_TOKEN_ID
    pad_token_id: int = 0

    def __post_init__(self):
        field_types.check(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> InternVLConfig:
        """From a checkpoint's config.json dict (model_type `internvl`, text `qwen3_moe`)."""
        if d.get("model_type") != "internvl":
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'internvl'")
        try:
            for key in ("text_config", "vision_config"):
                if not isinstance(d.get(key), Mapping):
                    raise ValueError(f"internvl config lacks the '{key}' object")
            text_type = d["text_config"].get("model_type")
            if text_type != "qwen3_moe":
                raise ValueError(f"text model_type {text_type!r} is not supported; only "
                                 "'qwen3_moe' (InternVL3.5's MoE models) has routed experts")
            # transformers ties by the top-level flag (InternVLConfig's default: True)
            text = dict(d["text_config"],
                        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
            text_cfg = TextConfig.from_hf(text)
            return cls(text=text_cfg,
                       vision=VisionConfig.from_hf(d, text_cfg.hidden_size),
                       image_token_id=int(d.get("image_token_id", IMAGE_TOKEN_ID)),
                       pad_token_id=int(d["text_config"].get("pad_token_id") or 0))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: {err}") from None


class InternVLEmbedder(Embedder):
    """`InternVL`'s vision tower (with its projector) and token embeddings
    (`models.batch.Embedder`)."""

    def __init__(self, model: InternVL):
        super().__init__(model)
        self.vision_tower = model.vision_tower

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 grid: Any = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        del grid  # the tiles' shape says everything
        h = self.embed_tokens(input_ids.astype(jnp.int32))
        if pixel_values is None:
            return h, ()
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower")
        features = self.per_device_images(lambda px, _: self.vision_tower(px), pixel_values,
                                          None)
        return place_at_tokens(h, input_ids, self.config.image_token_id, features), ()


class InternVL(nnx.Module):
    """`vision_tower` (InternViT + projector) and `language_model` (Qwen3MoeText)."""

    def __init__(self, config: InternVLConfig, *, param_dtype=jnp.float32,
                 experts_impl: str = "sorted", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.vision_tower = (None if config.vision is None
                             else InternVLVision(config.vision, dtype=param_dtype, rngs=rngs))
        self.language_model = Qwen3MoeText(config.text, param_dtype=param_dtype,
                                           experts_impl=experts_impl, rngs=rngs)

    def prepare(self, batch: Mapping[str, Any]) -> Prepared:
        """The checked batch (`models.batch`); the static grid is the tiles per image."""
        a = prepare_batch(self.config, batch)
        return Prepared(a["input_ids"], a["attention_mask"], a["pixel_values"], a["grid"])

    def embedder(self) -> InternVLEmbedder:
        """The modules `embed_inputs` reads, apart from the decoder (`models.batch.Embedder`)."""
        return InternVLEmbedder(self)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     grid: Any = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Token embeddings `[B, T, D]` with the tiles' features at the image tokens."""
        return self.embedder()(input_ids, pixel_values, grid)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, grid=None,
                positions=None, *, image_query_mask=None, return_routing: bool = False,
                return_mlp_inputs: bool = False, return_hidden: bool = False,
                logits_window: int = 0, embedded: tuple | None = None) -> TextOutput:
        """The traceable forward (the flags static); `__call__` jits it.
        embedded: `embed_inputs`' result when computed apart (`models.batch.run_forward`)."""
        h, _ = self.embed_inputs(input_ids, pixel_values, grid) if embedded is None else embedded
        return self.language_model(
            inputs_embeds=h, attention_mask=attention_mask, positions=positions,
            image_query_mask=image_query_mask, return_routing=return_routing,
            return_mlp_inputs=return_mlp_inputs, return_hidden=return_hidden,
            logits_window=logits_window)

    def __call__(self, batch: Mapping[str, Any], *, return_routing: bool = False,
                 image_query_mask: Any = None, return_mlp_inputs: bool = False,
                 return_hidden: bool = False, logits_window: int = 0) -> TextOutput:
        """Check the batch on the host, then run `forward` jitted (on a model split over a
        mesh, with the batch split over its "data" axis: `sharding.place_inputs`)."""
        a = prepare_batch(self.config, batch)
        args = {k: a[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        return run_forward(self, _forward_jit, args, image_query_mask,
                           return_routing=return_routing, return_mlp_inputs=return_mlp_inputs,
                           return_hidden=return_hidden, logits_window=logits_window)


@nnx.jit(static_argnames=("return_routing", "return_mlp_inputs", "return_hidden",
                          "logits_window"))
def _forward_jit(model, input_ids, attention_mask, pixel_values, **kw):
    return model.forward(input_ids, attention_mask, pixel_values, **kw)


def prepare_batch(config: InternVLConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an HF-style batch; returns `input_ids`, `attention_mask`, `pixel_values` (or
    None) and `grid` (tiles per image as a tuple, or None)."""
    if batch.get("pixel_values_videos") is not None:
        raise ValueError("video inputs (pixel_values_videos) are not supported yet")
    ids, mask = check_tokens(batch, config.text.vocab_size)
    mask = mask.astype(bool)
    slots = ids == config.image_token_id
    out = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask),
           "pixel_values": None, "grid": None}
    pixels = batch.get("pixel_values")
    if pixels is None or np.shape(pixels)[0] == 0:
        if slots.any():
            raise ValueError(f"input_ids hold {int(slots.sum())} image tokens "
                             f"(id {config.image_token_id}) but no pixel_values")
        return out
    if config.vision is None:
        raise ValueError("pixel_values given to a model without a vision tower")
    v = config.vision
    shape = tuple(np.shape(pixels))
    if len(shape) != 4 or shape[1:] != (v.num_channels, v.image_size, v.image_size):
        raise ValueError(f"pixel_values must be [N, {v.num_channels}, {v.image_size}, "
                         f"{v.image_size}] tiles, got {shape}")
    tiles = batch.get("image_num_patches")
    tiles = (shape[0],) if tiles is None else tuple(int(n) for n in np.ravel(tiles))
    if sum(tiles) != shape[0] or min(tiles) < 1:
        raise ValueError(f"image_num_patches {list(tiles)} do not add up to the {shape[0]} "
                         "tiles in pixel_values")
    n_features = shape[0] * v.tokens_per_tile
    if n_features != int(slots.sum()):
        raise ValueError(f"{shape[0]} tiles give {n_features} features ({v.tokens_per_tile} "
                         f"each) but input_ids hold {int(slots.sum())} image tokens "
                         f"(id {config.image_token_id})")
    if (slots & ~mask).any():
        raise ValueError("image tokens under attention_mask = 0 (padding)")
    return dict(out, pixel_values=jnp.asarray(pixels), grid=tiles)
