"""Calibration JSON reading: validation names every bad record; sampling is seeded."""

import json

import numpy as np
import pytest
from PIL import Image

from mode_jax.calib import data


def _write(tmp_path, records, images=("a.png", "b.png", "c.png")):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in images:
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img_dir / name)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(records))
    return str(path), str(img_dir)


def _record(i, image):
    return {
        "id": f"r{i}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is here?"},
            {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "and?"},
        ],
    }


def test_human_only_and_full(tmp_path):
    path, img_dir = _write(tmp_path, [_record(i, f"{c}.png") for i, c in enumerate("abc")])
    human = data.sharegpt_samples(path, img_dir, n=2, seed=0)
    assert len(human) == 2
    for s in human:
        assert len(s.messages) == 1 and s.messages[0]["role"] == "user"
        assert s.messages[0]["content"][0] == {"type": "image"}  # image first
        assert s.messages[0]["content"][1]["text"] == "what is here?"
    full = data.sharegpt_samples(path, img_dir, n=0, seed=0, human_only=False)
    assert [m["role"] for m in full[0].messages] == ["user", "assistant", "user"]
    # seeded: same seed, same draw; another seed, a different order of the 3 records
    again = data.sharegpt_samples(path, img_dir, n=3, seed=0)
    other = [data.sharegpt_samples(path, img_dir, n=3, seed=s) for s in range(1, 6)]
    same = data.sharegpt_samples(path, img_dir, 3, 0)
    assert [s.images for s in again] == [s.images for s in same]
    assert any([s.images for s in o] != [s.images for s in again] for o in other)


def test_every_problem_named_at_once(tmp_path):
    records = [
        _record(0, "a.png"),
        _record(1, "missing.png"),
        {"id": "r2", "conversations": [{"from": "human", "value": "no image"}]},
        {"id": "r3", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]},
    ]
    path, img_dir = _write(tmp_path, records)
    with pytest.raises(ValueError) as err:
        data.read_sharegpt(path, img_dir)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "'r1'" in msg and "missing.png" in msg
    assert "'r2'" in msg and "no 'image'" in msg
    assert "'r3'" in msg and "no human turn" in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration JSON not found"):
        data.read_sharegpt(str(tmp_path / "nope.json"), str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_sharegpt(str(bad), str(tmp_path))
