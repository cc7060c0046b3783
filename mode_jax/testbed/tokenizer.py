"""Word-level tokenizer for the testbed, with Kimi-VL's chat format and image placeholders.

The testbed model must enter the pipeline like a real checkpoint, so its tokenizer is saved in the
standard Hugging Face files (`tokenizer.json`, `tokenizer_config.json` with the chat template,
`special_tokens_map.json`) and loads offline with transformers (`AutoTokenizer` reads it too).

Chat format (Kimi-VL): a user turn is `<|im_user|>user<|im_middle|>{content}<|im_end|>`, the
generation prompt is `<|im_assistant|>assistant<|im_middle|>`. An image in the content is
`<|media_start|>image<|media_content|><|media_pad|><|media_end|>`; as in Kimi-VL's processor, the
single `<|media_pad|>` is expanded to h*w/4 copies for an image of h x w patches (2x2 merge), one
per merged image token the vision tower emits. Unlike Kimi-VL's published template (see
`mode_jax.preprocess.render_chat`) no default system turn is inserted: it would add nine text
tokens to every prompt of the small testbed; an explicit system message is rendered as usual.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mode_jax.preprocess import IMAGE_BLOCK, MEDIA_PAD, expand_image_tokens

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
IM_USER, IM_ASSISTANT, IM_SYSTEM = "<|im_user|>", "<|im_assistant|>", "<|im_system|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
MEDIA_START, MEDIA_CONTENT, MEDIA_END = "<|media_start|>", "<|media_content|>", "<|media_end|>"
# Order fixes the ids: [PAD] = 0 (the model config's pad_token_id), then the chat markers.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, IM_END,
                  MEDIA_START, MEDIA_CONTENT, MEDIA_END, MEDIA_PAD)
# Plain words the template itself emits (role names and the media kind).
TEMPLATE_WORDS = ("user", "assistant", "system", "image")
MERGE = 4  # 2x2 patches -> one image token

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + IM_SYSTEM +
    "{%- elif message['role'] == 'user' -%}" + IM_USER +
    "{%- else -%}" + IM_ASSISTANT + "{%- endif -%}"
    "{{ message['role'] }}" + IM_MIDDLE +
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}" + IMAGE_BLOCK +
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}" + IM_END +
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + IM_ASSISTANT + "assistant" + IM_MIDDLE + "{%- endif -%}"
)


def format_chat(question: str, with_image: bool) -> str:
    """The prompt the chat template renders for one user turn (image first) + generation prompt.

    Equal to `tokenizer.apply_chat_template([{"role": "user", "content": [image?, text]}],
    tokenize=False, add_generation_prompt=True)`; written out so that data generation does not
    need a tokenizer. The image appears as one `<|media_pad|>` (`encode_prompt` expands it).
    """
    return format_user_turn([{"type": "image"}] * with_image + [{"type": "text", "text": question}])


def format_user_turn(content) -> str:
    """`format_chat` for a user turn of content items (images and texts, in order)."""
    body = "".join(IMAGE_BLOCK if c["type"] == "image" else c["text"] for c in content)
    return f"{IM_USER}user{IM_MIDDLE}{body}{IM_END}{IM_ASSISTANT}assistant{IM_MIDDLE}"


def split_words(text: str) -> list[str]:
    """The words the pre-tokenizer cuts `text` into (runs of \\w, runs of punctuation)."""
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `SPECIAL_TOKENS` (ids 0..12) then the sorted unique `words`.

    Every word must survive the pre-tokenizer unchanged, or it could never be produced.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) | set(TEMPLATE_WORDS)):
        if split_words(word) != [word]:
            raise ValueError(f"vocabulary word {word!r} is not a single pre-tokenized word "
                             "(use runs of letters/digits or of punctuation, no spaces)")
        if word in vocab:
            raise ValueError(f"vocabulary word {word!r} collides with a special token")
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=IM_END,
        chat_template=CHAT_TEMPLATE, model_max_length=4096, padding_side="left",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with chat_template), special_tokens_map.json.

    Written by hand rather than by `save_pretrained`, whose transformers-5 output (a
    `TokenizersBackend` class name, a separate chat_template.jinja) older readers do not take.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD, "unk_token": UNK}
    extra = [t for t in SPECIAL_TOKENS if t not in special.values()]
    added = {
        str(tokenizer.convert_tokens_to_ids(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": tokenizer.model_max_length,
        "padding_side": "left",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
        "additional_special_tokens": extra,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**special, "additional_special_tokens": extra}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer directory offline (no hub access)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    # Not AutoTokenizer: it also reads the checkpoint's config.json, whose `kimi_vl` type
    # transformers does not know, and warns on every load.
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def num_image_tokens(grid_hw: Sequence[int]) -> int:
    """Merged image tokens for an image of `grid_hw = (h, w)` patches: h * w / 4 (2x2 merge)."""
    h, w = (int(v) for v in grid_hw)
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise ValueError(f"image grid {(h, w)} must be positive and even in both dims "
                         "(the 2x2 patch merge needs it)")
    return h * w // MERGE


def _grids(grid_hws) -> np.ndarray:
    """[N, 2] patch (rows, cols) per image from `image_grid_hws` [N, 2], `_thw` [N, 3] or None."""
    if grid_hws is None:
        return np.zeros((0, 2), np.int64)
    grids = np.asarray(grid_hws, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] not in (2, 3):
        raise ValueError(f"image grids must be [N, 2] (h, w) or [N, 3] (t, h, w), got shape "
                         f"{grids.shape}")
    grids = grids[:, -2:]
    for grid in grids:
        num_image_tokens(grid)  # rejects odd or empty grids
    return grids


def encode_prompt(tokenizer, prompt: str, grid_hws=None) -> np.ndarray:
    """Token ids [T] int32 of a chat prompt, its i-th `<|media_pad|>` repeated h_i * w_i / 4 times.

    `grid_hws` [N, 2]: patch rows and columns per image, as `preprocess` returns them.
    """
    text = expand_image_tokens(prompt, _grids(grid_hws), MERGE)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def encode_example(tokenizer, prompt: str, answer: str, grid_hws=None, *,
                   include_end: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [T] int32, answer_mask [T] bool) for prompt + answer (+ `<|im_end|>`).

    `answer_mask[t]` is True where token t is part of the answer the model must produce (and the
    closing `<|im_end|>` when `include_end`): the targets of training loss, KL and perplexity. The
    logits that predict token t sit at position t - 1.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, grid_hws)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens")
    if include_end:
        answer_ids = [*answer_ids, tokenizer.convert_tokens_to_ids(IM_END)]
    ids = np.concatenate([prompt_ids, np.asarray(answer_ids, dtype=np.int32)])
    mask = np.zeros(ids.shape, dtype=bool)
    mask[len(prompt_ids):] = True
    return ids, mask


def image_token_id(tokenizer) -> int:
    """Id of `<|media_pad|>`, the model config's `media_placeholder_token_id`."""
    return int(tokenizer.convert_tokens_to_ids(MEDIA_PAD))
