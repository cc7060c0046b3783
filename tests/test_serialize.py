"""The packed checkpoint: round trip, restore without PyTorch, size, and inference on the
restored model (KV-cache generation, Pallas kernels vs the XLA path)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mode_jax
from mode_jax.eval import generate
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.quant import apply, serialize
from mode_jax.quant import quantized_moe as qmoe
from mode_jax.quant.qlinear import QLinear
from pallas_kernels import packing

FIXTURE = "tests/fixtures/kimivl-tiny"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIT_MAP = [[2, 3, 4, 2, 3, 4, 2, 4]]


def image_prompt():
    """The fixture's prompt with one image."""
    ref = np.load(f"{FIXTURE}/reference.npz")
    return {"input_ids": ref["input_ids"], "attention_mask": np.ones_like(ref["input_ids"]),
            "pixel_values": ref["pixel_values"], "image_grid_hws": ref["image_grid_hws"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Kimi-VL's tiny checkpoint quantized (RTN, mixed map), saved and restored."""
    model = mode_jax.load(FIXTURE)
    config = apply.QuantConfig(method="rtn", group_size=32)
    qmodel, report = apply.quantize_model(model, None, np.array(BIT_MAP), config)
    path = str(tmp_path_factory.mktemp("ckpt") / "packed")
    serialize.save(path, qmodel, {"report": report})
    restored, meta = serialize.restore(path)
    return qmodel, restored, meta, path


def flat_arrays(model):
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model))}


def test_round_trip(saved):
    qmodel, restored, meta, _ = saved
    before, after = flat_arrays(qmodel), flat_arrays(restored)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert meta["bit_map"] == BIT_MAP
    assert serialize.bit_map(restored).tolist() == BIT_MAP
    assert meta["metadata"]["report"]["config"]["method"] == "rtn"
    assert {p for p, _ in apply.quantized_modules(restored)} == set(meta["quantized"])
    fake = apply.fake_quantized(qmodel)  # the float model of the same codes
    batch = image_prompt()
    np.testing.assert_allclose(np.asarray(restored(batch).logits),
                               np.asarray(fake(batch).logits), rtol=1e-5, atol=1e-5)


def test_restore_needs_neither_torch_nor_float_weights(saved, tmp_path):
    """A fresh process with torch, transformers and safetensors unimportable restores the
    checkpoint (it never reads the fixture's float weights) and gets the same logits."""
    qmodel, _, _, path = saved
    batch = image_prompt()
    np.savez(tmp_path / "batch.npz", **batch)
    script = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from mode_jax.quant import serialize\n"
        f"model, _ = serialize.restore({path!r})\n"
        f"batch = dict(np.load({str(tmp_path / 'batch.npz')!r}))\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(model(batch).logits))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"),
                                  np.asarray(qmodel(batch).logits))


@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kv_cache_generation_equals_uncached_argmax(saved, use_kernels):
    """Greedy decoding with the MLA cache (prefill, then one-token steps through the packed
    experts) picks at every step the argmax of the uncached forward over the sequence so far
    (checked with one teacher-forced forward: the model is causal)."""
    _, restored, _, _ = saved
    prompt = image_prompt()  # with the image
    apply.set_use_kernels(restored, use_kernels)
    try:
        gen = generate.greedy_generate(restored, prompt, 4, eos_token_id=319)
        ids = np.concatenate([prompt["input_ids"], gen.tokens[:, :3]], axis=1)
        full = {**prompt, "input_ids": ids, "attention_mask": np.ones_like(ids)}
        logits = np.asarray(restored(full).logits)
    finally:
        apply.set_use_kernels(restored, False)
    n = min(4, int(gen.lengths[0]) + 1)  # up to and including an eos
    t = prompt["input_ids"].shape[1]
    np.testing.assert_array_equal(gen.tokens[0, :n], logits[0, t - 1:t - 1 + n].argmax(-1))


def test_kernel_path_logits_match_xla_path(saved):
    """Float32 activations, so both paths agree to float32 rounding (bf16 activations are
    compared per layer in test_quantized_moe)."""
    _, restored, _, path = saved
    batch = image_prompt()
    xla = np.asarray(restored(batch).logits)
    with_kernels, _ = serialize.restore(path, use_kernels=True)
    kernel = np.asarray(with_kernels(batch).logits)
    np.testing.assert_allclose(kernel, xla, rtol=1e-4, atol=1e-4 * np.abs(xla).max())


