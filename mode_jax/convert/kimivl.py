"""Conversion rules for Kimi-VL: the published checkpoint layout and transformers' `kimi_k25`.

Targets are paths of `mode_jax.models.kimivl.KimiVL`: `vision_tower.*` (MoonViT),
`multi_modal_projector.*`, `language_model.*` (the DeepSeek-V3 text model).

Published Kimi-VL names (`config.json` model_type `kimi_vl`):
  vision_tower.patch_embed.proj.{weight [D, 3, 14, 14], bias}, vision_tower.patch_embed.pos_emb
  .weight [H, W, D], vision_tower.encoder.blocks.{i}.{norm0, norm1, wqkv, wo, mlp.fc0, mlp.fc1},
  vision_tower.encoder.final_layernorm, multi_modal_projector.{pre_norm, linear_1, linear_2},
  language_model.{model.*, lm_head.weight}.
transformers `Kimi_K25ForConditionalGeneration` state dict:
  model.vision_tower.{patch_embed.proj, patch_embed.pos_emb.position_embeddings,
  layers.{i}.{norm1, norm2, attn.{q,k,v}_proj, attn.proj, mlp.fc1, mlp.fc2}, final_layernorm},
  model.mm_projector.{pre_norm, in_proj, out_proj}, model.language_model.*, lm_head.weight.
K2.5's q/k rows are in rotate-half order; `moonvit.half_to_interleaved_rows` reorders them into
Kimi-VL's interleaved-pair order while they are written into the fused `wqkv`.
transformers `DeepseekV3ForCausalLM` and published `deepseek_v3` directories: `model.*`,
`lm_head.weight` (text only).

`from_directory` streams a checkpoint directory shard by shard (no torch); `from_torch` reads an
in-memory model's state dict. Both fail once, listing every unknown, missing, misshapen or
non-finite tensor (`mapping.MappingError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mode_jax.convert import deepseek_v3_keys, mapping, safetensors_io
from mode_jax.convert.mapping import (
    Rule,
    compose,
    flatten_conv,
    linear_rules,
    norm_rules,
    transpose,
)
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.models.moonvit import VisionConfig, half_to_interleaved_rows


def vision_rules_published(src: str = "", dst: str = "") -> list[Rule]:
    """Rules for Kimi-VL's own names (`vision_tower.*`, `multi_modal_projector.*`)."""
    s, d = re.escape(src), dst
    block = s + r"vision_tower\.encoder\.blocks\.(?P<i>\d+)\."
    out = d + "vision_tower.blocks.{i}."
    rules = [
        Rule(s + r"vision_tower\.patch_embed\.proj\.weight", d + "vision_tower.patch_embed.kernel",
             flatten_conv),
        Rule(s + r"vision_tower\.patch_embed\.proj\.bias", d + "vision_tower.patch_embed.bias"),
        Rule(s + r"vision_tower\.patch_embed\.pos_emb\.weight", d + "vision_tower.pos_emb"),
    ]
    for name in ("norm0", "norm1"):
        rules += norm_rules(block + name, out + name)
    for src_name, dst_name in (("wqkv", "wqkv"), ("wo", "wo"), (r"mlp\.fc0", "fc0"),
                               (r"mlp\.fc1", "fc1")):
        rules += linear_rules(block + src_name, out + dst_name)
    rules += norm_rules(s + r"vision_tower\.encoder\.final_layernorm",
                         d + "vision_tower.final_layernorm")
    rules += norm_rules(s + r"multi_modal_projector\.pre_norm",
                         d + "multi_modal_projector.pre_norm")
    for name in ("linear_1", "linear_2"):
        rules += linear_rules(s + r"multi_modal_projector\." + name,
                               d + "multi_modal_projector." + name)
    return rules


def _qkv_part(part: int):
    """Index of the q (0), k (1) or v (2) third of a fused `wqkv` kernel `[D, 3D]` or bias."""

    def index(groups, shape):
        n = shape[-1] // 3
        return (Ellipsis, slice(part * n, (part + 1) * n))

    return index


