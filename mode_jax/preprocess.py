"""Kimi-VL inputs without torchvision: image patches (numpy/PIL) and chat prompts.

Images (what Kimi-VL's `KimiVLImageProcessor` does, with the values of Kimi-VL-A3B-Instruct's
`preprocessor_config.json`: patch 14, merge 2x2, `in_token_limit` 4096, `pad_input` true,
mean = std = 0.5):
1. if `(W // 14) * (H // 14)` exceeds the patch budget, shrink by `sqrt(budget / that)` with PIL
   bicubic (sizes truncated to ints);
2. align to multiples of patch x merge (28 px): `"pad"` adds black pixels at the bottom/right
   (pad_input true), `"resize"` resizes up with PIL bicubic (the -2506 checkpoints), `"crop"`
   centre-crops (pad_input false);
3. RGB in [0, 1], `(x - mean) / std`, cut into `[h * w, 3, 14, 14]` patches in raster order.
Kimi-VL's budget is approximate: truncation and padding can leave up to ~23% more patches than
the budget for extreme aspect ratios. `strict_budget=True` shrinks further until the aligned
grid fits.

Prompts: the checkpoint's chat template through its tokenizer (transformers without remote
code; Kimi-VL's published tiktoken files through `convert.tiktoken_tokenizer`); without a
template `render_chat` writes Kimi-VL's out by hand. Each image is
`<|media_start|>image<|media_content|><|media_pad|><|media_end|>`, and
`expand_image_tokens` repeats its `<|media_pad|>` h * w / 4 times (one per merged patch group).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MEDIA_PAD = "<|media_pad|>"
IMAGE_BLOCK = "<|media_start|>image<|media_content|>" + MEDIA_PAD + "<|media_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant"
_ROLE_MARKERS = {"system": "<|im_system|>", "user": "<|im_user|>",
                 "assistant": "<|im_assistant|>"}
_ALIGN = ("pad", "resize", "crop")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """MoonViT preprocessing settings; defaults are Kimi-VL-A3B-Instruct's."""

    patch_size: int = 14
    merge_kernel: tuple[int, int] = (2, 2)
    max_patches: int = 4096
    align: str = "pad"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    strict_budget: bool = False
    max_side_patches: int = 512  # the position table Kimi-VL's rotary is precomputed for

    def __post_init__(self):
        if self.align not in _ALIGN:
            raise ValueError(f"align={self.align!r}; allowed: {_ALIGN}")
        if self.max_patches < self.merge_kernel[0] * self.merge_kernel[1]:
            raise ValueError(f"max_patches={self.max_patches} is below one merge group "
                             f"{self.merge_kernel}")

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ImageConfig:
        """The checkpoint's `preprocessor_config.json` settings; the defaults without one."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            return cls.from_preprocessor_config(json.loads(path.read_text()))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{path} could not be read: {err}") from None

    @classmethod
    def from_preprocessor_config(cls, d: Mapping[str, Any]) -> ImageConfig:
        """From a Kimi-VL `preprocessor_config.json` dict."""
        return cls(
            patch_size=int(d.get("patch_size", 14)),
            merge_kernel=tuple(int(k) for k in d.get("merge_kernel_size", (2, 2))),
            max_patches=int(d.get("in_token_limit", 4096)),
            align="pad" if d.get("pad_input", True) else "crop",
            mean=tuple(float(m) for m in d.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(s) for s in d.get("image_std", (0.5, 0.5, 0.5))),
        )


# ---------------------------------------------------------------- images


def _aligned(size: int, unit: int, align: str) -> int:
    return (size // unit) * unit if align == "crop" else math.ceil(size / unit) * unit


def _shrunk_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int]:
    """Kimi-VL's budget shrink (then, if strict, more until the aligned grid fits)."""
    p = cfg.patch_size
    n = (w // p) * (h // p)
    if n <= cfg.max_patches:
        scale = 1.0
    else:
        scale = math.sqrt(cfg.max_patches / n)
    if not cfg.strict_budget:
        return (int(w * scale), int(h * scale)) if scale < 1 else (w, h)
    uh, uw = (k * p for k in cfg.merge_kernel)
    while True:
        nw, nh = max(int(w * scale), 1), max(int(h * scale), 1)
        grid = (_aligned(nw, uw, cfg.align) // p) * (_aligned(nh, uh, cfg.align) // p)
        if grid <= cfg.max_patches:
            return nw, nh
        scale *= math.sqrt(cfg.max_patches / grid) * 0.999


def fit_image(image: Image.Image, cfg: ImageConfig = ImageConfig()) -> Image.Image:
    """Shrink to the patch budget and align to multiples of patch x merge (RGB out)."""
    image = image.convert("RGB")
    w, h = image.size
    nw, nh = _shrunk_size(w, h, cfg)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    uh, uw = (k * cfg.patch_size for k in cfg.merge_kernel)
    tw, th = _aligned(nw, uw, cfg.align), _aligned(nh, uh, cfg.align)
    if tw == 0 or th == 0:
        raise ValueError(f"image of {w}x{h} px is smaller than one {uw}x{uh} merge block")
    if cfg.align == "pad" and (tw, th) != (nw, nh):
        canvas = Image.new("RGB", (tw, th), (0, 0, 0))
        canvas.paste(image, (0, 0))
        image = canvas
    elif cfg.align == "resize" and (tw, th) != (nw, nh):
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    elif cfg.align == "crop" and (tw, th) != (nw, nh):
        left, top = (nw - tw) // 2, (nh - th) // 2
        image = image.crop((left, top, left + tw, top + th))
    limit = cfg.max_side_patches
    if tw // cfg.patch_size >= limit or th // cfg.patch_size >= limit:
        raise ValueError(f"image grid {th // cfg.patch_size}x{tw // cfg.patch_size} patches "
                         f"reaches the {limit}-patch side limit")
    return image


def patchify(chw: np.ndarray, patch_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`[3, H, W]` -> `([h * w, 3, p, p], (h, w))`, patches in raster order."""
    c, hh, ww = chw.shape
    h, w = hh // patch_size, ww // patch_size
    x = chw.reshape(c, h, patch_size, w, patch_size).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape(h * w, c, patch_size, patch_size)), (h, w)


def unpatchify(patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of `patchify`: `[h * w, 3, p, p]` -> `[3, h * p, w * p]`."""
    h, w = grid
    n, c, p, _ = patches.shape
    if n != h * w:
        raise ValueError(f"{n} patches do not fill a {h}x{w} grid")
    return patches.reshape(h, w, c, p, p).transpose(2, 0, 3, 1, 4).reshape(c, h * p, w * p)


def open_image(path: str | Path) -> Image.Image:
    """An image file (a calibration record's) as RGB; an unreadable one is named."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"image {path} could not be read: {err}") from None


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str | Path):
        return open_image(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"images must be PIL images or uint8 arrays [H, W, 3]; got "
                         f"{arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def preprocess_image(image: Any, cfg: ImageConfig = ImageConfig()
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """One image (PIL, uint8 `[H, W, 3]` or a file path) -> float32 patches `[h * w, 3, p, p]`
    and (h, w)."""
    fitted = fit_image(_as_pil(image), cfg)
    chw = np.asarray(fitted, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(cfg.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.std, np.float32)[:, None, None]
    return patchify((chw - mean) / std, cfg.patch_size)


def preprocess_images(images: Sequence[Any], cfg: ImageConfig = ImageConfig()
                      ) -> dict[str, np.ndarray]:
    """`{"pixel_values": [P, 3, p, p] float32, "image_grid_hws": [N, 2] int64}`."""
    patches, grids = [], []
    for image in images:
        x, grid = preprocess_image(image, cfg)
        patches.append(x)
        grids.append(grid)
    p = cfg.patch_size
    return {
        "pixel_values": np.concatenate(patches) if patches else np.zeros((0, 3, p, p), np.float32),
        "image_grid_hws": np.asarray(grids, np.int64).reshape(-1, 2),
    }


# ---------------------------------------------------------------- prompts


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Kimi-VL's chat template, by hand: a default system turn unless one is given, then
    `<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>` per message; an image content item
    becomes `IMAGE_BLOCK`."""
    parts = []
    if messages and messages[0]["role"] != "system":
        parts.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
    for m in messages:
        role = m["role"]
        if role not in _ROLE_MARKERS:
            raise ValueError(f"message role {role!r}; allowed: {sorted(_ROLE_MARKERS)}")
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_BLOCK if _is_image_item(c) else c["text"] for c in content)
        parts.append(f"{_ROLE_MARKERS[role]}{role}<|im_middle|>{content}<|im_end|>")
    if add_generation_prompt:
        parts.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(parts)


IMAGE_PLACEHOLDER = "<image>"  # where a dataset's text puts an image (ShareGPT, benchmarks)


def placeholder_content(text: str) -> list[dict]:
    """Content items of `text` with an image item at each `<image>` and the stripped text
    pieces between them (empty pieces dropped)."""
    content = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def _is_image_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def expand_image_tokens(text: str, grid_hws: Any, merge_size: int = 4) -> str:
    """Repeat the i-th `<|media_pad|>` `h_i * w_i / merge_size` times (one per merged group)."""
    grids = np.asarray(grid_hws).reshape(-1, 2)
    pieces = text.split(MEDIA_PAD)
    if len(pieces) - 1 != len(grids):
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholder(s) {MEDIA_PAD} but "
                         f"{len(grids)} image(s) were given")
    out = [pieces[0]]
    for (h, w), rest in zip(grids, pieces[1:], strict=True):
        out.append(MEDIA_PAD * (int(h) * int(w) // merge_size) + rest)
    return "".join(out)


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer through transformers (no remote code), or None if absent.

    Kimi-VL's published tiktoken tokenizer (`TikTokenTokenizer`, remote code upstream) is built
    from its files by `convert.tiktoken_tokenizer`. A processor chat template in the directory
    (`processor_chat_template`) replaces the tokenizer's own."""
    d = Path(directory)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mode_jax.convert import tiktoken_tokenizer

    if tiktoken_tokenizer.is_tiktoken_directory(d):
        return _with_processor_template(tiktoken_tokenizer.load(d), d)

    # A plain fast tokenizer loads directly: AutoTokenizer would also read config.json, whose
    # `kimi_vl` model type transformers does not know, and warn on every load.
    loader, kwargs = AutoTokenizer, {"trust_remote_code": False}
    config = d / "tokenizer_config.json"
    if config.is_file() and (d / "tokenizer.json").is_file():
        try:
            named = json.loads(config.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, AttributeError):
            named = None
        if named == "PreTrainedTokenizerFast":
            loader, kwargs = PreTrainedTokenizerFast, {}
    try:
        tokenizer = loader.from_pretrained(str(d), local_files_only=True, **kwargs)
    except Exception as err:  # any loader failure: say which directory and why
        raise ValueError(f"tokenizer files in {d} could not be loaded by transformers without "
                         f"remote code ({type(err).__name__}: {err}); tokenizer.json must be "
                         "in the Hugging Face tokenizers format (library callers may pass a "
                         "tokenizer object instead)") from None
    return _with_processor_template(tokenizer, d)


def _with_processor_template(tokenizer, directory: Path):
    template = processor_chat_template(directory)
    if template:
        tokenizer.chat_template = template
    return tokenizer


PROCESSOR_TEMPLATE_FILES = ("chat_template.json", "processor_config.json")


def processor_chat_template(directory: str | Path) -> str | None:
    """The processor's chat template, which renders image items (Qwen3-VL and InternVL ship it
    in `chat_template.json`, newer saves in `processor_config.json`); it takes precedence over a
    tokenizer's own, which may be the text model's. `chat_template.jinja` the tokenizer loads
    itself."""
    for name in PROCESSOR_TEMPLATE_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path} could not be read: {err}") from None
        if template:
            if not isinstance(template, str):
                raise ValueError(f"{path}: chat_template must be one jinja string")
            return template
    return None


def require_chat_template(tokenizer, family: str) -> None:
    """Families other than Kimi-VL have no hand-written fallback: say where a template lives."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the {family} tokenizer has no chat template: the checkpoint needs one "
                         "in tokenizer_config.json, chat_template.jinja or "
                         f"{' / '.join(PROCESSOR_TEMPLATE_FILES)}")


def prompt_text(messages: Sequence[Mapping[str, Any]], tokenizer=None,
                add_generation_prompt: bool = True) -> str:
    """The chat prompt before image expansion: the tokenizer's template when it has one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render_chat(messages, add_generation_prompt)


def build_batch(conversations: Sequence[Sequence[Mapping[str, Any]]],
                images: Sequence[Sequence[Any]], tokenizer, *,
                image_cfg: ImageConfig = ImageConfig(), pad_token_id: int = 0,
                padding_side: str = "left") -> dict[str, np.ndarray]:
    """HF-processor-style batch for `model(batch)` from chats and their images (in order).

    Returns `input_ids [B, T] int32`, `attention_mask [B, T] int32` (padding on
    `padding_side`), `pixel_values [P, 3, p, p]`, `image_grid_hws [N, 2]`.
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; allowed: 'left', 'right'")
    merge = image_cfg.merge_kernel[0] * image_cfg.merge_kernel[1]
    flat = [im for per in images for im in per]
    pixels = preprocess_images(flat, image_cfg)
    ids, start = [], 0
    for conv, per in zip(conversations, images, strict=True):
        grids = pixels["image_grid_hws"][start:start + len(per)]
        start += len(per)
        text = expand_image_tokens(prompt_text(conv, tokenizer), grids, merge)
        ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    input_ids, mask = pad_rows(ids, pad_token_id, padding_side)
    return {"input_ids": input_ids, "attention_mask": mask, **pixels}


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int,
             padding_side: str) -> tuple[np.ndarray, np.ndarray]:
    """Token rows padded to the longest: (input_ids, attention_mask) `[B, T]` int32."""
    length = max(len(x) for x in rows)
    input_ids = np.full((len(rows), length), pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, x in enumerate(rows):
        sl = slice(length - len(x), length) if padding_side == "left" else slice(0, len(x))
        input_ids[b, sl] = x
        mask[b, sl] = 1
    return input_ids, mask
