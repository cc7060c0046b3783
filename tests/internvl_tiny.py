"""A tiny random InternVL (InternViT 8 x 8 tiles of 4 tokens, Qwen3-MoE with 2 MoE layers) and a
checkpoint directory with a tokenizer, image processor, images and calibration file, for the
tests of preprocessing and the stages on that family."""

import qwen3vl_tiny
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GotOcr2ImageProcessorPil, PreTrainedTokenizerFast

from mode_jax.models import internvl as ivl

IMAGE, START, END = 60, 61, 62
RAW = {
    "model_type": "internvl", "image_token_id": IMAGE, "tie_word_embeddings": False,
    "text_config": dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32,
                        intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                        num_experts_per_tok=2, rope_theta=10000.0),
    "vision_config": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24, image_size=8, patch_size=2),
}
CONFIG = ivl.InternVLConfig.from_dict(RAW)


def model():
    """Random weights with std 1/sqrt(fan_in) (routing and quantization both matter)."""
    return qwen3vl_tiny.random_weights(
        nnx.eval_shape(lambda: ivl.InternVL(CONFIG, rngs=nnx.Rngs(0))),
        near_one=("scale", "lambda_1", "lambda_2"), tables=("embedding", "pos_embed", "cls_token"))


def randomize(hf):
    """Move a transformers InternVL's norms, layer scales, CLS token and position table off
    their initial values (torch's global generator), so that no term is invisible."""
    import torch

    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(k in name for k in ("norm", "lambda", "cls_token", "position_embeddings")):
                p.add_(0.3 * torch.randn_like(p))
    return hf


SPECIAL = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
IMAGE_SIZES = [(8, 16), (16, 8), (8, 8)]  # 2 tiles + thumbnail, 2 + thumbnail, 1


def save_checkpoint(path):
    """A transformers `InternVLForConditionalGeneration` of `RAW`'s sizes (random weights,
    norms and layer scales moved off their init) saved with `save_pretrained`."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    cfg = InternVLConfig(**{k: v for k, v in RAW.items() if k != "model_type"})
    hf = randomize(InternVLForConditionalGeneration(cfg).eval())
    hf.save_pretrained(path)
    return hf


def processor_dir(path):
    """Write into `path` the checkpoint (`save_checkpoint`), a word-level tokenizer whose
    <IMG_CONTEXT> is the image id (with the InternVL special tokens and a chat template),
    GotOcr2 image-processor settings for 8 x 8 tiles, three PNG images under images/ and a
    ShareGPT file calib.json; returns `path`."""
    save_checkpoint(path)
    words = ["<pad>", "<unk>", "user", "assistant", "what", "colour", "is", "the", "shape",
             "red", "circle", "A", "B", "C"]
    words += [f"w{i}" for i in range(IMAGE - len(words) - len(SPECIAL))] + SPECIAL
    words += ["<IMG_CONTEXT>", "<img>", "</img>"]
    assert words.index("<IMG_CONTEXT>") == IMAGE and words.index("</img>") == END
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL + ["<IMG_CONTEXT>", "<img>", "</img>"],
        extra_special_tokens={"context_image_token": "<IMG_CONTEXT>",
                              "start_image_token": "<img>", "end_image_token": "</img>"})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    GotOcr2ImageProcessorPil(size={"height": 8, "width": 8}, max_patches=4).save_pretrained(path)
    return qwen3vl_tiny.write_images(path, IMAGE_SIZES)
