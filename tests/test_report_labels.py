"""Report rows name the quantizer settings that tell them apart, and pair by them."""

import numpy as np

from mode_jax import report

DEFAULT = {"method": "gptq", "group_size": 128, "damp": 0.01, "act_order": False,
           "attention_bits": 4, "router_finetune": False}


def test_only_the_settings_that_differ_between_rows_are_named():
    assert report.quantizer_labels([DEFAULT, dict(DEFAULT, router_finetune=True)]) == \
        ["gptq", "gptq"]  # router fine-tuning has its own column
    labels = report.quantizer_labels([DEFAULT, dict(DEFAULT, act_order=True),
                                      dict(DEFAULT, method="rtn", attention_bits=16)])
    assert labels == ["gptq act_order=False attention_bits=4",
                      "gptq act_order=True attention_bits=4",
                      "rtn attention_bits=16"]  # act_order means nothing to rtn
    assert report.quantizer_labels([]) == []


def _row(method, fp):
    return {"method": method, "allocator": method, "budget_bits": 3.0, "router_finetune": False,
            "evaluate": fp, "eval_digest": "d"}


def test_a_method_pairs_with_the_uniform_quantized_like_it():
    """Two uniform rows at one budget (a quantizer ablation in the same workdir): each mode row
    is compared with its own. With one label for both, the later uniform took the pairing."""
    quants = [DEFAULT, dict(DEFAULT, act_order=True), DEFAULT]
    rows = [_row("uniform", "u"), _row("uniform", "u_ao"), _row("mode", "m")]
    for row, label in zip(rows, report.quantizer_labels(quants), strict=True):
        row["quantizer"] = label
    n = 40
    kl = {"u": np.full(n, 1.0), "u_ao": np.full(n, 4.0), "m": np.full(n, 2.0)}
    samples = {fp: {"kl": v, "kl_tokens": np.ones(n)} for fp, v in kl.items()}
    out = report.with_intervals(rows, samples, resamples=20)
    mode = next(r for r in out if r["method"] == "mode")
    assert np.isclose(mode["vs_uniform"]["kl_ratio"][0], 2.0)  # against "u", not "u_ao" (0.5)
