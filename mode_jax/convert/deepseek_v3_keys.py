"""Checkpoint-name rules for the DeepSeek-V3 text model, and in-memory torch conversion.

One rule list covers both layouts:
- transformers 5 in memory: fused `mlp.experts.gate_up_proj [E, 2F, D]` and
  `mlp.experts.down_proj [E, D, F]`;
- published checkpoints (DeepSeek-V3, Kimi-VL): `mlp.experts.{e}.{gate,up,down}_proj.weight`.

Source prefixes are configurable: transformers' DeepseekV3ForCausalLM uses `model.` and
`lm_head.`; published Kimi-VL uses `language_model.model.` and `language_model.lm_head.`.
`target_prefix` places the text model inside a larger NNX model (e.g. `language_model.`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mode_jax.convert import mapping
from mode_jax.convert.mapping import Rule
from mode_jax.models.deepseek_v3 import DeepseekV3, TextConfig


def text_rules(
    prefix: str = "model.", lm_head: str = "lm_head.", target_prefix: str = ""
) -> list[Rule]:
    """Rules mapping `{prefix}...` and `{lm_head}weight` onto `{target_prefix}...` paths."""
    p, t = re.escape(prefix), target_prefix
    layer = p + r"layers\.(?P<l>\d+)\."
    tl = t + "layers.{l}."
    tr = mapping.transpose
    return [
        Rule(p + r"embed_tokens\.weight", t + "embed_tokens.embedding"),
        Rule(p + r"norm\.weight", t + "norm.scale"),
        Rule(re.escape(lm_head) + r"weight", t + "lm_head.kernel", tr),
        Rule(layer + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", tl + "{n}.scale"),
        Rule(layer + r"self_attn\.(?P<n>q_a_layernorm|kv_a_layernorm)\.weight",
             tl + "self_attn.{n}.scale"),
        Rule(layer + r"self_attn\.(?P<n>q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
             r"|o_proj)\.weight", tl + "self_attn.{n}.kernel", tr),
        Rule(layer + r"mlp\.(?P<n>gate_proj|up_proj|down_proj)\.weight", tl + "mlp.{n}.kernel", tr),
        Rule(layer + r"mlp\.shared_experts\.(?P<n>gate_proj|up_proj|down_proj)\.weight",
             tl + "mlp.shared_experts.{n}.kernel", tr),
        Rule(layer + r"mlp\.gate\.weight", tl + "mlp.gate.kernel", tr),
        Rule(layer + r"mlp\.gate\.e_score_correction_bias",
             tl + "mlp.gate.e_score_correction_bias"),
        # transformers 5 fused experts
        Rule(layer + r"mlp\.experts\.gate_up_proj", tl + "mlp.experts.gate_up", tr),
        Rule(layer + r"mlp\.experts\.down_proj", tl + "mlp.experts.down", tr),
        *per_expert_rules(layer, tl),
    ]


def per_expert_rules(layer: str, target_layer: str) -> list[Rule]:
    """Published per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` into the
    stacked `gate_up`/`down` targets (`layer`: source regex up to the layer's dot)."""
    tr, tl = mapping.transpose, target_layer
    return [
        Rule(layer + r"mlp\.experts\.(?P<e>\d+)\.gate_proj\.weight", tl + "mlp.experts.gate_up",
             tr, mapping.expert_half(0)),
        Rule(layer + r"mlp\.experts\.(?P<e>\d+)\.up_proj\.weight", tl + "mlp.experts.gate_up",
             tr, mapping.expert_half(1)),
        Rule(layer + r"mlp\.experts\.(?P<e>\d+)\.down_proj\.weight", tl + "mlp.experts.down",
             tr, mapping.expert()),
    ]


def text_ignore(cfg: TextConfig, prefix: str = "model.") -> list[str]:
    """Source names to skip: rotary buffers, layers past num_hidden_layers (DeepSeek's MTP
    modules), and tensors the configuration leaves unused (zero-width shared experts, the
    correction bias without `noaux_tc`)."""
    p = re.escape(prefix)
    kept = "|".join(str(i) for i in range(cfg.num_hidden_layers))
    out = [r".*rotary_emb\.inv_freq", p + rf"layers\.(?!(?:{kept})\.)\d+\..*"]
    if not cfg.n_shared_experts:
        out.append(p + r"layers\.\d+\.mlp\.shared_experts\..*")
    if cfg.topk_method != "noaux_tc":
        out.append(p + r"layers\.\d+\.mlp\.gate\.e_score_correction_bias")
    return out


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as numpy, keeping bf16 as ml_dtypes.bfloat16 (no float32 detour)."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_items(module: Any) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, numpy array)` for every tensor of a torch module's state_dict."""
    for name, tensor in module.state_dict().items():
        yield name, torch_to_numpy(tensor)


def from_torch(
    torch_model: Any, *, param_dtype=jnp.float32, experts_impl: str = "sorted"
) -> DeepseekV3:
    """Convert an in-memory transformers `DeepseekV3ForCausalLM` to the NNX model."""
    cfg = TextConfig.from_hf(torch_model.config)
    abstract = nnx.eval_shape(lambda: DeepseekV3(
        cfg, param_dtype=param_dtype, experts_impl=experts_impl, rngs=nnx.Rngs(0)))
    return mapping.convert(torch_items(torch_model), text_rules(), abstract,
                           ignore=text_ignore(cfg))
