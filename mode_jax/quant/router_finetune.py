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

from mode_jax.convert import families
from mode_jax.models import deepseek_v3, qwen3_moe
from mode_jax.quant import apply

ROUTERS = (deepseek_v3.Router, qwen3_moe.Router)


def is_router_kernel(path: tuple, value: Any) -> bool:
    """NNX filter: the kernel of a Router (`...mlp.gate.kernel`)."""
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] == "gate"


def next_token_loss(model, args: Mapping[str, Any]) -> jax.Array:
    """Mean cross-entropy of token t+1 given tokens <= t over pairs of real tokens whose
    target is not an image placeholder; `args` the fields of `model.prepare(batch)`."""
    out = model.forward(args["input_ids"], args["attention_mask"], args["pixel_values"],
                        args["grid"], args["positions"])
    logits = out.logits[:, :-1].astype(jnp.float32)
    targets = args["input_ids"][:, 1:]
    mask = args["attention_mask"][:, :-1] & args["attention_mask"][:, 1:]
    placeholder = families.image_token_id(model.config)
    if placeholder is not None:
        mask = mask & (targets != placeholder)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(mask.sum(), 1)


def loss_args(model, batch) -> dict[str, Any]:
    p = model.prepare(batch)
    return dict(input_ids=p.input_ids, attention_mask=p.attention_mask,
                pixel_values=p.pixel_values, grid=p.grid, positions=p.positions)


@nnx.jit(static_argnames="grid")
def _loss(model, input_ids, attention_mask, pixel_values, grid, positions):
    args = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                grid=grid, positions=positions)
    return next_token_loss(model, args)


@nnx.jit(static_argnames="grid")
def _train_step(model, optimizer, input_ids, attention_mask, pixel_values, grid, positions):
    args = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                grid=grid, positions=positions)
    diff = nnx.DiffState(0, is_router_kernel)
    loss, grads = nnx.value_and_grad(next_token_loss, argnums=diff)(model, args)
    optimizer.update(model, grads)
    return loss


def calibration_loss(model, batches: Sequence[Mapping[str, Any]]) -> float:
    """Mean of `next_token_loss` over the batches."""
    losses = [float(_loss(model, **loss_args(model, b))) for b in batches]
    return float(np.mean(losses))


def finetune_routers(
    model,
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
    if not any(isinstance(m, ROUTERS) for _, m in nnx.iter_graph(model)):
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
                steps.append(float(_train_step(model, optimizer, **loss_args(model, b))))
        after = calibration_loss(model, batches)
    finally:
        for p, m in kernels.items():
            m.use_kernels = use_kernels[p]
    return {"loss_before": before, "loss_after": after, "steps": len(steps),
            "step_losses": steps}
