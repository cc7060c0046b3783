"""Memory of the sensitivity stage's estimators: quantized expert copies for the whole model
at once (how the stage held them until 2026-12-05) against a layer or a chunk of experts at a
time (now), and MoPEQ's Hessian trace with every MoE layer probed in one pass against one layer
per pass.

On a random DeepSeek-V3 text model (Kimi-VL's architecture at reduced widths, float32):
- for token_costs and logit_kl, the largest total of live jax arrays beyond the model and the
  token cache at any call of the estimators' jitted steps (what is held between dispatches:
  the copies), counted by wrapping those steps;
- for the Hessian trace, XLA's own figure for one compiled pass (`memory_analysis()`: the
  temporaries plus the outputs of `_hessian_batch`), since its probes live inside one program.
Then the copies projected to Kimi-VL-A3B (26 MoE layers of 64 experts, 2048 x 1408, bf16, three
candidate bits). The figures are the same on any backend (they count arrays, not a process).

    python -m benchmarks.sensitivity_memory
    python -m benchmarks.sensitivity_memory --hidden 1024 --moe_hidden 704 --experts 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks.memory_plan import hutchinson_program
from mode_jax.calib import passes, sensitivity
from mode_jax.models import deepseek_v3 as dv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers
import qwen3vl_tiny  # noqa: E402

KIMI = {"moe_layers": 26, "experts": 64, "hidden": 2048, "moe_hidden": 1408, "bytes": 2}
GIB = 2.0**30


def build(a):
    """(model, batches, StatsConfig) of a random DeepSeek-V3 with image-like prompts."""
    cfg = dv.TextConfig(
        vocab_size=512, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=4, kv_lora_rank=a.hidden // 4,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_intermediate_size=a.moe_hidden, n_routed_experts=a.experts, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.0,
    )
    abstract = nnx.eval_shape(lambda: dv.DeepseekV3(cfg, rngs=nnx.Rngs(0)))
    model = qwen3vl_tiny.random_weights(abstract, tables=("embedding", "e_score_correction_bias"))
    rng = np.random.default_rng(0)
    img, special = 4, (1, 2, 3)
    batches = []
    for _ in range(a.batches):
        ids = rng.integers(8, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32)
        ids[:, 1:1 + a.seq // 2] = img
        ids[:, 1 + a.seq // 2] = special[2]
        emb = rng.standard_normal((a.batch, a.seq, a.hidden), np.float32)
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "inputs_embeds": emb})
    return model, batches, passes.StatsConfig(img, special, key_ratio=0.2)


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def held_between_calls(fn, targets) -> tuple[int, float]:
    """(largest live bytes above the start at any call of `targets`, seconds) while fn runs."""
    base, peak = live_bytes(), [0]
    saved = [(module, name, getattr(module, name)) for module, name in targets]

    def spy(inner):
        def wrapped(*args, **kwargs):
            peak[0] = max(peak[0], live_bytes() - base)
            return inner(*args, **kwargs)
        return wrapped

    for module, name, inner in saved:
        setattr(module, name, spy(inner))
    try:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return peak[0], time.perf_counter() - start
    finally:
        for module, name, inner in saved:
            setattr(module, name, inner)


def trace_program_bytes(model, batch, cfg, layers) -> int:
    """Temporaries + outputs of one compiled Hutchinson pass over the experts of `layers`."""
    dev, grid = passes.device_batch(model, batch)
    m = hutchinson_program(model, layers, dev, grid, cfg.image_token_id).compile().memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe_hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--group", type=int, default=128)
    a = p.parse_args(argv)
    command = "python -m benchmarks.sensitivity_memory " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    print("command:", command.strip())
    model, batches, cfg = build(a)
    bits = np.array([2, 3, 4], np.int32)
    moe_layers = model.config.moe_layers
    layer_bytes = a.experts * 3 * a.hidden * a.moe_hidden * 4  # float32 gate, up, down
    cache = passes.collect_tokens(model, batches, cfg, gradients=False)

    def all_copies():
        return [sensitivity.quantize_layer(model.layers[i].mlp.experts.gate_up[...],
                                           model.layers[i].mlp.experts.down[...], bits, a.group)
                for i in moe_layers]

    token_step = [(sensitivity, "_layer_sums")]
    kl_step = [(passes, "_kl_layer")]
    cases = {
        "token_costs, copies of every layer": (
            lambda: passes.token_costs(model, cache, bits, a.group, quantized=all_copies()),
            token_step),
        "token_costs, per chunk of experts (now)": (
            lambda: passes.token_costs(model, cache, bits, a.group), token_step),
        "logit_kl, copies of every layer": (
            lambda: passes.logit_kl_pass(model, batches, cfg, bits, a.group,
                                         quantized=all_copies()), kl_step),
        "logit_kl, one layer's copies (now)": (
            lambda: passes.logit_kl_pass(model, batches, cfg, bits, a.group), kl_step),
    }
    print(f"model: DeepSeek-V3, {len(moe_layers)} MoE layers x {a.experts} experts of "
          f"{a.hidden} x {a.moe_hidden}, float32 ({layer_bytes / GIB:.3f} GiB of experts per "
          f"layer); {a.batches} batches of {a.batch} x {a.seq}; bits 2/3/4; "
          f"{jax.devices()[0].device_kind}")
    print(f"{'held between estimator calls':44s} {'GiB':>8s} {'x one layer':>12s} "
          f"{'seconds':>8s}")
    for label, (fn, targets) in cases.items():
        fn()  # compile first
        held, seconds = held_between_calls(fn, targets)
        print(f"{label:44s} {held / GIB:8.3f} {held / layer_bytes:12.2f} {seconds:8.1f}")
    print(f"{'one compiled Hutchinson pass (temporaries + outputs)':56s} {'GiB':>8s} "
          f"{'x one layer':>12s}")
    for label, layers in (("every MoE layer per pass", moe_layers),
                          ("one MoE layer per pass", moe_layers[:1])):
        n = trace_program_bytes(model, batches[0], cfg, layers)
        print(f"{label:56s} {n / GIB:8.3f} {n / layer_bytes:12.2f}")
    kimi_layer = KIMI["experts"] * 3 * KIMI["hidden"] * KIMI["moe_hidden"] * KIMI["bytes"]
    copies = 3 * kimi_layer
    print(f"Kimi-VL-A3B in bf16: experts {KIMI['moe_layers'] * kimi_layer / GIB:.1f} GiB; "
          f"3-bit-candidate copies of every layer {KIMI['moe_layers'] * copies / GIB:.1f} GiB, "
          f"of one layer {copies / GIB:.2f} GiB, of a chunk of 16 experts "
          f"{copies * 16 / KIMI['experts'] / GIB:.2f} GiB")
    print("command:", command.strip())


if __name__ == "__main__":
    main()
