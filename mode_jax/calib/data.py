"""Calibration data: ShareGPT4V-style JSON + a local image directory -> model batches.

The file is a JSON list of records:
  {"id": "...", "image": "coco/000000123.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                     {"from": "gpt", "value": "..."}, ...]}
`image` is relative to the image directory. The statistics passes use "human-only" prompts (the
first human turn, image first, generation prompt appended, no answer: method.md stage 1); GPTQ
uses whole conversations. A record may hold several images (LLaVA-OneVision style):
  {"image": ["a.jpg", "b.jpg"], "conversations": [
      {"from": "human", "value": "<image>\n<image>\nWhich photo is brighter?"}, ...]}
each then stands where its `<image>` placeholder is (in human turns, one per image, in order;
without placeholders they all go first). A human-only prompt holds the images of the first
human turn. Records with no `image` key (the text-only share of LLaVA-style mixes)
are skipped with a logged count: every stage draws from the image records only. Every problem in
the file (missing image file, bad record) is reported at once, naming the record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mode_jax import preprocess, processors
from mode_jax.preprocess import IMAGE_PLACEHOLDER as PLACEHOLDER

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEMPLATE_WORDS = ("user", "assistant", "system")  # role words inside the chat template


@dataclasses.dataclass(frozen=True)
class Sample:
    """One calibration example: chat messages (image item first) and its images."""

    messages: tuple[dict, ...]
    images: tuple[Any, ...]  # paths, PIL images or HWC uint8 arrays
    family: str = "vision"


def read_sharegpt(json_path: str, image_dir: str) -> list[dict]:
    """The validated records that have an image, in file order; raises one ValueError naming
    every bad record and missing image file, or saying that no record has an image."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"calibration JSON not found: {json_path}")
    try:
        with open(json_path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{json_path} must hold a non-empty JSON list of records")
    problems, kept, text_only = [], [], 0
    for i, r in enumerate(records):
        name = f"record {i} (id {r.get('id', '?')!r})" if isinstance(r, dict) else f"record {i}"
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            problems.append(f"{name}: needs a 'conversations' list")
            continue
        if "image" not in r:
            text_only += 1
            continue
        turns = r["conversations"]
        bad = [j for j, t in enumerate(turns) if not isinstance(t, dict)
               or not isinstance(t.get("from"), str) or t["from"] not in ROLES
               or not isinstance(t.get("value", ""), str)]
        if bad:
            problems.append(f"{name}: turn {bad[0]} needs 'from' ({', '.join(ROLES)}) and a "
                            f"string 'value', got {turns[bad[0]]!r}"[:300])
            continue
        if not any(ROLES[t["from"]] == "user" for t in turns):
            problems.append(f"{name}: has no human turn")
        problems += [f"{name}: {p}" for p in _image_problems(r, image_dir)]
        kept.append(r)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{json_path}: {len(problems)} problem(s):\n  {shown}{more}")
    if not kept:
        raise ValueError(f"{json_path}: none of its {len(records)} records has an 'image'; "
                         "calibrating the vision statistics needs image + question records")
    if text_only:
        log.info("%s: skipped %d of %d records that have no 'image' (text-only)", json_path,
                 text_only, len(records))
    return kept


def image_paths(record: dict) -> list[str]:
    """A record's image files, relative to the image directory, in placeholder order."""
    image = record["image"]
    return [image] if isinstance(image, str) else list(image)


def _placeholders(record: dict) -> tuple[int, int]:
    """`<image>` placeholders in the record's human turns and in its other turns."""
    human = other = 0
    for turn in record["conversations"]:
        n = str(turn.get("value", "")).count(PLACEHOLDER)
        if ROLES.get(turn.get("from")) == "user":
            human += n
        else:
            other += n
    return human, other


def _image_problems(record: dict, image_dir: str) -> list[str]:
    image = record["image"]
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(
            isinstance(p, str) and p for p in paths):
        return [f"'image' must be a relative path or a non-empty list of them, got {image!r}"]
    problems = [f"image not found: {os.path.join(image_dir, p)}" for p in paths
                if not os.path.isfile(os.path.join(image_dir, p))]
    if isinstance(image, list):
        human, other = _placeholders(record)
        if other:
            problems.append(f"{other} '{PLACEHOLDER}' placeholder(s) outside the human turns")
        elif human not in (0, len(paths)):
            problems.append(f"{human} '{PLACEHOLDER}' placeholder(s) in its human turns for "
                            f"{len(paths)} images (one per image, or none: all images first)")
    return problems


def image_sizes(records: list[dict], image_dir: str, indices
                ) -> dict[int, tuple[tuple[int, int], ...]]:
    """(width, height) of each image of `records[indices]`, each decoded once: a zero-byte,
    non-image or truncated file is named before any stage runs, not when the stage that draws
    it reaches it (after convert, on a real checkpoint)."""
    sizes, problems = {}, []
    for i in sorted({int(i) for i in indices}):
        found = []
        for name in image_paths(records[i]):
            try:
                with Image.open(os.path.join(image_dir, name)) as image:
                    image.load()  # the body too: a truncated file has a good header
                    found.append(image.size)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                # UnidentifiedImageError is an OSError
                problems.append(f"image record {i} (id {records[i].get('id', '?')!r}), "
                                f"{name}: {err}")
        sizes[i] = tuple(found)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{len(problems)} calibration image(s) cannot be read:\n  {shown}{more}")
    return sizes


# A blank image this size stands in for every record's image when prompts are measured.
PROBE_SIZE = (64, 64)


def prompt_lengths(samples: Sequence[Sample], sizes: Sequence[Sequence[tuple[int, int]]], build,
                   names: Sequence[str] | None = None) -> np.ndarray:
    """Tokens of each sample's prompt as `batches` builds it with `build`, knowing only its
    images' (width, height) (`sizes[i]` for `samples[i].images`, e.g. from `image_sizes`): no
    image is decoded. `names` label the samples in errors (e.g. a processor refusing a size).

    An image adds a run of placeholder tokens whose count depends on its size alone, so each
    prompt is built once with small blank images and the difference a real size makes is
    measured once per distinct size."""
    from PIL import Image

    if len(samples) != len(sizes):
        raise ValueError(f"{len(samples)} samples but {len(sizes)} image size lists")
    for s, size in zip(samples, sizes, strict=True):
        if len(s.images) != len(size):
            raise ValueError(f"a sample has {len(s.images)} images but {len(size)} sizes")
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(samples))]
    probe = Image.new("RGB", PROBE_SIZE)

    def length(i: int, messages, images, what: str = "") -> int:
        try:
            return int(build([messages], [tuple(images)])["input_ids"].shape[1])
        except ValueError as err:
            raise ValueError(f"{names[i]}{what}: {err}") from None

    owner = {}  # each distinct size -> the first sample with it (named if it is refused)
    for i, size in enumerate(sizes):
        for wh in size:
            owner.setdefault(tuple(wh), i)
    extra = {}
    if owner:  # measured as the first image of the first sample that has one
        j = next(i for i, s in enumerate(samples) if s.images)
        rest = [probe] * (len(samples[j].images) - 1)
        base = length(j, samples[j].messages, [probe, *rest])
        for wh, i in sorted(owner.items()):
            extra[wh] = length(i, samples[j].messages, [Image.new("RGB", wh), *rest],
                               f", an image of {wh[0]}x{wh[1]} px") - base
    return np.asarray([length(i, s.messages, [probe] * len(size)) + sum(extra[tuple(wh)]
                                                                       for wh in size)
                       for i, (s, size) in enumerate(zip(samples, sizes, strict=True))],
                      np.int64)


