"""Orbax checkpoint of a packed (quantized) model; restoring needs neither the full-precision
weights nor PyTorch.

Artifact (mode_jax.checkpoint: atomic, arrays via Orbax + JSON meta):
  arrays: `params` {dotted NNX path: array} for every variable of the model: uint32 code
          planes, scales and expert ids of the packed modules, float weights of what stays in
          float (embeddings, norms, routers, lm_head, vision tower, kept linears);
  meta:   `format`, `family` (`convert.families`: kimi_vl, the default of older artifacts,
          or qwen3_vl_moe), `config` (that family's config dataclass as JSON), `dtype`
          (parameter dtype), `quantized`
          {path: {"kind": "linear" | "experts", "layout": ...}} (shapes of each packed module),
          `bit_map` [L_moe, E], and the caller's `metadata` (e.g. the quantization report).

`to_artifact` / `from_artifact` give the (arrays, meta) pair the stage runner stores;
`save` / `restore` write and read a directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax import checkpoint, multihost
from mode_jax.convert import families, mapping
from mode_jax.models import deepseek_v3, internvl_vision, moonvit, qwen3_moe, qwen3_vl_vision
from mode_jax.quant import apply
from mode_jax.quant import quantized_moe as qmoe
from mode_jax.quant.qlinear import QLinear, abstract_packed
from pallas_kernels import packing

FORMAT = f"mode-jax-packed/{packing.LAYOUT_VERSION}"  # the bit layout decides the file format
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bit_map(model) -> np.ndarray:
    """Bits per routed expert `[L_moe, E]` int32 of a packed model."""
    rows = []
    for l in model.config.text.moe_layers:
        experts = model.language_model.layers[l].mlp.experts
        if not isinstance(experts, qmoe.QuantizedExperts):
            raise ValueError(f"layers.{l}.mlp.experts is not quantized "
                             f"({type(experts).__name__})")
        rows.append(experts.bits())
    return np.stack(rows).astype(np.int32)


def without_padding(model):
    """`model`, or a copy of it (sharing every other array) whose packed experts drop the
    phantom experts that a mesh added (`quantized_moe.BitGroup.pad_to_multiple`): files and
    byte counts hold the real experts only, whatever mesh the model was placed on."""
    def padded(m):
        return [g for _, e in apply.quantized_modules(m)
                if isinstance(e, qmoe.QuantizedExperts) for g in e.groups.values() if g.padding]

    if not padded(model):
        return model
    copy = nnx.clone(model)
    for g in padded(copy):
        g.pad_to_multiple(1)
    return copy


def to_artifact(model, metadata: Mapping[str, Any] | None = None):
    """(arrays, meta) of a packed model (module docstring)."""
    model = without_padding(model)
    quantized = {}
    for path, m in apply.quantized_modules(model):
        kind = "linear" if isinstance(m, QLinear) else "experts"
        layout = m.weight.layout() if kind == "linear" else m.layout()
        quantized[path] = {"kind": kind, "layout": layout}
    params = {mapping.path_str(p): multihost.to_host(v[...])  # split arrays gathered
              for p, v in nnx.to_flat_state(nnx.state(model))}
    meta = {
        "format": FORMAT,
        "family": families.for_config(model.config).name,
        "config": config_to_dict(model.config),
        "dtype": jnp.dtype(model.language_model.dtype).name,
        "quantized": quantized,
        "bit_map": bit_map(model).tolist(),
        "metadata": dict(metadata or {}),
    }
    return {"params": params}, meta


def from_artifact(arrays: Mapping[str, Any], meta: Mapping[str, Any], *,
                  use_kernels: bool = False, kernel_dequant: str = "",
                  source: str = "artifact"):
    """Rebuild the packed model from `to_artifact`'s output (shapes and dtypes checked)."""
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{source}: format {meta.get('format')!r} is not {FORMAT!r}; the bit layout of the "
            "packed weights differs, so re-run the quantize stage (another --workdir, or remove "
            "the old quantize artifact)")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{source}: dtype {meta.get('dtype')!r}; allowed: {sorted(DTYPES)}")
    family = families.by_name(meta.get("family", "kimi_vl"))
    config = config_from_dict(meta["config"], source, family.name)
    abstract = family.convert().abstract_model(config, DTYPES[meta["dtype"]])
    for path, q in meta["quantized"].items():
        if q["kind"] == "linear":
            sub = nnx.eval_shape(lambda q=q: QLinear(abstract_packed(q["layout"])))
        elif q["kind"] == "experts":
            sub = nnx.eval_shape(lambda q=q: qmoe.abstract_experts(q["layout"]))
        else:
            raise ValueError(f"{source}: quantized module {path} has unknown kind {q['kind']!r}")
        apply.set_child(abstract, path, sub)
    params = arrays.get("params", {})
    _check_params(mapping.target_specs(abstract), params, source)
    model = mapping.load_into(abstract, params)
    return apply.set_use_kernels(model, use_kernels, kernel_dequant)


