"""The bit map artifact: round trip, JSON layout, summary numbers, figure."""

import json

import numpy as np
import pytest
from PIL import Image

from mode_jax.alloc import bitmap, solve_with_report


def test_round_trip_and_json_layout(tmp_path):
    bits = np.random.default_rng(0).choice([2, 3, 4], size=(5, 7)).astype(np.int32)
    out = bitmap.save(
        tmp_path / "bitmap", bits, candidate_bits=[2, 3, 4], layer_ids=[1, 2, 3, 4, 5]
    )
    loaded, ids = bitmap.load(out)
    np.testing.assert_array_equal(loaded, bits)
    assert loaded.dtype == np.int32 and ids == [1, 2, 3, 4, 5]
    table = json.loads((out / "bitmap.json").read_text())
    assert list(table) == ["1", "2", "3", "4", "5"]
    assert table["3"]["6"] == bits[2, 6] and len(table["1"]) == 7


def test_summary_numbers(tmp_path):
    bits = np.array([[2, 3], [4, 4]])
    info = bitmap.summary(bits, candidate_bits=[1, 2, 3, 4])
    assert info["average_bits"] == 3.25 and info["total_bits"] == 13
    assert info["per_layer_average_bits"] == [2.5, 4.0]
    assert info["histogram"] == {"1": 0, "2": 1, "3": 1, "4": 2}
    result = solve_with_report(np.zeros((2, 2, 3)), [2, 3, 4], 3)
    bitmap.save(tmp_path, result.bits, report=result.report(), figure=False)
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["report"]["used_total_bits"] == 12 and stored["average_bits"] == 3.0
    assert not (tmp_path / "bitmap.png").exists()


def test_heatmap_is_a_png_of_sensible_size(tmp_path):
    bits = np.random.default_rng(1).choice([2, 3, 4], size=(26, 64))
    bitmap.save(tmp_path, bits, candidate_bits=[2, 3, 4])
    with Image.open(tmp_path / "bitmap.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 3  # at least the three levels


def test_load_refuses_a_json_that_disagrees(tmp_path):
    bitmap.save(tmp_path, np.array([[2, 4], [4, 2]]), figure=False)
    table = json.loads((tmp_path / "bitmap.json").read_text())
    table["1"]["0"] = 3
    (tmp_path / "bitmap.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"disagrees.*\[1, 0\]"):
        bitmap.load(tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="bits.npy"):
        bitmap.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"expected \[layers, experts\]"):
        bitmap.to_json(np.array([2, 3, 4]))
    with pytest.raises(ValueError, match="integers"):
        bitmap.to_json(np.array([[2.5, 3.0]]))
    with pytest.raises(ValueError, match="2 layers in increasing order"):
        bitmap.to_json(np.array([[2], [3]]), layer_ids=[4, 4])
    with pytest.raises(ValueError, match="experts 0..E-1"):
        bitmap.from_json({"0": {"0": 2, "2": 3}})
