"""Layer-sequential quantization of a Kimi-VL or Qwen3-VL-MoE model into packed weights
(method.md stage 4).

`quantize_model(model, batches, bit_map, config)` walks the decoder layers in order. Per layer,
with the calibration batches' residual streams as they leave the already-quantized layers:

1. attention, in passes over the batches, each collecting the Hessian `2/n sum x x^T`
   (real tokens only) of the next projections' input from the current, partly quantized
   layer. MLA (Kimi-VL): `q_proj | q_a_proj` with `kv_a_proj_with_mqa` (the normed layer
   input), then `q_b_proj` and `kv_b_proj` (after `q_a_layernorm` / `kv_a_layernorm`), then
   `o_proj`. Grouped-query attention (Qwen3): `q_proj`, `k_proj`, `v_proj` together, then
   `o_proj`;
2. re-forward: the MLP input `post_attention_layernorm(h + attn)` through the quantized
   attention; the router (kept in full precision) routes it;
3. MLP: routed experts gate/up from the tokens routed to each expert, then down from each
   expert's own intermediate activations through its quantized gate/up; shared experts and
   dense MLPs gate/up then down;
4. the quantized layer's outputs (plus Qwen3-VL's DeepStack addition after the first
   layers) become the next layer's inputs.

Linears that share an input (`q_a`/`kv_a`, `gate`/`up`) are quantized as one column-concatenated
kernel: GPTQ and the scale search treat output columns independently, so this equals
quantizing each and costs one compilation. Routed experts take their bits from `bit_map
[L_moe, E]`; attention, shared experts and dense MLPs `config.*_bits` (16 = keep in float).
Router, embeddings, lm_head, norms, vision tower and projector are never touched. With
`method="rtn"` no calibration data is needed.

An expert with no calibration token falls back to round-to-nearest (GPTQ's own fallback) and is
listed in `report["rtn_fallback"]`; so is any linear whose Cholesky factorisation failed at every
damping; every raised damping is in `report["damp_escalations"]`; `notes(report)` puts these,
and the experts with fewer calibration tokens than an input width, into words.

`config.hadamard`: routed experts are quantized in a rotated basis (quantized_moe.rotate: a
block-diagonal Hadamard per quantization group of the gate/up and down inputs), with the
rotated Hessian `R H R`; the packed experts rotate their activations online.

`fake_quantized(qmodel)` is the same model with every packed weight dequantized into float
`nnx.Linear` / `StackedExperts` (same codes): what the packed model must reproduce.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mode_jax import multihost, progress, sharding
from mode_jax.calib import hessian, passes
from mode_jax.models import deepseek_v3 as dsv3
from mode_jax.models.batch import embed_split, split_embedder
from mode_jax.quant import gptq, rtn
from mode_jax.quant import quantized_moe as qmoe
from mode_jax.quant.qlinear import QLinear, check_dequant
from pallas_kernels import packing

METHODS = ("gptq", "rtn")
KEEP = 16
SCALE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize (fields of configs/common.py `quant`, plus the storage options).

    scale_dtype: dtype of the stored group scales (bf16: 16 bits per group and column, the
    format's theoretical size). use_kernels: whether the returned model runs its experts and
    linears through the Pallas kernels. expert_chunk: experts per vmapped GPTQ call
    (None: all; bounds memory on large layers).
    """

    method: str = "gptq"
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    attention_bits: int = 4
    shared_expert_bits: int = 4
    dense_mlp_bits: int = 4
    hadamard: bool = False
    scale_dtype: str = "bfloat16"
    use_kernels: bool = False
    expert_chunk: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quant method {self.method!r}; allowed: {METHODS}")
        if self.group_size < 32 or self.group_size & (self.group_size - 1):
            raise ValueError(f"quant group_size={self.group_size} must be a power of two >= 32")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quant scale_dtype {self.scale_dtype!r}; allowed: {SCALE_DTYPES}")
        allowed = (*packing.SUPPORTED_BITS, KEEP)
        for name in ("attention_bits", "shared_expert_bits", "dense_mlp_bits"):
            if getattr(self, name) not in allowed:
                raise ValueError(f"quant {name}={getattr(self, name)!r}; allowed: {allowed} "
                                 f"({KEEP} = keep in float)")
        if not self.damp > 0:
            raise ValueError(f"quant damp must be > 0, got {self.damp!r}")

    @classmethod
    def from_config(cls, quant: Any, **overrides) -> QuantConfig:
        """From the `quant` section of configs/common.py (a ConfigDict or mapping)."""
        q = dict(quant.to_dict() if hasattr(quant, "to_dict") else quant)
        if q.pop("symmetric", True) is not True:
            raise ValueError("quant.symmetric=False: the packed format holds symmetric codes only")
        q.pop("router_finetune", None)  # a separate step: mode_jax.quant.router_finetune
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(q) - names)
        if unknown:
            raise ValueError(f"unknown quant config keys {unknown}; allowed: {sorted(names)}")
        q.update(overrides)
        return cls(**q)


