"""Fake quantization of a whole model's routed experts from a bit map `[L_moe, E]`.

Row l of the bit map belongs to the l-th MoE layer (`config.text.moe_layers` order), column e to
routed expert e; each expert's `gate_up` and `down` kernels are round-to-nearest quantized and
dequantized in place of the originals (`quant.rtn.fake_quantize_experts`: symmetric, groups of
`group_size` input rows). Bit-width 16 keeps an expert as it is. Everything else (attention,
dense and shared MLPs, routers, vision tower) stays in full precision.

The returned model is new; it shares every untouched array with the input (JAX arrays are
immutable), so only the quantized experts take extra memory. Used by the evaluation and by the
sensitivity stage.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mode_jax.models.kimivl import KimiVL
from mode_jax.quant import rtn


def moe_experts(model: KimiVL) -> list[nnx.Module]:
    """The routed-expert modules of the MoE layers, in bit-map row order."""
    return [layer.mlp.experts for layer in model.language_model.layers if layer.is_moe]


def bit_map_shape(model: KimiVL) -> tuple[int, int]:
    """(L_moe, E): the shape a bit map for `model` must have."""
    text = model.config.text
    return len(text.moe_layers), text.n_routed_experts


def uniform_bits(model: KimiVL, bits: int) -> np.ndarray:
    """A bit map giving every routed expert `bits` bits, `[L_moe, E]` int32."""
    return np.full(bit_map_shape(model), bits, np.int32)


def editable_copy(model: KimiVL) -> KimiVL:
    """A copy of `model` whose parameters can be set without touching `model`.

    merge would reuse the input's Variable objects; tree-mapping makes new ones around the same
    (immutable) arrays, so the copy costs no parameter memory until a value is replaced.
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def fake_quantize(model: KimiVL, bits, group_size: int = 128) -> KimiVL:
    """A copy of `model` with routed expert e of MoE layer l fake-quantized at `bits[l, e]`.

    bits: `[L_moe, E]` integers in 1..8, or 16 to keep an expert in full precision.
    """
    bits = np.asarray(bits)
    want = bit_map_shape(model)
    if bits.shape != want:
        raise ValueError(f"bit map has shape {bits.shape}; this model needs {want} "
                         "(MoE layers x routed experts)")
    if not np.issubdtype(bits.dtype, np.integer):
        raise ValueError(f"bit map must hold integers, got dtype {bits.dtype}")
    rtn.check_bits(bits, allow_keep=True)
    rtn.check_group_size(group_size)
    new = editable_copy(model)
    for row, experts in zip(bits, moe_experts(new), strict=True):
        if not (hasattr(experts, "gate_up") and hasattr(experts, "down")):
            raise ValueError(f"{type(experts).__name__} has no full-precision gate_up/down "
                             "kernels to fake-quantize (already packed?)")
        if np.all(row == rtn.KEEP_BITS):
            continue
        gate_up, down = rtn.fake_quantize_experts(experts.gate_up.get_value(),
                                                  experts.down.get_value(), row, group_size)
        experts.gate_up.set_value(gate_up)
        experts.down.set_value(down)
    return new
