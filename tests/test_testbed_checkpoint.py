"""The shipped testbed checkpoint (checkpoints/testbed): it loads through the same loader as a
real Kimi-VL checkpoint, its model card's held-out figures reproduce, and GPTQ beats
round-to-nearest on every routed expert of a trained model (issue: quantization)."""

import json
from pathlib import Path

import expert_checks
import numpy as np
import pytest

from mode_jax.calib import data, sources
from mode_jax.eval import harness
from mode_jax.quant import apply
from mode_jax.testbed import card
from mode_jax.testbed import tokenizer as tok_lib

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "testbed"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary():
    return json.loads((CHECKPOINT / "train_summary.json").read_text())


def test_card_accuracies_reproduce(summary):
    """Greedy decoding on CPU is deterministic: the held-out split scores exactly as recorded
    when the checkpoint was made (train_summary.json, the card's source)."""
    recorded = summary["heldout"]
    model, data = card.heldout(CHECKPOINT, recorded["n"])
    got = harness.summary(harness.evaluate(model, data))
    assert got["accuracy"] == recorded["accuracy"]
    assert got["mc_accuracy"] == recorded["mc_accuracy"]
    for family in ("text", "vision"):
        assert got["accuracy"]["family"][family] > 0.5, family  # it learned something


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_every_routed_expert(bits):
    model, _ = card.heldout(CHECKPOINT, 1)
    samples = sources.testbed_samples(48, seed=0, purpose="gptq")
    tokenizer = tok_lib.load_tokenizer(CHECKPOINT)
    batches = list(data.batches(samples, tokenizer, 16, pad_token_id=model.config.pad_token_id,
                                max_length=256))
    text = model.config.text
    bit_map = np.full((len(text.moe_layers), text.n_routed_experts), bits)
    config = apply.QuantConfig(attention_bits=16, shared_expert_bits=16, dense_mlp_bits=16)
    qmodel, report = apply.quantize_model(model, batches, bit_map, config)
    fake = apply.fake_quantized(qmodel)
    skipped = expert_checks.assert_gptq_beats_rtn_per_expert(
        model, fake, batches, report, bits, config.group_size)
    assert len(skipped) <= 2, skipped  # nearly every expert is exercised
