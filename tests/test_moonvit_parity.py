"""MoonViT + projector against transformers' Kimi-K2.5 vision tower (PyTorch, float32).

The K2.5 tower is the independent reference: it rotates "half" pairs with separate q/k/v
weights, so agreement also checks the converter's row permutation into Kimi-VL's fused,
interleaved `wqkv`. The published Kimi-VL names are checked end to end in
test_kimivl_parity.py against reference logits from Kimi-VL's own code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

from mode_jax.convert import kimivl as ck
from mode_jax.convert import mapping
from mode_jax.models import moonvit as mv

TEXT = dict(model_type="deepseek_v3", hidden_size=48, intermediate_size=64,
            moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, vocab_size=64, n_group=1, topk_group=1)
VISION = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=72,
              pos_emb_height=6, pos_emb_width=6)


class Tower(nnx.Module):
    def __init__(self, cfg: mv.VisionConfig, text_hidden: int, *, rngs: nnx.Rngs):
        self.vision_tower = mv.MoonViT(cfg, rngs=rngs)
        self.multi_modal_projector = mv.Projector(cfg, text_hidden, rngs=rngs)


@pytest.fixture(scope="module")
def k25():
    torch.manual_seed(0)
    cfg = Kimi_K25Config(text_config=TEXT, vision_config=VISION, projection_hidden_size=32)
    cfg._attn_implementation = "eager"
    model = Kimi_K25ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random values everywhere (init leaves norms at 1 and biases at 0)
        for name, p in model.named_parameters():
            if "vision_tower" in name or "mm_projector" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def _convert(model, dtype=jnp.float32):
    cfg = mv.VisionConfig.from_k25(model.config.vision_config,
                                   model.config.projection_layer_norm_eps)
    abstract = nnx.eval_shape(lambda: Tower(cfg, TEXT["hidden_size"], rngs=nnx.Rngs(0)))
    if dtype != jnp.float32:
        abstract = nnx.eval_shape(lambda: _cast(Tower(cfg, TEXT["hidden_size"],
                                                      rngs=nnx.Rngs(0)), dtype))
    sd = {k: v.numpy() for k, v in model.state_dict().items()
          if "vision_tower" in k or "mm_projector" in k}
    return mapping.convert(sd.items(), ck.vision_rules_k25(cfg), abstract)


def _cast(module, dtype):
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, nnx.map_state(lambda _, v: v.astype(dtype), state))


@nnx.jit(static_argnums=2)
def _run(ours, pixels, grids):
    return ours.multi_modal_projector(ours.vision_tower(pixels, grids))


def _features(ours, pixels, grids):
    return np.asarray(_run(ours, pixels, grids))  # jit: one compile instead of one per op


def _reference(model, pixels, grids):
    thw = torch.tensor([[1, h, w] for h, w in grids])
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pixels), thw).pooler_output
    return torch.cat(out).numpy()


@pytest.mark.parametrize("out_size,in_size", [(8, 6), (4, 6), (6, 6), (13, 5), (2, 64), (90, 64)])
def test_bicubic_matrix_matches_torch_interpolate(out_size, in_size):
    x = np.random.default_rng(out_size * 100 + in_size).normal(size=(in_size, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x.T[None, :, :, None]), size=(out_size, 1),
                        mode="bicubic", align_corners=False)[0, :, :, 0].numpy().T
    np.testing.assert_allclose(mv.bicubic_matrix(out_size, in_size) @ x, ref, atol=1e-5)


def test_pos_emb_resample_matches_torch_2d():
    table = np.random.default_rng(1).normal(size=(6, 5, 4)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=(10, 4),
                        mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(40, 4)
    np.testing.assert_allclose(np.asarray(mv.resample_pos_emb(jnp.asarray(table), 10, 4)),
                               ref.numpy(), atol=1e-5)


def test_two_images_of_different_sizes_match_k25(k25):
    grids = ((6, 8), (4, 10), (6, 6))  # larger than, smaller than, and equal to the 6x6 table
    pixels = np.random.default_rng(0).normal(size=(sum(h * w for h, w in grids), 3, 14, 14))
    pixels = pixels.astype(np.float32)
    ref = _reference(k25, pixels, grids)
    ours = _features(_convert(k25), pixels, grids)
    assert ours.shape == ref.shape == (sum(h * w for h, w in grids) // 4, TEXT["hidden_size"])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_runs_of_one_grid_match_k25(k25):
    """Consecutive images of one grid share one batched attention call and one position table;
    each still attends only within itself, as the K2.5 tower computes."""
    grids = ((4, 6), (4, 6), (4, 6), (6, 4), (4, 6))
    pixels = np.random.default_rng(5).normal(size=(sum(h * w for h, w in grids), 3, 14, 14))
    pixels = pixels.astype(np.float32)
    ref = _reference(k25, pixels, grids)
    ours = _features(_convert(k25), pixels, grids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_rope_tables_are_host_constants(k25):
    """The rope's cos/sin come into the vision program as constants, never as cosines of
    constant angles, which XLA would fold at every compile (most of a small tower's compile
    time); the outputs are the K2.5 tower's (the tests above)."""
    grids = ((4, 6), (4, 6), (6, 4))
    pixels = jnp.zeros((sum(h * w for h, w in grids), 3, 14, 14), jnp.float32)
    graphdef, state = nnx.split(_convert(k25))
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s).vision_tower(x, grids)).lower(
        state, pixels).as_text()
    assert "stablehlo.cosine" not in text and "stablehlo.sine" not in text
    cos, sin = mv.rope_cos_sin(grids, VISION["hidden_size"] // VISION["num_attention_heads"],
                               10000.0)
    assert cos.shape == sin.shape == (sum(h * w for h, w in grids), 1, cos.shape[-1])
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, atol=1e-6)


