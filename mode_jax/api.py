"""The public entry point: `model = mode_jax.load(path_or_torch_model, dtype=...)`.

`path_or_torch_model` is either a checkpoint directory as published (`config.json` with
model_type `kimi_vl`, `deepseek_v3`, `qwen3_vl_moe` or `qwen3_moe`, `*.safetensors` shards with
or without an index) or an in-memory transformers model of those types (Kimi-K2.5's
`Kimi_K25ForConditionalGeneration` for Kimi-VL). The result is a
`mode_jax.models.kimivl.KimiVL` or a `mode_jax.models.qwen3_vl_moe.Qwen3VLMoe`
(`convert.families`); `model(batch)` takes an HF-processor-style dict and returns
`TextOutput(logits [B, T, V] float32, routing, image_scores, ...)` (docs/design.md).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from mode_jax.convert import families, safetensors_io

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _param_dtype(dtype: Any):
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load(path_or_model: Any, dtype: Any = jnp.float32, *, experts_impl: str = "sorted"):
    """Convert a checkpoint directory or an in-memory transformers model to the NNX model.

    dtype: parameter dtype (float32, bfloat16 or float16); routers' correction biases stay
    float32. experts_impl: "sorted" (grouped by expert, `ragged_dot`) or "dense" (every expert
    on every token; a cross-check).
    """
    param_dtype = _param_dtype(dtype)
    if isinstance(path_or_model, str | os.PathLike):
        raw = safetensors_io.read_config(path_or_model)
        family = families.for_model_type(raw.get("model_type"),
                                         source=os.path.join(path_or_model, "config.json"))
        return family.convert().from_directory(path_or_model, param_dtype=param_dtype,
                                               experts_impl=experts_impl)
    if hasattr(path_or_model, "state_dict") and hasattr(path_or_model, "config"):
        family = families.for_model_type(getattr(path_or_model.config, "model_type", None),
                                         source="transformers model")
        return family.convert().from_torch(path_or_model, param_dtype=param_dtype,
                                           experts_impl=experts_impl)
    raise TypeError(f"load() takes a checkpoint directory or a transformers model, "
                    f"got {type(path_or_model).__name__}")