# ---------------------------------------------------------------- size


def packed_random_model(seed=0):
    """bf16 text model, expert dims multiples of 128, routed experts at a random mixed 2/3/4
    map and shared experts at 4 bits (random codes; sizes do not depend on the values)."""
    text = TextConfig(
        vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=0)
    model = KimiVL(KimiVLConfig(text=text, vision=None, media_placeholder_token_id=None),
                   param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    bit_map = rng.permuted(np.tile([2, 3, 4, 2], (2, 4)), axis=1)

    def codes(shape, bits):
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=shape)

    def scales(shape):
        return jnp.asarray(rng.uniform(0.01, 0.02, shape), jnp.bfloat16)

    d, f, e = 256, 256, 16
    for l, layer in enumerate(model.language_model.layers):
        b = bit_map[l]
        gu = np.stack([codes((d, 2 * f), x) for x in b])
        dn = np.stack([codes((f, d), x) for x in b])
        layer.mlp.experts = qmoe.from_codes(b, gu, scales((e, 2, 2 * f)), dn, scales((e, 2, d)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            packed = packing.pack(codes((256, 256), 4), scales((2, 256)), 4)
            setattr(layer.mlp.shared_experts, name, QLinear(packed))
    return model, bit_map


def test_checkpoint_size_within_two_percent_of_theoretical(tmp_path):
    model, bit_map = packed_random_model()
    assert set(np.unique(bit_map)) == {2, 3, 4}
    path = str(tmp_path / "packed")
    serialize.save(path, model)
    ideal = serialize.theoretical_nbytes(model)
    assert ideal["packed"] > 0.8 * ideal["total"]  # the experts dominate this model

    restored, _ = serialize.restore(path)
    stored = sum(t.nbytes() for _, m in apply.quantized_modules(restored)
                 for t in serialize.packed_tensors(m))
    assert stored == ideal["packed"]  # dense bit-planes, no containers, no padding

    arrays, _ = serialize.to_artifact(model)
    raw = str(tmp_path / "uncompressed")
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)).save(raw, arrays)
    uncompressed = serialize.directory_nbytes(raw)
    assert abs(uncompressed / ideal["total"] - 1) < 0.02, (uncompressed, ideal)
    # the default checkpoint is zstd-compressed by Orbax: never larger
    assert serialize.directory_nbytes(path) < 1.02 * ideal["total"]


# ---------------------------------------------------------------- errors


def test_bad_checkpoints_raise_clear_errors(saved, tmp_path):
    _, restored, _, path = saved
    with pytest.raises(FileNotFoundError, match="no complete artifact"):
        serialize.restore(str(tmp_path / "missing"))
    arrays, meta = serialize.to_artifact(restored)
    with pytest.raises(ValueError, match="format"):
        serialize.from_artifact(arrays, {**meta, "format": "other/0"})
    # Format 1 packed 3 bits' high plane in another order: same shapes, so only the format
    # check stands between an old file and wrong weights.
    with pytest.raises(ValueError, match="re-run the quantize stage"):
        serialize.from_artifact(arrays, {**meta, "format": "mode-jax-packed/1"})
    with pytest.raises(ValueError, match="dtype"):
        serialize.from_artifact(arrays, {**meta, "dtype": "int8"})
    key = "language_model.layers.1.mlp.experts.groups.b2.expert_ids"
    bad = {"params": {**arrays["params"], key: np.zeros(5, np.int32)}}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        serialize.from_artifact(bad, meta)
    missing = {"params": {k: v for k, v in arrays["params"].items() if k != key}}
    with pytest.raises(ValueError, match="missing " + key.replace(".", r"\.")):
        serialize.from_artifact(missing, meta)
    cfg = json.loads(json.dumps(meta["config"]))
    cfg["text"]["hiden_size"] = 3
    with pytest.raises(ValueError, match="unknown fields"):
        serialize.from_artifact(arrays, {**meta, "config": cfg})
    with pytest.raises(ValueError, match="not quantized"):
        serialize.to_artifact(mode_jax.load(FIXTURE))
