"""GEMQ router fine-tuning on a packed model: only router kernels move, the loss goes down."""

import numpy as np
import optax
import pytest
from flax import nnx

import mode_jax
from mode_jax.quant import apply
from mode_jax.quant import router_finetune as rf

FIXTURE = "tests/fixtures/kimivl-tiny"


def batches(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.ones((2, 16), np.int32)
        mask[i % 2, : i + 1] = 0  # left padding
        out.append({"input_ids": rng.integers(0, 40, (2, 16)), "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def packed():
    model = mode_jax.load(FIXTURE)
    config = apply.QuantConfig(method="rtn", group_size=32, use_kernels=True)
    qmodel, _ = apply.quantize_model(model, None, np.array([[2, 3, 4, 2, 3, 4, 2, 2]]), config)
    return qmodel


def flat(model):
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model))}


def test_only_router_kernels_change_and_loss_drops(packed):
    model = nnx.clone(packed)
    data = batches()
    before = flat(model)
    report = rf.finetune_routers(model, data)  # GEMQ's defaults: AdamW 1e-4, wd 1e-4, 1 epoch
    after = flat(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"language_model.layers.1.mlp.gate.kernel"}
    assert report["steps"] == len(data)
    assert report["loss_after"] < report["loss_before"]
    assert report["loss_before"] == pytest.approx(rf.calibration_loss(packed, data), rel=1e-6)
    assert report["loss_after"] == pytest.approx(rf.calibration_loss(model, data), rel=1e-6)
    # the packed experts get their kernel setting back
    assert all(m.use_kernels for _, m in apply.quantized_modules(model))


def test_loss_is_next_token_cross_entropy_over_real_pairs(packed):
    """Against a numpy evaluation on the model's logits."""
    batch = batches()[1]
    logits = np.asarray(packed(batch).logits, np.float64)
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                total -= logp[b, t, ids[b, t + 1]]
                count += 1
    loss = rf.calibration_loss(packed, [batch])
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_first_step_is_one_adamw_step_on_the_router_gradient(packed):
    """The update equals optax.adamw applied to the gradient of the loss w.r.t. the router
    kernel alone (computed here with nnx.grad over a DiffState of just that kernel)."""
    model = nnx.clone(packed)
    data = batches(n=1)
    args = rf.loss_args(model, data[0])
    apply.set_use_kernels(model, False)
    grads = nnx.grad(rf.next_token_loss, argnums=nnx.DiffState(0, rf.is_router_kernel))(
        model, args)
    g = np.asarray(grads["language_model"]["layers"][1]["mlp"]["gate"]["kernel"][...])
    w0 = np.asarray(model.language_model.layers[1].mlp.gate.kernel[...])
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    updates, _ = tx.update(g, tx.init(w0), w0)
    rf.finetune_routers(model, data, learning_rate=1e-3)
    np.testing.assert_allclose(np.asarray(model.language_model.layers[1].mlp.gate.kernel[...]),
                               w0 + np.asarray(updates), rtol=1e-5, atol=1e-7)
    assert np.abs(g).max() > 0


def test_bad_arguments(packed):
    with pytest.raises(ValueError, match="at least one calibration batch"):
        rf.finetune_routers(packed, [])
    with pytest.raises(ValueError, match="learning_rate"):
        rf.finetune_routers(packed, batches(1), learning_rate=0.0)
