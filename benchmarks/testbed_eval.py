"""Does the shipped testbed judge quantization? Full-precision accuracy, uniform RTN damage,
and how differently text and image tokens route.

    python -m benchmarks.testbed_eval [--checkpoint checkpoints/testbed] [--samples 1000]
        [--fold HIDDEN INTERMEDIATE FACTOR]

Prints: the full-precision table (exact match, multiple choice, perplexity per family, task,
modality); for uniform round-to-nearest on every routed expert at 2, 3, 4 bits (group 128) the
accuracy and its drop per family and the KL to full precision; the relative weight error of
that quantization, and the same table for the routed experts' output scaled by a factor (is
quantization noise any worse than shrinking the experts' output by as much?); per MoE layer
the Jensen-Shannon divergence between the expert-frequency distributions of text and image
tokens; answer margins (the teacher-forced log-prob gap between each answer token and the best
other token) at full precision and how far each of those RTN and scaled models moves them; wall
times.
The held-out split is `tasks.generate("heldout", samples, seed=0)` with the task settings the
checkpoint was trained on (its train_summary.json); `mode_jax.testbed.card` writes the same
figures into the checkpoint's MODEL_CARD.md. The shipped checkpoint carries outlier channels
folded in after training (`mode_jax.testbed.outliers`, recorded in train_summary.json); `--fold`
undoes that fold and applies another one (the same function, HIDDEN channels per MoE layer and
INTERMEDIATE per routed expert FACTOR times larger) before every perturbation: `--fold 0 0 1`
measures the trained weights as they were.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mode_jax.eval import harness, metrics
from mode_jax.quant import fake, rtn
from mode_jax.testbed import card, outliers


def _cell(accuracy: float, drop: float) -> str:
    return f"{accuracy:.1f} ({drop:+.1f})"


def _relative_error(model, bits: int, group_size: int, which: int) -> float:
    """||Q(W) - W|| / ||W|| over every MoE layer's gate_up (which=0) or down (1) kernels."""
    err = ref = 0.0
    for experts in fake.moe_experts(model):
        gate_up, down = experts.gate_up.get_value(), experts.down.get_value()
        q = rtn.fake_quantize_experts(gate_up, down, np.full(gate_up.shape[0], bits), group_size)
        w = (gate_up, down)[which]
        err += float(jnp.sum((q[which] - w) ** 2))
        ref += float(jnp.sum(w ** 2))
    return (err / ref) ** 0.5


