"""Layer-sequential quantization of whole models (mode_jax.quant.apply).

References: `rtn.fake_quantize` and `gptq.gptq_quantize` on Hessians rebuilt in the test from
the fake-quantized model's own activations (same codes as the packed model, so its layer
inputs are exactly those the sequential walk must have seen). Inference on the packed model
(KV cache, kernels) is tested on the restored checkpoint in test_serialize.py.
"""

import expert_checks
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mode_jax
from mode_jax.calib import hessian
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig, prepare_batch
from mode_jax.quant import apply, gptq, rtn
from mode_jax.quant.qlinear import QLinear
from mode_jax.quant.quantized_moe import QuantizedExperts
from pallas_kernels import packing

FIXTURE = "tests/fixtures/kimivl-tiny"
GS = 32
EXPERTS_ONLY = dict(attention_bits=16, shared_expert_bits=16, dense_mlp_bits=16)


def tiny_text_model(seed=0):
    """A dense layer then two MoE layers with a shared expert; MLA with query LoRA. Dims make
    several linears share a shape (fewer GPTQ compilations)."""
    text = TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.5)
    cfg = KimiVLConfig(text=text, vision=None, media_placeholder_token_id=None)
    return KimiVL(cfg, rngs=nnx.Rngs(seed))


def text_batches(vocab, n=3, b=2, t=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.ones((b, t), np.int32)
        if i == 1:
            mask[0, :5] = 0  # left padding is excluded from every Hessian
        out.append({"input_ids": rng.integers(0, vocab, (b, t)), "attention_mask": mask})
    return out


def fixture_batches():
    """Two text batches and the fixture's image prompt."""
    ref = np.load(f"{FIXTURE}/reference.npz")
    image = {"input_ids": ref["input_ids"], "attention_mask": np.ones_like(ref["input_ids"]),
             "pixel_values": ref["pixel_values"], "image_grid_hws": ref["image_grid_hws"]}
    return [*text_batches(40, n=2, t=16), image]


@pytest.fixture(scope="module")
def text_model():
    return tiny_text_model()


@pytest.fixture(scope="module")
def starved_model(text_model):
    """The text model with routed expert 5 of the second MoE layer never chosen."""
    model = nnx.clone(text_model)
    router = model.language_model.layers[2].mlp.gate
    router.e_score_correction_bias.value = router.e_score_correction_bias[...].at[5].set(-1e4)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_per_expert_and_idle_expert_falls_back(starved_model, bits):
    """For every routed expert with calibration tokens, GPTQ's output error on its tokens is
    below round-to-nearest's (gate/up on the routed inputs, down on the activations of the
    quantized gate/up); the expert without tokens is round-to-nearest and listed."""
    model, batches = starved_model, text_batches(64)
    bit_map = np.full((2, 8), bits)
    config = apply.QuantConfig(group_size=GS, **EXPERTS_ONLY)
    qmodel, report = apply.quantize_model(model, batches, bit_map, config)
    fake = apply.fake_quantized(qmodel)
    assert report["bit_map"] == bit_map.tolist()
    assert report["no_token_experts"] == [[1, 5]]
    listed = {(f["linear"], f["expert"], f["tokens"], f["reason"]) for f in report["rtn_fallback"]}
    assert listed == {(f"layers.2.mlp.experts.{p}", 5, 0, "no calibration tokens")
                      for p in ("gate_up", "down")}
    assert report["expert_input_widths"] == {"gate_up": 64, "down": 32}
    assert apply.notes(report)[0] == ("round-to-nearest instead of GPTQ for 2 linear(s), no "
                                      "calibration tokens: MoE layer 1 expert 5 gate_up, MoE "
                                      "layer 1 expert 5 down")
    skipped = expert_checks.assert_gptq_beats_rtn_per_expert(model, fake, batches, report,
                                                            bit_map, GS)
    assert skipped == [(1, 5)]
    fq = fake.language_model.layers[2].mlp.experts
    fp = model.language_model.layers[2].mlp.experts
    for w, got in ((fp.gate_up[5], fq.gate_up[5]), (fp.down[5], fq.down[5])):
        codes, scales = rtn.quantize(w, bits, GS)
        scales = scales.astype(jnp.bfloat16).astype(jnp.float32)  # as stored
        np.testing.assert_array_equal(np.asarray(got), rtn.dequantize(codes, scales, GS))


@pytest.mark.parametrize("which", ["text", pytest.param("fixture", marks=pytest.mark.slow)])
def test_full_gptq_walk_uses_quantized_upstream_activations(which, text_model):
    """Every dense linear's codes equal GPTQ on the Hessian of its input recomputed from the
    fake-quantized model (same codes), and the packed model's logits equal the fake model's.
    "fixture": Kimi-VL's own tiny checkpoint with an image prompt (vision tower in the loop)."""
    if which == "text":
        model, batches, bit_map = text_model, text_batches(64), np.array(
            [[2, 3, 4, 2, 3, 4, 2, 4], [4, 4, 3, 3, 2, 2, 3, 3]])
    else:
        model, batches, bit_map = mode_jax.load(FIXTURE), fixture_batches(), np.array(
            [[2, 3, 4, 2, 3, 4, 2, 4]])
    qmodel, report = apply.quantize_model(model, batches, bit_map,
                                          apply.QuantConfig(group_size=GS))
    fake = apply.fake_quantized(qmodel)
    text = model.config.text
    expected = set()
    for l in range(text.num_hidden_layers):
        mlp = ["mlp.experts"] + [f"mlp.shared_experts.{n}" for n in MLP] \
            if text.is_moe_layer(l) else [f"mlp.{n}" for n in MLP]
        expected |= {f"language_model.layers.{l}.{n}" for n in ATTN + mlp}
    assert {p for p, _ in apply.quantized_modules(qmodel)} == expected
    assert report["damp_escalations"] == [] and report["rtn_fallback"] == []
    assert report["bit_map"] == bit_map.tolist()

    for b in batches:
        np.testing.assert_allclose(np.asarray(qmodel(b).logits), np.asarray(fake(b).logits),
                                   rtol=1e-5, atol=1e-5)
    for l in range(text.num_hidden_layers):
        check_layer_codes(model, qmodel, fake, batches, l)


def check_layer_codes(model, qmodel, fake, batches, l):
    lm = fake.language_model
    mlp = "mlp.shared_experts" if lm.layers[l].is_moe else "mlp"
    joints = [("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
              ("self_attn.kv_b_proj",), ("self_attn.o_proj",),
              (f"{mlp}.gate_proj", f"{mlp}.up_proj"), (f"{mlp}.down_proj",)]
    acc = {j[0]: hessian.init_dense(_get(lm.layers[l], j[0]).in_features) for j in joints}
    for b in batches:
        args = prepare_batch(fake.config, b)
        h = fake.embed(args["input_ids"], args["pixel_values"], args["grid_hws"])
        out = lm(inputs_embeds=h, attention_mask=args["attention_mask"], return_hidden=True)
        seen = record_inputs(lm.layers[l], out.hidden[l], lm, args["attention_mask"])
        for p in acc:
            acc[p] = hessian.update_dense(acc[p], seen[p], args["attention_mask"])
    for joint in joints:
        w = jnp.concatenate([_get(model.language_model.layers[l], p).kernel[...]
                             for p in joint], axis=1)
        ref = gptq.gptq_quantize(w, hessian.finalize(acc[joint[0]].h_sum, acc[joint[0]].count),
                                 4, group_size=GS)
        got = np.concatenate([_codes(qmodel, l, p) for p in joint], axis=1)
        agree = float(np.mean(got == np.asarray(ref.codes)))
        assert agree > 0.99, (l, joint, agree)


ATTN = ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj", "self_attn.o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _get(root, path):
    for p in path.split("."):
        root = getattr(root, p)
    return root


def _codes(qmodel, l, path):
    return packing.unpack(_get(qmodel.language_model.layers[l], path).weight.packed)


def record_inputs(layer, h, lm, mask):
    """Inputs of every dense linear of a float layer, recorded by wrapping them (eager)."""
    seen = {}

    class Tap(nnx.Module):
        def __init__(self, inner, path):
            self.inner, self.path = inner, path

        def __call__(self, x):
            seen[self.path] = x
            return self.inner(x)

    layer = nnx.clone(layer)
    mlp = "mlp.shared_experts" if layer.is_moe else "mlp"
    for path in ATTN + [f"{mlp}.{n}" for n in MLP]:
        *parent, name = path.split(".")
        node = _get(layer, ".".join(parent))
        setattr(node, name, Tap(getattr(node, name), path))
    ctx, _ = lm.context(mask)
    layer(h, ctx)
    return seen


def test_hadamard_rotation_option(text_model):
    batches = text_batches(64)
    bit_map = np.full((2, 8), 8)
    config = apply.QuantConfig(group_size=GS, hadamard=True, **EXPERTS_ONLY)
    qmodel, report = apply.quantize_model(text_model, batches, bit_map, config)
    experts = qmodel.language_model.layers[1].mlp.experts
    assert (experts.rotate_in, experts.rotate_mid) == (32, 32)
    assert report["config"]["hadamard"] is True
    fake = apply.fake_quantized(qmodel)
    fp_logits = np.asarray(text_model(batches[0]).logits)
    q_logits = np.asarray(qmodel(batches[0]).logits)
    np.testing.assert_allclose(q_logits, np.asarray(fake(batches[0]).logits), atol=1e-5)
    # at 8 bits the rotated quantization is close to the float model
    assert np.abs(q_logits - fp_logits).max() < 0.02 * np.abs(fp_logits).max()


def test_only_the_configured_parts_change(text_model):
    """RTN without data, attention kept: routed and shared experts and the dense MLP are
    packed; router, norms, embeddings, attention and lm_head keep their exact values."""
    bit_map = np.full((2, 8), 4)
    config = apply.QuantConfig(method="rtn", group_size=GS, attention_bits=16)
    qmodel, _ = apply.quantize_model(text_model, None, bit_map, config)
    types = {p: type(m) for p, m in apply.quantized_modules(qmodel)}
    expected = {f"language_model.layers.0.mlp.{n}": QLinear for n in MLP}
    for l in (1, 2):
        expected[f"language_model.layers.{l}.mlp.experts"] = QuantizedExperts
        expected.update({f"language_model.layers.{l}.mlp.shared_experts.{n}": QLinear
                         for n in MLP})
    assert types == expected
    before = dict(nnx.to_flat_state(nnx.state(text_model, nnx.Param)))
    after = dict(nnx.to_flat_state(nnx.state(qmodel, nnx.Param)))
    assert set(after) < set(before)
    for path, v in after.items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(before[path][...]))
    assert not isinstance(text_model.language_model.layers[1].mlp.experts, QuantizedExperts)


def test_bad_inputs_raise_value_errors(text_model):
    with pytest.raises(ValueError, match=r"bit map must be \[L_moe=2, E=8\]"):
        apply.quantize_model(text_model, None, np.full((1, 8), 4), apply.QuantConfig("rtn"))
    with pytest.raises(ValueError, match="allowed"):
        apply.quantize_model(text_model, None, np.full((2, 8), 5), apply.QuantConfig("rtn"))
    with pytest.raises(ValueError, match="calibration batches"):
        apply.quantize_model(text_model, [], np.full((2, 8), 4), apply.QuantConfig())
    with pytest.raises(ValueError, match="method"):
        apply.QuantConfig(method="awq")
    with pytest.raises(ValueError, match="attention_bits"):
        apply.QuantConfig(attention_bits=5)
    with pytest.raises(ValueError, match="symmetric"):
        apply.QuantConfig.from_config({"symmetric": False})
    with pytest.raises(ValueError, match="unknown quant config keys"):
        apply.QuantConfig.from_config({"bitz": 3})
    from configs import common

    cfg = apply.QuantConfig.from_config(common.get_config().quant)
    assert (cfg.method, cfg.group_size, cfg.attention_bits) == ("gptq", 128, 4)
