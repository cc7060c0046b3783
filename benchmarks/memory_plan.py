"""Device memory of the calibration and sensitivity programs at Kimi-VL-A3B's real size,
without the model or a GPU: each jitted step is compiled for abstract arguments
(`jax.ShapeDtypeStruct`, no weights allocated) and XLA's buffer assignment reports its
arguments, outputs and temporaries (`compiled.memory_analysis()`).

The language model is DeepSeek-V3 at Kimi-VL-A3B's published dimensions (configs/kimivl.py
`reference`; bf16, the vision tower left out: its features enter as `inputs_embeds`), batch
`--batch` x `--seq` tokens, half of them image tokens. Figures are for the backend that compiles
(run it on the GPU to get the GPU's; CPU's buffer assignment differs, e.g. the experts run as
padded blocks there instead of `ragged_dot`), so read them as the size of each program, and the
difference between settings as what a setting costs.

    python -m benchmarks.memory_plan
    python -m benchmarks.memory_plan --seq 2048 --kl_chunk 4 --trace_layers 1,4
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import kimivl
from mode_jax.calib import passes, sensitivity
from mode_jax.models import deepseek_v3 as dv

GIB = 2.0**30


def kimi_text_config(layers: int) -> dv.TextConfig:
    r = kimivl.get_config().reference
    return dv.TextConfig(
        vocab_size=r.vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=r.num_heads, kv_lora_rank=r.kv_lora_rank,
        qk_nope_head_dim=r.qk_nope_head_dim, qk_rope_head_dim=r.qk_rope_head_dim,
        v_head_dim=r.v_head_dim, moe_intermediate_size=r.moe_intermediate_size,
        n_routed_experts=r.n_routed_experts, num_experts_per_tok=r.num_experts_per_tok,
        n_shared_experts=r.n_shared_experts, first_k_dense_replace=r.first_k_dense_replace,
        routed_scaling_factor=r.routed_scaling_factor, rope_theta=r.rope_theta,
    )


def hutchinson_program(model, layers, batch, grid, image_token_id):
    """One Hutchinson pass (`passes._hessian_batch`, 2 probes) over the experts of `layers`,
    lowered for `model` and `batch` (concrete or abstract)."""
    graphdef, experts, rest = nnx.split(model, passes._routed_experts_of(layers), ...)
    return passes._hessian_batch.lower(graphdef, experts, rest, batch, grid, jax.random.key(0),
                                       2, image_token_id, "hessian")


def sizes(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes / GIB, "outputs": m.output_size_in_bytes / GIB,
            "temporaries": m.temp_size_in_bytes / GIB}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=27, help="decoder layers (Kimi-VL-A3B: 27)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--kl_chunk", type=int, default=8, help="logit_kl variants per folded batch")
    p.add_argument("--expert_chunk", type=int, default=16, help="token estimators' chunk")
    p.add_argument("--trace_layers", default="1,4", help="MoE layers per Hutchinson pass")
    a = p.parse_args(argv)
    command = "python -m benchmarks.memory_plan " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    print("command:", command.strip())
    cfg = kimi_text_config(a.layers)
    abstract = nnx.eval_shape(lambda: dv.DeepseekV3(cfg, param_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    b, t, d = a.batch, a.seq, cfg.hidden_size
    image_id = 5
    batch = {"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "inputs_embeds": jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)}
    stats_cfg = passes.StatsConfig(image_id, (1, 2, 3))
    bits = jax.ShapeDtypeStruct((3,), jnp.int32)
    layer = cfg.moe_layers[0]
    gu = jax.ShapeDtypeStruct(abstract.layers[layer].mlp.experts.gate_up.shape, jnp.bfloat16)
    dn = jax.ShapeDtypeStruct(abstract.layers[layer].mlp.experts.down.shape, jnp.bfloat16)
    params = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) / GIB
    layer_experts = (np.prod(gu.shape) + np.prod(dn.shape)) * 2 / GIB
    print(f"DeepSeek-V3 at Kimi-VL-A3B size: {a.layers} layers ({len(cfg.moe_layers)} MoE, "
          f"{cfg.n_routed_experts} experts of {d} x {cfg.moe_intermediate_size}), bf16, "
          f"{params:.1f} GiB of parameters ({layer_experts:.2f} GiB of experts per MoE layer); "
          f"batch {b} x {t}; compiled for {jax.devices()[0].device_kind}")

    def copies(shape):
        return jax.ShapeDtypeStruct((3, *shape.shape), shape.dtype)

    prefix = jax.eval_shape(
        lambda s, bt: passes._prefix_batch(graphdef, s, bt, stats_cfg, None, 0), state, batch)
    n_tok, cap = b * t, 2 ** int(np.ceil(np.log2(b * t * cfg.num_experts_per_tok
                                                 / cfg.n_routed_experts * 2)))
    tokens = sensitivity.LayerTokens(
        jax.ShapeDtypeStruct((n_tok, d), jnp.float32),
        jax.ShapeDtypeStruct((n_tok, cfg.num_experts_per_tok), jnp.int32),
        jax.ShapeDtypeStruct((n_tok, cfg.num_experts_per_tok), jnp.float32),
        jax.ShapeDtypeStruct((n_tok,), jnp.int8),
        jax.ShapeDtypeStruct((n_tok, d), jnp.float32),
        jax.ShapeDtypeStruct((n_tok, d), jnp.float32))
    e = a.expert_chunk
    chunk_args = (jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((e, cap), jnp.int32),
                  jax.ShapeDtypeStruct((e, cap), jnp.float32),
                  jax.ShapeDtypeStruct((e, cap), jnp.bool_))
    programs = {
        "frequency pass step": lambda: passes._frequency_batch.lower(
            graphdef, state, batch, stats_cfg, None),
        "token cache step (with gradients)": lambda: passes._token_batch.lower(
            graphdef, state, batch, stats_cfg, None, True),
        "round-to-nearest copies of one layer": lambda: sensitivity._quantize_layer.lower(
            gu, dn, bits, 128),
        f"token estimators, {e} experts (copies inside)": lambda: sensitivity._layer_sums.lower(
            tokens, *chunk_args, gu, dn, None, None, chunk_args[0], bits, 128),
        "logit_kl prefix step": lambda: passes._prefix_batch.lower(
            graphdef, state, batch, stats_cfg, None, 0),
        f"logit_kl first MoE layer, chunk {a.kl_chunk}": lambda: passes._kl_layer.lower(
            graphdef, state, prefix, gu, dn, copies(gu), copies(dn), layer, a.kl_chunk),
    }
    for k in [int(x) for x in a.trace_layers.split(",") if x]:
        block = cfg.moe_layers[:k]
        programs[f"Hutchinson pass, {len(block)} MoE layer(s)"] = functools.partial(
            hutchinson_program, abstract, block, batch, None, image_id)
    print(f"{'program':48s} {'arguments':>10s} {'outputs':>9s} {'temps':>9s} {'compile':>8s}")
    for name, lower in programs.items():
        start = time.perf_counter()
        s = sizes(lower().compile())
        print(f"{name:48s} {s['arguments']:8.2f} G {s['outputs']:7.2f} G "
              f"{s['temporaries']:7.2f} G {time.perf_counter() - start:7.0f}s", flush=True)
    print("(GiB; arguments include the model's parameters where the program takes them)")
    print("command:", command.strip())


if __name__ == "__main__":
    main()
