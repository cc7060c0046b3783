"""The evaluation harness against independent references: a model whose own greedy answers are
the expected answers scores 100%, one wrong answer per family costs exactly that share, KL of a
model against itself is 0, perplexity and multiple-choice picks match a plain forward of each
unpadded row, routing counts add up, and fake quantization is identity at 16 bits."""

import dataclasses
import json
import types

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy.spatial.distance import jensenshannon

from mode_jax.eval import generate, harness
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.models.moonvit import VisionConfig
from mode_jax.preprocess import ImageConfig
from mode_jax.quant import fake, rtn
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tok_lib

TASKS = tasks.TaskConfig(image_size=(112, 112), object_size=(10, 16), max_objects=3, cell=0)
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return tok_lib.build_tokenizer(tasks.vocabulary())


@pytest.fixture(scope="module")
def model(tokenizer):
    text = TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.0)
    vision = VisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          pos_emb_height=4, pos_emb_width=4)
    config = KimiVLConfig(text=text, vision=vision,
                          media_placeholder_token_id=tok_lib.image_token_id(tokenizer))
    model = KimiVL(config, rngs=nnx.Rngs(0))
    for experts in fake.moe_experts(model):  # experts as strong as the rest (init is 0.02)
        for var in (experts.gate_up, experts.down):
            var.set_value(var.get_value() * 15.0)
    return model


WIDTH = 64  # every reference row is right-padded to this: one compiled shape per kind


def _row_logits(model, ex, ids):
    """Logits [len(ids), V] of one row `ids` (with `ex`'s image), computed alone.

    Right padding (causal attention: it changes nothing before it) keeps one shape."""
    batch = {"input_ids": np.zeros((1, WIDTH), np.int32),
             "attention_mask": np.zeros((1, WIDTH), np.int32)}
    batch["input_ids"][0, :len(ids)], batch["attention_mask"][0, :len(ids)] = ids, 1
    if ex.grids:
        batch.update(pixel_values=ex.pixel_values, image_grid_hws=np.asarray(ex.grids))
    return np.asarray(model(batch).logits[0, :len(ids)], np.float64)


def _own_answers(model, tokenizer, samples):
    """Samples re-labelled with what the (random) model itself answers: its greedy text, found
    one unpadded row at a time with a full forward per token, and for multiple choice the
    option whose letter it scores highest right after the prompt."""
    data = harness.encode(samples, tokenizer)
    out = []
    for s, ex in zip(samples, data.examples, strict=True):
        seq, first = list(ex.prompt_ids), None
        for _ in range(NEW_TOKENS):
            logits = _row_logits(model, ex, seq)[-1]
            first = logits if first is None else first
            seq.append(int(np.argmax(logits)))
            if seq[-1] == data.eos_token_id:
                break
        answer = tokenizer.decode(seq[len(ex.prompt_ids):], skip_special_tokens=True)
        assert answer, "the model's answer decodes to nothing; pick another seed"
        index = int(np.argmax(first[list(ex.option_ids)])) if s.options else None
        out.append(dataclasses.replace(s, answer=answer, answer_index=index))
    return out


@pytest.fixture(scope="module")
def samples(model, tokenizer):
    """Four vision and four text questions (two multiple choice each) the model 'knows'."""
    vision = tasks.generate("heldout", 4, 0, dataclasses.replace(TASKS, tasks=("color", "choice")))
    text = tasks.generate("heldout", 4, 0,
                          dataclasses.replace(TASKS, tasks=("arithmetic", "fact_choice")))
    return _own_answers(model, tokenizer, vision + text)


@pytest.fixture(scope="module")
def data(samples, tokenizer):
    return harness.encode(samples, tokenizer)


@pytest.fixture(scope="module")
def result(model, data):
    return harness.evaluate(model, data, batch_size=3, max_new_tokens=NEW_TOKENS, routing=True)


def test_a_model_that_answers_perfectly_scores_100(result, data):
    assert result["n"] == 8
    assert result["accuracy"]["all"] == 1.0
    assert result["accuracy"]["family"] == {"text": 1.0, "vision": 1.0}
    assert result["mc_accuracy"]["all"] == 1.0
    assert set(result["mc_accuracy"]["task"]) == {"choice", "fact_choice"}
    assert result["correct"] == [True] * 8
    assert result["choices"] == [ex.sample.answer_index if ex.sample.options else None
                                 for ex in data.examples]


