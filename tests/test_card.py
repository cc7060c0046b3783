"""The model card renders every figure it is given (no model needed)."""

import numpy as np

from mode_jax.testbed import card, tasks


def _result(vision, text):
    return {"n": 10, "wall_seconds": 3.0,
            "accuracy": {"all": (vision + text) / 2, "family": {"text": text, "vision": vision},
                         "task": {"color": vision, "fact": text},
                         "modality": {"image": vision, "text": text}}}


def test_card_reports_accuracies_rtn_drops_and_divergence():
    summary = {"train_config": {"seed": 0, "vision_warmup_steps": 5, "steps": 7,
                                "batch_vision": 2, "batch_text": 3},
               "parameters": 1234, "train_seconds": 120.0}
    full = _result(0.9, 1.0)
    sweep = [{"bits": 2, "accuracy": {"text": 50.0, "vision": 40.0, "all": 45.0},
              "drop": {"text": -50.0, "vision": -50.0, "all": -50.0}, "kl": 1.25}]
    text = card.render(summary, tasks.TaskConfig(), full, sweep, np.array([0.125, 0.5]),
                       (1, 2), 3 * 2**20)
    assert "| family vision | 90.0 |" in text and "| family text | 100.0 |" in text
    assert "| 2 | 50.0 (-50.0) | 40.0 (-50.0) | 45.0 (-50.0) | 1.2500 |" in text
    assert "| 1 | 0.125 |" in text and "| 2 | 0.500 |" in text
    assert "1,234 parameters" in text and "3.0 MiB" in text
