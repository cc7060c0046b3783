"""The quantize stage says in words what went wrong or thin in GPTQ (apply.notes), and the
report lists each note once with the rows it concerns."""

from mode_jax import report
from mode_jax.quant import apply


def _fallback(moe_layer, expert, proj, tokens, reason):
    return {"linear": f"layers.{moe_layer + 1}.mlp.experts.{proj}", "layer": moe_layer + 1,
            "moe_layer": moe_layer, "expert": expert, "tokens": tokens, "reason": reason}


def test_a_clean_run_has_no_notes():
    clean = {"rtn_fallback": [], "damp_escalations": [], "expert_tokens": [[300, 200]],
             "expert_input_widths": {"gate_up": 128, "down": 64}}
    assert apply.notes(clean) == []
    assert apply.notes({}) == []  # round-to-nearest, or an artifact older than the notes


def test_notes_name_fallbacks_thin_experts_and_raised_damping():
    rep = {
        "rtn_fallback": [_fallback(0, 2, "gate_up", 0, "no calibration tokens"),
                         _fallback(0, 2, "down", 0, "no calibration tokens"),
                         {"linear": "layers.0.mlp.down_proj",
                          "reason": "Cholesky failed at every damping"}],
        "expert_tokens": [[10, 129, 0], [127, 5, 4000]],
        "expert_input_widths": {"gate_up": 128, "down": 64},
        "damp_escalations": [{"linear": "layers.1.self_attn.o_proj", "damp": 0.1},
                             {"linear": "layers.2.mlp.experts.down", "expert": 3, "damp": 1.0}],
    }
    lines = apply.notes(rep)
    assert lines == [
        "round-to-nearest instead of GPTQ for 2 linear(s), no calibration tokens: "
        "MoE layer 0 expert 2 gate_up, MoE layer 0 expert 2 down",
        "round-to-nearest instead of GPTQ for 1 linear(s), Cholesky failed at every damping: "
        "layers.0.mlp.down_proj",
        # 0 tokens is a fallback above, not thin; 129 >= the widest input (128)
        "3 routed expert(s) saw fewer GPTQ calibration tokens than an input width (down 64, "
        "gate_up 128), so damping rather than data shapes their GPTQ; raise "
        "data.num_gptq_samples: MoE layer 1 expert 1 (5 tokens), MoE layer 0 expert 0 "
        "(10 tokens), MoE layer 1 expert 0 (127 tokens)",
        "GPTQ raised the damping of 2 linear(s) to factor their Hessian (up to 1 x mean "
        "diagonal): layers.1.self_attn.o_proj, layers.2.mlp.experts.down expert 3",
    ]
    assert apply.notes(rep, most=1)[2].endswith("MoE layer 1 expert 1 (5 tokens) and 2 more")


def test_report_lists_each_note_once_with_its_rows():
    rows = [{"method": m, "budget_bits": 3.0, "quantizer": "gptq", "quantize_notes": notes}
            for m, notes in (("uniform", ["thin"]), ("mode/text+key", ["thin", "fallback"]),
                             ("pmq", []))]
    lines = report._notes(rows)
    assert lines[-2:] == ["- thin (uniform at 3 bits, gptq; mode/text+key at 3 bits, gptq)",
                          "- fallback (mode/text+key at 3 bits, gptq)"]
    for r in rows:
        r["quantize_notes"] = ["thin"]
    assert report._notes(rows)[-1] == "- thin (every row)"
    assert report._notes([dict(r, quantize_notes=[]) for r in rows]) == []
