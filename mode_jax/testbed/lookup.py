"""Colour look-up probe: shape questions on two-object scenes, scored per (named, other) colour.

    python -m mode_jax.testbed.lookup checkpoints/testbed [--per_pair 16]

"what shape is the red object ?" about a scene holding the red object and one other is answered
only by finding the red one among the image tokens. The held-out split mixes in one-object
scenes (no look-up needed) and three-object ones, so its shape accuracy hides which colours the
language model cannot tell apart; this matrix shows them (the shipped testbed of session 13
confused red, green, yellow and orange with each other and never blue or purple). A wrong answer
that names the other object's shape is a look-up failure, not a misread shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

import mode_jax
from mode_jax.eval import harness
from mode_jax.preprocess import ImageConfig
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tok_lib


def pair_samples(config: tasks.TaskConfig, per_pair: int, seed: int = 0
                 ) -> tuple[list[tasks.Sample], list[tuple[str, str, str]]]:
    """`per_pair` shape questions for every ordered pair of distinct colours, and per sample
    (named colour, other colour, other object's shape). Shapes are distinct within a scene."""
    rng = np.random.default_rng(seed)
    samples, meta = [], []
    for named, other in itertools.permutations(tasks.COLORS, 2):
        made = 0
        while made < per_pair:
            shapes = [str(s) for s in rng.choice(tasks.SHAPES, 2, replace=False)]
            objects = tasks.place(rng, [(shapes[0], named), (shapes[1], other)], config)
            if objects is None:
                continue
            image = tasks.render(objects, config.image_size, int(rng.integers(2**31)))
            question = f"what shape is the {named} object ?"
            samples.append(tasks.Sample(prompt=tok_lib.format_chat(question, with_image=True),
                                        question=question, answer=shapes[0], family="vision",
                                        task="shape", image=image))
            meta.append((named, other, shapes[1]))
            made += 1
    return samples, meta


def matrix(meta, correct, predictions) -> tuple[np.ndarray, int]:
    """(accuracy [named, other] in COLORS order, NaN on the diagonal; how many wrong answers
    name the other object's shape)."""
    colors = list(tasks.COLORS)
    hits = np.zeros((len(colors), len(colors)))
    total = np.zeros_like(hits)
    swapped = 0
    for (named, other, other_shape), ok, pred in zip(meta, correct, predictions, strict=True):
        i, j = colors.index(named), colors.index(other)
        hits[i, j] += bool(ok)
        total[i, j] += 1
        swapped += (not ok) and pred.strip() == other_shape
    with np.errstate(invalid="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan), swapped


def format_matrix(acc: np.ndarray) -> str:
    colors = list(tasks.COLORS)
    lines = ["named \\ other " + " ".join(f"{c:>7}" for c in colors)]
    for i, named in enumerate(colors):
        cells = ("      -" if np.isnan(a) else f"{a:7.2f}" for a in acc[i])
        lines.append(f"{named:>13} " + " ".join(cells))
    return "\n".join(lines)


def run(checkpoint: str | Path, per_pair: int = 16, seed: int = 0) -> dict:
    checkpoint = Path(checkpoint)
    model = mode_jax.load(checkpoint)
    tokenizer = tok_lib.load_tokenizer(checkpoint)
    image_cfg = ImageConfig.from_preprocessor_config(
        json.loads((checkpoint / "preprocessor_config.json").read_text()))
    samples, meta = pair_samples(tasks.recorded_config(checkpoint), per_pair, seed)
    result = harness.evaluate(model, harness.encode(samples, tokenizer, image_cfg),
                              keep_logprobs=False)
    acc, swapped = matrix(meta, result["correct"], result["predictions"])
    return {"accuracy": float(np.mean(result["correct"])), "matrix": acc, "swapped": swapped,
            "wrong": len(meta) - int(np.sum(result["correct"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--per_pair", type=int, default=16, help="questions per colour pair")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = run(args.checkpoint, args.per_pair, args.seed)
    print(f"two-object shape look-up: {out['accuracy']:.3f} right; {out['swapped']} of "
          f"{out['wrong']} wrong answers name the other object's shape\n"
          + format_matrix(out["matrix"]))


if __name__ == "__main__":
    main()
