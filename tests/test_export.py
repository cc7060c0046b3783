"""Export writes the published Kimi-VL layout: the same tensors Kimi-VL's own code wrote for the
kimivl-tiny fixture, and a directory `mode_jax.load` reads back to an identical model."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import mode_jax
from mode_jax.convert import export
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.models.moonvit import VisionConfig
from mode_jax.preprocess import ImageConfig
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tok_lib

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kimivl-tiny"


def _flat(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def _randomize(model, seed):
    """Every parameter (norm scales and biases too) drawn at random, so nothing round-trips by
    luck of being all ones or zeros."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        var.set_value(jnp.asarray(rng.normal(size=value.shape), value.dtype))
    return model


@pytest.fixture(scope="module")
def fixture_model():
    return mode_jax.load(FIXTURE)


def test_fixture_tensors_are_reproduced_exactly(fixture_model, tmp_path):
    """Load Kimi-VL's own checkpoint, export it: every published name, shape, dtype and value
    comes back (per-expert gate/up/down, conv patch weight, fused wqkv)."""
    export.save(fixture_model, tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    theirs = load_file(FIXTURE / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert "language_model.model.layers.1.mlp.experts.7.up_proj.weight" in ours
    for name, ref in theirs.items():
        assert ours[name].shape == ref.shape and ours[name].dtype == ref.dtype, name
        np.testing.assert_array_equal(ours[name], ref, err_msg=name)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "kimi_vl"
    raw = json.loads((FIXTURE / "config.json").read_text())
    assert KimiVLConfig.from_dict(written) == KimiVLConfig.from_dict(raw)


def test_roundtrip_random_model_with_tokenizer(tmp_path):
    raw = json.loads((FIXTURE / "config.json").read_text())
    model = _randomize(KimiVL(KimiVLConfig.from_dict(raw), rngs=nnx.Rngs(1)), seed=2)
    tokenizer = tok_lib.build_tokenizer(tasks.vocabulary())
    image_cfg = ImageConfig(max_patches=1024, align="crop")
    export.save(model, tmp_path, tokenizer=tokenizer, image_config=image_cfg)
    loaded = mode_jax.load(tmp_path)
    assert loaded.config == model.config
    _assert_same_params(model, loaded)
    # the tokenizer files load offline and encode the same way; eos is <|im_end|>
    again = tok_lib.load_tokenizer(tmp_path)
    prompt = tok_lib.format_chat("what color is zorblat ?", with_image=False)
    assert again(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(tok_lib.IM_END)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert ImageConfig.from_preprocessor_config(pre) == image_cfg


def test_roundtrip_bfloat16(fixture_model, tmp_path):
    model = mode_jax.load(FIXTURE, dtype=jnp.bfloat16)
    export.save(model, tmp_path)
    assert load_file(tmp_path / "model.safetensors")["language_model.lm_head.weight"].dtype.name \
        == "bfloat16"
    _assert_same_params(model, mode_jax.load(tmp_path, dtype=jnp.bfloat16))


def test_roundtrip_text_only_model_with_yarn(tmp_path):
    text = TextConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=12, moe_intermediate_size=16,
                      n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
                      first_k_dense_replace=1, n_group=2, topk_group=1,
                      routed_scaling_factor=1.5, rope_type="yarn", rope_factor=4.0,
                      rope_original_max_position=256, rope_mscale=0.7, rope_mscale_all_dim=0.7)
    model = _randomize(KimiVL(KimiVLConfig(text=text, vision=None, media_placeholder_token_id=None),
                              rngs=nnx.Rngs(0)), seed=3)
    export.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    loaded = mode_jax.load(tmp_path)
    assert loaded.config == model.config
    _assert_same_params(model, loaded)
    ids = np.arange(10, dtype=np.int32)[None] % 48
    np.testing.assert_array_equal(np.asarray(loaded({"input_ids": ids}).logits),
                                  np.asarray(model({"input_ids": ids}).logits))


def test_unwritable_settings_and_stale_weights_are_refused(fixture_model, tmp_path):
    vision = VisionConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=8,
                          pos_emb_height=4, pos_emb_width=4, mlp_act="gelu")
    with pytest.raises(ValueError, match="vision mlp_act='gelu' cannot be written"):
        export.vision_config_dict(vision)
    with pytest.raises(ValueError, match="align='resize'"):
        export.preprocessor_config_dict(ImageConfig(align="resize"))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds other weight files"):
        export.save(fixture_model, tmp_path)


def test_exported_model_computes_the_fixture_reference(fixture_model, tmp_path):
    """The exported directory still reproduces what Kimi-VL's PyTorch code computed."""
    export.save(fixture_model, tmp_path)
    ref = np.load(FIXTURE / "reference.npz")
    batch = {k: ref[k] for k in ("input_ids", "pixel_values", "image_grid_hws")}
    logits = np.asarray(mode_jax.load(tmp_path)(batch).logits)
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-4)
