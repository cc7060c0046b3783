"""Kimi-VL in Flax NNX: MoonViT + projector writing image features into a DeepSeek-V3 LM.

`KimiVL(config)(batch)` takes the dict an HF-style processor produces (docs/design.md):
`input_ids [B, T]`, `attention_mask [B, T]` (1 = real; left or right padding), and optionally
`pixel_values [P, 3, 14, 14]` with `image_grid_hws [N, 2]` (or `image_grid_thw [N, 3]`, t = 1).
The i-th group of `media_placeholder_token_id` tokens (in row-major order over the batch)
receives image i's `h * w / 4` projected features, as Kimi-VL's `_merge_with_image_features`
does. Returns `ModelOutput` (= the text model's `TextOutput`: logits float32, and per-MoE-layer
routing / per-layer image scores when asked for).

Text positions count real tokens (`cumsum(attention_mask) - 1`), the convention of HF
generation for padded batches; Kimi-VL's forward without `position_ids` counts pads too, which
is the same thing whenever there is no left padding.

A model without vision (`vision=None`) is a plain DeepSeek-V3 LM behind the same call; that is
what `DeepseekV3ForCausalLM` and `deepseek_v3` checkpoints convert to.
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
from mode_jax.models.deepseek_v3 import DeepseekV3, TextConfig, TextOutput
from mode_jax.models.moonvit import GridHWs, MoonViT, Projector, VisionConfig, normalize_grid

ModelOutput = TextOutput
SUPPORTED_MODEL_TYPES = ("kimi_vl", "deepseek_v3")
KIMI_VL_MEDIA_PAD_ID = 163605  # <|media_pad|> in Kimi-VL's tokenizer


@dataclasses.dataclass(frozen=True)
class KimiVLConfig:
    """Text + vision configs and the image placeholder token id."""

    text: TextConfig
    vision: VisionConfig | None = None
    media_placeholder_token_id: int | None = KIMI_VL_MEDIA_PAD_ID
    pad_token_id: int = 0

    def __post_init__(self):
        field_types.check(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> KimiVLConfig:
        """From a checkpoint's config.json dict (model_type `kimi_vl` or `deepseek_v3`)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if model_type == "deepseek_v3":
            return cls(text=TextConfig.from_hf(d), vision=None, media_placeholder_token_id=None,
                       pad_token_id=int(d.get("pad_token_id") or 0))
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), Mapping):
                raise ValueError(f"{source}: kimi_vl config lacks the '{key}' object")
        try:
            text = TextConfig.from_hf(d["text_config"])
            vision = VisionConfig.from_kimi_vl(d["vision_config"])
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return cls(text=text, vision=vision,
                   media_placeholder_token_id=int(d.get("media_placeholder_token_id",
                                                        KIMI_VL_MEDIA_PAD_ID)),
                   pad_token_id=int(d.get("pad_token_id") or 0))

    @classmethod
    def from_transformers(cls, config: Any) -> KimiVLConfig:
        """From a transformers `Kimi_K25Config` or `DeepseekV3Config` object."""
        model_type = getattr(config, "model_type", None)
        if model_type == "deepseek_v3":
            return cls(text=TextConfig.from_hf(config), vision=None,
                       media_placeholder_token_id=None,
                       pad_token_id=int(getattr(config, "pad_token_id", None) or 0))
        if model_type != "kimi_k25":
            raise ValueError(f"transformers config model_type {model_type!r} is not supported; "
                             "supported: kimi_k25, deepseek_v3")
        vision = VisionConfig.from_k25(config.vision_config, config.projection_layer_norm_eps)
        if config.projection_hidden_size not in (None, vision.hidden_size):
            raise ValueError(f"kimi_k25 projection_hidden_size {config.projection_hidden_size} "
                             f"differs from the vision width {vision.hidden_size}")
        return cls(text=TextConfig.from_hf(config.text_config), vision=vision,
                   media_placeholder_token_id=int(config.image_token_id),
                   pad_token_id=int(getattr(config.text_config, "pad_token_id", None) or 0))


