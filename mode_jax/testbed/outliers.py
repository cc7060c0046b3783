"""Outlier channels folded into the testbed's routed experts: the same function, heavier tails.

Real LLM weights and activations are heavy-tailed (the outlier features of LLM.int8 and
SmoothQuant, AWQ's salient channels, "super weights" in down projections): a few channels set
each quantization group's scale, and low bit-widths round the rest towards zero. The trained
testbed's weights are close to Gaussian, so 2-bit round-to-nearest on them costs nothing
(docs/testbed.md). Folding rescales channels without changing any output, so the checkpoint keeps
its accuracy and only its quantization behaves more like a real model's:

- hidden: per MoE layer, `hidden` channels of the post-attention RMSNorm are divided by
  `factor` and every row that reads them (router, shared expert, routed gate/up) multiplied by
  it. The routed gate/up kernels' groups run along the hidden input, so each group of every
  expert holds these rows.
- intermediate: per routed expert, `intermediate` columns of the up kernel are divided by
  `factor` and the matching rows of the down kernel multiplied by it (in SwiGLU
  `down(silu(x @ gate) * (x @ up))` they meet only as a product).

With a power-of-two `factor` every rescaled weight is exact in floating point, so the folded
model's logits equal the original's bit for bit. Which channels are drawn from `seed`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mode_jax.quant import fake


@dataclasses.dataclass(frozen=True)
class Fold:
    hidden: int = 0  # outlier hidden channels per MoE layer (shared by its experts)
    intermediate: int = 0  # outlier intermediate channels per routed expert
    factor: float = 1.0
    seed: int = 0

    @property
    def empty(self) -> bool:
        return self.factor == 1.0 or not (self.hidden or self.intermediate)


def _scale(param, s) -> None:
    param.set_value(param.get_value() * s)


def apply(model, fold: Fold, inverse: bool = False):
    """A copy of `model` with `fold`'s outlier channels (`inverse`: with them taken out again,
    i.e. the trained weights of a checkpoint shipped folded)."""
    text = model.config.text
    if not 0 <= fold.hidden <= text.hidden_size:
        raise ValueError(f"fold.hidden must lie in [0, {text.hidden_size}], got {fold.hidden}")
    if not 0 <= fold.intermediate <= text.moe_intermediate_size:
        raise ValueError(f"fold.intermediate must lie in [0, {text.moe_intermediate_size}], "
                         f"got {fold.intermediate}")
    if not fold.factor > 0:
        raise ValueError(f"fold.factor must be positive, got {fold.factor}")
    rng = np.random.default_rng(fold.seed)
    factor = 1.0 / fold.factor if inverse else fold.factor
    new = fake.editable_copy(model)
    for layer in new.language_model.layers:
        if not layer.is_moe:
            continue
        moe = layer.mlp
        s = np.ones(text.hidden_size, np.float32)
        s[rng.choice(text.hidden_size, fold.hidden, replace=False)] = factor
        s = jnp.asarray(s)
        _scale(layer.post_attention_layernorm.scale, 1.0 / s)
        _scale(moe.gate.kernel, s[:, None])
        _scale(moe.experts.gate_up, s[None, :, None])
        if moe.shared_experts is not None:
            _scale(moe.shared_experts.gate_proj.kernel, s[:, None])
            _scale(moe.shared_experts.up_proj.kernel, s[:, None])
        num, width = moe.experts.down.get_value().shape[:2]
        t = np.ones((num, width), np.float32)
        for e in range(num):
            t[e, rng.choice(width, fold.intermediate, replace=False)] = factor
        t = jnp.asarray(t)
        up = jnp.concatenate([jnp.ones_like(t), 1.0 / t], axis=1)  # gate columns stay
        _scale(moe.experts.gate_up, up[:, None, :])
        _scale(moe.experts.down, t[:, :, None])
    return new


def from_train_config(cfg: dict) -> Fold:
    """The fold of a train.py config (`dataclasses.asdict(TrainConfig)`, or one recorded by an
    older train.py without these fields: no fold)."""
    return Fold(cfg.get("outlier_hidden", 0), cfg.get("outlier_intermediate", 0),
                cfg.get("outlier_factor", 1.0), cfg.get("seed", 0))


def from_summary(summary: dict) -> Fold:
    """The fold a checkpoint was shipped with, from its train_summary.json."""
    return from_train_config(summary.get("train_config", {}))
