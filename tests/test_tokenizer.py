"""Testbed tokenizer: standard files, offline loading, chat template, encoding and image tokens."""

import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mode_jax import preprocess
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tk


@pytest.fixture(scope="module")
def samples():
    config = tasks.TaskConfig()
    return tasks.generate("train", 60, seed=1, config=config) + tasks.generate(
        "heldout", 60, seed=1, config=config)


@pytest.fixture(scope="module")
def tok():
    return tk.build_tokenizer(tasks.vocabulary())


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return tk.save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer"))


def _grid(sample):
    """Patch grid from the project's MoonViT preprocessing (an independent code path)."""
    if sample.image is None:
        return None
    _, grid = preprocess.preprocess_image(sample.image)
    return np.asarray([grid])


def test_saved_files_are_standard(saved):
    assert {p.name for p in saved.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == tk.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "[PAD]"
    special = json.loads((saved / "special_tokens_map.json").read_text())
    assert "<|media_pad|>" in special["additional_special_tokens"]


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_loads_offline_and_encodes_like_the_built_one(loader, tok, saved, samples, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = loader.from_pretrained(str(saved), local_files_only=True)
    assert len(loaded) == len(tok)
    assert loaded.pad_token_id == 0 and loaded.eos_token == "<|im_end|>"
    for s in samples[:20]:
        a = tk.encode_example(tok, s.prompt, s.answer, _grid(s))
        b = tk.encode_example(loaded, s.prompt, s.answer, _grid(s))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert tk.load_tokenizer(saved).get_vocab() == tok.get_vocab()


def test_chat_template_matches_format_chat(tok, saved, samples):
    loaded = tk.load_tokenizer(saved)
    for s in samples[:20]:
        for t in (tok, loaded):
            rendered = t.apply_chat_template(s.messages(), tokenize=False,
                                             add_generation_prompt=True)
            assert rendered == s.prompt
    vision = next(s for s in samples if s.image is not None)
    assert vision.prompt.startswith("<|im_user|>user<|im_middle|><|media_start|>image"
                                    "<|media_content|><|media_pad|><|media_end|>")
    assert vision.prompt.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    # Same as the project's hand-written Kimi-VL renderer once its default system turn is given.
    system = {"role": "system", "content": "you are the testbed"}
    messages = [system, *vision.messages()]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        preprocess.render_chat(messages)


def test_round_trip_and_no_unknown_words(tok, samples):
    for s in samples:
        ids, mask = tk.encode_example(tok, s.prompt, s.answer, _grid(s))
        assert tok.unk_token_id not in ids.tolist()
        # ids -> text -> ids is the identity (special tokens included)
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids.tolist()
        # the question's tokens are exactly its words, in order
        q_ids = tok(s.question, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(q_ids) == re.findall(r"\w+|[^\w\s]+", s.question)
        # the answer decodes back (the closing <|im_end|> is a special token)
        assert tok.decode(ids[mask].tolist(), skip_special_tokens=True) == s.answer


def test_encode_example_mask_and_image_tokens(tok, samples):
    s = next(s for s in samples if s.image is not None)
    grid = _grid(s)
    ids, mask = tk.encode_example(tok, s.prompt, s.answer, grid)
    prompt_ids = tk.encode_prompt(tok, s.prompt, grid)
    np.testing.assert_array_equal(ids[: len(prompt_ids)], prompt_ids)
    assert mask.sum() == len(ids) - len(prompt_ids) and not mask[: len(prompt_ids)].any()
    assert tok.convert_ids_to_tokens(ids[mask].tolist())[-1] == "<|im_end|>"
    h, w = grid[0]
    assert (ids == tk.image_token_id(tok)).sum() == h * w // 4
    ids2, mask2 = tk.encode_example(tok, s.prompt, s.answer, grid, include_end=False)
    np.testing.assert_array_equal(ids2, ids[:-1])
    assert mask2.sum() == mask.sum() - 1


def test_image_tokens_outnumber_text_four_to_one(tok, samples):
    vision = [s for s in samples if s.image is not None]
    assert {s.task for s in vision} == set(tasks.VISION_TASKS)
    for s in vision:
        ids = tk.encode_prompt(tok, s.prompt, _grid(s))
        n_image = int((ids == tk.image_token_id(tok)).sum())
        assert n_image >= 4 * (len(ids) - n_image), (s.question, n_image, len(ids))


def test_special_ids_and_skip_special(tok):
    assert tok.convert_ids_to_tokens(list(range(len(tk.SPECIAL_TOKENS)))) == list(
        tk.SPECIAL_TOKENS)
    ids = tk.encode_prompt(tok, tk.format_chat("what color is the circle ?", True), [[4, 6]])
    assert (ids == tk.image_token_id(tok)).sum() == 6
    assert tok.decode(ids.tolist(), skip_special_tokens=True) == \
        "user image what color is the circle ? assistant"


def test_bad_inputs_raise_clear_errors(tok):
    with pytest.raises(ValueError, match="single pre-tokenized word"):
        tk.build_tokenizer(["two words"])
    with pytest.raises(ValueError, match="2x2 patch merge"):
        tk.encode_prompt(tok, tk.format_chat("what ?", True), [[3, 4]])
    with pytest.raises(ValueError, match="1 image placeholder"):
        tk.encode_prompt(tok, tk.format_chat("what ?", True), None)
    with pytest.raises(ValueError, match="0 image placeholder"):
        tk.encode_prompt(tok, tk.format_chat("what ?", False), [[4, 4]])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tk.load_tokenizer("/nonexistent/dir")
