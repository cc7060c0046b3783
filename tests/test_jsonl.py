"""User benchmark JSONL: valid files become samples; each bad line is named with its problem."""

import json

import numpy as np
import pytest
from PIL import Image

from mode_jax.eval import jsonl
from mode_jax.testbed import tokenizer as tk

GOOD = [
    {"question": "What animal is this?", "image": "images/cat.png",
     "options": ["cat", "dog", "owl"], "answer_index": 0, "family": "animals"},
    {"question": "What is 2 plus 3?", "answer": "5", "id": "arith-7", "task": "arithmetic"},
]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "images" / "cat.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path


def _write(folder, records, name="bench.jsonl"):
    path = folder / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_valid_file(folder):
    path = _write(folder, [GOOD[0], "", GOOD[1]])
    items = jsonl.read_benchmark(path)
    assert [i.line for i in items] == [1, 3]
    mc, open_q = items
    assert mc.image_path == (folder / "images" / "cat.png").resolve()
    assert mc.options == ("cat", "dog", "owl") and mc.answer_index == 0 and mc.answer == "A"
    assert (mc.family, mc.task, mc.id) == ("animals", "animals", "1")
    assert open_q.image_path is None and open_q.answer == "5"
    assert (open_q.family, open_q.task, open_q.id) == ("text", "arithmetic", "arith-7")

    sample = jsonl.to_sample(mc)
    assert sample.image.shape == (40, 60, 3) and sample.modality == "image"
    assert sample.question == "What animal is this? A. cat B. dog C. owl"
    assert sample.prompt == tk.format_chat(sample.question, with_image=True)
    assert jsonl.to_sample(open_q).prompt == tk.format_chat("What is 2 plus 3?", with_image=False)


def test_default_family_follows_the_image(folder):
    record = {"question": "Colour?", "image": "images/cat.png", "answer": "grey"}
    (item,) = jsonl.read_benchmark(_write(folder, [record]))
    assert item.family == "vision" and item.task == "vision"


BAD = [
    ('{"question": "x", "answer": "y"', "bad JSON"),
    ('["question"]', "expected a JSON object"),
    ({"answer": "y"}, "missing field 'question'"),
    ({"question": "", "answer": "y"}, "'question' must be a non-empty string"),
    ({"question": "x"}, "either 'answer' or 'options'"),
    ({"question": "x", "answer": "y", "options": ["a", "b"], "answer_index": 0},
     "either 'answer' or 'options'"),
    ({"question": "x", "options": ["a", "b"]}, "missing field 'answer_index'"),
    ({"question": "x", "answer_index": 1}, "missing field 'options'"),
    ({"question": "x", "options": ["a", "b"], "answer_index": 2}, "answer_index 2 out of range"),
    ({"question": "x", "options": ["a", "b"], "answer_index": -1}, "out of range"),
    ({"question": "x", "options": ["a", "b"], "answer_index": "1"}, "must be an integer"),
    ({"question": "x", "options": ["a", "b"], "answer_index": True}, "must be an integer"),
    ({"question": "x", "options": "a b", "answer_index": 0}, "'options' must be a list"),
    ({"question": "x", "options": ["a"], "answer_index": 0}, "'options' must be a list"),
    ({"question": "x", "answer": "y", "answer_idx": 0}, "unknown field(s) ['answer_idx']"),
    ({"question": "x", "answer": 5}, "'answer' must be a non-empty string"),
    ({"question": "x", "answer": "y", "id": 1.5}, "'id' must be a string or integer"),
    ({"question": "x", "answer": "y", "id": "arith-7"}, "id 'arith-7' already used on line 2"),
    ({"question": "x", "answer": "y", "image": "images/notes.txt"}, "is not a readable image"),
    ({"question": "x", "answer": "y", "image": []}, "'image' must be a non-empty string or a"),
    ({"question": "x", "answer": "y", "image": ["images/cat.png", 3]}, "non-empty list of them"),
    ({"question": "x <image>", "answer": "y"}, "1 '<image>' placeholder(s) for 0 image(s)"),
    ({"question": "x", "options": ["a <image>", "b"], "answer_index": 0},
     "an option holds '<image>'"),
    ({"question": "<image> x <image>", "answer": "y", "image": ["images/cat.png"]},
     "2 '<image>' placeholder(s) for 1 image(s)"),
]


@pytest.mark.parametrize("record, problem", BAD)
def test_bad_line_is_named(folder, record, problem):
    path = _write(folder, [GOOD[0], GOOD[1], record])
    with pytest.raises(ValueError) as err:
        jsonl.read_benchmark(path)
    assert f"{path}:3:" in str(err.value)
    assert problem in str(err.value)


def test_missing_image_is_named(folder):
    path = _write(folder, [GOOD[1], {"question": "x", "answer": "y", "image": "images/no.png"}])
    with pytest.raises(FileNotFoundError, match=r"bench.jsonl:2: image file .*no.png not found"):
        jsonl.read_benchmark(path)


def test_a_truncated_image_is_named_with_its_line(folder):
    """Its header reads, so the line passes; decoding it names the line and the file."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        folder / "images" / "full.png")
    body = (folder / "images" / "full.png").read_bytes()
    (folder / "images" / "cut.png").write_bytes(body[:len(body) // 2])
    path = _write(folder, [GOOD[1], {"question": "x", "answer": "y", "image": "images/cut.png"}])
    items = jsonl.read_benchmark(path)
    with pytest.raises(ValueError, match=r"benchmark line 2: image .*cut.png could not be read: "
                                         r"image file is truncated"):
        jsonl.to_sample(items[1])


def test_missing_or_empty_file(folder):
    with pytest.raises(FileNotFoundError, match="not found"):
        jsonl.read_benchmark(folder / "absent.jsonl")
    with pytest.raises(ValueError, match="holds no items"):
        jsonl.read_benchmark(_write(folder, ["", "  "]))


def test_several_images_stand_at_their_placeholders(folder):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "images" / "dark.png")
    records = [{"question": "is <image> darker than <image> ?", "answer": "yes",
                "image": ["images/cat.png", "images/dark.png"]},
               {"question": "which is darker ?", "options": ["first", "second"],
                "answer_index": 1, "image": ["images/dark.png", "images/cat.png"]}]
    at, first = jsonl.read_benchmark(_write(folder, records))
    assert at.image_paths == tuple((folder / "images" / n).resolve()
                                   for n in ("cat.png", "dark.png"))
    assert at.image_path == at.image_paths[0] and at.family == "vision"
    sample = jsonl.to_sample(at)
    assert [im.shape for im in sample.images] == [(40, 60, 3), (20, 30, 3)]
    assert sample.image is sample.images[0] and sample.modality == "image"
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}  # noqa: E731
    assert sample.messages() == [{"role": "user", "content": [
        text("is"), image, text("darker than"), image, text("?")]}]
    assert sample.prompt == tk.format_user_turn(sample.messages()[0]["content"])
    both = jsonl.to_sample(first)
    assert both.messages()[0]["content"] == [image, image, text(both.question)]
    assert both.question == "which is darker ? A. first B. second" and both.answer == "B"
    # one image without a placeholder stays a plain task-suite sample, image first
    one = jsonl.to_sample(jsonl.read_benchmark(_write(folder, [GOOD[0]], "one.jsonl"))[0])
    assert type(one) is jsonl.Sample and one.images == (one.image,)