def test_attention_stays_inside_each_image(k25):
    ours = _convert(k25)
    grids = ((4, 4), (2, 6))
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(28, 3, 14, 14)).astype(np.float32)
    changed = pixels.copy()
    changed[16:] = rng.normal(size=(12, 3, 14, 14))  # only the second image differs
    a, b = _features(ours, pixels, grids), _features(ours, changed, grids)
    np.testing.assert_array_equal(a[:4], b[:4])
    assert np.abs(a[4:] - b[4:]).max() > 1e-3
    alone = _features(ours, pixels[:16], grids[:1])
    # Alone vs packed is the same arithmetic on other shapes, so only float32 rounding may
    # differ (up to 4e-6 on features of size ~20 on some CPUs); a leak between the images
    # moves features by far more than that (the 1e-3 check above).
    np.testing.assert_allclose(alone, a[:4], rtol=1e-5, atol=1e-5)


def test_bf16_tower_tolerance(k25):
    """bf16 weights and activations: within 2% of the largest feature of float32 torch
    (measured 0.5%; the float32 tower is at 6e-7)."""
    grids = ((6, 8), (4, 4))
    pixels = np.random.default_rng(4).normal(size=(64, 3, 14, 14)).astype(np.float32)
    ref = _reference(k25, pixels, grids)
    ours = _features(_convert(k25, jnp.bfloat16), pixels, grids).astype(np.float32)
    assert np.abs(ours - ref).max() <= 2e-2 * np.abs(ref).max()


def test_bad_grids_are_rejected(k25):
    ours = _convert(k25)
    with pytest.raises(ValueError, match="multiple of the merge kernel"):
        ours.vision_tower(np.zeros((15, 3, 14, 14), np.float32), ((3, 5),))
    with pytest.raises(ValueError, match=r"needs \(16, 3, 14, 14\)"):
        ours.vision_tower(np.zeros((12, 3, 14, 14), np.float32), ((4, 4),))
    with pytest.raises(ValueError, match="t != 1"):
        mv.normalize_grid(np.array([[2, 4, 4]]))
