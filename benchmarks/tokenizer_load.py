"""Time loading a Kimi-VL-size tiktoken tokenizer without remote code, beside tiktoken itself.

Writes a synthetic `tiktoken.model` of Kimi-VL-A3B's size (163,584 BPE ranks: the 256 bytes,
then tokens each made by appending a byte-level piece to an earlier token, so every rank has a
valid merge) and a `tokenizer_config.json` with Kimi-VL's special ids, then times, in one run:
`mode_jax.convert.tiktoken_tokenizer.load` (ranks -> BPE merges -> fast tokenizer) and
`tiktoken.Encoding` built from the same ranks (what the checkpoint's remote class does), and
the encoding speed of both on the same text.

    python -m benchmarks.tokenizer_load
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tiktoken

from mode_jax.convert import tiktoken_tokenizer as tt

FIXTURE_CONFIG = Path(__file__).parent.parent / "tests" / "fixtures" / "kimi-tiktoken" / (
    "tokenizer_config.json")


def write_synthetic(directory: Path, num_ranks: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    pieces = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz etaoin"]
    while len(tokens) < num_ranks:
        recent = tokens[-5000:] if len(tokens) > 5000 and rng.random() < 0.5 else tokens
        token = rng.choice(recent) + rng.choice(pieces + tokens[256:1000])
        if token not in seen and len(token) < 24:
            seen.add(token)
            tokens.append(token)
    (directory / tt.VOCAB_FILE).write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    # the test fixture's config, its special ids moved to sit after these ranks
    config = json.loads(FIXTURE_CONFIG.read_text())
    base = min(int(k) for k in config["added_tokens_decoder"])
    config["added_tokens_decoder"] = {str(int(k) - base + num_ranks): v
                                      for k, v in config["added_tokens_decoder"].items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def best(fn, repeats: int = 3):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=163584, help="BPE ranks (Kimi-VL-A3B: 163584)")
    a = p.parse_args(argv)
    print("command: python -m benchmarks.tokenizer_load " + " ".join(sys.argv[1:]))
    d = Path(tempfile.mkdtemp(prefix="kimi-tiktoken-"))
    try:
        write_synthetic(d, a.ranks)
        ours, t_ours = best(lambda: tt.load(d))
        ranks = tt.read_ranks(d / tt.VOCAB_FILE)
        config = json.loads((d / "tokenizer_config.json").read_text())
        specials = tt.special_tokens(config, len(ranks))
        ref, t_ref = best(lambda: tiktoken.Encoding(
            name="kimi-synthetic", pat_str=tt.KIMI_PATTERN, mergeable_ranks=ranks,
            special_tokens={s: len(ranks) + i for i, s in enumerate(specials)}))
        text = (Path(__file__).parent.parent / "README.md").read_text() * 4
        ids, t_enc = best(lambda: ours(text, add_special_tokens=False)["input_ids"])
        ref_ids, t_ref_enc = best(lambda: ref.encode(text, allowed_special="all"))
        print(f"{a.ranks} ranks + {len(specials)} special tokens; <|media_pad|> = "
              f"{ours.convert_tokens_to_ids('<|media_pad|>')}")
        print(f"load:   mode_jax {t_ours:.2f} s, tiktoken.Encoding {t_ref:.2f} s "
              f"(ratio {t_ours / t_ref:.1f}x)")
        print(f"encode {len(text)} chars: mode_jax {t_enc * 1e3:.0f} ms, tiktoken "
              f"{t_ref_enc * 1e3:.0f} ms; same ids: {ids == ref_ids}")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