def _print_margins(data, full: dict, variants: dict[str, dict]) -> None:
    """How near the answers are to flipping, against how far each perturbation (a `card.against`
    row kept with its log-probs) moves them."""
    ids = [ex.answer_ids for ex in data.examples]
    base = metrics.answer_margins(full["answer_logprobs"], ids)
    q = np.percentile(base, [1, 10, 50])
    print("\nanswer margins (nats; min over an answer's tokens of log p(answer) - "
          "max log p(other))")
    print(f"  full precision: 1% {q[0]:.2f}, 10% {q[1]:.2f}, median {q[2]:.2f}; "
          f"{int(np.sum(base <= 0))} of {len(base)} not greedy-correct, "
          f"{int(np.sum((base > 0) & (base < 1)))} within 1 nat")
    print(f"  {'variant':<14}{'|shift| median':>16}{'90%':>8}{'99%':>8}{'max':>8}"
          f"{'median shift/margin':>22}{'flipped':>9}")
    for label, row in variants.items():
        shift = metrics.answer_margins(row["answer_logprobs"], ids) - base
        p = np.percentile(np.abs(shift), [50, 90, 99])
        flipped = int(np.sum((base > 0) != (base + shift > 0)))
        rel = np.median(np.abs(shift[base > 0]) / base[base > 0])
        print(f"  {label:<14}{p[0]:>16.2f}{p[1]:>8.2f}{p[2]:>8.2f}{np.abs(shift).max():>8.2f}"
              f"{rel:>22.3f}{flipped:>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--scales", type=float, nargs="*", default=[0.66, 0.5, 0.0],
                   help="routed-expert output factors for the aligned-shrink rows")
    p.add_argument("--fold", nargs=3, type=float, metavar=("HIDDEN", "INTERMEDIATE", "FACTOR"),
                   help="outlier channels to fold in instead of the checkpoint's own")
    args = p.parse_args()
    ckpt = Path(args.checkpoint)

    start = time.perf_counter()
    model, data = card.heldout(ckpt, args.samples)
    prepare = time.perf_counter() - start
    full = harness.evaluate(model, data, routing=True)
    print(harness.format_table(full, f"full precision, {args.checkpoint}"))
    print(f"load + data {prepare:.1f} s; full-precision evaluation {full['wall_seconds']:.1f} s "
          "(compilation included)\n")
    shipped = outliers.from_summary(json.loads((ckpt / "train_summary.json").read_text()))
    print(f"checkpoint's fold: {shipped}")
    if args.fold is not None:
        fold = outliers.Fold(int(args.fold[0]), int(args.fold[1]), args.fold[2], shipped.seed)
        model = outliers.apply(outliers.apply(model, shipped, inverse=True), fold)
        same = card.against(full, model, data)
        print(f"refolded as {fold}: accuracy {same['accuracy']['all']:.1f} "
              f"({same['drop']['all']:+.1f}), KL to the checkpoint {same['kl']:.2e}; every row "
              "below perturbs this model\n")

    families = sorted(full["accuracy"]["family"])
    print("uniform RTN on all routed experts (symmetric, group "
          f"{args.group_size}): accuracy % (drop in points)")
    head = f"{'bits':>5}" + "".join(f"{f:>20}" for f in [*families, "all"]) + f"{'KL':>10}"
    print(head + f"{'seconds':>10}")
    print("-" * (len(head) + 10))
    fp = {f: 100 * full["accuracy"]["family"][f] for f in families} | {
        "all": 100 * full["accuracy"]["all"]}
    print(f"{'fp32':>5}" + "".join(f"{fp[f]:>20.1f}" for f in [*families, "all"]) +
          f"{0.0:>10.4f}{full['wall_seconds']:>10.1f}")
    variants = {}  # every perturbed model's row, for the margins
    for row in card.rtn_sweep(model, data, full, args.bits, args.group_size, keep_logprobs=True):
        variants[f"{row['bits']}-bit RTN"] = row
        cells = "".join(f"{_cell(row['accuracy'][f], row['drop'][f]):>20}"
                        for f in [*families, "all"])
        print(f"{row['bits']:>5}" + cells + f"{row['kl']:>10.4f}{row['seconds']:>10.1f}")

    print("\nrelative weight error ||Q(W) - W|| / ||W|| of the routed experts (all MoE layers)")
    for bits in args.bits:
        print(f"{bits:>5} bits: gate_up {_relative_error(model, bits, args.group_size, 0):.3f}, "
              f"down {_relative_error(model, bits, args.group_size, 1):.3f}")
    print("routed experts' output scaled by s (a perturbation along the output itself; s = 0.66 "
          "is the size of 2-bit noise)")
    print(f"{'s':>5}" + head[5:])
    for s in args.scales:
        row = card.against(full, card.scaled(model, "routed", s), data, keep_logprobs=True)
        variants[f"routed x {s:g}"] = row
        cells = "".join(f"{_cell(row['accuracy'][f], row['drop'][f]):>20}"
                        for f in [*families, "all"])
        print(f"{s:>5}" + cells + f"{row['kl']:>10.4f}")

    _print_margins(data, full, variants)

    counts = full["routing"]
    js = harness.routing_divergence(counts["text"], counts["image"])
    layers = model.config.text.moe_layers
    print("\nrouting on the held-out split: Jensen-Shannon divergence (bits, 0..1) between the "
          "expert frequencies of text and image tokens")
    print(f"{'layer':>6}{'JS':>8}   top experts of text tokens | of image tokens (share %)")
    for i, layer in enumerate(layers):
        def top(c):
            share = c / max(c.sum(), 1) * 100
            return " ".join(f"{e}:{share[e]:.0f}" for e in np.argsort(-c)[:4])
        print(f"{layer:>6}{js[i]:>8.3f}   {top(counts['text'][i])} | {top(counts['image'][i])}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    print("reproduce: python -m benchmarks.testbed_eval " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
