"""The colour look-up probe: its scenes (read back by the test suite's own scene reader) and its
per-pair matrix."""

import numpy as np
from test_tasks import read_scene

from mode_jax.testbed import lookup, tasks


def test_pair_samples_hold_the_named_and_the_other_object():
    samples, meta = lookup.pair_samples(tasks.TaskConfig(), per_pair=2, seed=3)
    n_pairs = len(tasks.COLORS) * (len(tasks.COLORS) - 1)
    assert len(samples) == len(meta) == 2 * n_pairs
    assert len({m[:2] for m in meta}) == n_pairs
    for s, (named, other, other_shape) in zip(samples, meta, strict=True):
        objects = {o["color"]: o["shape"] for o in read_scene(s.image)}
        assert objects == {named: s.answer, other: other_shape}
        assert s.question == f"what shape is the {named} object ?" and s.answer != other_shape


def test_matrix_scores_each_pair_and_counts_swapped_answers():
    meta = [("red", "blue", "circle"), ("red", "blue", "square"), ("blue", "red", "cross")]
    acc, swapped = lookup.matrix(meta, [True, False, False], ["square", "circle", "triangle"])
    colors = list(tasks.COLORS)
    red, blue = colors.index("red"), colors.index("blue")
    assert acc[red, blue] == 0.5 and acc[blue, red] == 0.0
    assert np.isnan(acc[red, red]) and np.isnan(acc[red, colors.index("green")])
    assert swapped == 0  # the wrong answers name neither other object's shape
    _, swapped = lookup.matrix(meta, [True, False, False], ["square", "square", "cross"])
    assert swapped == 2
    assert "named \\ other" in lookup.format_matrix(acc)
