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

from mode_jax.convert import families


def image_processor(model_config: Any, checkpoint: str | Path):
    """The checkpoint's image processor for families that use one, else None."""
    if model_config is None or families.for_config(model_config).name == "kimi_vl":
        return None
    from mode_jax.preprocess_qwen3vl import load_image_processor

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
