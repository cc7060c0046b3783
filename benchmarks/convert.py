"""Time and peak memory of converting a Kimi-VL checkpoint directory to the NNX model.

Writes a synthetic checkpoint in the published Kimi-VL layout with the real Kimi-VL-A3B layer
widths (text hidden 2048, vocab 163840, MLA kv_lora 512 with nope/rope/v 128/64/128 and 16 heads,
a dense first layer of 11264, 64 routed experts of 1408 + 2 shared, top-6; MoonViT 1152 wide,
16 heads, MLP 4304, 64x64 position table; projector 4608 -> 2048; values from
../shared/docs/models.md) but only a few layers, in bf16, one shard per block plus an index.
Then converts it with `mode_jax.load` in a fresh process and prints wall time and that process's
peak RSS beside the checkpoint size.

    python -m benchmarks.convert                       # 3 text layers, 2 vision layers, bf16
    python -m benchmarks.convert --text_layers 2 --dtype float32 --dir /tmp/kimivl-synth
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

TEXT = dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048,
            intermediate_size=11264, moe_intermediate_size=1408, num_attention_heads=16,
            num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
            n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1,
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
            routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=800000.0,
            hidden_act="silu", max_position_embeddings=131072)
VISION = dict(model_type="moonvit", hidden_size=1152, num_attention_heads=16,
              intermediate_size=4304, patch_size=14, init_pos_emb_height=64,
              init_pos_emb_width=64, merge_kernel_size=[2, 2])


def shapes(text_layers: int, vision_layers: int) -> dict[str, dict[str, tuple]]:
    """Shard name -> {tensor name: shape}, in the published Kimi-VL layout."""
    t, v = TEXT, VISION
    d, heads, vd = t["hidden_size"], t["num_attention_heads"], v["hidden_size"]
    qk = t["qk_nope_head_dim"] + t["qk_rope_head_dim"]
    shards: dict[str, dict[str, tuple]] = {}
    vis = {"vision_tower.patch_embed.proj.weight": (vd, 3, 14, 14),
           "vision_tower.patch_embed.proj.bias": (vd,),
           "vision_tower.patch_embed.pos_emb.weight": (64, 64, vd)}
    for i in range(vision_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        for name, shape in (("wqkv", (3 * vd, vd)), ("wo", (vd, vd)),
                            ("mlp.fc0", (v["intermediate_size"], vd)),
                            ("mlp.fc1", (vd, v["intermediate_size"]))):
            vis[f"{b}{name}.weight"], vis[f"{b}{name}.bias"] = shape, shape[:1]
        for name in ("norm0", "norm1"):
            vis[f"{b}{name}.weight"] = vis[f"{b}{name}.bias"] = (vd,)
    vis["vision_tower.encoder.final_layernorm.weight"] = (vd,)
    vis["vision_tower.encoder.final_layernorm.bias"] = (vd,)
    wide = 4 * vd
    vis.update({"multi_modal_projector.pre_norm.weight": (vd,),
                "multi_modal_projector.pre_norm.bias": (vd,),
                "multi_modal_projector.linear_1.weight": (wide, wide),
                "multi_modal_projector.linear_1.bias": (wide,),
                "multi_modal_projector.linear_2.weight": (d, wide),
                "multi_modal_projector.linear_2.bias": (d,)})
    shards["vision"] = vis
    for li in range(text_layers):
        p = f"language_model.model.layers.{li}."
        layer = {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                 p + "self_attn.q_proj.weight": (heads * qk, d),
                 p + "self_attn.kv_a_proj_with_mqa.weight":
                     (t["kv_lora_rank"] + t["qk_rope_head_dim"], d),
                 p + "self_attn.kv_a_layernorm.weight": (t["kv_lora_rank"],),
                 p + "self_attn.kv_b_proj.weight":
                     (heads * (t["qk_nope_head_dim"] + t["v_head_dim"]), t["kv_lora_rank"]),
                 p + "self_attn.o_proj.weight": (d, heads * t["v_head_dim"])}
        if li < t["first_k_dense_replace"]:
            f = t["intermediate_size"]
            layer.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                          p + "mlp.down_proj.weight": (d, f)})
        else:
            f, e = t["moe_intermediate_size"], t["n_routed_experts"]
            layer.update({p + "mlp.gate.weight": (e, d),
                          p + "mlp.gate.e_score_correction_bias": (e,)})
            for x in range(e):
                q = f"{p}mlp.experts.{x}."
                layer.update({q + "gate_proj.weight": (f, d), q + "up_proj.weight": (f, d),
                              q + "down_proj.weight": (d, f)})
            s = f * t["n_shared_experts"]
            layer.update({p + "mlp.shared_experts.gate_proj.weight": (s, d),
                          p + "mlp.shared_experts.up_proj.weight": (s, d),
                          p + "mlp.shared_experts.down_proj.weight": (d, s)})
        shards[f"layer{li}"] = layer
    shards["embed"] = {"language_model.model.embed_tokens.weight": (t["vocab_size"], d),
                       "language_model.model.norm.weight": (d,),
                       "language_model.lm_head.weight": (t["vocab_size"], d)}
    return shards


def write_checkpoint(directory: Path, text_layers: int, vision_layers: int) -> None:
    """Random bf16 tensors (correction biases float32), one safetensors shard per block."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    plan = shapes(text_layers, vision_layers)
    weight_map = {}
    for i, tensors in enumerate(plan.values()):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        data = {}
        for name, shape in tensors.items():
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            data[name] = x if name.endswith("correction_bias") else x.astype(ml_dtypes.bfloat16)
            weight_map[name] = file
        save_file(data, directory / file)
        del data
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "kimi_vl", "media_placeholder_token_id": 163605,
              "text_config": {**TEXT, "num_hidden_layers": text_layers},
              "vision_config": {**VISION, "num_hidden_layers": vision_layers}}
    (directory / "config.json").write_text(json.dumps(config, indent=1))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM; ru_maxrss would include the
    parent's peak inherited across fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(directory: Path, dtype: str) -> None:
    """Child process: import, convert, block until ready; print one JSON line of figures."""
    import jax
    from flax import nnx

    import mode_jax

    rss_imports = peak_rss()
    start = time.perf_counter()
    model = mode_jax.load(directory, dtype=dtype)
    state = nnx.state(model)
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - start
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(),
                      "rss_after_imports": rss_imports, "model_bytes": nbytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text_layers", type=int, default=3)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        convert(args.child, args.dtype)
        return
    directory = args.dir or Path(tempfile.mkdtemp(prefix="kimivl-synth-"))
    try:
        t0 = time.perf_counter()
        write_checkpoint(directory, args.text_layers, args.vision_layers)
        written = time.perf_counter() - t0
        from mode_jax.convert.safetensors_io import checkpoint_nbytes, shard_map

        size, shards = checkpoint_nbytes(directory), len(shard_map(directory))
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.convert", "--child", str(directory),
             "--dtype", args.dtype],
            check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        r = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    gib = 2.0**30
    print(f"checkpoint: {args.text_layers} text layers, {args.vision_layers} vision layers, "
          f"real Kimi-VL-A3B widths, bf16, {shards} shards: {size / gib:.2f} GiB "
          f"(written in {written:.1f} s)")
    print(f"convert to {args.dtype}: {r['seconds']:.1f} s, model {r['model_bytes'] / gib:.2f} GiB")
    print(f"peak RSS of the converting process: {r['peak_rss'] / gib:.2f} GiB "
          f"({r['rss_after_imports'] / gib:.2f} GiB after imports; "
          f"{r['peak_rss'] / size:.2f}x the checkpoint size)")
    print("reproduce: python -m benchmarks.convert "
          f"--text_layers {args.text_layers} --vision_layers {args.vision_layers} "
          f"--dtype {args.dtype}")


if __name__ == "__main__":
    main()
