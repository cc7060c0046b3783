"""MoPEQ's per-expert traces on the testbed: the Hessian against its Gauss-Newton part.

MoPEQ is data-free: the sensitivity stage takes the traces on random tokens. This prints, for
both curvatures and for random tokens beside the statistics stage's own prompts, how many of
the experts' Hutchinson estimates are negative and their range, and the Spearman rank
correlation of each random-token trace with the prompt traces (do they point the same way as
curvature on real prompts?). Same sample count, batch size, probes and seed as
`configs/testbed.py`'s sensitivity stage.

    python -m benchmarks.mopeq_trace [--samples 32] [--batch 16] [--probes 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mode_jax
from benchmarks.stats import spearman
from mode_jax import preprocess
from mode_jax.calib import data, passes, sources


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    path = Path(a.checkpoint)
    model = mode_jax.load(path)
    image = model.config.media_placeholder_token_id
    prompts = list(data.batches(sources.testbed_samples(a.samples, a.seed + 1, "stats", str(path)),
                                preprocess.load_tokenizer(path), a.batch,
                                pad_token_id=model.config.pad_token_id))
    length = prompts[0]["input_ids"].shape[1]
    rand = passes.random_token_batches(passes.text_model(model).config.vocab_size,
                                       num_samples=a.samples, length=length,
                                       batch_size=a.batch, seed=a.seed, exclude=(image,))
    traces = {}
    for tokens, batches in (("random tokens", rand), ("prompts", prompts)):
        for curvature in passes.CURVATURES:
            traces[curvature, tokens] = passes.hessian_trace_pass(
                model, batches, image_token_id=image, num_probes=a.probes, seed=a.seed,
                curvature=curvature)

    print(f"{'curvature':13s} {'tokens':14s} {'negative':>9s} {'lowest':>9s} {'highest':>9s}"
          f"  Spearman vs prompts' hessian / gauss_newton")
    for (curvature, tokens), t in traces.items():
        rho = [spearman(t, traces[c, "prompts"]) for c in passes.CURVATURES]
        print(f"{curvature:13s} {tokens:14s} {int((t < 0).sum()):4d} / {t.size:<3d}"
              f"{t.min():9.3g} {t.max():9.3g}  {rho[0]:+.2f} / {rho[1]:+.2f}")
    print("\ncommand: python -m benchmarks.mopeq_trace " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv))


if __name__ == "__main__":
    main()
