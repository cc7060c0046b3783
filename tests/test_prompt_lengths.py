"""Prompt lengths measured from image sizes alone (validate's `data.max_length` check) equal the
lengths of the batches the stages build from the decoded images, for every model family."""

import internvl_tiny
import numpy as np
import pytest
import qwen3vl_tiny
from PIL import Image

from mode_jax import preprocess
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


@pytest.mark.parametrize("family", ["kimi_vl", "qwen3_vl_moe", "internvl"])
def test_lengths_equal_the_built_batches(family, tmp_path):
    path, config = _family(family, tmp_path)
    build = sources._builder(path, config, preprocess.load_tokenizer(path))
    rng = np.random.default_rng(0)
    samples, sizes = [], []
    for i, size in enumerate(SIZES):
        image = tmp_path / f"probe{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(image)
        for j, text in enumerate(TEXTS):
            record = {"image": image.name, "conversations": [
                {"from": "human", "value": f"<image>\n{text}"},
                {"from": "gpt", "value": "red circle " * (i + j)}]}
            for human_only in (True, False):
                samples.append(data.record_sample(record, str(tmp_path), human_only))
                sizes.append(size)
    want = [build([s.messages], [s.images])["input_ids"].shape[1] for s in samples]
    got = data.prompt_lengths(samples, sizes, build)
    np.testing.assert_array_equal(got, want)
    assert len(set(want)) > len(SIZES)  # the sizes and the texts both change the length


def test_mismatched_input_is_refused():
    with pytest.raises(ValueError, match="2 samples but 1 image sizes"):
        data.prompt_lengths([data.Sample((), ("a",))] * 2, [(8, 8)], build=None)
    with pytest.raises(ValueError, match="one-image samples; one has 0"):
        data.prompt_lengths([data.Sample((), ())], [(8, 8)], build=None)