def save(path: str, model, metadata: Mapping[str, Any] | None = None) -> None:
    """Write the packed model to the directory `path` (atomically)."""
    arrays, meta = to_artifact(model, metadata)
    checkpoint.save(path, arrays, meta)


def restore(path: str, *, use_kernels: bool = False,
            kernel_dequant: str = "") -> tuple[Any, dict[str, Any]]:
    """(packed model, meta) from a directory written by `save`; `kernel_dequant` as in
    `apply.set_use_kernels`."""
    arrays, meta = checkpoint.load(path)
    model = from_artifact(arrays, meta, use_kernels=use_kernels,
                          kernel_dequant=kernel_dequant, source=path)
    return model, meta


# ---------------------------------------------------------------- sizes


def theoretical_nbytes(model, scale_dtype=jnp.bfloat16) -> dict[str, int]:
    """Ideal bytes: `packed` = codes (bits per weight) + one scale per group and column of
    every packed weight; `other` = the exact bytes of every other array (float weights,
    expert ids); `total` their sum."""
    model = without_padding(model)
    tensors = [t for _, m in apply.quantized_modules(model) for t in packed_tensors(m)]
    packed = sum(
        packing.theoretical_nbytes(t.k, t.n, t.bits, group_size=t.group_size,
                                   scale_dtype=scale_dtype,
                                   batch=int(np.prod(t.scales.shape[:-2])))
        for t in tensors)
    stored = sum(int(v[...].nbytes) for _, v in nnx.to_flat_state(nnx.state(model)))
    other = stored - sum(t.nbytes() for t in tensors)
    return {"packed": packed, "other": other, "total": packed + other}


def packed_tensors(m) -> list:
    """The PackedTensors of a QLinear or QuantizedExperts."""
    if isinstance(m, QLinear):
        return [m.weight]
    return [t for g in m.groups.values() for t in (g.gate_up, g.down)]


def directory_nbytes(path: str) -> int:
    """Bytes of every file under `path` (the checkpoint's size on disk, before block
    rounding)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# ---------------------------------------------------------------- config as JSON


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# per family: the text and vision config classes inside its model config
_PARTS = {"kimi_vl": (deepseek_v3.TextConfig, moonvit.VisionConfig),
          "qwen3_vl_moe": (qwen3_moe.TextConfig, qwen3_vl_vision.VisionConfig),
          "internvl": (qwen3_moe.TextConfig, internvl_vision.VisionConfig)}


def config_from_dict(d: Mapping[str, Any], source: str = "config", family: str = "kimi_vl"):
    """Inverse of `config_to_dict` for `family`; unknown or missing fields raise ValueError."""
    text_cls, vision_cls = _PARTS[families.by_name(family).name]
    text = _dataclass_from(text_cls, d.get("text"), f"{source}: text config")
    vision = None
    if d.get("vision") is not None:
        vision = _dataclass_from(vision_cls, d["vision"], f"{source}: vision config")
    rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
    return _dataclass_from(families.by_name(family).config_cls(),
                           {**rest, "text": text, "vision": vision}, f"{source}: model config")


def _dataclass_from(cls, d, what: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: {err}") from None


def _check_params(specs, params: Mapping[str, Any], source: str) -> None:
    """Every model variable present with its shape and dtype, and nothing else."""
    problems = [f"missing {p}" for p in specs if p not in params]
    problems += [f"unexpected {p}" for p in params if p not in specs]
    for p, spec in specs.items():
        a = params.get(p)
        if a is not None and (tuple(a.shape) != spec.shape or np.dtype(a.dtype) != spec.dtype):
            problems.append(f"{p}: stored {a.dtype}{list(a.shape)}, "
                            f"expected {spec.dtype}{list(spec.shape)}")
    if problems:
        raise ValueError(f"{source}: packed checkpoint does not fit its model: "
                         + "; ".join(problems))
