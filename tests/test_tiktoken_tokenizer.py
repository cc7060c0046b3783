"""Kimi-VL's published tiktoken tokenizer loads without remote code and encodes exactly as
tiktoken does with the same ranks, pattern and special tokens (what the checkpoint's own
`TikTokenTokenizer` calls), and a Kimi-VL checkpoint holding it feeds the calibration stage."""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from flax import nnx
from PIL import Image
from transformers import PreTrainedTokenizerFast

import mode_jax
from configs import common
from mode_jax import preprocess
from mode_jax.calib import data, passes, sources
from mode_jax.convert import export
from mode_jax.convert import tiktoken_tokenizer as tt
from mode_jax.models.kimivl import KimiVL

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = FIXTURES / "kimi-tiktoken"
BASE = 512  # BPE tokens in the fixture's tiktoken.model
MEDIA_PAD_ID = BASE + 21  # Kimi-VL-A3B: 163584 + 21 = 163605


@pytest.fixture(scope="module")
def tok():
    return preprocess.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def reference():
    """tiktoken's encoder, built as the checkpoint's remote TikTokenTokenizer builds it."""
    ranks = tt.read_ranks(TOKENIZER / tt.VOCAB_FILE)
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    specials = tt.special_tokens(config, len(ranks))
    return tiktoken.Encoding(name="kimi-fixture", pat_str=tt.KIMI_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})


def _texts():
    fixed = [
        "What colour is the circle? <|media_pad|> The circle is red.",
        "中文English混合 北京市 Pascal 汉字abc",
        "I'M here, don't WE'LL it's They've",
        "12345678 x\n\n  \t y\r\n end  ",
        "naïve café ÉCOLE straße 😀 ∑→",
        "<|im_user|>user<|im_middle|>How many?<|im_end|><|im_assistant|>assistant<|im_middle|>",
        "<|reserved_token_600|>[PAD][BOS] <|media_start|>image<|media_content|>",
    ]
    rng = random.Random(0)
    pool = (list("abcdefgxyzABCDXYZ0123456789 .,;:!?'\"()[]<>|/\\-_=+*&%$#@~`") +
            list(" \n\r\t") + list("中文混合北京市汉字ÉéïçßøÆ😀∑→") +
            ["'s", "'LL", "<|media_pad|>", "[BOS]", "<|im_end|>", "  ", "\r\n", "circle "])
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    return fixed + fuzz


def test_ids_equal_tiktoken_and_decode_round_trips(tok, reference):
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.name_or_path == str(TOKENIZER)
    for text in _texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text, allowed_special="all"), repr(text)
        assert tok.decode(ids) == text, repr(text)


def test_kimi_pattern_splits_han_runs_and_contractions(tok):
    split = lambda s: [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(s)]
    # byte-level pieces: "Ġ" is a space, CJK characters show as their UTF-8 bytes
    assert len(split("中文English混合")) == 3
    assert split("Hello world I'M 12345") == ["Hello", "Ġworld", "ĠI'M", "Ġ", "123", "45"]


def test_special_tokens_take_the_remote_classes_ids(tok):
    assert len(tok) == BASE + 256
    ids = {name: tok.convert_tokens_to_ids(name) for name in
           ("[BOS]", "[EOS]", "<|im_end|>", "<|im_middle|>", "<|media_pad|>", "[UNK]", "[PAD]",
            "<|reserved_token_520|>")}
    assert ids == {"[BOS]": BASE, "[EOS]": BASE + 1, "<|im_end|>": BASE + 2,
                   "<|im_middle|>": BASE + 17, "<|media_pad|>": MEDIA_PAD_ID, "[UNK]": BASE + 254,
                   "[PAD]": BASE + 255, "<|reserved_token_520|>": 520}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BASE, BASE + 1, BASE + 255)
    # every special id counts as "not a text query" for MODE's statistics
    assert set(range(BASE, BASE + 256)) <= set(data.special_token_ids(tok).tolist())


def test_transformers_alone_refuses_it():
    """Why this module exists: the published config names remote code."""
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="custom code"):
        AutoTokenizer.from_pretrained(str(TOKENIZER), trust_remote_code=False)


def test_chat_template_from_config_or_jinja_file(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(TOKENIZER, d)
    messages = [{"role": "user", "content": "hi"}]
    assert tt.load(d).chat_template is None  # no template: the hand-written one is used
    assert preprocess.prompt_text(messages, tt.load(d)) == preprocess.render_chat(messages)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert preprocess.prompt_text(messages, tt.load(d)) == "hi!"
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "<{{ 1 }}>"}))
    assert preprocess.prompt_text(messages, tt.load(d)) == "<1>"


def _broken(tmp_path, ranks_text=None, **config_changes):
    d = tmp_path / "tok"
    shutil.copytree(TOKENIZER, d, dirs_exist_ok=True)
    if ranks_text is not None:
        (d / tt.VOCAB_FILE).write_text(ranks_text)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config | config_changes))
    return d


