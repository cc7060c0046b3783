"""Progress lines: items pass through unchanged; rate and time left follow from the counts."""

import logging

from mode_jax import progress


def test_track_yields_items_and_logs_final_line(caplog):
    with caplog.at_level(logging.INFO, logger="mode_jax.progress"):
        assert list(progress.track(iter([3, 1, 2]), "things", total=3, every_s=1e9)) == [3, 1, 2]
    assert caplog.messages[-1].startswith("things: 3/3 (")
    assert caplog.messages[-1].endswith("~0 s left)")


def test_line_arithmetic():
    assert progress.line("x", 5, 20, 10.0) == "x: 5/20 (0.50/s, ~30 s left)"
    assert progress.line("x", 4, None, 2.0) == "x: 4 (2.00/s)"