def test_wrong_answers_cost_their_share(model, samples, tokenizer):
    wrong = list(samples)
    for i in (0, 5):  # one vision, one text sample get an answer the model does not give
        wrong[i] = dataclasses.replace(wrong[i], answer=wrong[i].answer + " zebra")
    res = harness.evaluate(model, harness.encode(wrong, tokenizer), batch_size=3,
                           max_new_tokens=NEW_TOKENS)
    fam = [s.family for s in wrong]
    assert res["accuracy"]["all"] == 6 / 8
    assert res["accuracy"]["family"] == {f: 1 - 1 / fam.count(f) for f in set(fam)}
    assert [i for i, c in enumerate(res["correct"]) if not c] == [0, 5]


def test_perplexity_and_choices_match_a_plain_forward(model, data, result):
    nll, count = [], []
    for ex in data.examples:
        logits = _row_logits(model, ex, np.concatenate([ex.prompt_ids, ex.answer_ids]))
        n, t = len(ex.answer_ids), len(ex.prompt_ids)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.append(-sum(logp[t - 1 + j, ex.answer_ids[j]] for j in range(n)))
        count.append(n)
    np.testing.assert_allclose(result["perplexity"]["all"], np.exp(sum(nll) / sum(count)),
                               rtol=1e-5)
    vis = [i for i, ex in enumerate(data.examples) if ex.sample.family == "vision"]
    np.testing.assert_allclose(result["perplexity"]["family"]["vision"],
                               np.exp(sum(nll[i] for i in vis) / sum(count[i] for i in vis)),
                               rtol=1e-5)


def test_kl_of_a_model_against_itself_is_zero(model, data, result):
    kw = {"batch_size": 3, "max_new_tokens": NEW_TOKENS, "routing": True}  # `result`'s programs
    again = harness.evaluate(model, data, reference=result, **kw)
    assert again["kl"]["all"] == 0.0
    live = harness.evaluate(model, data, reference=model, **kw)
    assert abs(live["kl"]["all"]) < 1e-7
    other = fake.fake_quantize(model, fake.uniform_bits(model, 2), group_size=16)
    moved = harness.evaluate(other, data, reference=result, **kw)
    assert moved["kl"]["all"] > 1e-3
    assert "KL" in harness.format_table(moved)
    # the per-sample sums behind it (what the report's paired intervals resample)
    assert np.sum(moved["sample_kl"]) / np.sum(moved["answer_tokens"]) == pytest.approx(
        moved["kl"]["all"], rel=1e-12)
    assert moved["answer_tokens"] == [len(ex.answer_ids) for ex in data.examples]


def test_digest_names_the_samples_and_their_order(data, samples, tokenizer):
    assert harness.digest(data) == harness.digest(harness.encode(samples, tokenizer))
    assert harness.digest(data) != harness.digest(harness.encode(samples[::-1], tokenizer))
    changed = list(samples)
    changed[3] = dataclasses.replace(changed[3], answer=changed[3].answer + " zebra")
    assert harness.digest(data) != harness.digest(harness.encode(changed, tokenizer))


def test_routing_counts_add_up(model, data, result):
    k = model.config.text.num_experts_per_tok
    image_tokens = sum(int(np.sum(ex.prompt_ids == model.config.media_placeholder_token_id))
                       for ex in data.examples)
    all_tokens = sum(len(ex.prompt_ids) + len(ex.answer_ids) for ex in data.examples)
    counts = result["routing"]
    assert counts["image"].shape == (1, 4)
    np.testing.assert_array_equal(counts["image"].sum(-1), [k * image_tokens])
    np.testing.assert_array_equal(counts["text"].sum(-1), [k * (all_tokens - image_tokens)])


