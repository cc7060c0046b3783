"""Cached, batched greedy generation equals re-running the full forward on each growing sequence
(one unpadded row at a time) and taking the argmax; rows stop at the end token."""

import json
import pathlib

import numpy as np
import pytest
from flax import nnx

from mode_jax.eval import generate
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tok_lib

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kimivl-tiny"
STEPS = 5


@pytest.fixture(scope="module")
def model():
    raw = json.loads((FIXTURE / "config.json").read_text())
    return KimiVL(KimiVLConfig.from_dict(raw), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts(model):
    """Three rows of different lengths: two with images of different grids, one text-only."""
    rng = np.random.default_rng(0)
    img = model.config.media_placeholder_token_id
    rows = [
        (np.concatenate([[5, 6], [img] * 4, [7, 8, 9, 10]]), (4, 4)),
        (np.array([11, 12, 13]), None),
        (np.concatenate([[14], [img] * 3, [15, 16]]), (2, 6)),
    ]
    return [(ids.astype(np.int32), grid,
             None if grid is None else rng.normal(size=(grid[0] * grid[1], 3, 14, 14))
             .astype(np.float32)) for ids, grid in rows]


def _batch(prompts):
    ids, mask = generate.pad_left([p[0] for p in prompts], 0)
    with_image = [p for p in prompts if p[1] is not None]
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": np.concatenate([p[2] for p in with_image]),
            "image_grid_hws": np.asarray([p[1] for p in with_image])}


def _reference(model, ids, grid, pixels, steps=STEPS):
    """Full forward of the one row, argmax at its last token, append, repeat: (tokens, logits).

    The row is right-padded to a fixed width (causal attention: the pads after the last token
    change nothing before it), so every step reuses one compiled shape.
    """
    width = len(ids) + steps
    seq, tokens, logits = list(ids), [], []
    for _ in range(steps):
        batch = {"input_ids": np.zeros((1, width), np.int32),
                 "attention_mask": np.zeros((1, width), np.int32)}
        batch["input_ids"][0, :len(seq)] = seq
        batch["attention_mask"][0, :len(seq)] = 1
        if grid is not None:
            batch.update(pixel_values=pixels, image_grid_hws=np.asarray([grid]))
        last = np.asarray(model(batch).logits[0, len(seq) - 1])
        tokens.append(int(np.argmax(last)))
        logits.append(last)
        seq.append(tokens[-1])
    return np.asarray(tokens), np.asarray(logits)


@pytest.fixture(scope="module")
def references(model, prompts):
    return [_reference(model, *p) for p in prompts]


def test_cached_greedy_equals_full_forward_argmax(model, prompts, references):
    vocab = model.config.text.vocab_size
    out = generate.greedy_generate(model, _batch(prompts), STEPS, eos_token_id=vocab - 1,
                                   return_scores=True)
    for row, (tokens, logits) in enumerate(references):
        assert (vocab - 1) not in tokens  # the chosen eos never fires: all steps are compared
        np.testing.assert_array_equal(out.tokens[row], tokens)
        np.testing.assert_allclose(out.scores[row], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.lengths, [STEPS] * len(prompts))


def test_rows_stop_at_their_end_token(model, prompts, references):
    refs = [tokens for tokens, _ in references]
    eos = int(refs[0][2])  # row 0 emits it at step 2
    out = generate.greedy_generate(model, _batch(prompts), STEPS, eos_token_id=eos)
    for row, ref in enumerate(refs):
        stop = int(np.flatnonzero(ref == eos)[0]) if eos in ref else STEPS
        assert out.lengths[row] == stop
        np.testing.assert_array_equal(out.tokens[row, :stop], ref[:stop])
        assert np.all(out.tokens[row, stop:] == eos)
    assert out.lengths[0] == 2


def test_rows_also_stop_at_other_end_tokens(model, prompts, references):
    """A second end token (e.g. Qwen3-VL's <|endoftext|> beside <|im_end|>) stops a row too: it
    is cut from the answer and eos fills the slots after it."""
    refs = [tokens for tokens, _ in references]
    vocab = model.config.text.vocab_size
    other = int(refs[1][1])  # row 1 emits it at step 1
    out = generate.greedy_generate(model, _batch(prompts), STEPS, eos_token_id=vocab - 1,
                                   stop_token_ids=(other,))
    for row, ref in enumerate(refs):
        stop = int(np.flatnonzero(ref == other)[0]) if other in ref else STEPS
        assert out.lengths[row] == stop
        np.testing.assert_array_equal(out.tokens[row, :stop + 1], ref[:stop + 1])
        assert np.all(out.tokens[row, stop + 1:] == vocab - 1)
    assert out.lengths[1] == 1


def test_bad_requests_are_refused(model, prompts):
    batch = _batch(prompts)
    right = dict(batch, input_ids=batch["input_ids"][:, ::-1].copy(),
                 attention_mask=batch["attention_mask"][:, ::-1].copy())
    with pytest.raises(ValueError, match=r"left-padded prompts .* rows \[1, 2\]"):
        generate.greedy_generate(model, right, 2, eos_token_id=1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate.greedy_generate(model, batch, 0, eos_token_id=1)
    with pytest.raises(ValueError, match=r"end token id\(s\) \[999\] outside the vocabulary"):
        generate.greedy_generate(model, batch, 2, eos_token_id=999)
    with pytest.raises(ValueError, match=r"\[-1\] outside the vocabulary"):
        generate.greedy_generate(model, batch, 2, eos_token_id=1, stop_token_ids=(-1,))


def test_decode_cuts_at_the_end_token():
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    end = tok.convert_tokens_to_ids(tok_lib.IM_END)
    words = tok("east morvale", add_special_tokens=False)["input_ids"]
    gen = generate.Generation(tokens=np.asarray([[*words, end, end], [words[1]] * 4]),
                              lengths=np.asarray([2, 4]))
    assert generate.decode(tok, gen) == ["east morvale", "morvale morvale morvale morvale"]


@pytest.mark.parametrize("family", ["kimi_vl", "qwen3_vl_moe", "internvl"])
def test_logits_window_is_the_last_positions_of_the_full_logits(family):
    """The harness and generation ask for the last few positions' logits only (no [B, T, V]
    array at 150k-token vocabularies); they must be the full forward's."""
    import internvl_tiny
    import qwen3vl_tiny

    import mode_jax

    if family == "kimi_vl":
        model = mode_jax.load(FIXTURE)
        batch = {"input_ids": np.random.default_rng(0).integers(41, 300, (2, 9), np.int32)}
    else:
        tiny = qwen3vl_tiny if family == "qwen3_vl_moe" else internvl_tiny
        model = tiny.model()
        batch = {"input_ids": np.random.default_rng(0).integers(1, 50, (2, 9), np.int32)}
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :3] = 0  # left padding, as the harness batches
    full = np.asarray(model(batch).logits)
    for window in (1, 4, 9):
        np.testing.assert_allclose(np.asarray(model(batch, logits_window=window).logits),
                                   full[:, -window:], rtol=1e-6, atol=1e-6)
