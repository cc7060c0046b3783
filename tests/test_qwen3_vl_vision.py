"""Qwen3-VL vision tower against transformers' `Qwen3VLMoeVisionModel` (PyTorch, float32).

A tiny random tower (every parameter drawn, so norms and biases matter too) is converted from
its state dict under the published `model.visual.` names into a module nested as `visual`,
then both run on images of different, non-square and larger-than-table grids and on a video.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from mode_jax.convert import mapping
from mode_jax.convert import qwen3_vl_vision_keys as keys
from mode_jax.models import qwen3_vl_vision as qv

VISION = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4,
              temporal_patch_size=2, in_channels=3, spatial_merge_size=2, out_hidden_size=24,
              num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
IMAGES = ((1, 4, 6), (1, 6, 4), (1, 8, 8))  # the table is 4x4: smaller, non-square, larger
PATCH_DIM = 3 * 2 * 4 * 4


class Holder(nnx.Module):
    """A stand-in for the full model: the tower nested as `visual`."""

    def __init__(self, cfg: qv.VisionConfig, *, rngs: nnx.Rngs):
        self.visual = qv.Qwen3VLVision(cfg, rngs=rngs)


def _hf_model(**overrides):
    torch.manual_seed(0)
    cfg = Qwen3VLMoeVisionConfig(**{**VISION, **overrides})
    cfg._attn_implementation = "eager"
    model = Qwen3VLMoeVisionModel(cfg).eval()
    with torch.no_grad():  # random values everywhere (init leaves norms at 1 and biases at 0)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


def _state_dict(model):
    return {"model.visual." + k: v.numpy() for k, v in model.state_dict().items()}


def _convert(model, sd=None):
    cfg = qv.VisionConfig.from_hf(model.config.to_dict())
    abstract = nnx.eval_shape(lambda: Holder(cfg, rngs=nnx.Rngs(0)))
    sd = _state_dict(model) if sd is None else sd
    return mapping.convert(sd.items(), keys.vision_rules(), abstract).visual


@nnx.jit(static_argnums=2)
def _run_jit(ours, pixels, grid):
    return ours(pixels, grid)


def _reference(model, pixels, grid):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy(), [f.numpy() for f in out.deepstack_features]


def _pixels(grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).normal(size=(n, PATCH_DIM)).astype(np.float32)


def _assert_close(ours, ref, tol=1e-5):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= tol * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.mark.parametrize("out_size,side", [(4, 4), (6, 4), (2, 4), (1, 4), (13, 5), (90, 48)])
def test_bilinear_matrix_matches_transformers_weights(out_size, side):
    """Against the taps and weights transformers' tower uses (a (1, out_size, 1) grid reads
    column 0 only); its closed-form coordinates differ from `F.interpolate` in the last bits."""
    taps, weights = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, out_size, 1]]), side, mode="bilinear", align_corners=True)
    ref = np.zeros((out_size, side), np.float32)
    np.add.at(ref, (np.arange(out_size)[:, None], taps.numpy() // side), weights.numpy())
    np.testing.assert_allclose(qv.bilinear_matrix(out_size, side), ref, rtol=0, atol=1e-6)


def test_images_match_transformers(hf):
    pixels = _pixels(IMAGES)
    ref_embeds, ref_deep = _reference(hf, pixels, IMAGES)
    ours = _convert(hf)
    embeds, deep = ours(pixels, np.array(IMAGES))  # an array grid is normalised
    assert embeds.shape == (sum(t * h * w for t, h, w in IMAGES) // 4, 24)
    _assert_close(embeds, ref_embeds)
    assert len(deep) == len(ref_deep) == 2
    for ours_d, ref_d in zip(deep, ref_deep, strict=True):
        _assert_close(ours_d, ref_d)

    jit_embeds, jit_deep = _run_jit(ours, pixels, IMAGES)
    _assert_close(jit_embeds, ref_embeds)
    np.testing.assert_allclose(np.asarray(jit_embeds), np.asarray(embeds), rtol=1e-5,
                               atol=1e-6 * np.abs(ref_embeds).max())
    for jit_d, ours_d in zip(jit_deep, deep, strict=True):
        np.testing.assert_allclose(np.asarray(jit_d), np.asarray(ours_d), rtol=1e-5,
                                   atol=1e-6 * np.abs(np.asarray(ours_d)).max())


def _assert_jitted_matches(hf, grid, seed):
    """The jitted converted tower's merged and deepstack features equal transformers'."""
    pixels = _pixels(grid, seed=seed)
    ref_embeds, ref_deep = _reference(hf, pixels, grid)
    embeds, deep = _run_jit(_convert(hf), pixels, grid)
    _assert_close(embeds, ref_embeds)
    for ours_d, ref_d in zip(deep, ref_deep, strict=True):
        _assert_close(ours_d, ref_d)


def test_video_and_image_match_transformers(hf):
    # two frames attend separately and share positions
    _assert_jitted_matches(hf, ((2, 4, 4), (1, 4, 6)), seed=1)


def test_runs_of_one_grid_match_transformers(hf):
    """Consecutive images of one grid share one batched attention call (a video's frames with
    them); each still attends only within itself, as transformers' tower computes."""
    _assert_jitted_matches(hf, ((1, 4, 6), (1, 4, 6), (2, 4, 4), (1, 4, 4), (1, 4, 6)), seed=2)