class _Calib(NamedTuple):
    """One calibration batch as seen by the current layer: residual stream h `[B, T, D]`,
    attention context, real-token mask `[B, T]` bool, the model's per-layer additions."""

    h: jax.Array
    ctx: dsv3.Context
    mask: jax.Array
    additions: tuple = ()

    def after(self, layer, l: int) -> _Calib:
        """This batch as it leaves decoder layer `l`."""
        h = _layer_output(layer, self.h, self.ctx)
        if l < len(self.additions):
            h = h + self.additions[l].astype(h.dtype)
        return self._replace(h=h)


# ---------------------------------------------------------------- the walk


def quantize_model(
    model,
    batches: Sequence[Mapping[str, Any]] | None,
    bit_map,
    config: QuantConfig = QuantConfig(),
    *,
    inplace: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Quantize `model`; returns (packed model, JSON-able report). See the module docstring.

    batches: HF-style dicts (`input_ids`, `attention_mask`, optional images) for GPTQ; unused
    by RTN. bit_map: `[L_moe, E]` bits per routed expert, each in packing.SUPPORTED_BITS.
    inplace: modify `model` itself instead of a clone (saves memory on large models).
    """
    text = model.config.text
    bit_map = check_bit_map(bit_map, len(text.moe_layers), text.n_routed_experts)
    batches = list(batches or [])
    if config.method == "gptq" and not batches:
        raise ValueError("GPTQ needs calibration batches (or use method='rtn')")
    start = time.perf_counter()
    if not inplace:
        model = nnx.clone(model)
    report = _Report(config, bit_map)
    states = _initial_states(model, batches) if config.method == "gptq" else []
    lm = model.language_model
    moe_index = {layer: i for i, layer in enumerate(text.moe_layers)}
    for l, layer in progress.track(list(enumerate(lm.layers)), f"{config.method} layers"):
        _quantize_attention(layer, l, states, config, report)
        x = [_mlp_input(layer, s.h, s.ctx) for s in states]  # re-forward: quantized attention
        if layer.is_moe:
            i = moe_index[l]
            _quantize_experts(layer, l, x, states, bit_map[i], config, report, i)
            if layer.mlp.shared_experts is not None:
                _quantize_mlp(layer.mlp.shared_experts, f"layers.{l}.mlp.shared_experts", x,
                              states, config.shared_expert_bits, config, report)
        else:
            _quantize_mlp(layer.mlp, f"layers.{l}.mlp", x, states, config.dense_mlp_bits,
                          config, report)
        states = [s.after(layer, l) for s in states]
    _set_use_kernels(model, config.use_kernels)
    report.seconds = time.perf_counter() - start
    return model, report.as_dict()


def check_bit_map(bit_map, num_layers: int, num_experts: int) -> np.ndarray:
    """`[L_moe, E]` int32 with every value a packable bit-width, else ValueError."""
    bits = np.asarray(bit_map)
    if bits.shape != (num_layers, num_experts):
        raise ValueError(f"bit map must be [L_moe={num_layers}, E={num_experts}], "
                         f"got shape {bits.shape}")
    bad = sorted({int(b) for b in np.unique(bits)} - set(packing.SUPPORTED_BITS))
    if bad or not np.issubdtype(bits.dtype, np.integer):
        raise ValueError(f"bit map holds bits {bad or bits.dtype}; allowed: "
                         f"{packing.SUPPORTED_BITS}")
    return bits.astype(np.int32)


def _initial_states(model, batches) -> list[_Calib]:
    """Embeddings (images written in by the float vision tower), contexts (M-RoPE positions
    where the model has them) and DeepStack additions per batch."""
    states = []
    embedder = split_embedder(model)  # once, not a graph walk per batch
    for batch in batches:
        dev, grid = passes.device_batch(model, batch)  # split over the mesh's "data" axis
        h, additions = embed_split(*embedder, dev["input_ids"], dev.get("pixel_values"), grid)
        ctx, _ = model.language_model.context(dev["attention_mask"], dev.get("positions"))
        states.append(_Calib(h, ctx, dev["attention_mask"], additions))
    return states


# ---------------------------------------------------------------- running pieces of a layer


def _attention(layer, h, ctx):
    return layer.self_attn(layer.input_layernorm(h), ctx)[0]


def _mlp_input(layer, h, ctx):
    return layer.post_attention_layernorm(h + _attention(layer, h, ctx))


def _layer_output(layer, h, ctx):
    return layer(h, ctx)[0]


def _call(module, x):
    return module(x)


def _route(router, x):
    return router(x.reshape(-1, x.shape[-1]))[0].reshape(*x.shape[:-1], -1)


def _capture(module, paths: tuple[str, ...], fn: Callable, *args):
    """Run `fn(module, *args)` and return (its output, {path: input of the linear at path}).

    The linears at the dotted `paths` (relative to module) are wrapped by recording taps for
    the call and put back after. Runs eagerly, op by op: every pass of the walk sees a
    different graph (layers change as they are quantized), and compiling each whole pass cost
    more than it saved (the heavy parts, Hessian updates, GPTQ and the packed experts, are
    jitted functions).
    """
    seen: dict[str, jax.Array] = {}
    wrapped = []
    try:
        for path in paths:
            parent, name = _parent(module, path)
            inner = getattr(parent, name)
            wrapped.append((parent, name, inner))
            setattr(parent, name, _Tap(inner, seen, path))
        return fn(module, *args), seen
    finally:
        for parent, name, inner in wrapped:
            setattr(parent, name, inner)


class _Tap:
    """Records the input of the wrapped linear."""

    def __init__(self, inner, seen: dict, path: str):
        self.inner, self.seen, self.path = inner, seen, path

    def __call__(self, x):
        self.seen[self.path] = x
        return self.inner(x)


def _parent(root, path: str):
    *parents, name = path.split(".")
    node = root
    for p in parents:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node, name


# ---------------------------------------------------------------- dense linears


def _quantize_attention(layer, l: int, states, config: QuantConfig, report) -> None:
    if config.attention_bits == KEEP:
        return
    attn = layer.self_attn
    biased = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj")
              if getattr(getattr(attn, n, None), "bias", None) is not None]
    if biased:
        raise ValueError(f"layers.{l}.self_attn.{biased[0]} has a bias, which the packed "
                         "format does not hold: keep attention in float (quant.attention_bits=16)")
    if not hasattr(attn, "kv_a_proj_with_mqa"):  # grouped-query attention (Qwen3)
        steps = [[("q_proj", "k_proj", "v_proj")], [("o_proj",)]]
    else:
        first = "q_proj" if attn.cfg.q_lora_rank is None else "q_a_proj"
        steps = [[(first, "kv_a_proj_with_mqa")], [("kv_b_proj",)], [("o_proj",)]]
        if attn.cfg.q_lora_rank is not None:
            steps[1].insert(0, ("q_b_proj",))
    steps = [[tuple(f"self_attn.{n}" for n in joint) for joint in step] for step in steps]
    inputs = [(s.h, s.ctx) for s in states]
    _quantize_steps(layer, f"layers.{l}", steps, _attention, inputs, states,
                    config.attention_bits, config, report)


def _quantize_mlp(mlp, name: str, x, states, bits: int, config, report) -> None:
    if bits == KEEP:
        return
    steps = [[("gate_proj", "up_proj")], [("down_proj",)]]
    _quantize_steps(mlp, name, steps, _call, [(v,) for v in x], states, bits, config, report)


def _quantize_steps(module, name, steps, fn, inputs, states, bits, config, report) -> None:
    """Per step: one pass collecting the Hessians of each joint group's input, then quantize
    and swap in QLinears (so the next step sees the quantized outputs)."""
    for step in steps:
        hessians = _dense_hessians(module, step, fn, inputs, states)
        for joint in step:
            linears = [getattr(*_parent(module, p)) for p in joint]
            w = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
            codes, scales = _quantize_dense(w, hessians.get(joint[0]), bits, config, report,
                                            f"{name}.{'+'.join(joint)}")
            col = 0
            for path, lin in zip(joint, linears, strict=True):
                n = lin.kernel.shape[1]
                packed = packing.pack(codes[:, col:col + n], scales[:, col:col + n], bits,
                                      group_size=config.group_size)
                parent, attr = _parent(module, path)
                setattr(parent, attr, QLinear(packed))
                col += n


def _dense_hessians(module, step, fn, inputs, states) -> dict[str, jax.Array]:
    """{first path of each joint group: finalized Hessian of its input} ({} without data)."""
    if not states:
        return {}
    paths = tuple(joint[0] for joint in step)
    acc: dict[str, hessian.HessianState] = {}
    for args, s in zip(inputs, states, strict=True):
        _, seen = _capture(module, paths, fn, *args)
        for p in paths:
            x = seen[p]
            acc.setdefault(p, hessian.init_dense(x.shape[-1]))
            acc[p] = hessian.update_dense(acc[p], x, s.mask)
    return {p: hessian.finalize(a.h_sum, a.count) for p, a in acc.items()}


def _quantize_dense(w, h, bits, config: QuantConfig, report, name: str):
    """codes int8 `[K, N]`, scales `[ceil(K/gs), N]` in config.scale_dtype."""
    if config.method == "rtn":
        codes, scales = rtn.quantize(w, bits, config.group_size)
    else:
        r = gptq.gptq_quantize(w, h, bits, group_size=config.group_size, damp=config.damp,
                               block_size=config.block_size, act_order=config.act_order)
        codes, scales = r.codes, r.scales
        report.note_dense(name, r, config.damp)
    return codes, scales.astype(config.scale_dtype)


# ---------------------------------------------------------------- routed experts


def _quantize_experts(layer, l, x, states, bits, config: QuantConfig, report, moe_i) -> None:
    experts, router = layer.mlp.experts, layer.mlp.gate
    e, d, two_f = experts.gate_up.shape
    f = two_f // 2
    r_in = qmoe.hadamard_block(d, config.group_size) if config.hadamard else 0
    r_mid = qmoe.hadamard_block(f, config.group_size) if config.hadamard else 0
    gate_up = qmoe.rotate_rows(experts.gate_up[...], r_in)
    down = qmoe.rotate_rows(experts.down[...], r_mid)
    xr = [qmoe.rotate(v, r_in) for v in x]
    ids = [_route(router, v) for v in x]
    bits_j = jnp.asarray(bits)

    h_gu = counts = None
    if states:
        acc = _expert_hessians(xr, ids, states, gate_up, config)
        h_gu, counts = hessian.finalize(acc.gate_up, acc.count), np.asarray(acc.count)
    gu_codes, gu_scales = _quantize_stack(gate_up, h_gu, bits_j, config, report, l, "gate_up")
    gu_scales = gu_scales.astype(config.scale_dtype)
    gu_hat = _dequantize_stack(gu_codes, gu_scales, config.group_size)

    h_dn = None
    if states:
        acc = _expert_hessians(xr, ids, states, gu_hat, config)
        h_dn = qmoe.rotate_hessian(hessian.finalize(acc.down, acc.count), r_mid)
    dn_codes, dn_scales = _quantize_stack(down, h_dn, bits_j, config, report, l, "down")
    report.note_experts(l, moe_i, counts, {"gate_up": d, "down": f})
    layer.mlp.experts = qmoe.from_codes(
        bits, gu_codes, gu_scales, dn_codes, dn_scales.astype(config.scale_dtype),
        group_size=config.group_size, rotate_in=r_in, rotate_mid=r_mid)


def _expert_hessians(xr, ids, states, gate_up, config) -> hessian.ExpertHessianState:
    e, d, two_f = gate_up.shape
    acc = hessian.init_experts(e, d, two_f // 2)
    for v, i, s in zip(xr, ids, states, strict=True):
        acc = hessian.update_experts(acc, v, i, gate_up, s.mask)
    return acc


def _quantize_stack(w, h, bits, config: QuantConfig, report, l, proj):
    """codes int8 `[E, K, N]`, scales `[E, ceil(K/gs), N]` at per-expert `bits [E]`.

    On a mesh each device quantizes its share of the experts (`sharding.per_device`)."""
    mesh = sharding.array_mesh(w)
    if config.method == "rtn":
        codes, scales = sharding.per_device(_rtn_stack, (w, bits), mesh,
                                            group_size=config.group_size)
        return codes.astype(jnp.int8), scales
    chunk = config.expert_chunk or w.shape[0]
    parts = []
    for s in range(0, w.shape[0], chunk):
        parts.append(sharding.per_device(
            gptq.gptq_quantize_experts, (w[s:s + chunk], h[s:s + chunk], bits[s:s + chunk]),
            mesh, group_size=config.group_size, damp=config.damp,
            block_size=config.block_size, act_order=config.act_order))
    r = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    report.note_stack(l, proj, r, config.damp)
    return r.codes, r.scales


def _rtn_stack(w, bits, *, group_size: int):
    """Round-to-nearest codes and scales of stacked experts `w [E, K, N]` at `bits [E]`."""
    codes, scales, _ = jax.vmap(lambda wi, bi: rtn.quantize_float(wi, bi, group_size))(w, bits)
    return codes, scales


def _dequantize_stack(codes, scales, group_size):
    return rtn.dequantize(codes, scales.astype(jnp.float32), group_size)


# ---------------------------------------------------------------- report


class _Report:
    """Collects what the user must know about a quantization run (JSON-able as_dict)."""

    def __init__(self, config: QuantConfig, bit_map: np.ndarray):
        self.config, self.bit_map = config, bit_map
        self.fallback: list[dict[str, Any]] = []
        self.damp: list[dict[str, Any]] = []
        self.tokens: list[list[int]] = []
        self.widths: dict[str, int] = {}
        self.seconds = 0.0
        self._stack_fallback: dict[tuple[int, str], np.ndarray] = {}

    def note_dense(self, name, r: gptq.GPTQResult, damp) -> None:
        if bool(r.fallback):
            self.fallback.append({"linear": name, "reason": "Cholesky failed at every damping"})
        if float(r.damp) > damp * (1 + 1e-6):
            self.damp.append({"linear": name, "damp": float(r.damp)})

    def note_stack(self, l, proj, r: gptq.GPTQResult, damp) -> None:
        self._stack_fallback[(l, proj)] = multihost.to_host(r.fallback)  # split over hosts?
        for e, ratio in enumerate(multihost.to_host(r.damp)):
            if ratio > damp * (1 + 1e-6):
                self.damp.append({"linear": f"layers.{l}.mlp.experts.{proj}", "expert": e,
                                  "damp": float(ratio)})

    def note_experts(self, l, moe_i, counts, widths) -> None:
        if counts is None:
            return
        self.tokens.append([int(c) for c in counts])
        self.widths = dict(widths)
        for proj in ("gate_up", "down"):
            failed = self._stack_fallback.pop((l, proj))
            for e in np.flatnonzero(failed):
                reason = ("no calibration tokens" if counts[e] == 0
                          else "Cholesky failed at every damping")
                self.fallback.append({"linear": f"layers.{l}.mlp.experts.{proj}", "layer": l,
                                      "moe_layer": moe_i, "expert": int(e),
                                      "tokens": int(counts[e]), "reason": reason})

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "bit_map": self.bit_map.tolist(),
            "average_expert_bits": float(self.bit_map.mean()),
            "rtn_fallback": self.fallback,
            "no_token_experts": [[f["moe_layer"], f["expert"]] for f in self.fallback
                                 if f.get("tokens") == 0 and f["linear"].endswith("gate_up")],
            "damp_escalations": self.damp,
            "expert_tokens": self.tokens,
            "expert_input_widths": self.widths,
            "seconds": self.seconds,
        }


def notes(report: Mapping[str, Any], most: int = 6) -> list[str]:
    """What the user should know about a GPTQ run, one line each (none when all went well):
    linears quantized by round-to-nearest instead, routed experts whose calibration tokens
    were fewer than an input's width (their Hessian lacks rank, so the damping rather than the
    data shapes their GPTQ: more `data.num_gptq_samples` helps), and raised damping."""
    lines = []

    def listed(items):
        items = list(items)
        return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most
                                          else "")

    by_reason: dict[str, list[str]] = {}
    for f in report.get("rtn_fallback", []):
        where = (f"MoE layer {f['moe_layer']} expert {f['expert']} {f['linear'].split('.')[-1]}"
                 if "expert" in f else f["linear"])
        by_reason.setdefault(f["reason"], []).append(where)
    for reason, where in by_reason.items():
        lines.append(f"round-to-nearest instead of GPTQ for {len(where)} linear(s), "
                     f"{reason}: {listed(where)}")
    widths = report.get("expert_input_widths") or {}
    if widths:
        width = max(widths.values())
        thin = sorted((t, i, e) for i, row in enumerate(report.get("expert_tokens", []))
                      for e, t in enumerate(row) if 0 < t < width)
        if thin:
            lines.append(
                f"{len(thin)} routed expert(s) saw fewer GPTQ calibration tokens than an input "
                f"width ({', '.join(f'{k} {w}' for k, w in sorted(widths.items()))}), so damping "
                "rather than data shapes their GPTQ; raise data.num_gptq_samples: "
                + listed(f"MoE layer {i} expert {e} ({t} tokens)" for t, i, e in thin))
    damp = report.get("damp_escalations", [])
    if damp:
        lines.append(f"GPTQ raised the damping of {len(damp)} linear(s) to factor their Hessian "
                     f"(up to {max(d['damp'] for d in damp):.3g} x mean diagonal): "
                     + listed(d["linear"] + (f" expert {d['expert']}" if "expert" in d else "")
                              for d in damp))
    return lines


# ---------------------------------------------------------------- model-wide helpers


def quantized_modules(model: nnx.Module) -> Iterable[tuple[str, nnx.Module]]:
    """(dotted path, module) of every QLinear and QuantizedExperts in `model`."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QLinear | qmoe.QuantizedExperts):
            yield ".".join(str(p) for p in path), node