def vision_rules_k25(cfg: VisionConfig, src: str = "model.", dst: str = "") -> list[Rule]:
    """Rules for transformers' `Kimi_K25ForConditionalGeneration` vision tower and projector."""
    s, d = re.escape(src), dst
    perm = half_to_interleaved_rows(cfg.num_heads, cfg.head_dim)
    layer = s + r"vision_tower\.layers\.(?P<i>\d+)\."
    out = d + "vision_tower.blocks.{i}."
    rules = [
        Rule(s + r"vision_tower\.patch_embed\.proj\.weight", d + "vision_tower.patch_embed.kernel",
             flatten_conv),
        Rule(s + r"vision_tower\.patch_embed\.proj\.bias", d + "vision_tower.patch_embed.bias"),
        Rule(s + r"vision_tower\.patch_embed\.pos_emb\.position_embeddings",
             d + "vision_tower.pos_emb"),
    ]
    rules += norm_rules(layer + "norm1", out + "norm0")
    rules += norm_rules(layer + "norm2", out + "norm1")
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        reorder = (lambda x: x[perm]) if part < 2 else (lambda x: x)
        rules += [
            Rule(layer + rf"attn\.{name}\.weight", out + "wqkv.kernel",
                 compose(reorder, transpose), _qkv_part(part)),
            Rule(layer + rf"attn\.{name}\.bias", out + "wqkv.bias", reorder, _qkv_part(part)),
        ]
    rules += linear_rules(layer + r"attn\.proj", out + "wo")
    rules += linear_rules(layer + r"mlp\.fc1", out + "fc0")
    rules += linear_rules(layer + r"mlp\.fc2", out + "fc1")
    rules += norm_rules(s + r"vision_tower\.final_layernorm", d + "vision_tower.final_layernorm")
    rules += norm_rules(s + r"mm_projector\.pre_norm", d + "multi_modal_projector.pre_norm")
    rules += linear_rules(s + r"mm_projector\.in_proj", d + "multi_modal_projector.linear_1")
    rules += linear_rules(s + r"mm_projector\.out_proj", d + "multi_modal_projector.linear_2")
    return rules


# ---------------------------------------------------------------- whole models

LAYOUTS = ("kimi_vl", "kimi_k25", "deepseek_v3")


def model_rules(config: KimiVLConfig, layout: str) -> tuple[list[Rule], list[str]]:
    """(rules, ignored-name regexes) for a source `layout`:
    "kimi_vl" (published Kimi-VL), "kimi_k25" (transformers Kimi-K2.5 state dict) or
    "deepseek_v3" (transformers `DeepseekV3ForCausalLM` / published DeepSeek-V3 names)."""
    text_src = {"kimi_vl": ("language_model.model.", "language_model.lm_head."),
                "kimi_k25": ("model.language_model.", "lm_head."),
                "deepseek_v3": ("model.", "lm_head.")}
    if layout not in text_src:
        raise ValueError(f"unknown checkpoint layout {layout!r}; allowed: {LAYOUTS}")
    if (layout == "deepseek_v3") != (config.vision is None):
        raise ValueError(f"layout {layout!r} does not fit a model "
                         f"{'without' if config.vision is None else 'with'} a vision tower")
    prefix, lm_head = text_src[layout]
    rules = deepseek_v3_keys.text_rules(prefix, lm_head, target_prefix="language_model.")
    if layout == "kimi_vl":
        rules += vision_rules_published()
    elif layout == "kimi_k25":
        rules += vision_rules_k25(config.vision)
    return rules, deepseek_v3_keys.text_ignore(config.text, prefix)


def abstract_model(config: KimiVLConfig, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> KimiVL:
    """The model's structure without values (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: KimiVL(config, param_dtype=param_dtype,
                                         experts_impl=experts_impl, rngs=nnx.Rngs(0)))


def from_directory(path: str | Path, *, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> KimiVL:
    """Convert a published checkpoint directory (`config.json` model_type kimi_vl or
    deepseek_v3, `*.safetensors` with or without an index), one tensor at a time."""
    raw = safetensors_io.read_config(path)
    source = str(Path(path) / safetensors_io.CONFIG_NAME)
    config = KimiVLConfig.from_dict(raw, source=source)
    rules, ignore = model_rules(config, raw["model_type"])
    return safetensors_io.convert_directory(
        path, rules, abstract_model(config, param_dtype, experts_impl), ignore)


def from_torch(torch_model: Any, *, param_dtype=jnp.float32,
               experts_impl: str = "sorted") -> KimiVL:
    """Convert an in-memory transformers `Kimi_K25ForConditionalGeneration` or
    `DeepseekV3ForCausalLM` (bf16 tensors stay bf16 until cast to `param_dtype`)."""
    config = KimiVLConfig.from_transformers(torch_model.config)
    layout = "deepseek_v3" if config.vision is None else "kimi_k25"
    rules, ignore = model_rules(config, layout)
    abstract = abstract_model(config, param_dtype, experts_impl)
    return mapping.convert(deepseek_v3_keys.torch_items(torch_model), rules, abstract,
                           ignore=ignore)
