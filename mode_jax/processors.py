"""Which prompt and image preprocessing a model family uses.

Kimi-VL's comes with the project (`preprocess`: its chat format and patch layout, no image
processor needed). Qwen3-VL-MoE and InternVL take the checkpoint's own chat template and image
processor (`preprocess_qwen3vl`, `preprocess_internvl`). Calibration data, the evaluation
harness and the evaluate stage ask here instead of testing the family themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mode_jax import preprocess
from mode_jax.convert import families


def load_image_processor(directory: str | Path, **overrides):
    """The checkpoint's image processor (local files only; `overrides` replace its saved
    settings), or a clear error."""
    d = Path(directory)
    if not (d / "preprocessor_config.json").is_file():
        raise ValueError(f"{d} has no preprocessor_config.json: this model's images need the "
                         "checkpoint's image processor settings")
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(d), local_files_only=True, **overrides)


def rgb(image: Any):
    """A path, PIL image or HWC uint8 array as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, str | Path):
        return preprocess.open_image(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


def image_placeholder(model_config: Any, tokenizer) -> str:
    """The image token text the family's batch builder writes into prompts."""
    family = families.for_config(model_config).name
    if family == "qwen3_vl_moe":
        from mode_jax import preprocess_qwen3vl as pq

        return pq.IMAGE_PAD
    if family == "internvl":
        from mode_jax import preprocess_internvl as pi

        return pi.context_token(tokenizer)
    return preprocess.MEDIA_PAD


def check_image_token(model_config: Any, tokenizer, source: str = "the tokenizer") -> None:
    """The tokenizer must encode the family's image placeholder as config.json's image token id,
    or image features would be written over other tokens (or the counts fail deep in a pass)."""
    want = families.image_token_id(model_config)
    if want is None:
        return
    name = image_placeholder(model_config, tokenizer)
    got = list(tokenizer(name, add_special_tokens=False)["input_ids"])
    if got != [int(want)]:
        raise ValueError(f"{source} encodes the image placeholder {name} as {got}, but the model "
                         f"config's image token id is {int(want)}: tokenizer and checkpoint do "
                         "not belong together")


def image_processor(model_config: Any, checkpoint: str | Path, max_image_tokens: int = 0):
    """The checkpoint's image processor for families that use one, else None.

    `max_image_tokens` > 0 lowers the processor's resolution limit to that many tokens per image
    (never raises it): Qwen3-VL's largest image area (`size.longest_edge`, in pixels, one token
    per (patch x merge)^2; its resize keeps at least one token row, so an image more elongated
    than the cap itself can exceed it), InternVL's tile count (`max_patches`; a thumbnail tile
    joins more than one). A cap below the processor's smallest image is an error."""
    family = None if model_config is None else families.for_config(model_config).name
    if family in (None, "kimi_vl"):
        return None
    processor = load_image_processor(checkpoint)
    if max_image_tokens <= 0:
        return processor
    if family == "qwen3_vl_moe":
        unit = (int(processor.patch_size) * int(processor.merge_size)) ** 2
        low, high = int(processor.size["shortest_edge"]), int(processor.size["longest_edge"])
        if max_image_tokens * unit < low:
            raise ValueError(f"data.max_image_tokens={max_image_tokens} is below the image "
                             f"processor's smallest image ({-(-low // unit)} tokens)")
        cap = min(high, max_image_tokens * unit)
        # saved max_pixels / min_pixels (Qwen2-VL style configs) win over `size`: set both
        overrides = {"size": {"shortest_edge": low, "longest_edge": cap}, "max_pixels": cap,
                     "min_pixels": low}
    elif family == "internvl":
        per_tile = int(model_config.vision.tokens_per_tile)
        if max_image_tokens < per_tile:
            raise ValueError(f"data.max_image_tokens={max_image_tokens} is below one image "
                             f"tile ({per_tile} tokens)")
        tiles = max_image_tokens // per_tile  # beyond one tile, a thumbnail tile is added
        overrides = {"max_patches": min(int(processor.max_patches), max(1, tiles - 1))}
    else:
        raise ValueError(f"data.max_image_tokens is not supported for model family {family}")
    capped = load_image_processor(checkpoint, **overrides)
    if family == "qwen3_vl_moe" and int(capped.size["longest_edge"]) > cap:
        raise ValueError(f"data.max_image_tokens={max_image_tokens} could not be applied to the "
                         f"image processor of {checkpoint} (its largest image stayed "
                         f"{capped.size['longest_edge']} pixels)")
    return capped


def kimi_image_config(checkpoint: str | Path, max_image_tokens: int = 0
                      ) -> preprocess.ImageConfig:
    """Kimi-VL's image settings from the checkpoint; `max_image_tokens` > 0 lowers the patch
    budget so that no image yields more merged tokens (strictly, padding included)."""
    cfg = preprocess.ImageConfig.from_checkpoint(checkpoint)
    group = cfg.merge_kernel[0] * cfg.merge_kernel[1]
    if max_image_tokens <= 0 or max_image_tokens * group >= cfg.max_patches:
        return cfg  # no cap, or none below the checkpoint's own budget
    return dataclasses.replace(cfg, max_patches=max_image_tokens * group, strict_budget=True)


def batch_builder(model_config: Any, tokenizer, processor, *, pad_token_id: int = 0,
                  padding_side: str = "right", add_generation_prompt: bool = True
                  ) -> Callable[[Sequence[Sequence[Mapping]], Sequence[Sequence[Any]]], dict]:
    """`build(conversations, images) -> batch` in the family's processor format (None for
    Kimi-VL, whose callers build with `preprocess.build_batch` and an `ImageConfig`)."""
    family = families.for_config(model_config).name
    kw = dict(pad_token_id=pad_token_id, padding_side=padding_side,
              add_generation_prompt=add_generation_prompt)
    if family == "qwen3_vl_moe":
        from mode_jax import preprocess_qwen3vl as pq

        return lambda conversations, images: pq.build_batch(
            conversations, images, tokenizer, processor, **kw)
    if family == "internvl":
        from mode_jax import preprocess_internvl as pi

        tokens = model_config.vision.tokens_per_tile
        return lambda conversations, images: pi.build_batch(
            conversations, images, tokenizer, processor, tokens_per_tile=tokens, **kw)
    return None


def image_grid(batch: Mapping[str, Any], image: int = 0) -> tuple[int, ...]:
    """Image `image`'s grid in a built batch, the key batches are grouped by: Kimi-VL's (h, w)
    patches, Qwen3-VL's (t, h, w) or InternVL's (tiles,)."""
    for key in ("image_grid_hws", "image_grid_thw"):
        if key in batch:
            return tuple(int(v) for v in batch[key][image])
    return (int(batch["image_num_patches"][image]),)
