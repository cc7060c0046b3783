"""Is the testbed's held-out accuracy a property of the checkpoint or of the card's samples?

    python -m benchmarks.testbed_heldout [--checkpoint checkpoints/testbed] [--samples 1000]
        [--seeds 1 2]

Scores the checkpoint at full precision on further held-out draws (`tasks.generate("heldout",
samples, seed)`; the card's are seed 0) and prints exact-match accuracy per family and task for
each seed and pooled over them, with a 95% binomial (Wilson) interval on each family's pooled
figure: the card's 1000 samples hold 500 vision questions, about 100 per task, so a task's
figure there moves by several points between draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import mode_jax
from mode_jax.eval import harness
from mode_jax.testbed import card


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (in %)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    print("command: python -m benchmarks.testbed_heldout " + " ".join(sys.argv[1:]))
    counts: dict[str, list[int]] = {}  # group -> [hits, n] pooled over seeds
    rows = []
    model = mode_jax.load(args.checkpoint)  # once: every draw reuses its compiled steps
    for seed in args.seeds:
        start = time.perf_counter()
        data = card.heldout_data(Path(args.checkpoint), args.samples, seed)
        res = harness.evaluate(model, data, keep_logprobs=False)
        groups: dict[str, list[int]] = {}
        for ex, ok in zip(data.examples, res["correct"], strict=True):
            for g in (f"family {ex.sample.family}", f"task {ex.sample.task}"):
                hit = groups.setdefault(g, [0, 0])
                hit[0], hit[1] = hit[0] + int(ok), hit[1] + 1
        for g, (h, n) in groups.items():
            pooled = counts.setdefault(g, [0, 0])
            pooled[0], pooled[1] = pooled[0] + h, pooled[1] + n
        rows.append((seed, groups, time.perf_counter() - start))
    names = sorted(counts)
    print("| group | " + " | ".join(f"seed {s}" for s, _, _ in rows) + " | pooled | 95% interval |")
    print("|---" * (len(rows) + 3) + "|")
    for g in names:
        cells = [f"{100 * grp[g][0] / grp[g][1]:.1f}" if g in grp else "-" for _, grp, _ in rows]
        h, n = counts[g]
        interval = "[{:.1f}, {:.1f}]".format(*wilson(h, n)) if g.startswith("family") else ""
        print(f"| {g} | " + " | ".join(cells) + f" | {100 * h / n:.1f} ({n}) | {interval} |")
    for seed, _, seconds in rows:
        print(f"seed {seed}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
