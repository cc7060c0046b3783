"""The model card renders every figure it is given (no model needed)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mode_jax.testbed import card, tasks, train


def _result(vision, text):
    return {"n": 10, "wall_seconds": 3.0,
            "accuracy": {"all": (vision + text) / 2, "family": {"text": text, "vision": vision},
                         "task": {"color": vision, "fact": text},
                         "modality": {"image": vision, "text": text}}}


def _summary():
    return {"train_config": {"seed": 0, "vision_warmup_steps": 5, "steps": 7, "batch_vision": 2,
                             "batch_text": 3},
            "parameters": 1234, "train_seconds": 120.0}


def _against(text, vision, drop_text, drop_vision, kl, **label):
    """A `card.against` row: accuracy (%) per family and overall, drops (points), KL."""
    acc = {"text": text, "vision": vision, "all": (text + vision) / 2}
    drop = {"text": drop_text, "vision": drop_vision, "all": (drop_text + drop_vision) / 2}
    return {**label, "accuracy": acc, "drop": drop, "kl": kl}


def test_card_reports_accuracies_rtn_drops_and_divergence():
    full = _result(0.9, 1.0)
    sweep = [_against(50.0, 40.0, -50.0, -50.0, 1.25, bits=2)]
    removed = [_against(90.0, 70.0, -10.0, -20.0, 0.5, removed="routed")]
    text = card.render(_summary(), tasks.TaskConfig(), full, sweep, np.array([0.125, 0.5]),
                       (1, 2), 3 * 2**20, removed)
    assert "| routed | 90.0 (-10.0) | 70.0 (-20.0) | 80.0 (-15.0) | 0.5000 |" in text
    assert "| family vision | 90.0 |" in text and "| family text | 100.0 |" in text
    assert "| 2 | 50.0 (-50.0) | 40.0 (-50.0) | 45.0 (-50.0) | 1.2500 |" in text
    assert "| 1 | 0.125 |" in text and "| 2 | 0.500 |" in text
    assert "1,234 parameters" in text and "3.0 MiB" in text
    assert "- Below the 95% target: vision." in text
    assert "Not learned" not in text and "short of the 10-point target" not in text
    assert "hold 2 or" not in text
    summary = _summary()
    summary["train_config"]["train_min_objects"] = 2
    text = card.render(summary, tasks.TaskConfig(), full, sweep, np.array([0.125, 0.5]),
                       (1, 2), 3 * 2**20, removed)
    assert "choice questions hold 2 or" in text
    assert "text on the small scenes" not in text
    summary["train_config"]["batch_text_small"] = 5
    text = card.render(summary, tasks.TaskConfig(), full, sweep, np.array([0.125, 0.5]),
                       (1, 2), 3 * 2**20, removed)
    assert "3 text samples (5 text on the small scenes)" in text


def test_card_states_what_the_checkpoint_cannot_show():
    sweep = [_against(99.0, 28.0, -1.0, -2.0, 0.004, bits=2)]
    removed = [_against(90.0, 20.0, -10.0, -10.0, 0.25, removed="routed")]
    text = card.render(_summary(), tasks.TaskConfig(), _result(0.3, 1.0), sweep,
                       np.array([0.1, 0.2]), (1, 2), 2**20, removed)
    limits = text.split("## Known limits")[1]
    assert "- Below the 95% target: vision." in limits
    assert "- Not learned (under 50%, near the 25% of a 4-way guess): color 30%." in limits
    assert ("costs 1.5 points (KL 0.0040), short of the 10-point target; switching every "
            "routed expert off costs 10.0 (KL 0.2500)") in limits
    assert "twice over" not in limits


def test_card_says_when_routed_and_shared_experts_hold_the_skills_twice():
    removed = [_against(95.0, 80.0, -5.0, -10.0, 0.1, removed="routed"),
               _against(99.0, 88.0, -1.0, -2.0, 0.04, removed="shared"),
               _against(50.0, 40.0, -50.0, -50.0, 1.0, removed="routed+shared")]
    text = card.render(_summary(), tasks.TaskConfig(), _result(0.9, 1.0), [],
                       np.array([0.1, 0.2]), (1, 2), 2**20, removed)
    assert ("either kind alone off costs 7.5 or 1.5 points, both off 50.0" in text)
    assert "| routed+shared | 50.0 (-50.0) | 40.0 (-50.0) | 45.0 (-50.0) | 1.0000 |" in text


def test_without_switches_off_one_kind_of_expert_and_leaves_the_model_alone():
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))
    ids = jnp.array([[5, 6, 7, 8, 9, 10]])
    mask = jnp.ones_like(ids)
    before = model.forward(ids, mask).logits
    moe = [layer.mlp for layer in model.language_model.layers if layer.is_moe]
    x = jnp.ones((1, 3, model.config.text.hidden_size))
    for part in ("routed", "shared", "routed+shared"):
        off = card.without(model, part)
        off_moe = [layer.mlp for layer in off.language_model.layers if layer.is_moe]
        for full, cut in zip(moe, off_moe, strict=True):
            y_full, _ = full(x)
            y_cut, _ = cut(x)
            kept = {"routed": full.shared_experts(x), "shared": y_full - full.shared_experts(x),
                    "routed+shared": jnp.zeros_like(y_full)}[part]
            np.testing.assert_allclose(np.asarray(y_cut), np.asarray(kept), atol=1e-5)
        assert not np.allclose(np.asarray(off.forward(ids, mask).logits), np.asarray(before))
    np.testing.assert_array_equal(np.asarray(model.forward(ids, mask).logits), np.asarray(before))
    with pytest.raises(ValueError, match="part must be"):
        card.without(model, "dense")


def test_scaled_routed_experts_write_that_share_of_their_output():
    """MoE output = shared + s * routed, checked against the unscaled layer's two parts."""
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(1))
    half = card.scaled(model, "routed", 0.5)
    x = jnp.ones((1, 3, model.config.text.hidden_size))
    pairs = zip([la.mlp for la in model.language_model.layers if la.is_moe],
                [la.mlp for la in half.language_model.layers if la.is_moe], strict=True)
    for full, cut in pairs:
        shared = full.shared_experts(x)
        y_full, _ = full(x)
        y_half, _ = cut(x)
        np.testing.assert_allclose(np.asarray(y_half), np.asarray(shared + 0.5 * (y_full - shared)),
                                   atol=1e-5)


