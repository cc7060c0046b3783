"""Prompt lengths measured from image sizes alone (validate's `data.max_length` check) equal the
lengths of the batches the stages build from the decoded images, for every model family; and
`data.max_image_tokens` caps each image's tokens there."""

import internvl_tiny
import numpy as np
import pytest
import qwen3vl_tiny
from PIL import Image

from mode_jax import preprocess, processors
from mode_jax.calib import data, sources
from mode_jax.convert import families, safetensors_io

TESTBED = "checkpoints/testbed"
# (width, height): tiny, square, landscape, portrait, very wide, a size that gets shrunk
SIZES = [(28, 28), (64, 64), (300, 200), (120, 410), (1000, 90), (1280, 960)]
TEXTS = ["what colour is the circle ?", "", "red circle A B C " * 7]


def _family(name, tmp_path):
    """(checkpoint directory, model config) of one family with its tokenizer and processor."""
    if name == "kimi_vl":
        raw = safetensors_io.read_config(TESTBED)
        return TESTBED, families.for_model_type(raw["model_type"], TESTBED).config_from_json(
            raw, TESTBED)
    if name == "qwen3_vl_moe":
        return str(qwen3vl_tiny.processor_dir(tmp_path)), qwen3vl_tiny.CONFIG
    return str(internvl_tiny.processor_dir(tmp_path)), internvl_tiny.CONFIG


def _records(names):
    """One-image records over every text and image, then records of two and three images: at
    their placeholders, all first, and only in a later human turn."""
    out = [{"image": name, "conversations": [
        {"from": "human", "value": f"<image>\n{text}"},
        {"from": "gpt", "value": "red circle " * (i + j)}]}
        for i, name in enumerate(names) for j, text in enumerate(TEXTS)]
    out.append({"image": names[2:4], "conversations": [
        {"from": "human", "value": "compare <image> with <image> please"},
        {"from": "gpt", "value": "A"}]})
    out.append({"image": names[3:], "conversations": [
        {"from": "human", "value": "which is red ?"}, {"from": "gpt", "value": "B"}]})
    out.append({"image": names[:2], "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "C"},
        {"from": "human", "value": "<image> <image> what colour is the circle ?"}]})
    return out


@pytest.mark.parametrize("family", ["kimi_vl", "qwen3_vl_moe", "internvl"])
def test_lengths_equal_the_built_batches(family, tmp_path):
    path, config = _family(family, tmp_path)
    build = sources._builder(path, config, preprocess.load_tokenizer(path))
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate(SIZES):
        names.append(f"probe{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(tmp_path / names[-1])
    size_of = dict(zip(names, SIZES, strict=True))
    samples, sizes = [], []
    for record in _records(names):
        for human_only in (True, False):
            samples.append(data.record_sample(record, str(tmp_path), human_only))
            sizes.append([size_of[p.rsplit("/", 1)[1]] for p in samples[-1].images])
    assert {len(s.images) for s in samples} == {0, 1, 2, 3}
    built = [build([s.messages], [s.images]) for s in samples]
    got = data.prompt_lengths(samples, sizes, build)
    np.testing.assert_array_equal(got, [b["input_ids"].shape[1] for b in built])
    assert len(set(got)) > len(SIZES)  # the sizes and the texts both change the length
    # the grid each size gets (what calibration batches are grouped by) is the built one's
    grid = data.image_grids(build)
    for s, size, b in zip(samples, sizes, built, strict=True):
        assert [grid(tuple(wh)) for wh in size] == [processors.image_grid(b, k)
                                                     for k in range(len(s.images))]
    assert len({grid(wh) for wh in SIZES}) > 1  # the sizes give more than one grid


def test_mismatched_input_is_refused():
    with pytest.raises(ValueError, match="2 samples but 1 image size lists"):
        data.prompt_lengths([data.Sample((), ("a",))] * 2, [[(8, 8)]], build=None)
    with pytest.raises(ValueError, match="a sample has 0 images but 1 sizes"):
        data.prompt_lengths([data.Sample((), ())], [[(8, 8)]], build=None)


# per family: a cap, the image tokens of a small image (which the cap leaves alone) and the
# fewest tokens a large image may get under the cap (the resolution is lowered, not discarded)
CAPS = {"kimi_vl": (64, (28, 28), 40), "qwen3_vl_moe": (4, (8, 8), 2), "internvl": (8, (8, 8), 4)}


@pytest.mark.parametrize("family", ["kimi_vl", "qwen3_vl_moe", "internvl"])
def test_max_image_tokens_caps_every_image(family, tmp_path):
    path, config = _family(family, tmp_path)
    cap, small, least = CAPS[family]
    tokenizer = preprocess.load_tokenizer(path)
    image_id = int(families.image_token_id(config))
    sample = data.record_sample({"image": "x.png", "conversations": [
        {"from": "human", "value": "<image> what colour is the circle ?"}]}, str(tmp_path))

    def image_tokens(size, max_image_tokens):
        build = sources._builder(path, config, tokenizer, max_image_tokens)
        ids = build([sample.messages], [(Image.new("RGB", size, (200, 30, 30)),)])["input_ids"]
        return int((ids == image_id).sum())

    for size in SIZES[2:]:
        if family == "qwen3_vl_moe" and max(size) > 10 * min(size):
            continue  # its resize keeps one token row: an image this elongated exceeds a cap of 4
        full, capped = image_tokens(size, 0), image_tokens(size, cap)
        assert full > cap and least <= capped <= cap, (size, full, capped)
    assert image_tokens(small, cap) == image_tokens(small, 0) <= cap
    if family == "internvl":  # a cap below one tile cannot be met
        with pytest.raises(ValueError, match=r"max_image_tokens=3 is below one image tile \(4"):
            sources._builder(path, config, tokenizer, 3)


def test_a_cap_survives_saved_max_pixels_and_never_raises_a_budget(tmp_path):
    """Qwen2-VL-style configs save max_pixels, which transformers prefers to `size`; the cap must
    still apply. A Kimi-VL cap above the checkpoint's own budget changes nothing."""
    import json

    path, config = _family("qwen3_vl_moe", tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    saved.update(max_pixels=144, min_pixels=16)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert processors.image_processor(config, path, 4).size["longest_edge"] == 64
    assert processors.image_processor(config, path).size["longest_edge"] == 144
    own = preprocess.ImageConfig.from_checkpoint(TESTBED)
    assert processors.kimi_image_config(TESTBED, 10 ** 6) == own
    assert processors.kimi_image_config(TESTBED, 16).max_patches == 64


def test_a_size_the_processor_refuses_names_the_record():
    def build(conversations, images):
        if images[0] and images[0][0].size[0] > 500:
            raise ValueError("aspect ratio too large")
        return {"input_ids": np.zeros((1, 10), np.int32)}

    samples = [data.Sample((), ("a",)), data.Sample((), ("b",))]
    with pytest.raises(ValueError, match=r"record 7 \(id 'x'\), an image of 900x4 px: aspect"):
        data.prompt_lengths(samples, [[(20, 20)], [(900, 4)]], build,
                            names=["record 6 (id 'w')", "record 7 (id 'x')"])