def _messages(record: dict, human_only: bool) -> tuple[tuple[dict, ...], int]:
    """Chat messages and how many of the record's images (`image_paths` order) they hold. One
    image, or a list without placeholders: first in the first user turn. A list with
    placeholders: each image where its `<image>` stands."""
    at_placeholders = not isinstance(record["image"], str) and _placeholders(record)[0] > 0
    first = 0 if at_placeholders else len(image_paths(record))
    out, used = [], 0
    for turn in record["conversations"]:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"record {record.get('id', '?')!r}: unknown role {turn.get('from')!r}")
        if not out and role != "user":
            continue
        value = str(turn.get("value", ""))
        if at_placeholders and PLACEHOLDER in value:
            content = preprocess.placeholder_content(value)
            used += value.count(PLACEHOLDER)
        elif not out:
            text = value.replace(PLACEHOLDER, "").strip()
            content = [{"type": "image"}] * first + [{"type": "text", "text": text}]
            used += first
        else:
            content = value.replace(PLACEHOLDER, "").strip()
        out.append({"role": role, "content": content})
        if human_only:
            break
    return tuple(out), used


def sharegpt_samples(
    json_path: str, image_dir: str, n: int, seed: int, human_only: bool = True,
    records: list[dict] | None = None,
) -> list[Sample]:
    """`n` records drawn with a seeded shuffle (all of them if n <= 0 or n exceeds the file).
    `records`: the file's `read_sharegpt` result when the caller has it already."""
    if records is None:
        records = read_sharegpt(json_path, image_dir)
    order = draw_order(len(records), seed)
    if n > 0:
        order = order[:n]
    return [record_sample(records[i], image_dir, human_only) for i in order]


