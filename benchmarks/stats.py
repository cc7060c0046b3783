"""MODE statistics passes: speed against PyTorch / per-expert loops, and how well the cheap
sensitivity estimators rank experts like the exact logit KL.

The model is the shipped testbed (`--checkpoint checkpoints/testbed`, the default): its
DeepSeek-V3 language model in both frameworks, the transformers `DeepseekV3ForCausalLM` loaded
from the same safetensors. Prompts are the statistics stage's own calibration batches (image
questions of the task suite, human turn only); the vision tower runs once (mode_jax) and both
frameworks get the same `inputs_embeds`, since transformers has no MoonViT. `--checkpoint
random` instead builds a random DeepSeek-V3 (`--experts`, `--top_k`, ... set its shape) with
synthetic image-like prompts, for scaling experiments.

Figures printed:
1. frequency pass (jitted; per-layer key tokens + all counts) in real tokens/s, against the
   transformers forward of the same model on the same batches (plain logits, no statistics),
   and each side's arithmetic rate by XLA's flop count of its program (whether a speed-up
   comes from doing less arithmetic or from running it faster).
2. expert_mse vmapped over experts and bits against a per-expert, per-bit loop of jitted calls
   (the structure of the reference code), with the fake quantization shared (as the stage does)
   and end to end (each side quantizing for itself).
3. Spearman rank correlation of expert_mse and of the Fisher estimator with exact logit_kl, per
   modality: over all (layer, expert, bit) entries, and the mean over (layer, bit) of the
   rank correlation across experts (what a per-layer allocation sees); with each one's cost.

Timings are the best of 3 compiled runs (first-run seconds, compilation included, in
brackets). Thread counts come from the environment; on a shared, loaded machine run single-
threaded (oversubscribed OpenMP threads slow PyTorch's many small ops far more than XLA):

    python -m benchmarks.stats
    OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python -m benchmarks.stats
    python -m benchmarks.stats --checkpoint random --experts 32 --top_k 4   # random model
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import mode_jax
from mode_jax import preprocess
from mode_jax.calib import data, passes, sensitivity, sources
from mode_jax.convert import deepseek_v3_keys
from mode_jax.models import moe
from mode_jax.quant import rtn

IMG, SPECIAL = 4, (1, 2, 3)  # image placeholder; bos, role word, end-of-image marker


def testbed_models(a):
    """(torch LM, mode_jax LM, StatsConfig, batch maker) for the checkpoint at `a.checkpoint`."""
    path = Path(a.checkpoint)
    model = mode_jax.load(path)
    text_cfg = json.loads((path / "config.json").read_text())["text_config"]
    tm = DeepseekV3ForCausalLM(DeepseekV3Config(**text_cfg)).eval()
    prefix = "language_model."
    flat = {}
    for f in sorted(path.glob("*.safetensors")):
        flat |= {k[len(prefix):]: v for k, v in load_file(f).items() if k.startswith(prefix)}
    weights = {k: torch.from_numpy(v) for k, v in flat.items() if ".experts." not in k}
    for i in model.language_model.config.moe_layers:  # transformers stacks experts: [E, 2F, D]
        e = f"model.layers.{i}.mlp.experts"
        per = range(text_cfg["n_routed_experts"])
        weights[f"{e}.gate_up_proj"] = torch.from_numpy(np.stack(
            [np.concatenate([flat[f"{e}.{j}.gate_proj.weight"], flat[f"{e}.{j}.up_proj.weight"]])
             for j in per]))
        weights[f"{e}.down_proj"] = torch.from_numpy(np.stack(
            [flat[f"{e}.{j}.down_proj.weight"] for j in per]))
    missing, unexpected = tm.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"torch LM keys: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = preprocess.load_tokenizer(path)
    cfg = passes.StatsConfig(model.config.media_placeholder_token_id,
                             tuple(int(i) for i in data.special_token_ids(
                                 tokenizer, model.config.media_placeholder_token_id)),
                             key_ratio=a.key_ratio)

    def make(n, seed):
        """Calibration batches as the stats stage builds them, with the decoder inputs."""
        samples = sources.testbed_samples(n, seed, "stats", str(path))
        out = []
        for batch in data.batches(samples, tokenizer, a.batch,
                                  pad_token_id=model.config.pad_token_id):
            dev, grid = passes.device_batch(model, batch)
            emb = np.asarray(passes.embed_inputs(model, dev, grid)[0], np.float32)
            out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "inputs_embeds": emb})
        return out

    return tm, model.language_model, cfg, make


def random_models(a):
    """(torch LM, mode_jax LM, StatsConfig, batch maker) of a random DeepSeek-V3."""
    cfg = DeepseekV3Config(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
        moe_intermediate_size=a.moe_hidden, num_hidden_layers=a.layers, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=a.hidden // 2, q_lora_rank=None,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k, n_shared_experts=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.446, max_position_embeddings=4 * a.seq,
    )
    torch.manual_seed(a.seed)
    tm = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            elif p.numel():
                p.normal_(0, p.shape[-1] ** -0.5)  # torch stores [out, in]: fan_in last
        for layer in tm.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    embed = lambda ids: (tm.model.embed_tokens(torch.as_tensor(ids, device=tm.device))
                         .detach().cpu().numpy().copy())
    stats_cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=a.key_ratio)
    return (tm, deepseek_v3_keys.from_torch(tm), stats_cfg,
            lambda n, seed: make_batches(a, n, embed, seed))


def make_batches(a, n, embed, seed):
    """Right-padded prompts with an image run; inputs_embeds from `embed` plus patch features."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, a.batch):
        b = min(a.batch, n - start)
        ids = rng.integers(8, a.vocab, size=(b, a.seq)).astype(np.int32)
        ids[:, 0], ids[:, 1] = SPECIAL[0], SPECIAL[1]
        ids[:, 2:2 + a.image_tokens] = IMG
        ids[:, 2 + a.image_tokens] = SPECIAL[2]
        mask = np.ones_like(ids)
        for i in range(1, b, 2):
            mask[i, a.seq - rng.integers(1, a.seq // 4):] = 0
        emb = embed(ids)
        side = int(np.sqrt(a.image_tokens))
        for i in range(b):  # smooth, low-rank patch features at unit RMS
            grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
            freq = rng.normal(size=(2, 4)) / side
            coef = np.cos(grid @ freq * 2 * np.pi + rng.uniform(0, 6, 4))
            feat = coef @ rng.normal(size=(4, a.hidden)) + 0.5 * rng.normal(
                size=(len(grid), a.hidden))
            feat /= np.sqrt((feat**2).mean(-1, keepdims=True))
            emb[i, 2:2 + len(grid)] = feat
        out.append({"input_ids": ids, "attention_mask": mask,
                    "inputs_embeds": emb.astype(np.float32)})
    return out


def program_flops(model, batches, cfg) -> tuple[float, float]:
    """XLA's flop count (cost analysis of the optimized program) of the frequency pass over
    `batches` and of the plain logits forward of the same model: how much arithmetic each
    side does (the transformers forward does the forward's)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, emb, mask: nnx.merge(graphdef, st)(
        inputs_embeds=emb, attention_mask=mask).logits)
    per_shape, total_pass, total_forward = {}, 0.0, 0.0
    for batch in batches:  # one compile per distinct batch shape
        dev, grid = passes.device_batch(model, batch)
        shape = dev["inputs_embeds"].shape
        if shape not in per_shape:
            per_shape[shape] = (
                _flops(passes._frequency_batch.lower(graphdef, state, dev, cfg, grid)),
                _flops(forward.lower(state, dev["inputs_embeds"], dev["attention_mask"])))
        total_pass += per_shape[shape][0]
        total_forward += per_shape[shape][1]
    return total_pass, total_forward


def _flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def timed(fn, repeats=3):
    """(result, best seconds of `repeats` runs after the first, seconds of the first run);
    with repeats=0 both are the first run."""
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return result, min(times[1:] or times), times[0]


# ---------------------------------------------------------------- per-expert loop baseline


@functools.partial(jax.jit, static_argnames="group_size")
def _one_expert(x, is_m, gate_up, down, bits, group_size):
    """The loop's unit of work: one expert, one bit, its M-tokens (padded rows masked)."""
    guq = rtn.fake_quantize(gate_up, bits, group_size)
    dnq = rtn.fake_quantize(down, bits, group_size)
    return _one_expert_q(x, is_m, gate_up, down, guq, dnq)


@jax.jit
def _one_expert_q(x, is_m, gate_up, down, guq, dnq):
    diff = moe.swiglu(x, guq, dnq) - moe.swiglu(x, gate_up, down)
    sq = jnp.mean(diff * diff, -1)
    return jnp.einsum("c,cm->m", sq, is_m) / jnp.maximum(is_m.sum(0), 1)


def loop_expert_mse(cache, weights, quantized, bits, group_size):
    """expert_mse_{text,vision} by a loop over layers, experts and bits (one call each)."""
    out = []
    for tok, (gu, dn), q in zip(cache.layers, weights, quantized, strict=True):
        res = np.zeros((gu.shape[0], len(bits), 2))
        for e in range(gu.shape[0]):
            rows = np.flatnonzero((tok.ids == e).any(-1))
            cap = int(2 ** np.ceil(np.log2(max(len(rows), 8))))
            x = np.zeros((cap, tok.x.shape[1]), np.float32)
            x[:len(rows)] = tok.x[rows]
            is_m = np.zeros((cap, 2), np.float32)
            for m, code in enumerate(sensitivity.MODALITY_CODES):
                is_m[:len(rows), m] = tok.modality[rows] == code
            for j, b in enumerate(bits):
                if q is None:
                    r = _one_expert(x, is_m, gu[e], dn[e], jnp.int32(b), group_size)
                else:
                    r = _one_expert_q(x, is_m, gu[e], dn[e], q[0][j, e], q[1][j, e])
                res[e, j] = np.asarray(r)
        out.append(res)
    return np.stack(out)


def vmapped_expert_mse(cache, weights, quantized, bits, group_size):
    """expert_mse_{text,vision} of every layer: vmapped over experts, one host sync per pass;
    without copies each chunk of experts is fake-quantized inside its step, as the stage does."""
    runs = []
    for j, (tok, (gu, dn)) in enumerate(zip(cache.layers, weights, strict=True)):
        guq, dnq = quantized[j] if quantized[j] is not None else (None, None)
        runs.append((tok._replace(g2_fisher=None, g2_loss=None), gu, dn, guq, dnq))
    costs = sensitivity.stacked_costs(runs, num_samples=1, bits=bits, group_size=group_size)
    return np.stack([costs[f"expert_mse_{m}"] for m in sensitivity.MODALITIES], -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _variant_logp(graphdef, state, emb, mask, layer, gate_up, down, select):
    """The reference's unit of work for logit_kl: the whole model re-run with layer `layer`'s
    experts replaced for the `select` tokens; last-position log-probabilities [B, V]."""
    model = nnx.merge(graphdef, state)
    ctx, _ = model.context(mask)
    h = emb
    for i, lyr in enumerate(model.layers):
        out, _ = lyr(h, ctx)
        if i == layer:
            replaced = nnx.merge(graphdef, state).layers[i]
            replaced.mlp.experts.gate_up[...] = gate_up
            replaced.mlp.experts.down[...] = down
            out = jnp.where(select[..., None], replaced(h, ctx)[0], out)
        h = out
    last = sensitivity.last_logits(model.logits(h), sensitivity.last_positions(mask))
    return jax.nn.log_softmax(last, -1)


def loop_logit_kl(model, batches, cfg, weights, quantized):
    """logit_kl_{text,vision} [L, E, B] by one full re-forward per (layer, expert, bit,
    modality) and batch, as the reference code runs it (same quantized weights)."""
    graphdef, state = nnx.split(model)
    codes = jax.jit(lambda st, b: tuple(passes.modality_codes(c) for c in passes.trace(
        nnx.merge(graphdef, st), b, cfg).classes))
    n_bits, n_exp = quantized[0][0].shape[:2]
    out = np.zeros((len(weights), n_exp, n_bits, 2))
    for batch in batches:
        dev, _ = passes.device_batch(model, batch)
        emb, mask = dev["inputs_embeds"], dev["attention_mask"]
        p = _variant_logp(graphdef, state, emb, mask, -1, None, None, None)
        mods = codes(state, dev)
        for j, layer in enumerate(model.config.moe_layers):
            gu, dn = weights[j]
            for e in range(n_exp):
                for b in range(n_bits):
                    gq = gu.at[e].set(quantized[j][0][b, e])
                    dq = dn.at[e].set(quantized[j][1][b, e])
                    for m, code in enumerate(sensitivity.MODALITY_CODES):
                        q = _variant_logp(graphdef, state, emb, mask, layer, gq, dq,
                                          mods[j] == code)
                        out[j, e, b, m] += float(jnp.sum(jnp.exp(p) * (p - q)))
    n = sum(int((b["attention_mask"].sum(1) > 0).sum()) for b in batches)
    return {f"logit_kl_{m}": out[..., i] / n for i, m in enumerate(sensitivity.MODALITIES)}


# ---------------------------------------------------------------- rank correlation


def spearman(a, b):
    """Spearman's rho with average ranks for ties (nan if either side is constant)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average tied ranks
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_table(est, exact):
    """(rho over all entries, mean over (layer, bit) of rho across experts)."""
    per = [spearman(est[l, :, b], exact[l, :, b]) for l in range(est.shape[0])
           for b in range(est.shape[2])]
    return spearman(est, exact), float(np.nanmean(per))


# ---------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed",
                   help="a Kimi-VL checkpoint directory, or 'random' for a random DeepSeek-V3")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--moe_hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--image_tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--freq_samples", type=int, default=64)
    p.add_argument("--sens_samples", type=int, default=8)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group_size", type=int, default=0,
                   help="rtn group (default: 128 for a checkpoint, 32 for the random model)")
    p.add_argument("--key_ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul_precision", default="highest",
                   help="jax's float32 matmul precision (torch computes float32 without TF32)")
    p.add_argument("--torch_device", default="auto",
                   help="where the transformers forward runs: cpu, cuda, or auto (cuda if present)")
    a = p.parse_args(argv)
    a.group_size = a.group_size or (32 if a.checkpoint == "random" else 128)
    bits = np.array([int(b) for b in a.bits.split(",")], np.int32)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "XLA_FLAGS")
                   if k in os.environ)
    command = f"{env} python -m benchmarks.stats " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print("command:", command.strip())
    tdev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if a.torch_device == "auto" else a.torch_device)
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"(on {tdev}; {torch.get_num_threads()} CPU threads); jax float32 matmuls: "
          f"{a.matmul_precision}")

    jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    tm, model, cfg, make = (random_models if a.checkpoint == "random" else testbed_models)(a)
    tm.to(tdev)
    on_torch = lambda array: torch.as_tensor(array, device=tdev)
    c = model.config
    a.experts, a.top_k = c.n_routed_experts, c.num_experts_per_tok
    freq_batches = make(a.freq_samples, a.seed)
    t_max = max(b["input_ids"].shape[1] for b in freq_batches)
    print(f"model: {a.checkpoint}: DeepSeek-V3 {c.num_hidden_layers} layers (MoE "
          f"{list(c.moe_layers)}), D={c.hidden_size}, {c.n_routed_experts} experts of "
          f"{c.moe_intermediate_size}, top-{c.num_experts_per_tok}, {c.n_shared_experts} shared; "
          f"prompts padded to T<={t_max}, batch {a.batch}")
    with torch.inference_mode():  # the two frameworks hold the same model
        b = freq_batches[0]
        ref = tm(inputs_embeds=on_torch(b["inputs_embeds"]),
                 attention_mask=on_torch(b["attention_mask"])).logits.float().cpu().numpy()
    ours = np.asarray(model(inputs_embeds=jnp.asarray(b["inputs_embeds"]),
                            attention_mask=jnp.asarray(b["attention_mask"])).logits)
    real = b["attention_mask"].astype(bool)
    print(f"parity: max |logits jax - torch| on real tokens {np.abs(ours - ref)[real].max():.1e}")

    # 1. frequency pass vs the transformers forward
    n_tok = sum(int(b["attention_mask"].sum()) for b in freq_batches)

    def torch_forward():
        with torch.inference_mode():
            for b in freq_batches:
                tm(inputs_embeds=on_torch(b["inputs_embeds"]),
                   attention_mask=on_torch(b["attention_mask"]))
        if tdev.type == "cuda":
            torch.cuda.synchronize()  # the timer must see the queued kernels finish

    dense = deepseek_v3_keys.from_torch(tm, experts_impl="dense")  # same weights
    stats, t_sorted, t_sorted0 = timed(lambda: passes.frequency_pass(model, freq_batches, cfg))
    _, t_dense, t_dense0 = timed(lambda: passes.frequency_pass(dense, freq_batches, cfg))
    _, t_torch, t_torch0 = timed(torch_forward)
    print(f"\n1. frequency pass, {a.freq_samples} samples, {n_tok} real tokens (tokens/s)")
    print(f"   transformers forward on {tdev.type} ({tm.config._experts_implementation} experts): "
          f"{n_tok / t_torch:8.0f} [{t_torch0:.2f} s first]")
    for name, t, t0 in (("sorted", t_sorted, t_sorted0), ("dense", t_dense, t_dense0)):
        print(f"   mode_jax frequency_pass, {name:6s} experts: {n_tok / t:8.0f} "
              f"[{t0:.2f} s first]  speed-up {t_torch / t:5.2f}x (goal >= 2x)")
    assert int(stats["count_all"].sum()) == n_tok * a.top_k * len(model.config.moe_layers)
    pass_flops, forward_flops = program_flops(model, freq_batches, cfg)
    print(f"   arithmetic rate by XLA's count of each program, summed over the batches: "
          f"frequency_pass (sorted) {pass_flops / t_sorted / 1e9:.1f} GFLOP/s, transformers "
          f"forward {forward_flops / t_torch / 1e9:.1f} GFLOP/s (the same model's full forward)")

    # 2. vmapped expert_mse vs a per-expert loop
    sens_batches = make(a.sens_samples, a.seed + 1)
    layers = model.config.moe_layers
    weights = [(model.layers[i].mlp.experts.gate_up[...], model.layers[i].mlp.experts.down[...])
               for i in layers]
    cache, t_cache, t_cache0 = timed(lambda: passes.collect_tokens(model, sens_batches, cfg,
                                                                   gradients=False))
    quantized, t_q, _ = timed(lambda: [sensitivity.quantize_layer(gu, dn, bits, a.group_size)
                                       for gu, dn in weights])
    none = [None] * len(layers)
    v_q, tv_q, tv_q0 = timed(lambda: vmapped_expert_mse(cache, weights, quantized, bits,
                                                          a.group_size))
    l_q, tl_q, tl_q0 = timed(lambda: loop_expert_mse(cache, weights, quantized, bits,
                                                       a.group_size))
    v_e, tv_e, _ = timed(lambda: vmapped_expert_mse(cache, weights, none, bits, a.group_size))
    l_e, tl_e, _ = timed(lambda: loop_expert_mse(cache, weights, none, bits, a.group_size))
    np.testing.assert_allclose(v_q, l_q, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(v_e, l_e, rtol=1e-3, atol=1e-9)
    calls = len(layers) * a.experts * len(bits)
    print(f"\n2. expert_mse, {len(layers)} MoE layers x {a.experts} experts x {len(bits)} bits "
          f"({cache.layers[0].x.shape[0]} cached tokens/layer; equal results)")
    print(f"   quantized weights shared: vmapped {tv_q * 1e3:8.1f} ms [{tv_q0:.2f} s first]   "
          f"loop of {calls} calls {tl_q * 1e3:8.1f} ms [{tl_q0:.2f} s first]   "
          f"speed-up {tl_q / tv_q:.1f}x (goal >= 20x)")
    print(f"   end to end (quantizing): vmapped {tv_e * 1e3:8.1f} ms   loop {tl_e * 1e3:8.1f} ms"
          f"   speed-up {tl_e / tv_e:.1f}x   (of which fake quantization: {t_q * 1e3:.1f} ms)")

    # logit_kl: cached prefix + batched suffix variants vs a loop of full re-forwards
    kl, t_kl, t_kl0 = timed(lambda: passes.logit_kl_pass(model, sens_batches, cfg, bits,
                                                         a.group_size), repeats=0)
    kl_loop, t_kll, _ = timed(lambda: loop_logit_kl(model, sens_batches, cfg, weights,
                                                    quantized), repeats=0)
    for m in sensitivity.MODALITIES:
        np.testing.assert_allclose(kl[f"logit_kl_{m}"], kl_loop[f"logit_kl_{m}"], rtol=1e-3,
                                   atol=1e-6)
    n_var = len(layers) * a.experts * len(bits) * 2
    print(f"   exact logit_kl ({n_var} variants x {len(sens_batches)} batches; equal results, "
          "one run each, compilation included):")
    print(f"     cached prefix + batched suffixes {t_kl:7.2f} s   loop of full re-forwards "
          f"{t_kll:7.2f} s   speed-up {t_kll / t_kl:.1f}x")

    # 3. estimators against exact logit_kl
    gcache, t_gcache, t_gcache0 = timed(lambda: passes.collect_tokens(model, sens_batches, cfg))
    costs, t_costs, t_costs0 = timed(lambda: passes.token_costs(model, gcache, bits,
                                                                a.group_size))
    print(f"\n3. rank agreement with exact logit_kl ({a.sens_samples} samples, bits {a.bits}); "
          "Spearman rho: all entries / mean per (layer, bit) across experts")
    for i, m in enumerate(sensitivity.MODALITIES):
        exact = kl[f"logit_kl_{m}"]
        code = sensitivity.MODALITY_CODES[i]
        freq = np.stack([np.bincount(t.ids[t.modality == code].reshape(-1), minlength=a.experts)
                         for t in gcache.layers])[..., None]  # M-tokens per expert
        rows = {"expert_mse": costs[f"expert_mse_{m}"],
                "freq x expert_mse": freq * costs[f"expert_mse_{m}"],
                "fisher": costs[f"fisher_{m}"]}
        for name, est in rows.items():
            rho_all, rho_layer = rank_table(est, exact)
            print(f"   {m:6s} {name:17s}: rho {rho_all:6.3f} / {rho_layer:6.3f}")
    print("   (freq x expert_mse: the product MODE's bit allocation weighs; logit_kl and fisher "
          "already sum over the tokens)")
    print("   cost, seconds (best compiled run [first run]; logit_kl: one run incl. compile):")
    print(f"     logit_kl exact : {t_kl:7.2f}  ({n_var} (layer, expert, bit, modality) variants, "
          "each a suffix re-forward of every sample)")
    print(f"     expert_mse     : {t_cache + t_q + tv_q:7.2f}  (forward cache {t_cache:.2f} "
          f"[{t_cache0:.2f}] + quantize {t_q:.2f} + estimator {tv_q:.2f})")
    print(f"     fisher         : {t_gcache + t_costs:7.2f}  (forward+backward cache "
          f"{t_gcache:.2f} [{t_gcache0:.2f}] + token_costs {t_costs:.2f} [{t_costs0:.2f}]: "
          "quantize + every token-level estimator, pmq and gemq included)")
    print("\ncommand:", command.strip())


if __name__ == "__main__":
    main()
