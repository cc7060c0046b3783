"""The evaluation harness on a Qwen3-VL-MoE: a user JSONL benchmark encoded with the
checkpoint's chat template and image processor, scored by generation, log-likelihood and KL."""

import json

import numpy as np
import pytest
import qwen3vl_tiny as tiny

from mode_jax import preprocess, processors
from mode_jax.eval import harness


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tiny.processor_dir(tmp_path_factory.mktemp("ckpt"))
    lines = [
        {"question": "what colour is the shape", "image": "images/0.png", "answer": "red"},
        {"question": "what is the shape", "image": "images/1.png",
         "options": ["red", "circle"], "answer_index": 1},
        {"question": "what colour", "answer": "red circle"},
    ]
    bench = path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(x) for x in lines))
    tokenizer = preprocess.load_tokenizer(path)
    processor = processors.image_processor(tiny.CONFIG, path)
    build = processors.batch_builder(tiny.CONFIG, tokenizer, processor)
    return harness.load_jsonl(bench, tokenizer, build=build)


def test_examples_carry_qwen3vl_images(data):
    image, mc, text = data.examples
    assert image.grid[0] == 1 and len(image.grid) == 3
    assert int((image.prompt_ids == tiny.IMAGE).sum()) == np.prod(image.grid) // 4
    assert image.pixel_values.shape == (np.prod(image.grid), 24)
    assert text.grid is None and not (text.prompt_ids == tiny.IMAGE).any()
    assert len(mc.option_ids) == 2 and image.answer_ids[-1] == data.eos_token_id


def test_scores_against_itself(data):
    model = tiny.model()
    full = harness.evaluate(model, data, batch_size=2, max_new_tokens=3, routing=True)
    again = harness.evaluate(model, data, reference=full, batch_size=2, max_new_tokens=3)
    assert again["kl"]["all"] == pytest.approx(0.0, abs=1e-6)
    assert again["predictions"] == full["predictions"]
    assert np.isfinite(full["perplexity"]["all"])
    image_tokens = sum(int((e.prompt_ids == tiny.IMAGE).sum()) for e in data.examples)
    picks = full["routing"]["image"]  # [MoE layers, experts], top-2 per image token
    np.testing.assert_array_equal(picks.sum(-1), [2 * image_tokens] * 3)
