"""Report rows name the quantizer settings that tell them apart, and pair by them."""

import numpy as np

from mode_jax import report

QUANT = {"method": "gptq", "group_size": 128, "damp": 0.01, "act_order": False,
         "attention_bits": 4, "router_finetune": False}
DEFAULT = {"quant": QUANT, "data.num_gptq_samples": 64, "seed": 0}


def _with(**changes):
    """DEFAULT's recorded config with quant.* or other keys (data_num_gptq_samples=...) set."""
    quant = {k: v for k, v in changes.items() if k in QUANT}
    other = {k.replace("data_", "data.", 1): v for k, v in changes.items() if k not in QUANT}
    return {**DEFAULT, **other, "quant": {**QUANT, **quant}}


def test_only_the_settings_that_differ_between_rows_are_named():
    assert report.quantizer_labels([DEFAULT, _with(router_finetune=True)]) == \
        ["gptq", "gptq"]  # router fine-tuning has its own column
    labels = report.quantizer_labels([DEFAULT, _with(act_order=True),
                                      _with(method="rtn", attention_bits=16),
                                      _with(data_num_gptq_samples=256)])
    assert labels == ["gptq act_order=False attention_bits=4 data.num_gptq_samples=64",
                      "gptq act_order=True attention_bits=4 data.num_gptq_samples=64",
                      "rtn attention_bits=16",  # GPTQ's settings and data mean nothing to rtn
                      "gptq act_order=False attention_bits=4 data.num_gptq_samples=256"]
    assert report.quantizer_labels([]) == []


def _row(method, fp):
    return {"method": method, "allocator": method, "budget_bits": 3.0, "router_finetune": False,
            "evaluate": fp, "eval_digest": "d"}


def test_a_method_pairs_with_the_uniform_quantized_like_it():
    """Two uniform rows at one budget (a quantizer ablation in the same workdir): each mode row
    is compared with its own. With one label for both, the later uniform took the pairing."""
    quants = [DEFAULT, _with(act_order=True), DEFAULT]
    rows = [_row("uniform", "u"), _row("uniform", "u_ao"), _row("mode", "m")]
    for row, label in zip(rows, report.quantizer_labels(quants), strict=True):
        row["quantizer"] = label
    n = 40
    kl = {"u": np.full(n, 1.0), "u_ao": np.full(n, 4.0), "m": np.full(n, 2.0)}
    samples = {fp: {"kl": v, "kl_tokens": np.ones(n)} for fp, v in kl.items()}
    out = report.with_intervals(rows, samples, resamples=20)
    mode = next(r for r in out if r["method"] == "mode")
    assert np.isclose(mode["vs_uniform"]["kl_ratio"][0], 2.0)  # against "u", not "u_ao" (0.5)


def test_sensitivity_column_names_what_each_allocation_read():
    """Both MoPEQ curvatures are named: configs/testbed.py makes Gauss-Newton the default, so a
    bare '-' would not say which trace a row used."""
    sens = {"estimator": "logit_kl", "quantizer": "rtn", "trace_curvature": "hessian"}
    assert report._sensitivity_label("mopeq-budget", sens) == "hessian trace"
    assert report._sensitivity_label(
        "mopeq", dict(sens, trace_curvature="gauss_newton")) == "gauss_newton trace"
    assert report._sensitivity_label("mopeq", {"estimator": "expert_mse"}) == "hessian trace"
    assert report._sensitivity_label("mode", dict(sens, quantizer="gptq")) == "logit_kl/gptq"
    assert report._sensitivity_label("pmq", sens) is None
    assert report._sensitivity_label("gemq", dict(sens, quantizer="gptq")) == "own costs/gptq"
