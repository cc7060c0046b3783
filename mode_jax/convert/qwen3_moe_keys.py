"""Checkpoint-name rules for the Qwen3-MoE text model (`mode_jax.models.qwen3_moe`).

Fused routed experts come in two layouts of the same names, told apart by the source:
- transformers 5 in memory: `mlp.experts.gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`
  (`experts_layout="torch"`, transposed on the way in);
- published Qwen3-VL-MoE checkpoints: `gate_up_proj [E, D, 2F]`, `down_proj [E, F, D]`, already
  ours (`experts_layout="published"`; transformers transposes them when it loads).
Published Qwen3-MoE checkpoints store `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert,
which either layout accepts. When the config ties the embeddings there is no `lm_head`.
"""

from __future__ import annotations

import re
from typing import Any

from mode_jax.convert import deepseek_v3_keys, mapping
from mode_jax.convert.mapping import Rule
from mode_jax.models.qwen3_moe import TextConfig

EXPERT_LAYOUTS = ("torch", "published")


def text_rules(prefix: str = "model.", lm_head: str = "lm_head.", target_prefix: str = "",
               experts_layout: str = "torch") -> list[Rule]:
    """Rules mapping `{prefix}...` and `{lm_head}weight` onto `{target_prefix}...` paths."""
    if experts_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"experts_layout {experts_layout!r} is not one of {EXPERT_LAYOUTS}")
    p, t = re.escape(prefix), target_prefix
    layer = p + r"layers\.(?P<l>\d+)\."
    tl = t + "layers.{l}."
    tr = mapping.transpose
    fused = tr if experts_layout == "torch" else None
    return [
        Rule(p + r"embed_tokens\.weight", t + "embed_tokens.embedding"),
        Rule(p + r"norm\.weight", t + "norm.scale"),
        Rule(re.escape(lm_head) + r"weight", t + "lm_head.kernel", tr),
        Rule(layer + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", tl + "{n}.scale"),
        Rule(layer + r"self_attn\.(?P<n>q_norm|k_norm)\.weight", tl + "self_attn.{n}.scale"),
        Rule(layer + r"self_attn\.(?P<n>[qkvo]_proj)\.weight", tl + "self_attn.{n}.kernel", tr),
        Rule(layer + r"self_attn\.(?P<n>[qkvo]_proj)\.bias", tl + "self_attn.{n}.bias"),
        Rule(layer + r"mlp\.(?P<n>gate_proj|up_proj|down_proj)\.weight", tl + "mlp.{n}.kernel", tr),
        Rule(layer + r"mlp\.gate\.weight", tl + "mlp.gate.kernel", tr),
        Rule(layer + r"mlp\.experts\.gate_up_proj", tl + "mlp.experts.gate_up", fused),
        Rule(layer + r"mlp\.experts\.down_proj", tl + "mlp.experts.down", fused),
        *deepseek_v3_keys.per_expert_rules(layer, tl),
    ]


def text_ignore(cfg: TextConfig, prefix: str = "model.", lm_head: str = "lm_head.") -> list[str]:
    """Source names to skip: rotary buffers, and the lm_head copy some tied checkpoints keep."""
    out = [r".*rotary_emb\.inv_freq"]
    if cfg.tie_word_embeddings:
        out.append(re.escape(lm_head) + r"weight")
    return out


def experts_layout(raw_config: dict[str, Any]) -> str:
    """The fused-expert layout of a checkpoint directory from its config.json: "published"
    for files saved by transformers 4.x (or with no version), "torch" for 5+.

    The version decides rather than the shapes, which are the same both ways when D = 2F.
    """
    version = str(raw_config.get("transformers_version") or "4")
    major = version.split(".")[0]
    return "torch" if major.isdigit() and int(major) >= 5 else "published"
