"""Conversion of Qwen3-VL-MoE (and text-only Qwen3-MoE) checkpoints to `models.qwen3_vl_moe`.

Targets: `visual.*` (the vision tower) and `language_model.*` (the Qwen3-MoE text model).
Source names, shared by published checkpoints and transformers' state dicts:
  qwen3_vl_moe: model.visual.*, model.language_model.{embed_tokens, layers, norm}.*,
    lm_head.weight (absent when the embeddings are tied);
  qwen3_moe: model.{embed_tokens, layers, norm}.*, lm_head.weight.
The fused experts differ: files written by transformers 4.x (the published Qwen3-VL-MoE
checkpoints) hold `[E, D, 2F]` / `[E, F, D]`; transformers 5 keeps `[E, 2F, D]` / `[E, D, F]`
in memory and saves them so (`qwen3_moe_keys`). A directory's layout is read from the
`transformers_version` in its config.json (`qwen3_moe_keys.experts_layout`).

`from_directory` streams a checkpoint directory shard by shard (no torch); `from_torch` reads an
in-memory model's state dict. Both fail once, listing every unknown, missing, misshapen or
non-finite tensor (`mapping.MappingError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mode_jax.convert import deepseek_v3_keys, mapping, qwen3_moe_keys, safetensors_io
from mode_jax.convert.mapping import Rule
from mode_jax.convert.qwen3_moe_keys import experts_layout
from mode_jax.convert.qwen3_vl_vision_keys import vision_rules
from mode_jax.models.qwen3_vl_moe import Qwen3VLMoe, Qwen3VLMoeConfig


def model_rules(config: Qwen3VLMoeConfig, experts_layout: str) -> tuple[list[Rule], list[str]]:
    """(rules, ignored-name regexes) for this config; `experts_layout` "published" (files) or
    "torch" (transformers in memory)."""
    prefix = "model." if config.vision is None else "model.language_model."
    rules = qwen3_moe_keys.text_rules(prefix, "lm_head.", target_prefix="language_model.",
                                      experts_layout=experts_layout)
    if config.vision is not None:
        rules += vision_rules("model.visual.", "visual.")
    return rules, qwen3_moe_keys.text_ignore(config.text, prefix)


def abstract_model(config: Qwen3VLMoeConfig, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> Qwen3VLMoe:
    """The model's structure without values (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: Qwen3VLMoe(config, param_dtype=param_dtype,
                                             experts_impl=experts_impl, rngs=nnx.Rngs(0)))


def from_directory(path: str | Path, *, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> Qwen3VLMoe:
    """Convert a published checkpoint directory (`config.json` model_type qwen3_vl_moe or
    qwen3_moe, `*.safetensors` with or without an index), one tensor at a time."""
    raw = safetensors_io.read_config(path)
    source = str(Path(path) / safetensors_io.CONFIG_NAME)
    config = Qwen3VLMoeConfig.from_dict(raw, source=source)
    rules, ignore = model_rules(config, experts_layout(raw))
    return safetensors_io.convert_directory(
        path, rules, abstract_model(config, param_dtype, experts_impl), ignore)


def from_torch(torch_model: Any, *, param_dtype=jnp.float32,
               experts_impl: str = "sorted") -> Qwen3VLMoe:
    """Convert an in-memory transformers `Qwen3VLMoeForConditionalGeneration` or
    `Qwen3MoeForCausalLM` (bf16 tensors stay bf16 until cast to `param_dtype`)."""
    config = Qwen3VLMoeConfig.from_dict(torch_model.config.to_dict(), source="torch model")
    rules, ignore = model_rules(config, "torch")
    abstract = abstract_model(config, param_dtype, experts_impl)
    return mapping.convert(deepseek_v3_keys.torch_items(torch_model), rules, abstract,
                           ignore=ignore)
