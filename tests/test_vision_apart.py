"""The vision tower runs as a program of its own (`models.batch.embed_images`): batches whose
image grids differ but whose shapes match reuse the decoder's compiled programs (the forward,
`generate`, the calibration passes), the full-precision and quantized models share the vision
program, and the results equal the vision tower run inside."""

import pathlib

import numpy as np
import pytest

import mode_jax
from mode_jax import sharding
from mode_jax.calib import passes
from mode_jax.eval import generate
from mode_jax.models import deepseek_v3, kimivl
from mode_jax.models.batch import embed_images
from mode_jax.quant import apply

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kimivl-tiny"
GRIDS = ((2, 12), (12, 2), (6, 4))  # patches; 6 image tokens each, so equal batch shapes


@pytest.fixture(scope="module")
def model():
    return mode_jax.load(FIXTURE)


def _batch(model, grid, seed):
    rng = np.random.default_rng(seed)
    image = model.config.media_placeholder_token_id
    ids = [*rng.integers(10, 60, 3), *[image] * (grid[0] * grid[1] // 4), *rng.integers(10, 60, 4)]
    pixels = rng.normal(size=(grid[0] * grid[1], 3, 14, 14)).astype(np.float32)
    return {"input_ids": np.asarray([ids], np.int32), "attention_mask": np.ones((1, len(ids))),
            "pixel_values": pixels, "image_grid_hws": np.asarray([grid])}


def _counting(monkeypatch, owner, name):
    """Count the calls of `owner.name`: under jit, one per trace."""
    calls = []
    inner = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_new_grid_does_not_retrace_the_decoder(model, monkeypatch):
    batches = [_batch(model, g, i) for i, g in enumerate(GRIDS)]
    decoder = _counting(monkeypatch, deepseek_v3.DeepseekV3, "__call__")
    vision = _counting(monkeypatch, model.vision_tower.__class__, "__call__")
    model(batches[0])
    generate.greedy_generate(model, batches[0], 2, eos_token_id=0)
    seen, seen_vision = len(decoder), len(vision)
    for b in batches[1:]:
        model(b)
        generate.greedy_generate(model, b, 2, eos_token_id=0)
    assert len(decoder) == seen  # the decoder's programs: reused for every grid
    assert len(vision) == seen_vision + len(GRIDS) - 1  # the vision program: once per grid
    trace = _counting(monkeypatch, passes, "trace")
    cfg = passes.StatsConfig(model.config.media_placeholder_token_id)
    passes.frequency_pass(model, batches[:1], cfg)
    seen = len(trace)
    passes.frequency_pass(model, batches[1:], cfg)
    passes.collect_tokens(model, batches[:1], cfg)
    seen_tokens = len(trace)
    passes.collect_tokens(model, batches[1:], cfg)
    assert len(trace) == seen_tokens and seen_tokens - seen <= 1


def test_the_vision_tower_apart_gives_the_same_outputs(model):
    batch = _batch(model, GRIDS[0], 0)
    got = model(batch, return_routing=True)
    args = kimivl.prepare_batch(model.config, batch)
    want = kimivl._forward_jit(model, **sharding.place_inputs(model, args), return_routing=True,
                               return_mlp_inputs=False, return_hidden=False, logits_window=0)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    for (gi, gw), (wi, ww) in zip(got.routing, want.routing, strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_allclose(gw, ww, rtol=1e-6, atol=1e-7)


def test_quantized_copies_share_the_vision_program(model, monkeypatch):
    """Quantization leaves the vision tower and embeddings alone, so a packed model (another
    graph than the float one) runs its images through the float model's compiled vision
    program, and its embeddings are the float model's."""
    text = model.config.text
    bits = np.full((len(text.moe_layers), text.n_routed_experts), 2)
    packed, _ = apply.quantize_model(model, None, bits,
                                     apply.QuantConfig(method="rtn", group_size=32))
    batch = _batch(model, (4, 8), 7)  # a grid no other test uses
    args = kimivl.prepare_batch(model.config, batch)
    cfg = passes.StatsConfig(model.config.media_placeholder_token_id)
    vision = _counting(monkeypatch, model.vision_tower.__class__, "__call__")

    def run(m):  # the forward, the calibration passes and GPTQ's walk's way in
        m(batch)
        passes.frequency_pass(m, [batch], cfg)
        return embed_images(m, args["input_ids"], args["pixel_values"], args["grid_hws"])

    want = run(model)
    traced = len(vision)
    got = run(packed)
    assert 1 <= traced and len(vision) == traced  # the packed model traced it no more
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert not np.array_equal(packed(batch).logits, model(batch).logits)  # packed indeed
