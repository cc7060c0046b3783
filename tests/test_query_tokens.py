"""MODE's text queries are the question's words, for every family's chat template.

Qwen3-VL and InternVL use ChatML templates whose '\\n' after a role word, an image or
`<|im_end|>` is an ordinary token of their byte-level BPE tokenizers; Kimi-VL writes the word
'image' in each image block. None of these may query the image tokens. The tokenizer here is a
small byte-level BPE with Qwen2's pre-tokenizer split, as the real checkpoints have (the tiny
test fixtures' word-level tokenizers have no newline token and cannot show this)."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

from mode_jax import preprocess
from mode_jax import preprocess_internvl as pi
from mode_jax import preprocess_qwen3vl as pq
from mode_jax.calib import data, frequency
from mode_jax.testbed import tokenizer as testbed_tokenizer

QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<img>", "</img>", "<IMG_CONTEXT>"]
# Qwen3-VL's and InternVL's published templates, reduced to user turns of images and text
QWEN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content in message.content %}{%- if content.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")
QUESTION = "which photo is brighter ?"


@pytest.fixture(scope="module")
def bpe():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = [f"user\nassistant\nsystem\n{QUESTION} what colour\n"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIAL[1:])


def _queries(tokenizer, batch, image_id):
    special = jnp.asarray(data.special_token_ids(tokenizer, image_id))
    q = np.asarray(frequency.query_mask(jnp.asarray(batch["input_ids"]),
                                        jnp.asarray(batch["attention_mask"]), image_id, special))
    return [int(i) for i, m in zip(batch["input_ids"][0], q[0], strict=True) if m]


def _messages(images: int):
    return [{"role": "user", "content": [{"type": "image"}] * images + [
        {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "internvl"])
def test_chatml_template_tokens_are_not_queries(bpe, family, images):
    image = Image.fromarray(np.full((8, 8, 3), 128, np.uint8))
    if family == "qwen3_vl_moe":
        bpe.chat_template = QWEN_TEMPLATE
        processor = Qwen2VLImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2,
                                          min_pixels=16, max_pixels=144)
        batch = pq.build_batch([_messages(images)], [[image] * images], bpe, processor)
        image_id = bpe.convert_tokens_to_ids("<|image_pad|>")
    else:
        bpe.chat_template = INTERNVL_TEMPLATE
        text = preprocess.prompt_text(_messages(images), bpe)
        text = pi.expand_image_tokens(text, [1] * images, 4, bpe)
        ids = np.asarray([bpe(text, add_special_tokens=False)["input_ids"]])
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        image_id = bpe.convert_tokens_to_ids("<IMG_CONTEXT>")
    newline = bpe("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and newline[0] in batch["input_ids"][0]  # the template wrote some
    assert _queries(bpe, batch, image_id) == bpe(QUESTION, add_special_tokens=False)["input_ids"]
    # without the template's own tokens the newlines would have been queries too
    plain = jnp.asarray(data.special_token_ids(bpe))
    q = frequency.query_mask(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                             image_id, plain)
    assert newline[0] in np.asarray(batch["input_ids"])[np.asarray(q)]


def test_kimi_second_image_block_is_not_a_query():
    tok = testbed_tokenizer.build_tokenizer(QUESTION.split())
    image = np.zeros((56, 56, 3), np.uint8)
    batch = preprocess.build_batch([_messages(2)], [[image, image]], tok)
    image_id = testbed_tokenizer.image_token_id(tok)
    assert _queries(tok, batch, image_id) == tok(QUESTION, add_special_tokens=False)["input_ids"]


def test_a_template_that_drops_images_is_named(bpe):
    bpe.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="wrote 0 image tokens"):
        data.template_token_ids(bpe, bpe.convert_tokens_to_ids("<|image_pad|>"))
