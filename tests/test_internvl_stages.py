"""InternVL through the stages: calibration batches from a checkpoint directory's chat template
and image processor (tiles), the frequency pass on them, GPTQ with a mixed bit map, and the
packed artifact's round trip. (main.py end to end: test_pipeline_families.py.)"""

import internvl_tiny as tiny
import numpy as np
import pytest
from PIL import Image

import mode_jax
from configs import common
from mode_jax import preprocess, processors
from mode_jax import preprocess_internvl as pi
from mode_jax.calib import passes, sources
from mode_jax.quant import apply, serialize
from mode_jax.quant.qlinear import QLinear

BIT_MAP = np.array([[2, 3, 4, 8], [4, 2, 3, 4]], np.int32)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tiny.processor_dir(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def calib(checkpoint_dir):
    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=str(checkpoint_dir / "calib.json"),
                    image_dir=str(checkpoint_dir / "images"), batch_size=2,
                    max_length=0))
    return sources.load(cfg, str(checkpoint_dir), tiny.CONFIG, 3, 0, "stats")


def test_sharegpt_batches_carry_tiles_and_their_tokens(checkpoint_dir, calib):
    assert calib.image_token_id == tiny.IMAGE and len(calib.batches) == 2
    processor = processors.image_processor(tiny.CONFIG, checkpoint_dir)
    order = [int(i) for i in np.random.default_rng(0).permutation(3)]
    images = [Image.open(checkpoint_dir / "images" / f"{i}.png").convert("RGB") for i in order]
    ref = processor(images=images, crop_to_patches=True, return_tensors="np")
    # 8x16 and 16x8 images: 2 tiles + a thumbnail; 8x8: one tile (4 tokens per tile)
    np.testing.assert_array_equal(ref["num_patches"], [{0: 3, 1: 3, 2: 1}[i] for i in order])
    tiles = np.concatenate([b["image_num_patches"] for b in calib.batches])
    np.testing.assert_array_equal(tiles, ref["num_patches"])
    pixels = np.concatenate([b["pixel_values"] for b in calib.batches])
    np.testing.assert_allclose(pixels, ref["pixel_values"], rtol=1e-6)
    for batch in calib.batches:
        per_row = (batch["input_ids"] == tiny.IMAGE).sum(1)
        np.testing.assert_array_equal(per_row, 4 * batch["image_num_patches"])
        for row in batch["input_ids"]:  # <img> run </img> around each image's tokens
            at = np.flatnonzero(row == tiny.IMAGE)
            assert row[at[0] - 1] == tiny.START and row[at[-1] + 1] == tiny.END
            assert np.all(np.diff(at) == 1)
    model = mode_jax.load(str(checkpoint_dir))
    stats = passes.frequency_pass(model, calib.batches, passes.StatsConfig(
        calib.image_token_id, calib.special_token_ids))
    assert int(stats["num_tokens_image"]) == int(tiles.sum()) * 4


def test_placeholder_count_must_match_the_images(checkpoint_dir):
    tokenizer = preprocess.load_tokenizer(checkpoint_dir)
    with pytest.raises(ValueError, match="1 image placeholder.* 2 image"):
        pi.expand_image_tokens("a <IMG_CONTEXT> b", [1, 2], 4, tokenizer)
    assert pi.expand_image_tokens("a <IMG_CONTEXT> b", [2], 1, tokenizer) == (
        "a <img><IMG_CONTEXT><IMG_CONTEXT></img> b")


def test_gptq_pack_and_round_trip(calib, tmp_path):
    model = tiny.model()
    config = apply.QuantConfig(method="gptq", group_size=32, attention_bits=4)
    qmodel, report = apply.quantize_model(model, calib.batches, BIT_MAP, config)
    attn = qmodel.language_model.layers[1].self_attn
    assert all(isinstance(getattr(attn, n), QLinear) for n in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj"))
    np.testing.assert_array_equal(serialize.bit_map(qmodel), BIT_MAP)
    assert not report["rtn_fallback"]
    batch = calib.batches[0]
    packed = np.asarray(qmodel(batch).logits)
    fake = np.asarray(apply.fake_quantized(qmodel)(batch).logits)
    np.testing.assert_allclose(packed, fake, rtol=1e-4, atol=1e-4 * np.abs(fake).max())
    fp = np.asarray(model(batch).logits)
    assert 1e-3 < np.abs(packed - fp).max() / np.abs(fp).max() < 0.5
    serialize.save(str(tmp_path / "q"), qmodel, {"note": "tiny"})
    restored, meta = serialize.restore(str(tmp_path / "q"))
    assert meta["family"] == "internvl"
    np.testing.assert_array_equal(np.asarray(restored(batch).logits), packed)
