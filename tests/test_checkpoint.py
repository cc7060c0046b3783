"""Artifact store: exact round trip (incl. empty arrays and bf16) and atomicity."""

import os

import ml_dtypes
import numpy as np
import pytest

from mode_jax import checkpoint


def test_round_trip_exact(tmp_path):
    arrays = {
        "counts": np.arange(12, dtype=np.int64).reshape(3, 4),
        "groups": {
            "b3": {"codes": np.array([[1, 2**32 - 1]], dtype=np.uint32), "ids": np.array([5])},
            "b2": {"codes": np.zeros((0, 8), np.uint32), "ids": np.zeros((0,), np.int32)},
        },
        "scales": np.array([0.5, -1.25], dtype=ml_dtypes.bfloat16),
    }
    path = str(tmp_path / "stage" / "abc")
    checkpoint.save(path, arrays, {"seed": 3, "note": "x"})
    assert checkpoint.is_complete(path)
    got, meta = checkpoint.load(path)
    assert meta == {"seed": 3, "note": "x"}
    np.testing.assert_array_equal(got["counts"], arrays["counts"])
    np.testing.assert_array_equal(got["groups"]["b3"]["codes"], arrays["groups"]["b3"]["codes"])
    assert got["groups"]["b2"]["codes"].shape == (0, 8)
    assert got["groups"]["b2"]["codes"].dtype == np.uint32
    assert got["scales"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["scales"].astype(np.float32), [0.5, -1.25])


def test_failed_write_leaves_nothing(tmp_path):
    path = str(tmp_path / "stage" / "abc")
    with pytest.raises(ValueError, match="keys must be strings"):
        checkpoint.save(path, {"ok": np.ones(2), 3: np.ones(2)}, {})
    assert not os.path.exists(path)
    assert not checkpoint.is_complete(path)
    assert [n for n in os.listdir(tmp_path / "stage") if n.startswith(".tmp-")] == []
    with pytest.raises(FileNotFoundError, match="no complete artifact"):
        checkpoint.load(path)


def test_relative_paths_round_trip(tmp_path, monkeypatch):
    """`--workdir=runs/x` gives relative artifact paths; Orbax itself wants absolute ones."""
    monkeypatch.chdir(tmp_path)
    checkpoint.save(os.path.join("runs", "stage", "abc"), {"x": np.arange(3.0)}, {"k": 1})
    got, meta = checkpoint.load(os.path.join("runs", "stage", "abc"))
    np.testing.assert_array_equal(got["x"], [0.0, 1.0, 2.0])
    assert meta == {"k": 1}
