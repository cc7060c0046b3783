"""A user's own benchmark as JSONL, so exported MMBench- or ScienceQA-style sets can be scored.

One JSON object per line (blank lines are skipped):

    {"question": "What animal is this?", "image": "images/0001.jpg",
     "options": ["cat", "dog", "owl"], "answer_index": 1, "family": "animals"}
    {"question": "What is 2 plus 3?", "answer": "5", "id": "arith-7"}

Fields:
- `question` (string, required): the user text; for multiple choice the options are appended
  MMBench style ("... A. cat B. dog C. owl") and the expected answer is the letter.
- `image` (string, or a list of strings; optional): path of an image file, relative to the JSONL
  file's folder (or absolute), or several (MMMU style). The images stand where the question
  writes `<image>` (one placeholder per image, in order); without placeholders they come first,
  as in the chat template.
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

from mode_jax.preprocess import IMAGE_PLACEHOLDER as PLACEHOLDER
from mode_jax.preprocess import open_image, placeholder_content
from mode_jax.testbed.tasks import LETTERS, Sample, format_choices
from mode_jax.testbed.tokenizer import format_chat, format_user_turn

FIELDS = ("question", "image", "answer", "options", "answer_index", "family", "task", "id")


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One validated line. `answer` is the option letter for multiple choice."""

    id: str
    question: str
    answer: str
    family: str
    task: str
    image_paths: tuple[Path, ...] = ()
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    line: int = 0

    @property
    def image_path(self) -> Path | None:
        """The first image (the only one of most benchmarks), or None."""
        return self.image_paths[0] if self.image_paths else None


@dataclasses.dataclass(frozen=True)
class BenchmarkSample(Sample):
    """A benchmark question with any number of images (`image` is the first): each at its
    `<image>` placeholder in the question, or all first."""

    image_list: tuple[np.ndarray, ...] = dataclasses.field(default=(), compare=False,
                                                           repr=False)

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        return self.image_list

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": user_content(self.question, len(self.image_list))}]


def user_content(question: str, num_images: int) -> list[dict]:
    """Content items of a question with `num_images` images: at its placeholders, else first."""
    if PLACEHOLDER not in question:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return placeholder_content(question)


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
    image_paths = _images(record, base, where)
    slots = question.count(PLACEHOLDER)
    if slots not in (0, len(image_paths)):
        raise ValueError(f"{where}: the question has {slots} '{PLACEHOLDER}' placeholder(s) for "
                         f"{len(image_paths)} image(s) (one per image, or none: images first)")
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
        if any(PLACEHOLDER in o for o in opts):
            raise ValueError(f"{where}: an option holds '{PLACEHOLDER}'; images stand at "
                             "placeholders in the question only")
        options, answer = tuple(o.strip() for o in opts), LETTERS[index]
    else:
        answer = _string(record, "answer", where, required=True)
    family = _string(record, "family", where) or ("vision" if image_paths else "text")
    task = _string(record, "task", where) or family
    raw_id = record.get("id", line)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or integer, got {raw_id!r}")
    return BenchmarkItem(id=str(raw_id), question=question, answer=answer, family=family,
                         task=task, image_paths=image_paths, options=options, answer_index=index,
                         line=line)


def _images(record: dict, base: Path, where: str) -> tuple[Path, ...]:
    """The record's image files (checked to open), in order."""
    value = record.get("image")
    if value is None:
        return ()
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{where}: field 'image' must be a non-empty string or a non-empty "
                         f"list of them, got {value!r}")
    paths = []
    for name in names:
        path = (base / name.strip()).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} not found")
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{where}: {path} is not a readable image ({err})") from None
        paths.append(path)
    return tuple(paths)


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
    """The item as a task-suite `Sample` (images loaded as [H, W, 3] uint8 RGB), ready to
    encode; a `BenchmarkSample` when its images are not simply one placed first."""
    question = format_choices(item.question, item.options) if item.options else item.question
    images = []
    for path in item.image_paths:  # headers were read with the line; a truncated body shows here
        try:
            images.append(np.asarray(open_image(path)))
        except ValueError as err:
            raise ValueError(f"benchmark line {item.line}: {err}") from None
    fields = dict(question=question, answer=item.answer, family=item.family, task=item.task,
                  image=images[0] if images else None, options=item.options,
                  answer_index=item.answer_index, key=item.id)
    if len(images) <= 1 and PLACEHOLDER not in question:
        return Sample(prompt=format_chat(question, with_image=bool(images)), **fields)
    content = user_content(question, len(images))
    return BenchmarkSample(prompt=format_user_turn(content), image_list=tuple(images), **fields)
