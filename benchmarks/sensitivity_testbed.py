"""How well do the cheap sensitivity estimators rank the trained testbed's experts like the exact
logit KL, per modality, and what does each cost?

    python -m benchmarks.sensitivity_testbed [--checkpoint checkpoints/testbed] [--samples 32]

Calibration is what the pipeline's sensitivity stage uses for configs/testbed.py (vision prompts
of the task suite's train split, key image tokens chosen by the frequency pass's rule). Printed:
seconds for the token cache + expert_mse, the extra cost of the Fisher estimator (one backward
pass per batch), and the exact logit_kl pass; then Spearman's rho of each cheap estimator with
logit_kl per modality, over all (layer, expert, bit) entries and as the mean over (layer, bit)
of the rank correlation across experts (what a per-layer allocation sees).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import mode_jax
from benchmarks.stats import rank_table
from configs import testbed
from mode_jax.calib import passes, sensitivity, sources


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group_size", type=int, default=128)
    args = p.parse_args()
    bits = np.asarray([int(b) for b in args.bits.split(",")])
    config = testbed.get_config()
    model = mode_jax.load(args.checkpoint)
    calib = sources.load(config.data, args.checkpoint, model.config, args.samples, seed=1,
                         purpose="stats")
    cfg = passes.StatsConfig(image_token_id=calib.image_token_id,
                             special_token_ids=calib.special_token_ids,
                             key_ratio=config.stats.key_ratio,
                             attention_mode=config.stats.attention_mode,
                             judge_layer=config.stats.judge_layer)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def cheap(gradients):
        cache = passes.collect_tokens(model, calib.batches, cfg, gradients=gradients)
        return passes.token_costs(model, cache, bits, args.group_size)

    mse_only, t_mse = timed(lambda: cheap(False))
    both, t_both = timed(lambda: cheap(True))
    exact, t_kl = timed(lambda: passes.logit_kl_pass(model, calib.batches, cfg, bits,
                                                     args.group_size))
    for m in sensitivity.MODALITIES:  # the cache without gradients computes expert_mse alike
        np.testing.assert_allclose(mse_only[f"expert_mse_{m}"], both[f"expert_mse_{m}"],
                                   rtol=1e-4, atol=1e-12)

    n_layers, n_experts, _ = exact["logit_kl_text"].shape
    print(f"testbed {args.checkpoint}: {n_layers} MoE layers x {n_experts} experts x bits "
          f"{args.bits}, {args.samples} calibration prompts, group {args.group_size}")
    print(f"{'estimator':<12}{'seconds':>10}   (first run, compilation included)")
    print(f"{'expert_mse':<12}{t_mse:>10.1f}   token cache + vmapped layer costs")
    print(f"{'fisher':<12}{max(t_both - t_mse, 0.0):>10.1f}   extra: one backward per batch")
    print(f"{'logit_kl':<12}{t_kl:>10.1f}   exact: re-forward per (layer, expert, bit)")
    print("\nSpearman rho with logit_kl: all entries | mean over (layer, bit) across experts")
    for m in sensitivity.MODALITIES:
        for name in ("expert_mse", "fisher"):
            rho_all, rho_layer = rank_table(both[f"{name}_{m}"], exact[f"logit_kl_{m}"])
            print(f"  {m:<7}{name:<12}{rho_all:>8.3f} | {rho_layer:.3f}")
    print("reproduce: python -m benchmarks.sensitivity_testbed " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
