"""The text-only training probe runs end to end and reports every variant."""

from mode_jax.testbed import text_probe


def test_probe_scores_every_variant_of_a_tiny_run():
    cfg = text_probe.ProbeConfig(names=3, arithmetic_max=4, expert_width=16, shared_experts=0,
                                 experts=8, top_k=3, steps=2, batch=8, eval_samples=10,
                                 layers=3)
    results = text_probe.run(cfg, log=lambda _: None)
    assert list(results) == ["full precision", "routed off", "RTN 2-bit", "RTN 3-bit",
                             "RTN 4-bit"]  # no shared expert to switch off
    assert results["full precision"]["n"] == 10
    routing = results["full precision"]["routing"]["text"]  # [MoE layers, experts] counts
    assert len(routing) == 2  # --layers 3: one dense layer, then two MoE layers
    assert all(len(layer) == 8 for layer in routing)
    assert all(sum(layer) % 3 == 0 and sum(layer) > 0 for layer in routing)  # top-3 per token
    for name, res in results.items():
        assert set(res["accuracy"]["family"]) == {"text"}
        assert name == "full precision" or res["kl"]["all"] >= 0
    lines = text_probe.table(results).splitlines()
    assert len(lines) == 2 + len(results) and lines[2].startswith("| full precision |")
