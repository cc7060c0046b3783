"""Properties of the numpy/PIL MoonViT preprocessing and of prompt building."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import mode_jax
from mode_jax import preprocess as pp
from mode_jax.models.moonvit import merge_patches

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kimivl-tiny"
SPECIALS = ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
            "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]
# The same chat format as pp.render_chat, written as a jinja template the way checkpoints ship it.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_system|>system<|im_middle|>"
    "You are a helpful assistant<|im_end|>{% endif %}"
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|media_start|>image<|media_content|><|media_pad|>"
    "<|media_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_patchify_round_trip_and_raster_order():
    x = np.random.default_rng(0).normal(size=(3, 42, 70)).astype(np.float32)
    patches, (h, w) = pp.patchify(x, 14)
    assert (h, w) == (3, 5) and patches.shape == (15, 3, 14, 14)
    np.testing.assert_array_equal(pp.unpatchify(patches, (h, w)), x)
    for k in (0, 4, 7, 14):
        r, c = divmod(k, w)
        np.testing.assert_array_equal(patches[k], x[:, 14 * r:14 * r + 14, 14 * c:14 * c + 14])


def test_merge_groups_are_2x2_neighbourhoods_of_the_patch_grid():
    _, (h, w) = pp.patchify(np.zeros((3, 56, 84), np.float32), 14)
    index = np.arange(h * w, dtype=np.float32)[:, None]
    groups = np.asarray(merge_patches(index, h, w, (2, 2)))[..., 0]
    for g, (r, c) in enumerate((r, c) for r in range(h // 2) for c in range(w // 2)):
        expected = [(2 * r) * w + 2 * c, (2 * r) * w + 2 * c + 1,
                    (2 * r + 1) * w + 2 * c, (2 * r + 1) * w + 2 * c + 1]
        np.testing.assert_array_equal(groups[g], expected)


def test_small_image_is_padded_black_not_resized():
    img = _image(50, 30)
    patches, grid = pp.preprocess_image(img)
    assert grid == (4, 4)  # 30 -> 56 rows, 50 -> 56 columns of pixels
    full = pp.unpatchify(patches, grid)
    expected = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(full[:, :30, :50], expected, atol=1e-6)
    np.testing.assert_array_equal(full[:, 30:, :], -1.0)
    np.testing.assert_array_equal(full[:, :, 50:], -1.0)


@pytest.mark.parametrize("align", ["pad", "resize", "crop"])
def test_grids_are_multiples_of_the_merge_kernel(align):
    cfg = pp.ImageConfig(align=align, max_patches=256)
    rng = np.random.default_rng(1)
    for w, h in rng.integers(30, 200, (12, 2)):
        patches, (gh, gw) = pp.preprocess_image(_image(int(w), int(h)), cfg)
        assert gh % 2 == 0 and gw % 2 == 0 and patches.shape == (gh * gw, 3, 14, 14)
        rnd = math.floor if align == "crop" else math.ceil
        if (w // 14) * (h // 14) <= cfg.max_patches:  # not shrunk: grid follows the size
            assert (gh, gw) == (2 * rnd(h / 28), 2 * rnd(w / 28))


def test_shrink_above_budget_follows_kimi_vl():
    """Above the budget the content is PIL-bicubic resized by sqrt(budget / patches)."""
    cfg = pp.ImageConfig(max_patches=64)
    img = _image(300, 170, seed=2)
    patches, grid = pp.preprocess_image(img, cfg)
    scale = math.sqrt(64 / ((300 // 14) * (170 // 14)))
    size = (int(300 * scale), int(170 * scale))
    expected = np.asarray(img.resize(size, Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    full = pp.unpatchify(patches, grid)
    np.testing.assert_allclose(full[:, :size[1], :size[0]], expected.transpose(2, 0, 1),
                               atol=1e-6)
    assert grid == (2 * math.ceil(size[1] / 28), 2 * math.ceil(size[0] / 28))


def test_strict_patch_budget():
    """Strict mode keeps every aligned grid within the budget."""
    rng = np.random.default_rng(3)
    for budget in (16, 64, 300):
        strict = pp.ImageConfig(max_patches=budget, strict_budget=True)
        for w, h in rng.integers(28, 900, (15, 2)):
            fitted = pp.fit_image(Image.new("RGB", (int(w), int(h))), strict)
            assert (fitted.width // 14) * (fitted.height // 14) <= budget, (w, h, budget)


def test_kimi_vl_budget_overshoot_is_bounded():
    """Kimi-VL's own rule (budget 4096) may overshoot after padding by at most ~23%."""
    rng = np.random.default_rng(4)
    sizes = [(int(w), int(h)) for w, h in rng.integers(300, 6000, (12, 2))] + [(5000, 120)]
    for w, h in sizes:
        fitted = pp.fit_image(Image.new("RGB", (w, h)))
        assert (fitted.width // 14) * (fitted.height // 14) <= 1.24 * 4096, (w, h)


def test_preprocess_images_concatenates_in_order():
    images = [_image(60, 40, 4), _image(30, 90, 5)]
    out = pp.preprocess_images(images)
    singles = [pp.preprocess_image(im) for im in images]
    np.testing.assert_array_equal(out["image_grid_hws"], [s[1] for s in singles])
    np.testing.assert_array_equal(out["pixel_values"], np.concatenate([s[0] for s in singles]))
    assert out["pixel_values"].dtype == np.float32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer whose `<|media_pad|>` is id 40, the fixture's placeholder id."""
    words = ["[UNK]", "[PAD]", "system", "user", "assistant", "image", "You", "are", "a",
             "helpful", "describe", "this", "and", "that", "compare", "the", "two", "."]
    words += [f"w{i}" for i in range(40 - len(words) - len(SPECIALS) + 1)]
    vocab = {t: i for i, t in enumerate(words + SPECIALS)}
    assert vocab["<|media_pad|>"] == 40
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
        "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    return d


CONVERSATIONS = [
    [{"role": "user", "content": "describe this ."}],
    [{"role": "system", "content": "You are a helpful assistant"},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                  {"type": "image"}, {"type": "text", "text": "compare"}]},
     {"role": "assistant", "content": "that"}, {"role": "user", "content": "the two ."}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_hand_written_template_matches_the_tokenizers_jinja(tokenizer_dir, conv):
    tok = pp.load_tokenizer(tokenizer_dir)
    assert tok.chat_template == TEMPLATE  # else prompt_text would fall back to render_chat
    jinja = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert jinja == pp.render_chat(conv)
    assert pp.prompt_text(conv, tok) == jinja


def test_no_tokenizer_files_means_none(tmp_path):
    assert pp.load_tokenizer(tmp_path) is None


def test_expand_image_tokens_counts():
    text = "a <|media_pad|> b <|media_pad|> c"
    out = pp.expand_image_tokens(text, [[4, 6], [2, 2]])
    assert out.count(pp.MEDIA_PAD) == 6 + 1
    assert out.startswith("a " + pp.MEDIA_PAD * 6 + " b " + pp.MEDIA_PAD + " c")
    with pytest.raises(ValueError, match="2 image placeholder.* but 1 image"):
        pp.expand_image_tokens(text, [[4, 6]])


def test_built_batch_runs_through_the_model_and_left_padding_is_invisible(tokenizer_dir):
    """Two conversations (one with two images of different sizes): the batch is accepted by the
    fixture model, and the shorter, left-padded row gets the logits it gets alone."""
    tok = pp.load_tokenizer(tokenizer_dir)
    images = [[_image(70, 40, 6), _image(30, 60, 7)], [_image(50, 50, 8)]]
    convs = [CONVERSATIONS[2], CONVERSATIONS[1]]
    batch = pp.build_batch(convs, images, tok)
    grids = batch["image_grid_hws"]
    assert grids.tolist() == [[4, 6], [6, 4], [4, 4]]
    assert [(row == 40).sum() for row in batch["input_ids"]] == [6 + 6, 4]
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()
    model = mode_jax.load(FIXTURE)
    logits = np.asarray(model(batch).logits)
    alone = pp.build_batch(convs[1:], images[1:], tok)
    ref = np.asarray(model(alone).logits)[0]
    np.testing.assert_allclose(logits[1, -ref.shape[0]:], ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


def test_image_files_are_read_and_unreadable_ones_named(tmp_path):
    """Calibration records give image paths; they cut exactly like the decoded image."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (70, 100, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    got, grid = pp.preprocess_image(tmp_path / "a.png")
    want, want_grid = pp.preprocess_image(arr)
    np.testing.assert_array_equal(got, want)
    assert grid == want_grid
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png could not be read"):
        pp.preprocess_image(str(tmp_path / "bad.png"))


def test_image_settings_come_from_the_checkpoint(tmp_path):
    assert pp.ImageConfig.from_checkpoint(tmp_path) == pp.ImageConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "in_token_limit": 256, "pad_input": False, "image_mean": [0, 0, 0]}))
    cfg = pp.ImageConfig.from_checkpoint(tmp_path)
    assert (cfg.max_patches, cfg.align, cfg.mean) == (256, "crop", (0.0, 0.0, 0.0))
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(ValueError, match="preprocessor_config.json could not be read"):
        pp.ImageConfig.from_checkpoint(tmp_path)
