"""Conversion of InternVL (3.5-MoE) checkpoints to `models.internvl.InternVL`.

Targets: `vision_tower.*` (InternViT and the projector, `models.internvl_vision`) and
`language_model.*` (the Qwen3-MoE text model, `qwen3_moe_keys`). Source names, as transformers 5
keeps them in memory:
  model.vision_tower.embeddings.{cls_token [1, 1, D], position_embeddings [1, n, D],
    patch_embeddings.projection.{weight [D, C, p, p], bias}},
  model.vision_tower.encoder.layer.{i}.{layernorm_before, layernorm_after}.*,
    .attention.{q_proj, k_proj, v_proj, projection_layer}.*, .attention.{q_norm, k_norm}.weight,
    .mlp.{fc1, fc2}.*, .lambda_1, .lambda_2,
  model.vision_tower.layernorm.* (only without mean pooling),
  model.multi_modal_projector.{layer_norm, linear_1, linear_2}.*,
  model.language_model.* (fused experts), lm_head.weight (absent when the embeddings are tied).
Files written by `save_pretrained` use the LLaVA-style prefixes `vision_tower.`,
`multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.` and per-expert
Qwen3-MoE tensors (transformers 5.23 reverses its load-time renaming and fusing when it saves,
measured in tests/test_internvl_parity.py). `current_name` renames as transformers does when it
loads; the text rules read per-expert and fused experts alike, so either naming converts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mode_jax.convert import deepseek_v3_keys, mapping, qwen3_moe_keys, safetensors_io
from mode_jax.convert.mapping import Rule, flatten_conv, linear_rules, norm_rules
from mode_jax.models.internvl import InternVL, InternVLConfig

_LEGACY = ((r"^language_model\.lm_head\.", "lm_head."),
           (r"^language_model\.model\.", "model.language_model."),
           (r"^vision_tower\.", "model.vision_tower."),
           (r"^multi_modal_projector\.", "model.multi_modal_projector."))


def current_name(name: str) -> str:
    """A 4.x file's tensor name in transformers 5's layout (other names unchanged)."""
    for old, new in _LEGACY:
        if re.match(old, name):
            return re.sub(old, new, name, count=1)
    return name


def vision_rules(src: str = "model.vision_tower.", projector: str = "model.multi_modal_projector.",
                 dst: str = "vision_tower.") -> list[Rule]:
    """Rules from InternVL vision and projector names to `InternVLVision` paths."""
    s, d = re.escape(src), dst
    layer = s + r"encoder\.layer\.(?P<i>\d+)\."
    out = d + "layers.{i}."
    rules = [
        Rule(s + r"embeddings\.cls_token", d + "cls_token", mapping.reshape(-1)),
        Rule(s + r"embeddings\.position_embeddings", d + "pos_embed",
             lambda w: w.reshape(w.shape[-2], w.shape[-1])),
        Rule(s + r"embeddings\.patch_embeddings\.projection\.weight", d + "patch_embed.kernel",
             flatten_conv),
        Rule(s + r"embeddings\.patch_embeddings\.projection\.bias", d + "patch_embed.bias"),
        Rule(layer + r"(?P<n>lambda_1|lambda_2)", out + "{n}"),
        Rule(layer + r"attention\.(?P<n>q_norm|k_norm)\.weight", out + "{n}.scale"),
    ]
    for name in ("layernorm_before", "layernorm_after"):
        rules += norm_rules(layer + name, out + name)
    for name in ("q_proj", "k_proj", "v_proj", "projection_layer"):
        rules += linear_rules(layer + r"attention\." + name, out + name)
    for name in ("fc1", "fc2"):
        rules += linear_rules(layer + r"mlp\." + name, out + name)
    rules += norm_rules(s + "layernorm", d + "final_norm")
    p = re.escape(projector)
    rules += norm_rules(p + "layer_norm", d + "projector_norm")
    rules += linear_rules(p + "linear_1", d + "projector_1")
    rules += linear_rules(p + "linear_2", d + "projector_2")
    return rules


def model_rules(config: InternVLConfig, experts_layout: str) -> tuple[list[Rule], list[str]]:
    """(rules, ignored-name regexes); `experts_layout` as in `qwen3_moe_keys`."""
    rules = qwen3_moe_keys.text_rules("model.language_model.", "lm_head.",
                                      target_prefix="language_model.",
                                      experts_layout=experts_layout)
    rules += vision_rules()
    return rules, qwen3_moe_keys.text_ignore(config.text, "model.language_model.")


def abstract_model(config: InternVLConfig, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> InternVL:
    """The model's structure without values (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: InternVL(config, param_dtype=param_dtype,
                                           experts_impl=experts_impl, rngs=nnx.Rngs(0)))


def from_directory(path: str | Path, *, param_dtype=jnp.float32,
                   experts_impl: str = "sorted") -> InternVL:
    """Convert a checkpoint directory (`config.json` model_type internvl, `*.safetensors` with
    or without an index), one tensor at a time."""
    raw = safetensors_io.read_config(path)
    config = InternVLConfig.from_dict(raw, source=str(Path(path) / safetensors_io.CONFIG_NAME))
    rules, ignore = model_rules(config, qwen3_moe_keys.experts_layout(raw))
    return safetensors_io.convert_directory(
        path, rules, abstract_model(config, param_dtype, experts_impl), ignore,
        rename=current_name)


def from_torch(torch_model: Any, *, param_dtype=jnp.float32,
               experts_impl: str = "sorted") -> InternVL:
    """Convert an in-memory transformers `InternVLForConditionalGeneration`."""
    config = InternVLConfig.from_dict(torch_model.config.to_dict(), source="torch model")
    rules, ignore = model_rules(config, "torch")
    return mapping.convert(deepseek_v3_keys.torch_items(torch_model), rules,
                           abstract_model(config, param_dtype, experts_impl), ignore=ignore)
