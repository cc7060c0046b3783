"""What each of the testbed card's held-out samples scored (fixtures/testbed_heldout_outcomes.json).

The card records the split's figures (checkpoints/testbed/train_summary.json). This record holds
each sample's greedy answer and multiple-choice pick, so test_testbed_checkpoint.py can rescore
a few whole evaluation batches and compare them sample by sample, instead of rescoring all 1000
samples (about 100 s on 2 cores) to compare the totals. Regenerate it after retraining:

    python -m tests.heldout_outcomes   # from the repository root

It scores the whole split and refuses to write a record whose figures differ from the card's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mode_jax.eval import harness, metrics
from mode_jax.testbed import card

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "testbed"
RECORD = Path(__file__).resolve().parent / "fixtures" / "testbed_heldout_outcomes.json"
FIGURES = ("accuracy", "mc_accuracy")
BATCH_SIZE = 32  # the card's evaluation batch (harness.evaluate's default)


def figures(data: harness.EvalSet, predictions, choices) -> dict:
    """The card's accuracy and multiple-choice accuracy, totalled from per-sample outcomes."""
    samples = [ex.sample for ex in data.examples]
    correct = metrics.exact_match(predictions, [s.answer for s in samples])
    return harness.accuracies(samples, correct, choices)


def wrong(data: harness.EvalSet, record: dict) -> set[int]:
    """Samples answered or picked wrongly in the record."""
    answers = [ex.sample.answer for ex in data.examples]
    bad = ~metrics.exact_match(record["predictions"], answers)
    return {i for i, ex in enumerate(data.examples)
            if bad[i] or record["choices"][i] not in (None, ex.sample.answer_index)}


def batches_to_rescore(data: harness.EvalSet, record: dict, batch_size: int = BATCH_SIZE):
    """Whole batches of the full evaluation (same rows, so the same padded shapes and numbers):
    per kind of sample, its first and last batch (shortest and longest prompts, the ragged last
    one) and the one holding most wrong answers, in the evaluation's order."""
    batches = harness._batches(data, harness._rows_per_batch(data, batch_size))
    bad = wrong(data, record)
    kinds: dict = {}
    for b in batches:
        kinds.setdefault(data.examples[b[0]].grids, []).append(b)
    out = []
    for runs in kinds.values():
        most = max(range(len(runs)), key=lambda j: len(bad & set(runs[j])))
        out += [runs[j] for j in sorted({0, most, len(runs) - 1})]
    return out


def load() -> dict:
    return json.loads(RECORD.read_text())


def main() -> None:
    summary = json.loads((CHECKPOINT / "train_summary.json").read_text())["heldout"]
    model, data = card.heldout(CHECKPOINT, summary["n"])
    res = harness.evaluate(model, data, batch_size=BATCH_SIZE)
    got = figures(data, res["predictions"], res["choices"])
    if got != {k: summary[k] for k in FIGURES}:
        sys.exit(f"the harness scores the held-out split as {got}, the card records "
                 f"{ {k: summary[k] for k in FIGURES} }: not writing {RECORD}")
    record = {"n": summary["n"], "digest": harness.digest(data),
              "predictions": res["predictions"], "choices": res["choices"]}
    RECORD.write_text(json.dumps(record) + "\n")
    print(f"wrote {RECORD}: {len(record['predictions'])} samples, "
          f"{len(wrong(data, record))} wrong")


if __name__ == "__main__":
    main()
