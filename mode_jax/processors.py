"""Which prompt and image preprocessing a model family uses.

Kimi-VL's comes with the project (`preprocess`: its chat format and patch layout, no image
processor needed). Qwen3-VL-MoE and InternVL take the checkpoint's own chat template and image
processor (`preprocess_qwen3vl`, `preprocess_internvl`). Calibration data, the evaluation
harness and the evaluate stage ask here instead of testing the family themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mode_jax import preprocess
from mode_jax.convert import families


def load_image_processor(directory: str | Path):
    """The checkpoint's image processor (local files only), or a clear error."""
    d = Path(directory)
    if not (d / "preprocessor_config.json").is_file():
        raise ValueError(f"{d} has no preprocessor_config.json: this model's images need the "
                         "checkpoint's image processor settings")
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(d), local_files_only=True)


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


def image_processor(model_config: Any, checkpoint: str | Path):
    """The checkpoint's image processor for families that use one, else None."""
    if model_config is None or families.for_config(model_config).name == "kimi_vl":
        return None
    return load_image_processor(checkpoint)


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
    """Image `image`'s grid in a built batch, the key the harness groups examples by: Qwen3-VL's
    (t, h, w) or InternVL's (tiles,)."""
    if "image_grid_thw" in batch:
        return tuple(int(v) for v in batch["image_grid_thw"][image])
    return (int(batch["image_num_patches"][image]),)
