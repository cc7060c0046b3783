"""The calibration passes on a tiny Qwen3-VL-MoE (images, M-RoPE, DeepStack), against the
model's own whole forward (counts) and brute-force layer-by-layer re-forwards (logit_kl).

What is new against tests/test_passes.py: positions that are not token counts, and DeepStack
additions that the exact logit_kl re-run must add again after the quantized layer.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mode_jax.calib import frequency, passes
from mode_jax.calib import sensitivity as sens
from mode_jax.models import qwen3_vl_moe as qvl
from mode_jax.quant import rtn

IMAGE, START, END = 60, 61, 62
BITS, GROUP = (2, 4), 8
CONFIG = qvl.Qwen3VLMoeConfig.from_dict({
    "model_type": "qwen3_vl_moe", "image_token_id": IMAGE,
    "text_config": dict(vocab_size=64, hidden_size=32, intermediate_size=40,
                        moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 1, 1]}),
    "vision_config": dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=32,
                          patch_size=2, temporal_patch_size=2, spatial_merge_size=2,
                          out_hidden_size=32, num_position_embeddings=16,
                          deepstack_visual_indexes=[0, 1]),
})
GRIDS = ((1, 4, 6), (1, 6, 4), (1, 4, 4))


@pytest.fixture(scope="module")
def model():
    """Random weights with std 1/sqrt(fan_in) (routing and quantization both matter)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qvl.Qwen3VLMoe(CONFIG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if name in ("scale", "bias"):
            return (1.0 if name == "scale" else 0.0) + 0.1 * rng.normal(size=leaf.shape).astype(
                leaf.dtype)
        fan_in = 1 if name in ("embedding", "pos_embed") else leaf.shape[-2]
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def _batch(seed):
    """Row 0: text, image 0, text; row 1: image 1, text, image 2, left-padded by 2."""
    rng = np.random.default_rng(seed)
    t = 30
    ids = rng.integers(1, 50, (2, t))
    mask = np.ones((2, t), np.int64)
    layout = [(3, [0]), (4, [1, 2])]
    for row, (pos, images) in enumerate(layout):
        for i in images:
            n = math.prod(GRIDS[i]) // 4
            ids[row, pos], ids[row, pos + 1 + n] = START, END
            ids[row, pos + 1 : pos + 1 + n] = IMAGE
            pos += n + 4
    ids[1, :2], mask[1, :2] = 0, 0
    pixels = rng.standard_normal((sum(math.prod(g) for g in GRIDS), 24)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": np.asarray(GRIDS)}


def _stats_config(**kw):
    return passes.StatsConfig(IMAGE, (START, END), key_ratio=0.3, **kw)


def test_frequency_counts_equal_a_loop_over_the_whole_forward(model):
    batch, cfg = _batch(0), _stats_config()
    got = passes.frequency_pass(model, [batch], cfg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    query = frequency.query_mask(jnp.asarray(ids), jnp.asarray(mask), IMAGE,
                                 jnp.asarray((START, END)), cfg.attention_mode)
    out = model(batch, image_query_mask=query, return_routing=True)
    e = CONFIG.text.num_experts
    for j, layer in enumerate(CONFIG.text.moe_layers):
        scores, (eids, _) = np.asarray(out.image_scores[layer]), out.routing[j]
        want = {c: np.zeros(e, np.int64) for c in frequency.TOKEN_CLASSES}
        for s in range(2):
            image = [p for p in range(ids.shape[1]) if mask[s, p] and ids[s, p] == IMAGE]
            n_key = max(1, math.floor(cfg.key_ratio * len(image)))
            key = set(sorted(image, key=lambda p: (-scores[s, p], p))[:n_key])
            for p in np.flatnonzero(mask[s]):
                cls = ("text" if ids[s, p] != IMAGE else "key" if p in key else "redundant")
                for name in ["all", cls] + (["image"] if cls != "text" else []):
                    np.add.at(want[name], np.asarray(eids)[s, p], 1)
        for c in frequency.TOKEN_CLASSES:
            np.testing.assert_array_equal(got[f"count_{c}"][j], want[c], err_msg=f"{c} {j}")
    assert got["count_key"].sum() > 0 and got["count_redundant"].sum() > 0


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "layer"))
def _reforward(graphdef, state, args, grid, layer, gate_up, down, select):
    """Layer by layer, with the DeepStack additions and M-RoPE positions; decoder layer
    `layer` uses `gate_up`/`down` on the `select`ed tokens. Last-position logits [B, V]."""
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    h, additions = model.embed_inputs(args["input_ids"], args["pixel_values"], grid)
    ctx, _ = lm.context(args["attention_mask"], args["positions"])
    for i, lyr in enumerate(lm.layers):
        out, _ = lyr(h, ctx)
        if i == layer:
            replaced = nnx.merge(graphdef, state).language_model.layers[i]
            replaced.mlp.experts.gate_up[...] = gate_up
            replaced.mlp.experts.down[...] = down
            out = jnp.where(select[..., None], replaced(h, ctx)[0], out)
        h = out + additions[i] if i < len(additions) else out
    return sens.last_logits(lm.logits(h), sens.last_positions(args["attention_mask"]))


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_logit_kl_equals_brute_force_reforward(model):
    batch, cfg = _batch(1), _stats_config()
    got = passes.logit_kl_pass(model, [batch], cfg, BITS, GROUP, chunk=3)
    p = model.prepare(batch)
    args = {"input_ids": p.input_ids, "attention_mask": p.attention_mask,
            "pixel_values": p.pixel_values, "positions": p.positions}
    graphdef, state = nnx.split(model)
    tokens = passes.collect_tokens(model, [batch], cfg, gradients=False)
    lm = model.language_model
    none = np.zeros(batch["input_ids"].shape, bool)
    ref = _log_softmax(_reforward(graphdef, state, args, p.grid, 0, lm.layers[0].mlp.experts
                                  .gate_up[...], lm.layers[0].mlp.experts.down[...], none))
    mask = batch["attention_mask"].astype(bool)
    for j, layer in enumerate(CONFIG.text.moe_layers):
        modality = np.zeros(mask.shape, np.int8)
        modality[mask] = tokens.layers[j].modality
        experts = lm.layers[layer].mlp.experts
        for e in (0, 3):
            for bi, bits in enumerate(BITS):
                gu = experts.gate_up[...].at[e].set(rtn.fake_quantize(experts.gate_up[e], bits,
                                                                       GROUP))
                dn = experts.down[...].at[e].set(rtn.fake_quantize(experts.down[e], bits, GROUP))
                for m, code in enumerate(sens.MODALITY_CODES):
                    q = _log_softmax(_reforward(graphdef, state, args, p.grid, layer, gu, dn,
                                                modality == code))
                    want = (np.exp(ref) * (ref - q)).sum() / 2  # two samples
                    name = f"logit_kl_{sens.MODALITIES[m]}"
                    np.testing.assert_allclose(got[name][j, e, bi], want, rtol=2e-3, atol=1e-7)
    assert got["logit_kl_vision"].max() > 1e-4 and got["logit_kl_text"].max() > 1e-4
