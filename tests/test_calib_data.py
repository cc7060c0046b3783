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
        {"id": "r2", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> two images"}]},
        {"id": "r3", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "r4", "image": "a.png"},
        {"id": "r5", "image": [], "conversations": [{"from": "human", "value": "x"}]},
        {"id": "r6", "image": ["a.png"], "conversations": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}]},
        {"id": "r7", "image": "a.png", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "r8", "image": "a.png", "conversations": ["hi"]},
        {"id": "r9", "image": "a.png", "conversations": [{"from": ["human"], "value": "x"}]},
    ]
    path, img_dir = _write(tmp_path, records)
    with pytest.raises(ValueError) as err:
        data.read_sharegpt(path, img_dir)
    msg = str(err.value)
    assert "9 problem(s)" in msg
    assert "'r1'" in msg and "missing.png" in msg
    assert "'r2'): 1 '<image>' placeholder(s) in its human turns for 2 images" in msg
    assert "'r3'" in msg and "no human turn" in msg
    assert "'r4'" in msg and "'conversations' list" in msg
    assert "'r5'): 'image' must be a relative path or a non-empty list of them" in msg
    assert "'r6'): 1 '<image>' placeholder(s) outside the human turns" in msg
    assert "'r7'): turn 0 needs 'from'" in msg and "'robot'" in msg
    assert "'r8'): turn 0 needs 'from'" in msg
    assert "'r9'): turn 0 needs 'from'" in msg


def test_several_images_stand_at_their_placeholders(tmp_path):
    """A list of images: each where its `<image>` is written (a human-only prompt keeps the first
    turn's); without placeholders all first, like a single image."""
    at = {"id": "m", "image": ["a.png", "b.png", "c.png"], "conversations": [
        {"from": "human", "value": "compare <image> and\n<image>"},
        {"from": "gpt", "value": "the first"},
        {"from": "human", "value": "<image>\nand this one?"}]}
    first = {"id": "f", "image": ["b.png", "a.png"], "conversations": [
        {"from": "human", "value": "which is brighter?"}, {"from": "gpt", "value": "b"}]}
    path, img_dir = _write(tmp_path, [at, first])
    at, first = data.read_sharegpt(path, img_dir)
    img = lambda *names: tuple(f"{img_dir}/{n}" for n in names)  # noqa: E731
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}  # noqa: E731
    whole = data.record_sample(at, img_dir, human_only=False)
    assert whole.images == img("a.png", "b.png", "c.png")
    assert whole.messages == (
        {"role": "user", "content": [text("compare"), image, text("and"), image]},
        {"role": "assistant", "content": "the first"},
        {"role": "user", "content": [image, text("and this one?")]})
    human = data.record_sample(at, img_dir)
    assert human.images == img("a.png", "b.png") and human.messages == whole.messages[:1]
    both = data.record_sample(first, img_dir, human_only=False)
    assert both.images == img("b.png", "a.png")
    assert both.messages[0]["content"] == [image, image, text("which is brighter?")]
    assert data.image_sizes([at, first], img_dir, [0, 1]) == {0: ((28, 28),) * 3,
                                                             1: ((28, 28),) * 2}