class KimiVLEmbedder(Embedder):
    """`KimiVL`'s vision tower, projector and token embeddings (`models.batch.Embedder`)."""

    def __init__(self, model: KimiVL):
        super().__init__(model)
        self.vision_tower = model.vision_tower
        self.multi_modal_projector = model.multi_modal_projector

    def image_features(self, pixel_values: jax.Array, grid_hws: GridHWs) -> jax.Array:
        """Projected features `[sum(h * w) / 4, text_hidden]` of all images, in order."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint)")
        return self.per_device_images(
            lambda px, grid: self.multi_modal_projector(self.vision_tower(px, grid)),
            pixel_values, grid_hws)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 grid_hws: GridHWs | None = None) -> tuple[jax.Array, tuple]:
        """Token embeddings `[B, T, D]` with image features written at the placeholders, and
        no additions."""
        h = self.embed_tokens(input_ids.astype(jnp.int32))
        if pixel_values is None:
            return h, ()
        features = self.image_features(pixel_values, grid_hws)
        return place_at_tokens(h, input_ids, self.config.media_placeholder_token_id,
                               features), ()


class KimiVL(nnx.Module):
    """`vision_tower` (MoonViT), `multi_modal_projector`, `language_model` (DeepseekV3)."""

    def __init__(self, config: KimiVLConfig, *, param_dtype=jnp.float32,
                 experts_impl: str = "sorted", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        if config.vision is not None:
            self.vision_tower = MoonViT(config.vision, dtype=param_dtype, rngs=rngs)
            self.multi_modal_projector = Projector(config.vision, config.text.hidden_size,
                                                   dtype=param_dtype, rngs=rngs)
        else:
            self.vision_tower = self.multi_modal_projector = None
        self.language_model = DeepseekV3(config.text, param_dtype=param_dtype, rngs=rngs)
        if experts_impl not in ("sorted", "dense"):
            raise ValueError(f"experts_impl must be 'sorted' or 'dense', got {experts_impl!r}")
        for layer in self.language_model.layers:
            if layer.is_moe:
                layer.mlp.experts.impl = experts_impl

    def embedder(self) -> KimiVLEmbedder:
        """The modules `embed_inputs` reads, apart from the decoder (`models.batch.Embedder`)."""
        return KimiVLEmbedder(self)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              grid_hws: GridHWs | None = None) -> jax.Array:
        """Token embeddings `[B, T, D]` with image features written at the placeholders."""
        return self.embedder()(input_ids, pixel_values, grid_hws)[0]

    def prepare(self, batch: Mapping[str, Any]) -> Prepared:
        """The checked batch (`models.batch`); positions count real tokens."""
        a = prepare_batch(self.config, batch)
        return Prepared(a["input_ids"], a["attention_mask"], a["pixel_values"], a["grid_hws"])

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     grid_hws: GridHWs | None = None) -> tuple[jax.Array, tuple]:
        """`(embed(...), ())`: Kimi-VL adds nothing inside the decoder (`models.batch`)."""
        return self.embedder()(input_ids, pixel_values, grid_hws)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                pixel_values: jax.Array | None = None, grid_hws: GridHWs | None = None,
                positions: jax.Array | None = None, *,
                image_query_mask: jax.Array | None = None, return_routing: bool = False,
                return_mlp_inputs: bool = False, return_hidden: bool = False,
                logits_window: int = 0, embedded: tuple | None = None) -> ModelOutput:
        """The traceable forward (grid_hws and the flags static); `__call__` jits it.
        logits_window > 0: the last positions' logits only (`DeepseekV3.__call__`).
        embedded: `embed_inputs`' result when computed apart (`models.batch.run_forward`)."""
        h = self.embed(input_ids, pixel_values, grid_hws) if embedded is None else embedded[0]
        return self.language_model(
            inputs_embeds=h, attention_mask=attention_mask, positions=positions,
            image_query_mask=image_query_mask,
            return_routing=return_routing, return_mlp_inputs=return_mlp_inputs,
            return_hidden=return_hidden, logits_window=logits_window)

    def __call__(self, batch: Mapping[str, Any], *, return_routing: bool = False,
                 image_query_mask: Any = None, return_mlp_inputs: bool = False,
                 return_hidden: bool = False, logits_window: int = 0) -> ModelOutput:
        """Check the batch on the host, then run `forward` under `nnx.jit` (on a model split
        over a mesh, with the batch split over its "data" axis: `sharding.place_inputs`)."""
        return run_forward(self, _forward_jit, prepare_batch(self.config, batch),
                           image_query_mask, return_routing=return_routing,
                           return_mlp_inputs=return_mlp_inputs, return_hidden=return_hidden,
                           logits_window=logits_window)


@nnx.jit(static_argnames=("grid_hws", "return_routing", "return_mlp_inputs", "return_hidden",
                          "logits_window"))
def _forward_jit(model, input_ids, attention_mask, pixel_values, grid_hws, **kwargs):
    return model.forward(input_ids, attention_mask, pixel_values, grid_hws, **kwargs)


def prepare_batch(config: KimiVLConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an HF-style batch; returns forward's arrays (+ `grid_hws` as a static tuple)."""
    ids, mask = check_tokens(batch, config.text.vocab_size)
    pixels = batch.get("pixel_values")
    grid = batch.get("image_grid_hws", batch.get("image_grid_thw"))
    n_slots = (int((ids == config.media_placeholder_token_id).sum())
               if config.media_placeholder_token_id is not None else 0)
    out = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, bool),
           "pixel_values": None, "grid_hws": None}
    if pixels is None or np.shape(pixels)[0] == 0:
        if n_slots:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens "
                             f"(id {config.media_placeholder_token_id}) but no pixel_values")
        return out
    if config.vision is None:
        raise ValueError("pixel_values given to a model without a vision tower")
    if grid is None:
        raise ValueError("pixel_values need 'image_grid_hws' [N, 2] or 'image_grid_thw' [N, 3]")
    grid_hws = normalize_grid(grid, config.vision.merge_kernel)
    n_features = sum(h * w for h, w in grid_hws) // config.vision.merge_size
    if n_features != n_slots:
        raise ValueError(f"images give {n_features} features (grids {grid_hws}) but input_ids "
                         f"hold {n_slots} placeholder tokens "
                         f"(id {config.media_placeholder_token_id})")
    out.update(pixel_values=jnp.asarray(pixels), grid_hws=grid_hws)
    return out