def draw_order(num_records: int, seed: int) -> np.ndarray:
    """The seeded shuffle that draws records: a draw of n takes its first n."""
    return np.random.default_rng(seed).permutation(num_records)


def record_sample(record: dict, image_dir: str, human_only: bool = True) -> Sample:
    messages, used = _messages(record, human_only)
    return Sample(messages, tuple(os.path.join(image_dir, p) for p in image_paths(record)[:used]))


def special_token_ids(tokenizer, image_token_id: int | None = None) -> np.ndarray:
    """Ids that never count as MODE text queries: special tokens, the template's role words and,
    given the image token id, every token the chat template itself writes after an image.

    The last matters for ChatML templates (Qwen3-VL, InternVL): their '\n' after a role word,
    an image or `<|im_end|>` is an ordinary token, which would otherwise query the image tokens
    beside the question's words (as would the word 'image' of Kimi-VL's second image block).
    A newline or role word inside a question is excluded with them: queries are the words."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "get_added_vocab", lambda: {})()
    ids.update(added.values())
    for word in TEMPLATE_WORDS:
        ids.update(tokenizer(word, add_special_tokens=False)["input_ids"])
    if image_token_id is not None:
        ids.update(template_token_ids(tokenizer, image_token_id))
    return np.asarray(sorted(ids), dtype=np.int32)


def template_token_ids(tokenizer, image_token_id: int) -> set[int]:
    """The ids a statistics prompt's template writes from its first image on, found by
    rendering a user turn of two images and no text (with the generation prompt)."""
    image, empty = {"type": "image"}, {"type": "text", "text": ""}
    text = preprocess.prompt_text([{"role": "user", "content": [image, image, empty]}], tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.count(image_token_id) != 2:
        raise ValueError(f"the chat template wrote {ids.count(image_token_id)} image tokens "
                         f"(id {image_token_id}) for two images: {text!r}")
    return set(ids[ids.index(image_token_id):]) - {image_token_id}


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a Sample's image: a path (its header only is read), a PIL image or an
    `[H, W, C]` array."""
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as im:
                return im.size
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"image {image} could not be read: {err}") from None
    if isinstance(image, Image.Image):
        return image.size
    shape = np.shape(image)
    return int(shape[1]), int(shape[0])


# The one-image conversation `image_grids` builds around a blank image of each size.
GRID_PROBE = ({"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Describe the image."}]},)


def image_grids(build) -> Callable[[tuple[int, int]], tuple]:
    """`(width, height) -> grid`: the static grid (`processors.image_grid`) `build` gives an
    image of that size, measured once per size on a blank image (41 ms a size for sizes of 200
    to 1400 px at Kimi-VL's settings, nearly all of it the processor's pixel work). Many sizes
    share a grid (Kimi-VL pads to 28-pixel multiples, so COCO's 640x421 to 640x448 are one
    grid), and that grid is what a compiled pass sees."""

    @functools.cache
    def grid(size: tuple[int, int]) -> tuple:
        try:
            batch = build([GRID_PROBE], [(Image.new("RGB", size),)])
        except ValueError as err:
            raise ValueError(f"an image of {size[0]}x{size[1]} px: {err}") from None
        return processors.image_grid(batch, 0)

    return grid