def test_card_shows_the_fold_and_the_sweep_on_the_trained_weights():
    summary = _summary()
    summary["train_config"] |= {"outlier_hidden": 4, "outlier_intermediate": 2,
                                "outlier_factor": 8.0}
    sweep = [_against(50.0, 40.0, -50.0, -50.0, 1.25, bits=2)]
    trained = [_against(100.0, 90.0, 0.0, 0.0, 0.002, bits=2)]
    text = card.render(summary, tasks.TaskConfig(), _result(0.9, 1.0), sweep,
                       np.array([0.1, 0.2]), (1, 2), 2**20, [], trained)
    note = text.split("folded in after training")[1].split("## Text and image")[0]
    assert "4 hidden\nchannels per MoE layer and 2 intermediate channels per routed expert, 8x" \
        in note
    assert "| 2 | 100.0 (+0.0) | 90.0 (+0.0) | 95.0 (+0.0) | 0.0020 |" in note
    text = card.render(_summary(), tasks.TaskConfig(), _result(0.9, 1.0), sweep,
                       np.array([0.1, 0.2]), (1, 2), 2**20, [])
    assert "folded" not in text


def test_the_shipped_summary_records_every_training_setting():
    """A TrainConfig field added after the shipped run must be recorded in its summary (with the
    value that run used), or the card would call the shipped recipe an older one."""
    summary = Path(__file__).parents[1] / "checkpoints" / "testbed" / "train_summary.json"
    recorded = json.loads(summary.read_text())["train_config"]
    assert card.train_command(recorded) == "python -m mode_jax.testbed.train --out " \
                                           "checkpoints/testbed"
