"""The shipped testbed checkpoint (checkpoints/testbed): it loads through the same loader as a
real Kimi-VL checkpoint, its model card's held-out figures reproduce, GPTQ beats
round-to-nearest on every routed expert of a trained model, and the packed checkpoint restores
to the logits of the fake-quantized model (issue: quantization)."""

import dataclasses
import json
from pathlib import Path

import expert_checks
import heldout_outcomes
import numpy as np
import pytest

import mode_jax
from mode_jax.calib import data, sources
from mode_jax.eval import harness
from mode_jax.quant import apply, serialize
from mode_jax.testbed import card
from mode_jax.testbed import tokenizer as tok_lib

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "testbed"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return mode_jax.load(CHECKPOINT)


@pytest.fixture(scope="module")
def summary():
    return json.loads((CHECKPOINT / "train_summary.json").read_text())


def test_card_accuracies_reproduce(summary):
    """Greedy decoding on CPU is deterministic: the held-out split scores as recorded when the
    checkpoint was made (train_summary.json, the card's source). What each sample scored
    (heldout_outcomes.py's record) gives exactly the card's figures, and rescoring whole
    batches of the full evaluation (each kind's first, last and most wrongly answered one)
    gives the same answers and picks, sample by sample. A regression check: the figures were
    recorded by this harness, whose scoring is checked against plain forwards in
    test_harness.py."""
    recorded, record = summary["heldout"], heldout_outcomes.load()
    model, data = card.heldout(CHECKPOINT, recorded["n"])
    assert harness.digest(data) == record["digest"], "the record is of other questions"
    assert heldout_outcomes.figures(data, record["predictions"], record["choices"]) == {
        k: recorded[k] for k in heldout_outcomes.FIGURES}, "the record is stale: regenerate it"
    chosen = heldout_outcomes.batches_to_rescore(data, record)
    rows = [i for batch in chosen for i in batch]
    part = dataclasses.replace(data, examples=tuple(data.examples[i] for i in rows))
    size = heldout_outcomes.BATCH_SIZE
    assert [[rows[j] for j in b] for b in harness._batches(
        part, harness._rows_per_batch(part, size))] == chosen  # the full run's batches
    got = harness.evaluate(model, part, batch_size=size)
    assert got["predictions"] == [record["predictions"][i] for i in rows]
    assert got["choices"] == [record["choices"][i] for i in rows]
    assert heldout_outcomes.wrong(data, record) & set(rows)  # wrong answers are rescored too
    for family in ("text", "vision"):
        assert recorded["accuracy"]["family"][family] > 0.5, family  # it learned something


def _batches(model, n, seed):
    """Whole testbed conversations (vision and text), as the GPTQ stage reads them."""
    samples = sources.testbed_samples(n, seed=seed, purpose="gptq")
    tokenizer = tok_lib.load_tokenizer(CHECKPOINT)
    return list(data.batches(samples, tokenizer, 16, pad_token_id=model.config.pad_token_id,
                             max_length=256))


@pytest.fixture(scope="module")
def quantized(model):
    """One GPTQ walk for the two tests below: 2, 3 and 4 bits, a third of every MoE layer's
    experts at each (rolled from layer to layer), attention, shared expert and dense MLP at 4
    bits as configured by default (so the experts' inputs come through quantized layers).
    Returns (packed model, report, bit map, calibration batches)."""
    batches = _batches(model, 48, seed=0)
    text = model.config.text
    bit_map = np.asarray([np.roll(np.resize([2, 3, 4], text.n_routed_experts), layer)
                          for layer in range(len(text.moe_layers))])
    qmodel, report = apply.quantize_model(model, batches, bit_map, apply.QuantConfig())
    return qmodel, report, bit_map, batches


def test_gptq_beats_rtn_on_every_routed_expert(model, quantized):
    qmodel, report, bit_map, batches = quantized
    fake = apply.fake_quantized(qmodel)
    skipped = expert_checks.assert_gptq_beats_rtn_per_expert(
        model, fake, batches, report, bit_map, apply.QuantConfig().group_size)
    assert len(skipped) <= 2, skipped  # nearly every expert is exercised


def test_restored_packed_testbed_gives_the_fake_quantized_logits(model, quantized, tmp_path):
    """The restored packed model and the float model of the same codes agree on fresh
    prompts."""
    qmodel, report, bit_map, _ = quantized
    serialize.save(str(tmp_path / "packed"), qmodel, {"report": report})
    restored, meta = serialize.restore(str(tmp_path / "packed"))
    assert meta["bit_map"] == bit_map.tolist()
    fake = apply.fake_quantized(qmodel)
    for batch in _batches(model, 16, seed=1):
        got, want = restored(batch).logits, fake(batch).logits
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        assert not np.allclose(np.asarray(want), np.asarray(model(batch).logits), atol=1e-3)
