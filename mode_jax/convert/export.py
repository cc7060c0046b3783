"""Write an NNX `KimiVL` as a checkpoint directory in the published Kimi-VL layout.

The inverse of `mode_jax.convert.kimivl.from_directory`, so a model made here (the trained
testbed) enters the pipeline through the same loader as a downloaded checkpoint:

    out/config.json             model_type kimi_vl (text_config + vision_config), or
                                deepseek_v3 for a model without vision tower
    out/model.safetensors       published names: language_model.model.layers.{l}.mlp.experts.{e}
                                .{gate,up,down}_proj.weight (one tensor per expert), vision_tower
                                .encoder.blocks.{i}.wqkv.weight, multi_modal_projector.linear_1...
    out/generation_config.json  pad (and eos = <|im_end|> when a tokenizer is given)
    out/preprocessor_config.json  the MoonViT image settings (patch, merge, budget, mean, std)
    out/tokenizer.json, tokenizer_config.json, special_tokens_map.json  (when given)

Tensors keep the model's dtype (bf16 stays bf16); PyTorch layouts are restored (`kernel [in, out]`
-> `weight [out, in]`, the patch kernel -> a conv weight `[D, 3, p, p]`, fused expert `gate_up`
-> per-expert gate and up). Settings the published config cannot express (e.g. a non-default
vision activation) raise ValueError instead of being silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from mode_jax.convert.mapping import path_str
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.models.moonvit import VisionConfig
from mode_jax.preprocess import ImageConfig
from mode_jax.testbed import tokenizer as testbed_tokenizer

WEIGHTS_NAME = "model.safetensors"
Emit = Callable[[re.Match, np.ndarray], Iterator[tuple[str, np.ndarray]]]


# ---------------------------------------------------------------- config.json
def text_config_dict(cfg: TextConfig, pad_token_id: int = 0) -> dict[str, Any]:
    """An HF `deepseek_v3` config dict that `TextConfig.from_hf` reads back to `cfg`."""
    d = {
        "model_type": "deepseek_v3", "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "num_key_value_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.rope_original_max_position, "pad_token_id": pad_token_id,
    }
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                 "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size", "n_routed_experts",
                 "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
                 "moe_layer_freq", "n_group", "topk_group", "scoring_func", "topk_method",
                 "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "rope_theta",
                 "rope_interleave"):
        d[name] = getattr(cfg, name)
    d["rope_scaling"] = None
    if cfg.rope_type == "yarn":
        rope = {"type": "yarn", "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position,
                "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
        if cfg.rope_mscale_all_dim:
            rope.update(mscale=cfg.rope_mscale, mscale_all_dim=cfg.rope_mscale_all_dim)
        elif cfg.rope_mscale != 1.0:
            raise ValueError(f"yarn rope_mscale={cfg.rope_mscale} without mscale_all_dim cannot "
                             "be written as a published config (from_hf rejects it)")
        d["rope_scaling"] = rope
    return d


def vision_config_dict(cfg: VisionConfig) -> dict[str, Any]:
    """A published Kimi-VL `vision_config` dict; fixed Kimi-VL settings must be at default."""
    fixed = VisionConfig()
    for name in ("rope_theta", "layer_norm_eps", "mlp_act", "projector_act", "projector_eps"):
        if getattr(cfg, name) != getattr(fixed, name):
            raise ValueError(f"vision {name}={getattr(cfg, name)!r} cannot be written in the "
                             f"kimi_vl layout (it fixes {name}={getattr(fixed, name)!r})")
    return {"model_type": "moonvit", "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size, "patch_size": cfg.patch_size,
            "init_pos_emb_height": cfg.pos_emb_height, "init_pos_emb_width": cfg.pos_emb_width,
            "merge_kernel_size": list(cfg.merge_kernel)}


def config_dict(config: KimiVLConfig, dtype: str) -> dict[str, Any]:
    """config.json contents: kimi_vl with a vision tower, deepseek_v3 without."""
    text = text_config_dict(config.text, config.pad_token_id)
    if config.vision is None:
        return {"architectures": ["DeepseekV3ForCausalLM"], **text, "dtype": dtype}
    return {"architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
            "media_placeholder_token_id": config.media_placeholder_token_id,
            "pad_token_id": config.pad_token_id, "ignore_index": -100, "dtype": dtype,
            "text_config": text, "vision_config": vision_config_dict(config.vision)}


def preprocessor_config_dict(cfg: ImageConfig) -> dict[str, Any]:
    """preprocessor_config.json that `ImageConfig.from_preprocessor_config` reads back."""
    if cfg.align == "resize":
        raise ValueError("ImageConfig align='resize' has no preprocessor_config.json field "
                         "(pad_input true = 'pad', false = 'crop')")
    return {"image_processor_type": "KimiVLImageProcessor", "patch_size": cfg.patch_size,
            "merge_kernel_size": list(cfg.merge_kernel), "in_token_limit": cfg.max_patches,
            "pad_input": cfg.align == "pad", "image_mean": list(cfg.mean),
            "image_std": list(cfg.std)}


# ---------------------------------------------------------------- tensors
def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def _one(name: str, transform=lambda x: x) -> Emit:
    def emit(m, x):
        yield name.format(**m.groupdict()), np.ascontiguousarray(transform(x))
    return emit


def _linear(name: str) -> Emit:
    """`.kernel [in, out]` -> `name.weight [out, in]`; `.bias` -> `name.bias`."""
    def emit(m, x):
        kind = m.group("kind")
        yield f"{name.format(**m.groupdict())}.{'weight' if kind == 'kernel' else 'bias'}", (
            _t(x) if kind == "kernel" else x)
    return emit


def _norm(name: str) -> Emit:
    def emit(m, x):
        kind = "weight" if m.group("kind") == "scale" else "bias"
        yield f"{name.format(**m.groupdict())}.{kind}", x
    return emit


def _experts(prefix: str) -> Emit:
    """Stacked `gate_up [E, D, 2F]` / `down [E, F, D]` -> one weight per expert and projection."""
    def emit(m, x):
        base = f"{prefix.format(**m.groupdict())}.mlp.experts"
        if m.group("kind") == "gate_up":
            f = x.shape[-1] // 2
            for e in range(x.shape[0]):
                yield f"{base}.{e}.gate_proj.weight", _t(x[e, :, :f])
                yield f"{base}.{e}.up_proj.weight", _t(x[e, :, f:])
        else:
            for e in range(x.shape[0]):
                yield f"{base}.{e}.down_proj.weight", _t(x[e])
    return emit


def text_rules(src: str, dst: str, lm_head: str) -> list[tuple[str, Emit]]:
    """(regex over NNX paths under `src`, emitter of published names under `dst`)."""
    s = re.escape(src)
    layer = s + r"layers\.(?P<l>\d+)\."
    out = dst + "layers.{l}"
    return [
        (s + r"embed_tokens\.embedding", _one(dst + "embed_tokens.weight")),
        (s + r"norm\.scale", _one(dst + "norm.weight")),
        (s + r"lm_head\.kernel", _one(lm_head + "weight", _t)),
        (layer + r"(?P<n>input_layernorm|post_attention_layernorm)\.(?P<kind>scale)",
         _norm(out + ".{n}")),
        (layer + r"self_attn\.(?P<n>q_a_layernorm|kv_a_layernorm)\.(?P<kind>scale)",
         _norm(out + ".self_attn.{n}")),
        (layer + r"self_attn\.(?P<n>\w+)\.(?P<kind>kernel)", _linear(out + ".self_attn.{n}")),
        (layer + r"mlp\.(?P<n>gate_proj|up_proj|down_proj)\.(?P<kind>kernel)",
         _linear(out + ".mlp.{n}")),
        (layer + r"mlp\.shared_experts\.(?P<n>\w+)\.(?P<kind>kernel)",
         _linear(out + ".mlp.shared_experts.{n}")),
        (layer + r"mlp\.gate\.kernel", _one(out + ".mlp.gate.weight", _t)),
        (layer + r"mlp\.gate\.e_score_correction_bias",
         _one(out + ".mlp.gate.e_score_correction_bias")),
        (layer + r"mlp\.experts\.(?P<kind>gate_up|down)", _experts(out)),
    ]


def vision_rules() -> list[tuple[str, Emit]]:
    block = r"vision_tower\.blocks\.(?P<i>\d+)\."
    out = "vision_tower.encoder.blocks.{i}."

    def patch_kernel(m, x):  # [3 * p * p, D] over channel-major patches -> [D, 3, p, p]
        p = int(round((x.shape[0] / 3) ** 0.5))
        yield "vision_tower.patch_embed.proj.weight", _t(x).reshape(x.shape[1], 3, p, p)

    return [
        (r"vision_tower\.patch_embed\.kernel", patch_kernel),
        (r"vision_tower\.patch_embed\.bias", _one("vision_tower.patch_embed.proj.bias")),
        (r"vision_tower\.pos_emb", _one("vision_tower.patch_embed.pos_emb.weight")),
        (block + r"(?P<n>norm0|norm1)\.(?P<kind>scale|bias)", _norm(out + "{n}")),
        (block + r"(?P<n>wqkv|wo)\.(?P<kind>kernel|bias)", _linear(out + "{n}")),
        (block + r"(?P<n>fc0|fc1)\.(?P<kind>kernel|bias)", _linear(out + "mlp.{n}")),
        (r"vision_tower\.final_layernorm\.(?P<kind>scale|bias)",
         _norm("vision_tower.encoder.final_layernorm")),
        (r"multi_modal_projector\.pre_norm\.(?P<kind>scale|bias)",
         _norm("multi_modal_projector.pre_norm")),
        (r"multi_modal_projector\.(?P<n>linear_1|linear_2)\.(?P<kind>kernel|bias)",
         _linear("multi_modal_projector.{n}")),
    ]


def published_tensors(model: KimiVL) -> dict[str, np.ndarray]:
    """Every parameter of `model` under its published checkpoint name (host numpy arrays)."""
    if model.config.vision is None:
        rules = text_rules("language_model.", "model.", "lm_head.")
    else:
        rules = (text_rules("language_model.", "language_model.model.",
                            "language_model.lm_head.") + vision_rules())
    compiled = [(re.compile(pattern), emit) for pattern, emit in rules]
    tensors: dict[str, np.ndarray] = {}
    unknown = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, array = path_str(path), np.asarray(var.get_value())
        for regex, emit in compiled:
            if m := regex.fullmatch(name):
                tensors.update(emit(m, array))
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"no published name for parameter(s): {', '.join(unknown)}")
    return tensors


# ---------------------------------------------------------------- the directory
def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save(model: KimiVL, out_dir: str | Path, *, tokenizer=None,
         image_config: ImageConfig | None = None) -> Path:
    """Write `model` (+ tokenizer files and image settings when given) to `out_dir`.

    `tokenizer`: a testbed word-level tokenizer (written by `testbed.tokenizer.save_tokenizer`,
    which `transformers.AutoTokenizer` reads offline) or any transformers tokenizer
    (`save_pretrained`). Refuses a directory holding other weight files, which the loader could
    not tell apart from this export's.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export target {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("*.safetensors*") if p.name != WEIGHTS_NAME]
    if stale:
        raise ValueError(f"{out} already holds other weight files {stale}; export into an "
                         "empty directory or remove them")
    tensors = published_tensors(model)
    dtype = str(next(iter(tensors.values())).dtype) if tensors else "float32"
    tmp = out / (WEIGHTS_NAME + ".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    _write_json(out / "config.json", config_dict(model.config, dtype))
    generation = {"pad_token_id": model.config.pad_token_id}
    if tokenizer is not None:
        if _is_testbed_tokenizer(tokenizer):
            testbed_tokenizer.save_tokenizer(tokenizer, out)
        else:
            tokenizer.save_pretrained(str(out))
        end = tokenizer.get_vocab().get(testbed_tokenizer.IM_END)
        if end is not None:
            generation["eos_token_id"] = int(end)
    _write_json(out / "generation_config.json", generation)
    if image_config is not None:
        _write_json(out / "preprocessor_config.json", preprocessor_config_dict(image_config))
    return out


def _is_testbed_tokenizer(tokenizer) -> bool:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return all(vocab.get(t) == i for i, t in enumerate(testbed_tokenizer.SPECIAL_TOKENS))
