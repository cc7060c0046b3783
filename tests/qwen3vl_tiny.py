"""A tiny random Qwen3-VL-MoE (images, M-RoPE, DeepStack, 3 MoE layers) and image batches for
the tests of the passes and the quantizer on that family."""

import json
import math

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

from mode_jax.models import qwen3_vl_moe as qvl

IMAGE, START, END = 60, 61, 62
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


def model():
    """Random weights with std 1/sqrt(fan_in) (routing and quantization both matter)."""
    return random_weights(nnx.eval_shape(lambda: qvl.Qwen3VLMoe(CONFIG, rngs=nnx.Rngs(0))))


def random_weights(abstract, near_one=("scale",), tables=("embedding", "pos_embed")):
    """`abstract` (an `nnx.eval_shape` model) filled from a seeded numpy generator: norm scales
    and the names in `near_one` around 1, biases around 0 (both +- 0.1), lookup `tables` with
    std 1, every other weight with std 1/sqrt(fan_in)."""
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if name in near_one or name == "bias":
            return (1.0 if name in near_one else 0.0) + 0.1 * rng.normal(
                size=leaf.shape).astype(leaf.dtype)
        fan_in = 1 if name in tables else leaf.shape[-2]
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def batch(seed):
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


SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def processor_dir(path):
    """Write into `path` a tokenizer whose <|image_pad|> is the tiny model's image id (with a
    chat template), image-processor settings for its tower (patch 2, temporal patch 2, merge
    2), three PNG images under images/ and a ShareGPT file calib.json; returns `path`."""
    words = ["<pad>", "<unk>", "user", "assistant", "what", "colour", "is", "the", "shape",
             "red", "circle", "A", "B", "C"]
    words += [f"w{i}" for i in range(IMAGE - len(words) - len(SPECIAL))] + SPECIAL
    words += ["<|image_pad|>"]
    assert words.index("<|image_pad|>") == IMAGE
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # special tokens split on their own
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=SPECIAL + ["<|image_pad|>"])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    Qwen2VLImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16,
                          max_pixels=12 * 12).save_pretrained(path)
    return write_images(path, [(8, 12), (12, 8), (8, 8)])


def write_images(path, sizes):
    """Random PNG images of `sizes` (h, w) under `path`/images and a ShareGPT file calib.json
    asking about each; returns `path`."""
    images = path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape"},
            {"from": "gpt", "value": "red circle"}]})
    (path / "calib.json").write_text(json.dumps(records))
    return path
