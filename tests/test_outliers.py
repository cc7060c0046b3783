"""Folding outlier channels into the testbed's routed experts keeps the function and moves the
scale of every quantization group (outliers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mode_jax.quant import fake
from mode_jax.testbed import outliers, train

IDS = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12]])


def _model(seed=0):
    return train.KimiVL(train.model_config(), rngs=nnx.Rngs(seed))


def _logits(model):
    return np.asarray(model.forward(IDS, jnp.ones_like(IDS)).logits)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_a_power_of_two_fold_keeps_the_logits_bit_for_bit_and_inverts_exactly():
    model = _model()
    fold = outliers.Fold(hidden=8, intermediate=8, factor=8.0, seed=3)
    folded = outliers.apply(model, fold)
    np.testing.assert_array_equal(_logits(folded), _logits(model))
    back = outliers.apply(folded, fold, inverse=True)
    for a, b in zip(_params(model), _params(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(_params(model), _params(folded), strict=True))


def test_any_factor_keeps_the_function_up_to_rounding():
    model = _model(1)
    folded = outliers.apply(model, outliers.Fold(hidden=5, intermediate=3, factor=3.0))
    np.testing.assert_allclose(_logits(folded), _logits(model), rtol=1e-4, atol=1e-5)


def test_the_fold_scales_exactly_the_drawn_channels():
    model = _model(2)
    hidden, inter, factor = 6, 3, 16.0
    folded = outliers.apply(model, outliers.Fold(hidden, inter, factor, seed=0))
    width = model.config.text.moe_intermediate_size
    layers = zip(model.language_model.layers, folded.language_model.layers, strict=True)
    for before, after in ((b, a) for b, a in layers if b.is_moe):
        norm = np.asarray(after.post_attention_layernorm.scale.get_value()) / np.asarray(
            before.post_attention_layernorm.scale.get_value())
        s = 1.0 / norm  # the factor each hidden channel's readers were multiplied by
        assert np.sum(np.isclose(s, factor)) == hidden and np.all(np.isclose(s, factor) |
                                                                 np.isclose(s, 1.0))
        for old, new in ((before.mlp.gate.kernel, after.mlp.gate.kernel),
                         (before.mlp.shared_experts.up_proj.kernel,
                          after.mlp.shared_experts.up_proj.kernel)):
            np.testing.assert_allclose(np.asarray(new.get_value()),
                                       np.asarray(old.get_value()) * s[:, None], rtol=1e-6)
        down = np.asarray(after.mlp.experts.down.get_value()) / np.asarray(
            before.mlp.experts.down.get_value())
        t = down[..., 0]  # one factor per (expert, intermediate row)
        assert np.all(np.sum(np.isclose(t, factor), axis=1) == inter)
        gate_up_b = np.asarray(before.mlp.experts.gate_up.get_value())
        gate_up_a = np.asarray(after.mlp.experts.gate_up.get_value())
        np.testing.assert_allclose(gate_up_a[..., :width], gate_up_b[..., :width]
                                   * s[None, :, None], rtol=1e-6)
        np.testing.assert_allclose(gate_up_a[..., width:] * t[:, None, :],
                                   gate_up_b[..., width:] * s[None, :, None], rtol=1e-6)


def test_the_fold_makes_low_bit_rounding_lose_more_of_the_function():
    """Each group's scale is now set by its outlier channels, so 2-bit round-to-nearest zeroes
    most of the rest. Measured in the trained coordinates (quantize the folded model, undo the
    fold), where the error is what the function sees."""
    model = _model(3)
    fold = outliers.Fold(hidden=8, intermediate=8, factor=8.0)
    folded = outliers.apply(model, fold)

    def error(m, bits):
        q = fake.fake_quantize(m, fake.uniform_bits(m, bits), 128)
        if m is folded:
            q = outliers.apply(q, fold, inverse=True)
        errs = [[float(jnp.linalg.norm(a.get_value() - b.get_value()) /
                       jnp.linalg.norm(b.get_value()))
                 for a, b in ((qe.gate_up, e.gate_up), (qe.down, e.down))]
                for qe, e in zip(fake.moe_experts(q), fake.moe_experts(model), strict=True)]
        return np.mean(errs, axis=0)

    assert np.all(error(folded, 2) > 2 * error(model, 2))
    assert np.all(error(folded, 4) < 0.6 * error(folded, 2))


@pytest.mark.parametrize("fold, match", [
    (outliers.Fold(hidden=10_000, factor=2.0), "fold.hidden"),
    (outliers.Fold(intermediate=10_000, factor=2.0), "fold.intermediate"),
    (outliers.Fold(hidden=1, factor=0.0), "fold.factor"),
])
def test_bad_folds_are_named(fold, match):
    with pytest.raises(ValueError, match=match):
        outliers.apply(_model(), fold)


@pytest.mark.parametrize("field, value", [("outlier_hidden", 129), ("outlier_hidden", -1),
                                          ("outlier_intermediate", 129)])
def test_train_refuses_a_fold_wider_than_the_model_before_training(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}: must be in 0..128"):
        train.TrainConfig(**{field: value})
    train.TrainConfig(**{field: 128})  # the whole width is allowed


def test_the_fold_is_read_from_the_training_summary():
    assert outliers.from_summary({"train_config": {"seed": 0}}).empty
    cfg = train.TrainConfig()
    assert cfg.fold() == outliers.Fold(cfg.outlier_hidden, cfg.outlier_intermediate,
                                       cfg.outlier_factor, cfg.seed)
    assert outliers.from_summary({"train_config": {
        "seed": cfg.seed, "outlier_hidden": cfg.outlier_hidden,
        "outlier_intermediate": cfg.outlier_intermediate,
        "outlier_factor": cfg.outlier_factor}}) == cfg.fold()
