"""A user's own benchmark as JSONL, so exported MMBench- or ScienceQA-style sets can be scored.

One JSON object per line (blank lines are skipped):

    {"question": "What animal is this?", "image": "images/0001.jpg",
     "options": ["cat", "dog", "owl"], "answer_index": 1, "family": "animals"}
    {"question": "What is 2 plus 3?", "answer": "5", "id": "arith-7"}

Fields:
- `question` (string, required): the user text; for multiple choice the options are appended
  MMBench style ("... A. cat B. dog C. owl") and the expected answer is the letter.
- `image` (string, optional): path of an image file, relative to the JSONL file's folder (or
  absolute); the prompt then has the image first, as in the chat template.
- exactly one of: `answer` (string, open question scored by exact match) or `options` (2 to 26
  strings) with `answer_index` (integer, 0-based index of the right option; scored by exact match
  of the letter and by log-likelihood of each option letter).
- `family` (string, optional): label for the per-family breakdown; default "vision" with an
  image, "text" without. `task` (string, optional): sub-task label; default the family.
- `id` (string or integer, optional, unique): default the line number.
Any other field is an error (it is most likely a misspelt one). Errors name the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mode_jax.testbed.tasks import LETTERS, Sample, format_choices
from mode_jax.testbed.tokenizer import format_chat

FIELDS = ("question", "image", "answer", "options", "answer_index", "family", "task", "id")


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One validated line. `answer` is the option letter for multiple choice."""

    id: str
    question: str
    answer: str
    family: str
    task: str
    image_path: Path | None = None
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    line: int = 0


def _string(record: dict, key: str, where: str, required: bool = False) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _parse(record, base: Path, where: str, line: int) -> BenchmarkItem:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} (allowed: {list(FIELDS)})")
    question = _string(record, "question", where, required=True)
    image_path = None
    if (image := _string(record, "image", where)) is not None:
        image_path = (base / image).resolve()
        if not image_path.is_file():
            raise FileNotFoundError(f"{where}: image file {image_path} not found")
        try:
            with Image.open(image_path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{where}: {image_path} is not a readable image ({err})") from None
    has_options = "options" in record or "answer_index" in record
    if has_options == ("answer" in record):
        raise ValueError(f"{where}: give either 'answer' or 'options' with 'answer_index'")
    options, index = (), None
    if has_options:
        for key in ("options", "answer_index"):
            if key not in record:
                raise ValueError(f"{where}: missing field {key!r} (multiple choice needs "
                                 "'options' and 'answer_index')")
        opts = record["options"]
        if (not isinstance(opts, list) or not 2 <= len(opts) <= len(LETTERS)
                or not all(isinstance(o, str) and o.strip() for o in opts)):
            raise ValueError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} "
                             f"non-empty strings, got {opts!r}")
        index = record["answer_index"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{where}: 'answer_index' must be an integer, got {index!r}")
        if not 0 <= index < len(opts):
            raise ValueError(f"{where}: answer_index {index} out of range for {len(opts)} "
                             f"options (allowed 0..{len(opts) - 1})")
        options, answer = tuple(o.strip() for o in opts), LETTERS[index]
    else:
        answer = _string(record, "answer", where, required=True)
    family = _string(record, "family", where) or ("vision" if image_path else "text")
    task = _string(record, "task", where) or family
    raw_id = record.get("id", line)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or integer, got {raw_id!r}")
    return BenchmarkItem(id=str(raw_id), question=question, answer=answer, family=family,
                         task=task, image_path=image_path, options=options, answer_index=index,
                         line=line)


def read_benchmark(path: str | Path) -> list[BenchmarkItem]:
    """Validate every line of a benchmark JSONL file; the first bad line raises, naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} not found")
    items: list[BenchmarkItem] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
            item = _parse(record, path.parent, where, line)
            if item.id in seen:
                raise ValueError(f"{where}: id {item.id!r} already used on line {seen[item.id]}")
            seen[item.id] = line
            items.append(item)
    if not items:
        raise ValueError(f"benchmark file {path} holds no items")
    return items


def to_sample(item: BenchmarkItem) -> Sample:
    """The item as a task-suite `Sample` (image loaded as [H, W, 3] uint8 RGB), ready to encode."""
    question = format_choices(item.question, item.options) if item.options else item.question
    image = None
    if item.image_path is not None:
        with Image.open(item.image_path) as im:
            image = np.asarray(im.convert("RGB"))
    return Sample(prompt=format_chat(question, with_image=image is not None), question=question,
                  answer=item.answer, family=item.family, task=item.task, image=image,
                  options=item.options, answer_index=item.answer_index, key=item.id)
