"""Qwen3-VL calibration batches from a checkpoint directory's tokenizer (chat template) and
image processor, through the sharegpt source, fed to a tiny Qwen3-VL-MoE."""

import json

import numpy as np
import pytest
import qwen3vl_tiny as tiny
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

from mode_jax import preprocess_qwen3vl as pq
from mode_jax.calib import passes, sources

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tokenizer whose <|image_pad|> is the tiny model's image id, and image settings for
    its vision tower (patch 2, temporal patch 2, merge 2)."""
    words = ["<pad>", "<unk>", "user", "assistant", "what", "colour", "is", "the", "shape",
             "red", "circle"]
    words += [f"w{i}" for i in range(tiny.IMAGE - len(words) - len(SPECIAL))] + SPECIAL
    words += ["<|image_pad|>"]
    assert words.index("<|image_pad|>") == tiny.IMAGE
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # special tokens split on their own
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=SPECIAL + ["<|image_pad|>"])
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("ckpt")
    tok.save_pretrained(path)
    Qwen2VLImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16,
                          max_pixels=12 * 12).save_pretrained(path)
    images = path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(8, 12), (12, 8), (8, 8)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape"},
            {"from": "gpt", "value": "red circle"}]})
    (path / "calib.json").write_text(json.dumps(records))
    return path


def test_sharegpt_batches_in_qwen3vl_format(checkpoint_dir):
    cfg = type("D", (), dict(source="sharegpt", calib_json=str(checkpoint_dir / "calib.json"),
                             image_dir=str(checkpoint_dir / "images"), batch_size=2,
                             max_length=0, testbed_stats_tasks="vision"))
    calib = sources.load(cfg, str(checkpoint_dir), tiny.CONFIG, 3, 0, "stats")
    assert calib.image_token_id == tiny.IMAGE and len(calib.batches) == 2
    processor = pq.load_image_processor(checkpoint_dir)
    total = 0
    for batch in calib.batches:
        grids = batch["image_grid_thw"]
        per_row = (batch["input_ids"] == tiny.IMAGE).sum(1)
        np.testing.assert_array_equal(per_row, grids.prod(1) // 4)  # one image per row
        np.testing.assert_array_equal(batch["mm_token_type_ids"], batch["input_ids"] == tiny.IMAGE)
        assert batch["input_ids"].shape[1] % 32 == 0  # bucketed lengths
        assert batch["pixel_values"].shape == (grids.prod(1).sum(), 24)
        total += len(grids)
    assert total == 3
    # the pixels are the image processor's own for those images, in the shuffled order
    order = [int(i) for i in np.random.default_rng(0).permutation(3)]
    ref = processor(images=[Image.open(checkpoint_dir / "images" / f"{i}.png").convert("RGB")
                            for i in order[:2]], return_tensors="np")
    np.testing.assert_allclose(calib.batches[0]["pixel_values"], ref["pixel_values"], rtol=1e-6)
    # the tiny model takes them: statistics run on real prompts
    model = tiny.model()
    stats = passes.frequency_pass(model, calib.batches, passes.StatsConfig(
        calib.image_token_id, calib.special_token_ids))
    assert int(stats["num_tokens_image"]) == int(sum((b["input_ids"] == tiny.IMAGE).sum()
                                                     for b in calib.batches))


def test_missing_image_processor_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        pq.load_image_processor(tmp_path)
    with pytest.raises(ValueError, match="1 image placeholder.* 2 image"):
        pq.expand_image_pads("a <|image_pad|> b", np.ones((2, 3), int), 2)
