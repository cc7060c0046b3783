"""Kimi-VL's published tokenizer as a transformers fast tokenizer, without remote code.

Kimi-VL-A3B ships `tiktoken.model` (one `base64(token bytes) rank` line per BPE token) and a
`tokenizer_config.json` whose `tokenizer_class` is `TikTokenTokenizer`, a class that lives in the
checkpoint's own `tokenization_moonshot.py`: transformers loads it only with
`trust_remote_code=True` and the tiktoken package. This module builds the same tokenizer from the
files alone: transformers' `TikTokenConverter` turns the ranks into byte-level BPE merges for the
`tokenizers` library, split first by Kimi's pre-tokenizer pattern, and the special tokens take
the ids the remote class gives them:

- the `num_base = len(ranks)` BPE tokens keep their ranks as ids;
- ids `num_base .. num_base + 255` (more when `added_tokens_decoder` names a higher id) are
  special: the name `added_tokens_decoder` gives, else `<|reserved_token_{id}|>`. Like the remote
  class (tiktoken's `allowed_special="all"`), text containing a special token's name encodes it
  as that one id.

`tests/test_tiktoken_tokenizer.py` checks the ids against tiktoken itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

TOKENIZER_CLASS = "TikTokenTokenizer"
VOCAB_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL = 256
# Kimi's pre-tokenizer split (tokenization_moonshot.py's `pat_str`): Han runs apart from other
# letters (`&&` is class intersection), cased words with English contractions, digits in threes.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
_ROLE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def is_tiktoken_directory(directory: str | Path) -> bool:
    """Whether `directory` holds a tokenizer in this format (its config names the class)."""
    config = Path(directory) / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        named = json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError):
        return False
    return named == TOKENIZER_CLASS


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """`{token bytes: rank}` from a tiktoken BPE file; ranks must be 0..n-1, each once."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: a {TOKENIZER_CLASS} checkpoint keeps its BPE "
                         f"ranks there")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path} line {number}: expected 'base64-token rank', got "
                             f"{line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once (duplicate "
                         "tokens or ranks, or a gap)")
    return ranks


class _Converter(TikTokenConverter):
    """transformers' converter on ranks already read (`read_ranks`), not through tiktoken."""

    def __init__(self, ranks: dict[bytes, int], **kwargs):
        super().__init__(vocab_file="", **kwargs)
        self.ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
        return self.ranks


def special_tokens(config: dict, num_base: int) -> list[str]:
    """Special token names in id order, from id `num_base` up."""
    named = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not str(key).isdigit() or not isinstance(content, str):
            raise ValueError(f"tokenizer_config.json added_tokens_decoder[{key!r}] must map an "
                             f"id to {{'content': name}}, got {entry!r}")
        named[int(key)] = content
    below = sorted(i for i in named if i < num_base)
    if below:
        raise ValueError(f"added_tokens_decoder names ids {below[:5]} inside the BPE ranks "
                         f"(0..{num_base - 1}) of {VOCAB_FILE}")
    top = max([num_base + NUM_RESERVED_SPECIAL - 1, *named])
    return [named.get(i, f"<|reserved_token_{i}|>") for i in range(num_base, top + 1)]


def _chat_template(directory: Path, config: dict) -> str | None:
    if config.get("chat_template"):
        return config["chat_template"]
    jinja = directory / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a `TikTokenTokenizer` checkpoint directory (Kimi-VL's layout)."""
    d = Path(directory)
    config = json.loads((d / "tokenizer_config.json").read_text())
    vocab_file = d / VOCAB_FILE
    ranks = read_ranks(vocab_file)
    specials = special_tokens(config, len(ranks))
    backend = _Converter(ranks, pattern=KIMI_PATTERN).converted()
    backend.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    moved = [(s, backend.token_to_id(s)) for i, s in enumerate(specials, len(ranks))
             if backend.token_to_id(s) != i]
    if moved:
        name, got = moved[0]
        raise ValueError(f"special token {name!r} is also a BPE token (id {got}) of {vocab_file}: "
                         "its id would be ambiguous")
    roles = {k: _token_name(config[k]) for k in _ROLE_TOKENS if config.get(k)}
    unknown = sorted(v for v in roles.values() if v not in specials)
    if unknown:
        raise ValueError(f"tokenizer_config.json names {unknown} as bos/eos/unk/pad, which are not "
                         "among the special tokens")
    extra = [_token_name(t) for t in config.get("additional_special_tokens") or []]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(d), **roles, additional_special_tokens=extra,
        chat_template=_chat_template(d, config),
        model_max_length=int(config.get("model_max_length", 1 << 20)),
        clean_up_tokenization_spaces=False)
