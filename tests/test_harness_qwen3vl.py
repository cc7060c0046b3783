"""The evaluation harness on a Qwen3-VL-MoE: a user JSONL benchmark encoded with the
checkpoint's chat template and image processor, scored by generation, log-likelihood and KL."""

import json

import numpy as np
import pytest
import qwen3vl_tiny as tiny

from mode_jax import preprocess, processors
from mode_jax.eval import harness
from mode_jax.quant import fake


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tiny.processor_dir(tmp_path_factory.mktemp("ckpt"))
    lines = [
        {"question": "what colour is the shape", "image": "images/0.png", "answer": "red"},
        {"question": "what is the shape", "image": "images/1.png",
         "options": ["red", "circle"], "answer_index": 1},
        {"question": "what colour", "answer": "red circle"},
        {"question": "is <image> the shape <image> red", "image": ["images/2.png", "images/0.png"],
         "answer": "A"},  # two images at their placeholders
        {"question": "which shape is red", "image": ["images/1.png", "images/2.png"],
         "answer": "B"},  # two images, both first
    ]
    bench = path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(x) for x in lines))
    tokenizer = preprocess.load_tokenizer(path)
    processor = processors.image_processor(tiny.CONFIG, path)
    build = processors.batch_builder(tiny.CONFIG, tokenizer, processor)
    return harness.load_jsonl(bench, tokenizer, build=build)


def test_examples_carry_qwen3vl_images(data):
    image, mc, text, *_ = data.examples
    assert image.grid[0] == 1 and len(image.grid) == 3
    assert int((image.prompt_ids == tiny.IMAGE).sum()) == np.prod(image.grid) // 4
    assert image.pixel_values.shape == (np.prod(image.grid), 24)
    assert text.grid is None and not (text.prompt_ids == tiny.IMAGE).any()
    assert len(mc.option_ids) == 2 and image.answer_ids[-1] == data.eos_token_id


def test_prompts_are_the_chat_template_over_the_question(data):
    """Each prompt is the checkpoint's template rendered over (image, question) with the image
    pad repeated once per merged image token; not the testbed's Kimi-VL-formatted prompt text,
    which this tokenizer cannot even read (an earlier version put it inside the template)."""
    assert [len(ex.grids) for ex in data.examples] == [1, 1, 0, 2, 2]
    tok = data.tokenizer
    for ex in data.examples:
        text = tok.apply_chat_template(ex.sample.messages(), tokenize=False,
                                       add_generation_prompt=True)
        for grid in ex.grids:  # each placeholder in turn, once per merged image token
            text = text.replace("<|image_pad|>", "<|image_pad|@ " * (np.prod(grid) // 4), 1)
        text = text.replace("<|image_pad|@", "<|image_pad|>")
        want = tok(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(ex.prompt_ids, want)
        for piece in ex.sample.question.split("<image>"):  # the text between placeholders
            words = tok(piece.strip(), add_special_tokens=False)["input_ids"]
            assert any(want[i:i + len(words)] == words for i in range(len(want)))


def _row_logp(model, ex) -> np.ndarray:
    """Log-probs of prompt + answer computed alone (one unpadded row, its own image)."""
    ids = np.concatenate([ex.prompt_ids, ex.answer_ids])[None].astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if ex.grids:
        batch.update(pixel_values=ex.pixel_values, image_grid_thw=np.asarray(ex.grids))
    logits = np.asarray(model(batch).logits[0], np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_scores_against_itself_and_a_plain_forward(data):
    model = tiny.model()
    # routing=True throughout: the three evaluations then share one set of compiled programs
    full = harness.evaluate(model, data, batch_size=2, max_new_tokens=3, routing=True)
    again = harness.evaluate(model, data, reference=full, batch_size=2, max_new_tokens=3,
                             routing=True)
    assert again["kl"]["all"] == pytest.approx(0.0, abs=1e-6)
    assert again["predictions"] == full["predictions"]
    # perplexity against one unbatched forward per example
    nll = count = 0
    for ex in data.examples:
        logp, t = _row_logp(model, ex), len(ex.prompt_ids)
        nll -= sum(logp[t - 1 + j, a] for j, a in enumerate(ex.answer_ids))
        count += len(ex.answer_ids)
    np.testing.assert_allclose(full["perplexity"]["all"], np.exp(nll / count), rtol=1e-4)
    two_bit = fake.fake_quantize(model, fake.uniform_bits(model, 2), group_size=16)
    moved = harness.evaluate(two_bit, data, reference=full, batch_size=2, max_new_tokens=3,
                             routing=True)
    assert moved["kl"]["all"] > 1e-4
    image_tokens = sum(int((e.prompt_ids == tiny.IMAGE).sum()) for e in data.examples)
    picks = full["routing"]["image"]  # [MoE layers, experts], top-2 per image token
    np.testing.assert_array_equal(picks.sum(-1), [2 * image_tokens] * 3)