def test_text_only_records_are_skipped(tmp_path, caplog):
    """LLaVA-style mixes hold text-only records: they are left out (and counted), and every
    draw takes image records only; a file with no image record at all is refused."""
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "hello"}]}
    records = [text_only, _record(0, "a.png"), text_only, _record(1, "b.png"), text_only]
    path, img_dir = _write(tmp_path, records)
    with caplog.at_level("INFO", logger=data.__name__):
        kept = data.read_sharegpt(path, img_dir)
    assert [r["id"] for r in kept] == ["r0", "r1"]
    assert "skipped 3 of 5 records" in caplog.text
    drawn = data.sharegpt_samples(path, img_dir, n=0, seed=3)
    assert sorted(s.images[0] for s in drawn) == [f"{img_dir}/a.png", f"{img_dir}/b.png"]
    (tmp_path / "none").mkdir()
    path, img_dir = _write(tmp_path / "none", [text_only, text_only], images=())
    with pytest.raises(ValueError, match="none of its 2 records has an 'image'"):
        data.read_sharegpt(path, img_dir)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration JSON not found"):
        data.read_sharegpt(str(tmp_path / "nope.json"), str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_sharegpt(str(bad), str(tmp_path))


def test_samples_are_grouped_by_image_grid(tmp_path):
    """Same sizes (or grids) become neighbours (groups in order of first appearance, the draw's
    order kept inside a group); samples without images stay where they were; all of one size:
    no change. Paths (header only), PIL images and arrays give the same key."""
    sizes = {"a.png": (28, 14), "b.png": (14, 28), "c.png": (28, 14)}
    for name, (w, h) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    wide, tall = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    pil = Image.open(tmp_path / "c.png")
    arr = np.zeros((14, 28, 3), np.uint8)
    assert {data.image_size(x) for x in (wide, pil, arr)} == {(28, 14)}
    assert data.image_size(tall) == (14, 28)
    drawn = [data.Sample((), (wide,)), data.Sample((), (tall,)), data.Sample((), ()),
             data.Sample((), (pil,)), data.Sample((), (tall, wide)), data.Sample((), (tall,)),
             data.Sample((), (arr,))]
    got = data.group_by_image_grid(drawn)
    want = [drawn[0], drawn[3], drawn[2], drawn[6], drawn[1], drawn[5], drawn[4]]
    assert [id(s) for s in got] == [id(s) for s in want]
    same = [data.Sample((), (wide,)), data.Sample((), ()), data.Sample((), (arr,))]
    assert [id(s) for s in data.group_by_image_grid(same)] == [id(s) for s in same]
    with pytest.raises(ValueError, match="missing.png could not be read"):
        data.group_by_image_grid([data.Sample((), (str(tmp_path / "missing.png"),))])
    # with a grid function, different sizes of one grid are one group (here by width alone)
    narrow = np.zeros((20, 14, 3), np.uint8)  # 14 x 20: tall's width, not its size
    drawn = [data.Sample((), (narrow,)), data.Sample((), (wide,)), data.Sample((), (tall,))]
    got = data.group_by_image_grid(drawn, grid=lambda size: size[0])
    assert [id(s) for s in got] == [id(s) for s in (drawn[0], drawn[2], drawn[1])]
    assert [id(s) for s in data.group_by_image_grid(drawn)] == [id(s) for s in drawn]


def test_padded_lengths_are_few_and_pad_little():
    ts = np.arange(1, 9000)
    for per_doubling in (0, 4, 8):
        padded = np.array([data.padded_length(int(t), 32, per_doubling) for t in ts])
        assert np.all(padded >= ts) and np.all(padded % 32 == 0)
        assert np.all(np.diff(padded) >= 0)  # longer prompts never get shorter batches
        assert all(data.padded_length(int(p), 32, per_doubling) == p for p in set(padded))
        if per_doubling == 0:
            np.testing.assert_array_equal(padded, -(-ts // 32) * 32)
            continue
        long = ts >= 32 * per_doubling  # below it the 32-token multiple is the step
        assert np.all((padded - ts)[long] < ts[long] / per_doubling)
        for k in range(int(np.log2(32 * per_doubling)), 13):  # lengths in (2^k, 2^(k+1)]
            inside = (ts > 2 ** k) & (ts <= 2 ** (k + 1))
            assert len(set(padded[inside])) == per_doubling, (per_doubling, k)
    # within a max_length the prompt fits, never padded past it (to a multiple of 32 below it)
    assert data.padded_length(3900, 32, 8) == 4096
    assert data.padded_length(3900, 32, 8, cap=4010) == 4000
    assert data.padded_length(4001, 32, 8, cap=4010) == 4032  # over a multiple: 32 rounding
    assert data.padded_length(600, 32, 8, cap=4096) == 640
