"""GEMQ's router fine-tuning: after quantization, train only the routers' kernels.

Loss: mean next-token cross-entropy over real tokens (position t predicts token t+1 when both
are real; image placeholder tokens are never targets). Optimizer: optax AdamW (GEMQ: lr 1e-4,
weight decay 1e-4), one step per calibration batch, `epochs` passes (GEMQ: one).

Only `layers.*.mlp.gate.kernel` (the `Router` kernels `[D, E]`) are differentiated and updated;
the correction biases, packed experts and every other weight stay as they are. Gradients reach
a router through its routing weights (the top-k choice itself is discrete) and, for earlier
layers, through the later layers' experts: the packed experts run their XLA path while
training (the Pallas kernels define no gradient) and get their kernel setting back after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mode_jax.models.deepseek_v3 import Router
from mode_jax.models.kimivl import KimiVL, prepare_batch
from mode_jax.quant import apply


def is_router_kernel(path: tuple, value: Any) -> bool:
    """NNX filter: the kernel of a Router (`...mlp.gate.kernel`)."""
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] == "gate"


def next_token_loss(model: KimiVL, args: Mapping[str, Any]) -> jax.Array:
    """Mean cross-entropy of token t+1 given tokens <= t over pairs of real tokens whose
    target is not an image placeholder; `args` as `prepare_batch` returns them."""
    out = model.forward(args["input_ids"], args["attention_mask"], args["pixel_values"],
                        args["grid_hws"])
    logits = out.logits[:, :-1].astype(jnp.float32)
    targets = args["input_ids"][:, 1:]
    mask = args["attention_mask"][:, :-1] & args["attention_mask"][:, 1:]
    placeholder = model.config.media_placeholder_token_id
    if placeholder is not None:
        mask = mask & (targets != placeholder)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(mask.sum(), 1)


@nnx.jit(static_argnames="grid_hws")
def _loss(model, input_ids, attention_mask, pixel_values, grid_hws):
    args = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                grid_hws=grid_hws)
    return next_token_loss(model, args)


@nnx.jit(static_argnames="grid_hws")
def _train_step(model, optimizer, input_ids, attention_mask, pixel_values, grid_hws):
    args = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                grid_hws=grid_hws)
    diff = nnx.DiffState(0, is_router_kernel)
    loss, grads = nnx.value_and_grad(next_token_loss, argnums=diff)(model, args)
    optimizer.update(model, grads)
    return loss


def calibration_loss(model: KimiVL, batches: Sequence[Mapping[str, Any]]) -> float:
    """Mean of `next_token_loss` over the batches."""
    losses = [float(_loss(model, **prepare_batch(model.config, b))) for b in batches]
    return float(np.mean(losses))


def finetune_routers(
    model: KimiVL,
    batches: Sequence[Mapping[str, Any]],
    *,
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-4,
    epochs: int = 1,
) -> dict[str, Any]:
    """Train the routers of `model` in place; returns {"loss_before", "loss_after", "steps",
    "step_losses"} (losses over `batches`)."""
    batches = list(batches)
    if not batches:
        raise ValueError("router fine-tuning needs at least one calibration batch")
    if epochs < 1 or not learning_rate > 0 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, learning_rate > 0, weight_decay >= 0; got "
                         f"{epochs}, {learning_rate}, {weight_decay}")
    if not any(isinstance(m, Router) for _, m in nnx.iter_graph(model)):
        raise ValueError("model has no MoE router to fine-tune")
    kernels = dict(apply.quantized_modules(model))
    use_kernels = {p: m.use_kernels for p, m in kernels.items()}
    apply.set_use_kernels(model, False)
    try:
        before = calibration_loss(model, batches)
        tx = optax.adamw(learning_rate, weight_decay=weight_decay)
        optimizer = nnx.Optimizer(model, tx, wrt=is_router_kernel)
        steps = []
        for _ in range(epochs):
            for b in batches:
                args = prepare_batch(model.config, b)
                steps.append(float(_train_step(model, optimizer, **args)))
        after = calibration_loss(model, batches)
    finally:
        for p, m in kernels.items():
            m.use_kernels = use_kernels[p]
    return {"loss_before": before, "loss_after": after, "steps": len(steps),
            "step_losses": steps}