def test_bad_files_are_named(tmp_path):
    lines = (TOKENIZER / tt.VOCAB_FILE).read_text().splitlines()
    cases = [
        (dict(ranks_text="\n".join(lines[:3] + ["not-base64!! x"] + lines[4:])),
         r"tiktoken.model line 4: expected 'base64-token rank'"),
        (dict(ranks_text="\n".join(lines[:-1] + [lines[-1].split()[0] + " 7"])),
         "ranks must be 0..511, each once"),
        (dict(added_tokens_decoder={"100": {"content": "<|x|>"}}),
         r"names ids \[100\] inside the BPE ranks"),
        (dict(bos_token="<|nope|>"), r"names \['<\|nope\|>'\] as bos/eos/unk/pad"),
        (dict(added_tokens_decoder={"512": {"content": "angle"}}, bos_token=None, eos_token=None,
              unk_token=None, pad_token=None),
         "special token 'angle' is also a BPE token"),
    ]
    for changes, message in cases:
        d = _broken(tmp_path, **changes)
        with pytest.raises(ValueError, match=message):
            preprocess.load_tokenizer(d)
        shutil.rmtree(d)
    d = _broken(tmp_path)
    (d / tt.VOCAB_FILE).unlink()
    with pytest.raises(ValueError, match="tiktoken.model is missing"):
        preprocess.load_tokenizer(d)


def test_kimivl_checkpoint_with_it_feeds_calibration(tmp_path, tok, reference):
    """The published layout end to end: weights, tiktoken files and image settings in one
    directory, ShareGPT records (image files) in, batches whose ids are tiktoken's for the
    expanded prompt and whose grids follow the checkpoint's patch budget, statistics out."""
    base = mode_jax.load(FIXTURES / "kimivl-tiny").config
    config = dataclasses.replace(base, media_placeholder_token_id=MEDIA_PAD_ID,
                                 text=dataclasses.replace(base.text, vocab_size=BASE + 256))
    ckpt = tmp_path / "ckpt"
    small = preprocess.ImageConfig(max_patches=64)  # the checkpoint's image budget is used
    export.save(KimiVL(config, rngs=nnx.Rngs(0)), ckpt, image_config=small)
    for f in TOKENIZER.glob("*.json"):
        shutil.copy(f, ckpt)
    shutil.copy(TOKENIZER / tt.VOCAB_FILE, ckpt)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, size in enumerate([(168, 252), (28, 56), (252, 168)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is shape {i}?"},
            {"from": "gpt", "value": "red"}]})
    (tmp_path / "calib.json").write_text(json.dumps(records))
    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=str(tmp_path / "calib.json"),
                    image_dir=str(images), batch_size=3, max_length=0))
    model = mode_jax.load(ckpt)
    calib = sources.load(cfg, str(ckpt), model.config, 3, 0, "stats")
    assert calib.image_token_id == MEDIA_PAD_ID and MEDIA_PAD_ID in calib.special_token_ids
    (batch,) = calib.batches
    order = np.random.default_rng(0).permutation(3)  # sharegpt_samples' seeded draw
    shrunk = 0
    for row, i in enumerate(order):
        grid = batch["image_grid_hws"][row]
        path = images / f"{i}.png"
        assert tuple(grid) == preprocess.preprocess_image(path, small)[1]
        shrunk += tuple(grid) != preprocess.preprocess_image(path)[1]
        prompt = preprocess.expand_image_tokens(preprocess.render_chat([
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": f"What colour is shape {i}?"}]}
        ]), [grid])
        expected = reference.encode(prompt, allowed_special="all")
        real = batch["attention_mask"][row].astype(bool)
        assert batch["input_ids"][row][real].tolist() == expected
        assert (batch["input_ids"][row] == MEDIA_PAD_ID).sum() == grid.prod() // 4
    assert shrunk  # at least one image is over that budget
    stats = passes.frequency_pass(model, calib.batches, passes.StatsConfig(
        calib.image_token_id, calib.special_token_ids))
    assert int(stats["num_tokens_image"]) == int((batch["input_ids"] == MEDIA_PAD_ID).sum())


def test_a_tokenizer_that_does_not_fit_the_config_is_refused_up_front(tmp_path):
    """validate (before any stage) loads the tokenizer and checks its image placeholder."""
    from configs import tiny
    from mode_jax import stages
    from mode_jax.runner import UserError

    config = json.loads((FIXTURES / "kimivl-tiny" / "config.json").read_text())
    config["text_config"]["vocab_size"] = BASE + 256
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TOKENIZER, ckpt)
    c = tiny.get_config()
    c.model.path, c.data.source = str(ckpt), "testbed"
    for placeholder in (MEDIA_PAD_ID, 40):
        (ckpt / "config.json").write_text(json.dumps(config | {
            "media_placeholder_token_id": placeholder}))
        if placeholder == MEDIA_PAD_ID:
            stages.validate(c)
            continue
        with pytest.raises(UserError, match=r"encodes the image placeholder <\|media_pad\|> as "
                                            r"\[533\], but the model config's image token id "
                                            "is 40"):
            stages.validate(c)
    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer files"):
        stages.validate(c)