def test_routing_divergence_is_jensen_shannon():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, (3, 6)), rng.integers(0, 50, (3, 6))
    expected = [jensenshannon(x, y, base=2) ** 2 for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(harness.routing_divergence(a, b), expected, rtol=1e-10)
    assert harness.routing_divergence([[1, 0]], [[0, 3]])[0] == 1.0


def test_fake_quantization_identity_at_16_bits_and_exact_per_expert(model, data):
    original = np.asarray(fake.moe_experts(model)[0].down.get_value())
    same = fake.fake_quantize(model, fake.uniform_bits(model, 16))
    batch = harness._model_batch(data, [0, 1], True)
    np.testing.assert_array_equal(np.asarray(same(batch).logits), np.asarray(model(batch).logits))
    bits = fake.uniform_bits(model, 16)
    bits[0, 1], bits[0, 3] = 2, 4
    mixed = fake.fake_quantize(model, bits, group_size=16)
    before, after = fake.moe_experts(model)[0], fake.moe_experts(mixed)[0]
    want = rtn.fake_quantize_experts(before.gate_up.get_value(), before.down.get_value(),
                                     bits[0], 16)
    for name, ref in zip(("gate_up", "down"), want, strict=True):
        w, got = (np.asarray(getattr(m, name).get_value()) for m in (before, after))
        np.testing.assert_array_equal(got, np.asarray(ref))
        for e in range(4):
            if bits[0, e] == 16:
                np.testing.assert_array_equal(got[e], w[e])
                continue
            groups = got[e].reshape(-1, 16, got.shape[-1])  # [G, 16 rows, N]
            levels = max(len(np.unique(groups[g, :, n])) for g in range(groups.shape[0])
                         for n in range(groups.shape[2]))
            assert 2 < levels <= 2 ** bits[0, e]  # on the b-bit grid, not the original weights
    assert not np.array_equal(np.asarray(mixed(batch).logits), np.asarray(model(batch).logits))
    np.testing.assert_array_equal(np.asarray(fake.moe_experts(model)[0].down.get_value()),
                                  original)  # the input model is untouched


def test_bad_bit_maps_are_refused(model):
    with pytest.raises(ValueError, match=r"bit map has shape \(2, 4\); this model needs \(1, 4\)"):
        fake.fake_quantize(model, np.full((2, 4), 4))
    with pytest.raises(ValueError, match=r"bits \[9\] not supported"):
        fake.fake_quantize(model, np.asarray([[4, 9, 4, 4]]))


def test_user_jsonl_is_scored_and_bad_lines_are_named(model, tokenizer, tmp_path):
    Image.fromarray(np.full((112, 112, 3), 200, np.uint8)).save(tmp_path / "a.png")
    lines = [{"question": "what color is the circle ?", "image": "a.png", "answer": "red"},
             {"question": "what is 2 plus 3 ?", "options": ["5", "6"], "answer_index": 0,
              "task": "arithmetic"}]
    good = tmp_path / "bench.jsonl"
    good.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = harness.load_jsonl(good, tokenizer, ImageConfig())
    assert data.examples[0].grid == (8, 8)
    res = harness.evaluate(model, data, batch_size=3, max_new_tokens=NEW_TOKENS)
    assert set(res["accuracy"]["family"]) == {"vision", "text"}
    assert set(res["mc_accuracy"]["task"]) == {"arithmetic"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[1]) + "\n" + '{"question": "x", "answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'answer' must be a non-empty"):
        harness.load_jsonl(bad, tokenizer)


def test_questions_with_several_images(model, tokenizer, tmp_path):
    """Images stand at the question's `<image>` placeholders (or all first); every one is cut
    and expanded in order, rows of two images batch together, and the perplexity equals one
    unbatched forward per question."""
    for name, (h, w, v) in {"a.png": (112, 112, 200), "b.png": (56, 112, 40)}.items():
        Image.fromarray(np.full((h, w, 3), v, np.uint8)).save(tmp_path / name)
    lines = [
        {"question": "is <image> color of <image> red ?", "image": ["a.png", "b.png"],
         "answer": "red"},
        {"question": "what color is the circle ?", "image": ["b.png", "a.png"], "answer": "red"},
        {"question": "what color is the circle ?", "image": "a.png", "answer": "blue"},
        {"question": "what is 2 plus 3 ?", "answer": "5"},
    ]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = harness.load_jsonl(bench, tokenizer, ImageConfig())
    assert [ex.grids for ex in data.examples] == [((8, 8), (4, 8)), ((4, 8), (8, 8)),
                                                  ((8, 8),), ()]
    image_id = tok_lib.image_token_id(tokenizer)
    for ex in data.examples:
        ids = list(ex.prompt_ids)
        assert ids.count(image_id) == sum(h * w // 4 for h, w in ex.grids)
        assert len(ex.pixel_values if ex.grids else []) == sum(h * w for h, w in ex.grids)
    # placeholders: "is" before the first image's run, "color" between the two runs
    ids = list(data.examples[0].prompt_ids)
    word = {w: tokenizer.convert_tokens_to_ids(w) for w in ("is", "color")}
    assert tokenizer.unk_token_id not in ids
    first = ids.index(image_id)
    assert ids.index(word["is"]) < first < ids.index(word["color"]) < first + 16 + 8
    res = harness.evaluate(model, data, batch_size=2, max_new_tokens=NEW_TOKENS)
    nll = count = 0
    for ex in data.examples:
        logits = _row_logits(model, ex, np.concatenate([ex.prompt_ids, ex.answer_ids]))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        t = len(ex.prompt_ids)
        nll -= sum(logp[t - 1 + j, a] for j, a in enumerate(ex.answer_ids))
        count += len(ex.answer_ids)
    np.testing.assert_allclose(res["perplexity"]["all"], np.exp(nll / count), rtol=1e-5)
    with pytest.raises(ValueError, match="has 2 images; use .grids"):
        _ = data.examples[0].grid


def test_answers_the_tokenizer_cannot_spell_are_warned_about(tokenizer, tmp_path, caplog):
    bench = tmp_path / "unk.jsonl"
    bench.write_text("\n".join(json.dumps({"question": "what is 2 plus 3 ?", "answer": a})
                               for a in ("5", "zyxwvut")))
    with caplog.at_level("WARNING", logger="mode_jax.eval.harness"):
        harness.load_jsonl(bench, tokenizer)
    assert "1 of 2 answers hold words the tokenizer does not know (e.g. 'zyxwvut')" in caplog.text


def test_pad_left_and_bad_arguments(model, data):
    ids, mask = generate.pad_left([np.asarray([4, 5]), np.asarray([6])], 0, 4)
    np.testing.assert_array_equal(ids, [[0, 0, 4, 5], [0, 0, 0, 6]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        harness.evaluate(model, data, batch_size=0)
    with pytest.raises(ValueError, match="no 'answer_logprobs'"):
        harness.evaluate(model, data, reference={"n": 8})
    with pytest.raises(ValueError, match="no samples"):
        harness.encode([], None)


def test_multiple_choice_scores_letters_or_options_by_the_answer_form(tokenizer):
    """Lettered questions compare the letters' log-likelihoods, option-answered ones the
    options' (cloze style); a multi-token option is an error naming it."""
    for form in ("letter", "option"):
        cfg = dataclasses.replace(TASKS, tasks=("fact_choice",), choice_answer=form)
        s = tasks.generate("heldout", 1, 0, cfg)[0]
        (ex,) = harness.encode([s], tokenizer).examples
        words = tasks.LETTERS[:4] if form == "letter" else s.options
        expected = [tokenizer.convert_tokens_to_ids(w) for w in words]
        assert list(ex.option_ids) == expected and len(set(expected)) == 4
        assert ex.option_ids[s.answer_index] == ex.answer_ids[0]  # the answer's first token
    bad = dataclasses.replace(s, options=("north morvale", *s.options[1:]))
    with pytest.raises(ValueError, match="option 'north morvale' encodes to 2 tokens"):
        harness.encode([bad], tokenizer)


def test_generation_stop_ids_come_from_generation_config(tmp_path):
    assert harness.generation_stop_ids(tmp_path) == ()  # no file
    path = tmp_path / "generation_config.json"
    for value, want in ((151645, (151645,)), ([151645, 151643], (151645, 151643)), (None, ())):
        path.write_text(json.dumps({"eos_token_id": value}))
        assert harness.generation_stop_ids(tmp_path) == want
    for bad in ('{"eos_token_id": "x"}', '{"eos_token_id": [1, true]}', "[1,", "[]"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="generation_config.json"):
            harness.generation_stop_ids(tmp_path)
    assert harness.generation_stop_ids("checkpoints/testbed") == (8,)  # the shipped <|im_end|>


@pytest.mark.parametrize("counts,batch_size,rows", [
    ((100, 100), 32, 32),  # a real split: full batches
    ((3,), 32, 4),  # a smoke run's few samples: 4 rows, not 29 repeats
    ((5, 1), 32, 8),  # the largest kind decides
    ((1,), 32, 1),
    ((2,), 12, 3),  # halves of the asked size only, so a mesh axis dividing it divides these
    ((2,), 3, 3),
])
def test_small_splits_are_not_padded_to_the_full_batch(counts, batch_size, rows):
    examples = [types.SimpleNamespace(grids=((k, k),) if k else ())
                for k, n in enumerate(counts) for _ in range(n)]
    assert harness._rows_per_batch(types.SimpleNamespace(examples=examples), batch_size) == rows
