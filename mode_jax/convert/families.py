"""Which model family a checkpoint belongs to, and that family's converter.

A family is a config class, a model class and a converter module with `from_directory`,
`from_torch` and `abstract_model` (convert/kimivl.py, convert/qwen3_vl_moe.py,
convert/internvl.py). The stages,
`mode_jax.load` and the packed-model artifact pick the family from config.json's `model_type`
(or the artifact's recorded family name), so no other code needs to know which one it holds.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_module: str  # module holding `config_class`
    config_class: str
    converter: str  # module with from_directory / from_torch / abstract_model

    def config_cls(self):
        return getattr(importlib.import_module(self.config_module), self.config_class)

    def convert(self):
        return importlib.import_module(self.converter)

    def config_from_json(self, d: Mapping[str, Any], source: str = "config"):
        """The model config from a checkpoint's config.json dict."""
        return self.config_cls().from_dict(d, source=source)


FAMILIES = (
    # kimi_k25: transformers' in-memory Kimi-K2.5 (from_torch), the reference for Kimi-VL
    Family("kimi_vl", ("kimi_vl", "deepseek_v3", "kimi_k25"), "mode_jax.models.kimivl",
           "KimiVLConfig", "mode_jax.convert.kimivl"),
    Family("qwen3_vl_moe", ("qwen3_vl_moe", "qwen3_moe"), "mode_jax.models.qwen3_vl_moe",
           "Qwen3VLMoeConfig", "mode_jax.convert.qwen3_vl_moe"),
    Family("internvl", ("internvl",), "mode_jax.models.internvl", "InternVLConfig",
           "mode_jax.convert.internvl"),
)
MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def for_model_type(model_type: Any, source: str = "config") -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(MODEL_TYPES)}")


def by_name(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; known: "
                     f"{', '.join(f.name for f in FAMILIES)}")


def for_config(config: Any) -> Family:
    """The family of a model config object (an instance of some family's config class)."""
    for f in FAMILIES:
        if type(config).__name__ == f.config_class:
            return f
    raise ValueError(f"no model family has config class {type(config).__name__}")


def image_token_id(config: Any) -> int | None:
    """The id of the image placeholder token (None for a text-only model)."""
    return getattr(config, "media_placeholder_token_id", getattr(config, "image_token_id", None))


def _qwen_grid(vision, grid: tuple[int, int]) -> tuple[int, int]:
    m = vision.spatial_merge_size
    return tuple(-(-g // m) * m for g in grid)  # rounded up to whole merge windows


def image_tokens(config: Any, grid: tuple[int, int] = (4, 4)) -> int:
    """How many placeholder tokens one image of `grid` patches takes (`random_images`)."""
    vision, family = config.vision, for_config(config).name
    if family == "internvl":
        return vision.tokens_per_tile  # one tile whatever the grid
    if family == "qwen3_vl_moe":
        h, w = _qwen_grid(vision, grid)
        return h * w // vision.spatial_merge_size**2
    return grid[0] * grid[1] // 4  # Kimi-VL's 2x2 merge


def random_images(config: Any, num_images: int, rng: np.random.Generator,
                  grid: tuple[int, int] = (4, 4)) -> dict[str, np.ndarray]:
    """Random pixels for `num_images` images of `grid` patches in the family's processor
    format: InternVL's `[N, C, S, S]` tiles (one per image; `grid` is not used), Qwen3-VL's
    flattened (C, T, p, p) patches with (t, h, w) grids, or Kimi-VL's `[P, 3, 14, 14]` patches
    with (h, w) grids."""
    vision, family = config.vision, for_config(config).name
    if family == "internvl":
        s = vision.image_size
        pixels = rng.standard_normal((num_images, vision.num_channels, s, s))
        return {"pixel_values": pixels.astype(np.float32),
                "image_num_patches": np.ones(num_images, np.int64)}
    if family == "qwen3_vl_moe":
        h, w = _qwen_grid(vision, grid)
        pixels = rng.standard_normal((num_images * h * w, vision.patch_dim))
        return {"pixel_values": pixels.astype(np.float32),
                "image_grid_thw": np.tile(np.asarray([(1, h, w)], np.int64), (num_images, 1))}
    h, w = grid
    pixels = rng.standard_normal((num_images * h * w, 3, 14, 14))
    return {"pixel_values": pixels.astype(np.float32),
            "image_grid_hws": np.tile(np.asarray([grid], np.int64), (num_images, 1))}
