"""Qwen3-VL prompts and images from a checkpoint directory, without its video processor.

transformers' `Qwen3VLProcessor` insists on a video processor, which needs torchvision (not a
dependency here). Images need only the checkpoint's image processor, which transformers runs
on PIL (`Qwen2VLImageProcessorPil`), and the chat template, which the tokenizer holds. So this
does what the processor does for images:
- the prompt is the tokenizer's chat template (each image item renders as
  `<|vision_start|><|image_pad|><|vision_end|>`);
- the i-th `<|image_pad|>` is repeated `t * h * w / merge^2` times, image i's merged patches
  (`image_grid_thw` from the image processor);
- `mm_token_type_ids` marks those tokens with 1.
Images are paths, PIL images or HWC uint8 arrays, converted to RGB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mode_jax import preprocess
from mode_jax.processors import load_image_processor, rgb

__all__ = ["build_batch", "expand_image_pads", "load_image_processor"]

IMAGE_PAD = "<|image_pad|>"


def expand_image_pads(text: str, grid_thw: np.ndarray, merge: int) -> str:
    """Repeat the i-th `<|image_pad|>` once per merged patch of image i."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(grid_thw):
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholder(s) {IMAGE_PAD} but "
                         f"{len(grid_thw)} image(s) were given")
    out = [pieces[0]]
    for thw, rest in zip(grid_thw, pieces[1:], strict=True):
        out.append(IMAGE_PAD * (int(np.prod(thw)) // merge**2) + rest)
    return "".join(out)


def build_batch(conversations: Sequence[Sequence[Mapping[str, Any]]],
                images: Sequence[Sequence[Any]], tokenizer, image_processor, *,
                pad_token_id: int = 0, padding_side: str = "right",
                add_generation_prompt: bool = True) -> dict[str, np.ndarray]:
    """`Qwen3VLMoe`'s batch: input_ids, attention_mask, mm_token_type_ids `[B, T]`,
    pixel_values `[P, C * T * p * p]`, image_grid_thw `[N, 3]`."""
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    preprocess.require_chat_template(tokenizer, "Qwen3-VL")
    flat = [rgb(im) for per in images for im in per]
    out: dict[str, np.ndarray] = {}
    grids = np.zeros((0, 3), np.int64)
    if flat:
        pix = image_processor(images=flat, return_tensors="np")
        out["pixel_values"] = np.asarray(pix["pixel_values"], np.float32)
        grids = np.asarray(pix["image_grid_thw"], np.int64)
        out["image_grid_thw"] = grids
    merge = int(getattr(image_processor, "merge_size", 2))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows, start = [], 0
    for conv, per in zip(conversations, images, strict=True):
        text = preprocess.prompt_text(conv, tokenizer, add_generation_prompt)
        text = expand_image_pads(text, grids[start:start + len(per)], merge)
        start += len(per)
        rows.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    ids, mask = preprocess.pad_rows(rows, pad_token_id, padding_side)
    types = ((ids == image_id) & (mask == 1)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **out}