def test_bf16_tower_tolerance(hf):
    """bf16 weights and activations, the tower converted bare (empty prefixes): within 3% of
    the largest float32 torch feature (measured 1%; the float32 tower is at 7e-7)."""
    cfg = qv.VisionConfig.from_hf(hf.config.to_dict())
    abstract = nnx.eval_shape(lambda: qv.Qwen3VLVision(cfg, dtype=jnp.bfloat16,
                                                       rngs=nnx.Rngs(0)))
    sd = {k.removeprefix("model.visual."): v for k, v in _state_dict(hf).items()}
    ours = mapping.convert(sd.items(), keys.vision_rules("", ""), abstract)
    pixels = _pixels(IMAGES)
    ref_embeds, ref_deep = _reference(hf, pixels, IMAGES)
    embeds, deep = _run_jit(ours, pixels, IMAGES)
    assert embeds.dtype == jnp.bfloat16
    for got, ref in zip((embeds, *deep), (ref_embeds, *ref_deep), strict=True):
        _assert_close(np.asarray(got, np.float32), ref, tol=3e-2)


def test_unsorted_deepstack_indexes_follow_block_order():
    _assert_jitted_matches(_hf_model(deepstack_visual_indexes=[2, 0]), ((1, 4, 4),), seed=2)


def test_missing_or_misshaped_tensor_is_named(hf):
    sd = _state_dict(hf)
    del sd["model.visual.blocks.1.attn.qkv.weight"]
    with pytest.raises(mapping.MappingError, match=r"visual\.blocks\.1\.qkv\.kernel"):
        _convert(hf, sd)
    sd = _state_dict(hf)
    sd["model.visual.deepstack_merger_list.1.norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(mapping.MappingError,
                       match=r"model\.visual\.deepstack_merger_list\.1\.norm\.weight: shape"):
        _convert(hf, sd)
    sd = _state_dict(hf)
    sd["model.visual.blocks.3.norm1.weight"] = np.ones(32, np.float32)  # a 4th block
    with pytest.raises(mapping.MappingError, match=r"model\.visual\.blocks\.3\.norm1\.weight"):
        _convert(hf, sd)


def test_from_hf_reads_published_config():
    published = {"vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4304, "model_type": "qwen3_vl_moe", "num_heads": 16,
        "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2}}
    cfg = qv.VisionConfig.from_hf(published)
    assert cfg == qv.VisionConfig()
    assert (cfg.head_dim, cfg.patch_dim, cfg.grid_side) == (72, 1536, 48)


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "relu6"}, "hidden_act 'relu6' is not supported"),
    ({"out_hidden_size": None}, "lacks required field 'out_hidden_size'"),
    ({"deepstack_visual_indexes": [1, 3]}, r"distinct block indexes in \[0, 3\)"),
    ({"deepstack_visual_indexes": [1, 1]}, "distinct"),
    ({"patch_size": [4, 4]}, "patch_size must be an int"),
    ({"num_heads": 3}, "not a multiple of num_heads"),
    ({"hidden_size": 24, "num_heads": 4}, "multiple of 4"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
])
def test_from_hf_rejects_bad_configs(change, message):
    d = {**VISION, **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        qv.VisionConfig.from_hf(d)


def test_bad_inputs_are_rejected():
    ours = qv.Qwen3VLVision(qv.VisionConfig.from_hf(VISION), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        ours(np.zeros((15, PATCH_DIM), np.float32), ((1, 3, 5),))
    with pytest.raises(ValueError, match=r"needs \(16, 96\)"):
        ours(np.zeros((12, PATCH_DIM), np.float32), ((1, 4, 4),))
    with pytest.raises(ValueError, match=r"\[images, 3\]"):
        ours(np.zeros((16, PATCH_DIM), np.float32), ((4, 4),))
    with pytest.raises(ValueError, match="positive"):
        ours(np.zeros((0, PATCH_DIM), np.float32), ((0, 4, 4),))
