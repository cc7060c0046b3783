"""InternVL prompts and images from a checkpoint directory, as its HF processor makes them.

transformers' `InternVLProcessor` needs a video processor, which needs torchvision (not a
dependency here), so this does what it does for images, from the checkpoint's tokenizer (chat
template) and image processor (`GotOcr2ImageProcessorPil`, on PIL):
- the image processor cuts each image into tiles of the tower's size (a grid chosen by aspect
  ratio, up to `max_patches`, plus a thumbnail when there is more than one), `num_patches` per
  image;
- the chat template renders each image item as the context token `<IMG_CONTEXT>` (the
  tokenizer's `context_image_token`); the i-th one becomes `<img>` + `<IMG_CONTEXT>` x
  (tokens per tile x tiles of image i) + `</img>`.
The batch carries `image_num_patches` so the model can check the tiles against the tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mode_jax import preprocess
from mode_jax.processors import load_image_processor, rgb

__all__ = ["build_batch", "expand_image_tokens", "load_image_processor"]

CONTEXT, START, END = "<IMG_CONTEXT>", "<img>", "</img>"


def _special(tokenizer, attribute: str, default: str) -> str:
    return str(getattr(tokenizer, attribute, None) or default)


def context_token(tokenizer=None) -> str:
    """The image context token: the tokenizer's `context_image_token`, else `<IMG_CONTEXT>`."""
    return _special(tokenizer, "context_image_token", CONTEXT)


def expand_image_tokens(text: str, tiles: Sequence[int], tokens_per_tile: int,
                        tokenizer=None) -> str:
    """Replace the i-th context token by image i's `<img>...</img>` run."""
    context = context_token(tokenizer)
    start = _special(tokenizer, "start_image_token", START)
    end = _special(tokenizer, "end_image_token", END)
    pieces = text.split(context)
    if len(pieces) - 1 != len(tiles):
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholder(s) {context} but "
                         f"{len(tiles)} image(s) were given")
    out = [pieces[0]]
    for n, rest in zip(tiles, pieces[1:], strict=True):
        out.append(start + context * (int(n) * tokens_per_tile) + end + rest)
    return "".join(out)


def build_batch(conversations: Sequence[Sequence[Mapping[str, Any]]],
                images: Sequence[Sequence[Any]], tokenizer, image_processor, *,
                tokens_per_tile: int, pad_token_id: int = 0, padding_side: str = "right",
                add_generation_prompt: bool = True) -> dict[str, np.ndarray]:
    """`InternVL`'s batch: input_ids, attention_mask `[B, T]`, pixel_values `[N, 3, S, S]`
    and image_num_patches `[I]` (tiles per image)."""
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    preprocess.require_chat_template(tokenizer, "InternVL")
    flat = [rgb(im) for per in images for im in per]
    out: dict[str, np.ndarray] = {}
    tiles = np.zeros(0, np.int64)
    if flat:
        pix = image_processor(images=flat, crop_to_patches=True, return_tensors="np")
        out["pixel_values"] = np.asarray(pix["pixel_values"], np.float32)
        tiles = np.asarray(pix["num_patches"], np.int64).reshape(-1)
        out["image_num_patches"] = tiles
    rows, start = [], 0
    for conv, per in zip(conversations, images, strict=True):
        text = preprocess.prompt_text(conv, tokenizer, add_generation_prompt)
        text = expand_image_tokens(text, tiles[start:start + len(per)], tokens_per_tile,
                                   tokenizer)
        start += len(per)
        rows.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    ids, mask = preprocess.pad_rows(rows, pad_token_id, padding_side)
    return {"input_ids": ids, "attention_mask": mask, **out}
