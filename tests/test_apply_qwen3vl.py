"""Quantizing a tiny Qwen3-VL-MoE (grouped-query attention, DeepStack, M-RoPE) end to end:
GPTQ with a mixed bit map, the packed model against its own dequantized copy, the artifact
round trip, router fine-tuning. (The kernel path of packed experts and linears is family-blind
and tested in test_quantized_moe.py and test_serialize.py.)"""

import numpy as np
import pytest
import qwen3vl_tiny as tiny
from flax import nnx

from mode_jax.quant import apply, router_finetune, serialize
from mode_jax.quant.qlinear import QLinear

BIT_MAP = np.array([[2, 3, 4, 8], [4, 4, 2, 3], [3, 2, 8, 4]], np.int32)


@pytest.fixture(scope="module")
def quantized():
    model = tiny.model()
    config = apply.QuantConfig(method="gptq", group_size=32, attention_bits=4)
    qmodel, report = apply.quantize_model(model, [tiny.batch(0), tiny.batch(1)], BIT_MAP, config)
    return model, qmodel, report


def test_every_linear_is_packed_and_the_packed_model_is_its_dequantized_copy(quantized):
    model, qmodel, report = quantized
    attn = qmodel.language_model.layers[1].self_attn
    assert all(isinstance(getattr(attn, n), QLinear) for n in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj"))
    np.testing.assert_array_equal(serialize.bit_map(qmodel), BIT_MAP)
    assert not report["rtn_fallback"]
    batch = tiny.batch(2)
    packed = np.asarray(qmodel(batch).logits)
    fake = np.asarray(apply.fake_quantized(qmodel)(batch).logits)
    np.testing.assert_allclose(packed, fake, rtol=1e-4, atol=1e-4 * np.abs(fake).max())
    fp = np.asarray(model(batch).logits)
    assert 1e-3 < np.abs(packed - fp).max() / np.abs(fp).max() < 0.5  # quantized, not broken


def test_gptq_beats_round_to_nearest_on_the_output(quantized):
    """The layer-sequential GPTQ (which sees DeepStack and M-RoPE in its calibration pass) is
    closer to the float model than round-to-nearest at the same bits."""
    model, qmodel, _ = quantized
    rtn_model, _ = apply.quantize_model(model, None, BIT_MAP,
                                        apply.QuantConfig(method="rtn", group_size=32,
                                                          attention_bits=4))
    fp, err = None, {}
    for name, m in (("gptq", qmodel), ("rtn", rtn_model)):
        total = 0.0
        for seed in (0, 1):  # the calibration batches
            batch = tiny.batch(seed)
            fp = np.asarray(model(batch).logits)
            total += float(np.square(np.asarray(m(batch).logits) - fp).sum())
        err[name] = total
    assert err["gptq"] < err["rtn"], err


def test_artifact_round_trip_keeps_the_family(quantized, tmp_path):
    _, qmodel, _ = quantized
    serialize.save(str(tmp_path / "q"), qmodel, {"note": "tiny"})
    restored, meta = serialize.restore(str(tmp_path / "q"))
    assert meta["family"] == "qwen3_vl_moe"
    batch = tiny.batch(3)
    np.testing.assert_array_equal(np.asarray(restored(batch).logits),
                                  np.asarray(qmodel(batch).logits))


def test_router_finetuning_lowers_the_calibration_loss(quantized):
    """GEMQ's router fine-tuning option on this family: the loss it reports uses the model's
    M-RoPE positions and DeepStack, and two AdamW steps on the routers alone lower it."""
    _, qmodel, _ = quantized
    model = nnx.clone(qmodel)
    batches = [tiny.batch(0), tiny.batch(1)]
    routers = [np.asarray(lyr.mlp.gate.kernel[...]) for lyr in model.language_model.layers]
    result = router_finetune.finetune_routers(model, batches, learning_rate=1e-2)
    assert result["loss_after"] < result["loss_before"]
    assert result["loss_before"] == pytest.approx(
        router_finetune.calibration_loss(qmodel, batches), rel=1e-6)
    moved = [np.abs(np.asarray(lyr.mlp.gate.kernel[...]) - r).max()
             for lyr, r in zip(model.language_model.layers, routers, strict=True)]
    assert min(moved) > 0