def group_by_image_grid(samples: Sequence[Sample],
                        grid: Callable[[tuple[int, int]], Any] | None = None) -> list[Sample]:
    """`samples` with those whose images have the same grids (`grid(size)`, e.g. `image_grids`;
    None: the sizes themselves) next to each other: groups in the order of their first sample,
    the draw's order kept within a group; samples without images keep their places (they add
    no grid). Images all of one grid leave the order as it is.

    A batch's image grids are static arguments of every compiled pass (the vision tower's
    position tables and attention blocks are built for them), so every new tuple of grids
    in a batch is one more program to trace and compile for each pass. Drawn at random from
    images of a few common grids, nearly every batch holds a new tuple; grouped, batches of
    one grid repeat the same tuple. The statistics are sums over tokens, so only their float
    rounding depends on the order."""
    grid = grid or (lambda size: size)
    places = [i for i, s in enumerate(samples) if s.images]
    keys = {i: tuple(grid(image_size(im)) for im in samples[i].images) for i in places}
    first: dict[tuple, int] = {}
    for i in places:
        first.setdefault(keys[i], len(first))
    out = list(samples)
    for place, i in zip(places, sorted(places, key=lambda i: first[keys[i]]), strict=True):
        out[place] = samples[i]  # sorted() is stable: the draw's order within a group
    return out


LENGTHS_PER_DOUBLING = 8  # configs/common.py data.lengths_per_doubling


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_length(length: int, multiple: int = 32, per_doubling: int = LENGTHS_PER_DOUBLING,
                  cap: int = 0) -> int:
    """The length a batch whose longest prompt has `length` tokens is padded to.

    Every distinct padded length is one more program to compile for each pass (and at
    Kimi-VL-A3B's size one program of a pass takes tens of seconds), while the padding costs
    compute in proportion. Rounding to a fixed multiple gives a program per 32 tokens however
    long the prompts; rounding to `per_doubling` steps per doubling (a step of
    `2**floor(log2 length) / per_doubling`, at least `multiple`) pads at most
    `1 / per_doubling` of the length (12.5% at 8) and gives a fixed number of programs per
    doubling. 0: every multiple of `multiple`. `cap` (> 0) keeps the padding within a
    `max_length` the prompt itself fits."""
    step = multiple
    if per_doubling > 0 and length > 0:
        step = max(multiple, _round_up((1 << (int(length).bit_length() - 1)) // per_doubling,
                                       multiple))
    padded = _round_up(length, step)
    if cap > 0:
        padded = min(padded, max(cap // multiple * multiple, _round_up(length, multiple)))
    return padded


def kimi_build(tokenizer, image_cfg: preprocess.ImageConfig, pad_token_id: int = 0):
    """Kimi-VL's `build(conversations, images) -> batch` (right-padded), as `batches` uses it."""
    def build(conversations, images):
        return preprocess.build_batch(conversations, images, tokenizer, image_cfg=image_cfg,
                                      pad_token_id=pad_token_id, padding_side="right")
    return build


def batches(
    samples: Sequence[Sample],
    tokenizer,
    batch_size: int,
    *,
    image_cfg: preprocess.ImageConfig | None = None,
    pad_token_id: int = 0,
    max_length: int = 0,
    length_multiple: int = 32,
    lengths_per_doubling: int = LENGTHS_PER_DOUBLING,
    build=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Right-padded batches, their lengths rounded up as `padded_length` does (multiples of
    `length_multiple`, `lengths_per_doubling` lengths per doubling, within `max_length`) so jit
    sees few shapes.

    A batch is the HF-processor dict (input_ids, attention_mask, pixel_values, image_grid_hws);
    the last batch may be smaller. Prompts longer than `max_length` (if > 0) are an error: the
    image tokens would be cut. `build(conversations, images)` makes one right-padded batch in
    another model family's format (Qwen3-VL: `preprocess_qwen3vl.build_batch`); the default
    is Kimi-VL's `preprocess.build_batch`.
    """
    if build is None:
        build = kimi_build(tokenizer, image_cfg or preprocess.ImageConfig(), pad_token_id)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = build([s.messages for s in chunk], [s.images for s in chunk])
        t = batch["input_ids"].shape[1]
        if max_length and t > max_length:
            raise ValueError(
                f"a calibration prompt has {t} tokens, more than data.max_length={max_length}; "
                "raise max_length or cap each image's tokens with data.max_image_tokens"
            )
        pad = padded_length(t, length_multiple, lengths_per_doubling, max_length) - t
        if pad:
            batch["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, pad)),
                                        constant_values=pad_token_id)
            for key in ("attention_mask", "mm_token_type_ids"):
                if key in batch:
                    batch[key] = np.pad(batch[key], ((0, 0), (0, pad)))
        yield batch
