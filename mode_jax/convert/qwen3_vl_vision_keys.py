"""Conversion rules for Qwen3-VL(-MoE)'s vision tower onto `models.qwen3_vl_vision.Qwen3VLVision`.

Source names (published checkpoints and transformers' `Qwen3VLMoeForConditionalGeneration`
state dict share them), under `model.visual.`:
  patch_embed.proj.{weight [D, C, T, p, p], bias}, pos_embed.weight [n, D],
  blocks.{i}.{norm1, norm2}.{weight, bias}, blocks.{i}.attn.{qkv, proj}.{weight, bias},
  blocks.{i}.mlp.{linear_fc1, linear_fc2}.{weight, bias},
  merger.{norm, linear_fc1, linear_fc2}.*, deepstack_merger_list.{j}.{norm, linear_fc1,
  linear_fc2}.*.
Targets (under `dst`, `visual.` by default): patch_embed.{kernel [C*T*p*p, D], bias},
pos_embed, blocks.{i}.{norm1, norm2}.{scale, bias}, blocks.{i}.{qkv, proj, linear_fc1,
linear_fc2}.{kernel, bias}, merger.* and deepstack_merger_list.{j}.* with the same leaf names.
The rotary `inv_freq` is a non-persistent buffer, absent from state dicts, so nothing needs
ignoring.
"""

from __future__ import annotations

import re

from mode_jax.convert import mapping
from mode_jax.convert.mapping import flatten_conv, linear_rules, norm_rules


def _merger_rules(src: str, dst: str) -> list[mapping.Rule]:
    rules = norm_rules(src + r"\.norm", dst + ".norm")
    for name in ("linear_fc1", "linear_fc2"):
        rules += linear_rules(src + r"\." + name, dst + "." + name)
    return rules


def vision_rules(src: str = "model.visual.", dst: str = "visual.") -> list[mapping.Rule]:
    """Rules from Qwen3-VL vision names under `src` to `Qwen3VLVision` paths under `dst`.

    The Conv3d weight `[D, C, T, p, p]` flattens to the kernel `[C * T * p * p, D]` in the same
    order the processor flattens each patch, so the conv is that linear map.
    """
    s, d = re.escape(src), dst
    block = s + r"blocks\.(?P<i>\d+)\."
    out = d + "blocks.{i}."
    rules = [
        mapping.Rule(s + r"patch_embed\.proj\.weight", d + "patch_embed.kernel", flatten_conv),
        mapping.Rule(s + r"patch_embed\.proj\.bias", d + "patch_embed.bias"),
        mapping.Rule(s + r"pos_embed\.weight", d + "pos_embed"),
    ]
    for name in ("norm1", "norm2"):
        rules += norm_rules(block + name, out + name)
    for src_name, dst_name in ((r"attn\.qkv", "qkv"), (r"attn\.proj", "proj"),
                               (r"mlp\.linear_fc1", "linear_fc1"),
                               (r"mlp\.linear_fc2", "linear_fc2")):
        rules += linear_rules(block + src_name, out + dst_name)
    rules += _merger_rules(s + "merger", d + "merger")
    rules += _merger_rules(s + r"deepstack_merger_list\.(?P<j>\d+)",
                           d + "deepstack_merger_list.{j}")
    return rules