def set_child(root: nnx.Module, path: str, new: nnx.Module) -> None:
    """Replace the submodule at dotted `path` (list indices as digits) by `new`."""
    parent, name = _parent(root, path)
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def _set_use_kernels(model, use_kernels: bool, dequant: str = "") -> None:
    dequant = check_dequant(dequant)
    for _, m in quantized_modules(model):
        m.use_kernels = use_kernels
        m.kernel_dequant = dequant


def set_use_kernels(model: nnx.Module, use_kernels: bool, dequant: str = "") -> nnx.Module:
    """Switch every packed module between the Pallas kernels and the XLA path (in place);
    `dequant` picks the kernels' dequant mode ("" = the backend's frozen default; see
    `pallas_kernels.grouped_matmul.BlockConfig`)."""
    _set_use_kernels(model, use_kernels, dequant)
    return model


def fake_quantized(qmodel):
    """A float copy of the packed model: every packed weight dequantized (same codes) into an
    `nnx.Linear` or `StackedExperts` in the model's parameter dtype, on the packed model's mesh
    when it has one."""
    model = nnx.clone(qmodel)
    dtype = model.language_model.dtype
    for path, m in list(quantized_modules(model)):
        if isinstance(m, QLinear):
            new = nnx.eval_shape(lambda m=m: nnx.Linear(
                m.in_features, m.out_features, use_bias=False, param_dtype=dtype,
                rngs=nnx.Rngs(0)))
            new.kernel = nnx.Param(m.dequantized_kernel(dtype))
        else:
            new = nnx.eval_shape(lambda m=m: dsv3.StackedExperts(
                m.num_experts, m.dim, m.hidden, dtype, nnx.Rngs(0)))
            gate_up, down = m.dequantized(dtype)
            new.gate_up, new.down = nnx.Param(gate_up), nnx.Param(down)
        set_child(model, path, new)
    mesh = sharding.model_mesh(qmodel)
    if mesh is not None:  # placed as the packed model is: its float experts split the same way
        sharding.shard_model(model, mesh)
    return model
