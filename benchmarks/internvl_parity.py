"""InternVL (Qwen3-MoE language model) against transformers on the tests' tiny random models.

Relative error = max |ours - transformers| / max |transformers| over real tokens (float32
logits), per tower variant of tests/test_internvl_parity.py, on its batch (one- and two-tile
images, a text-only row, left padding), and for the same model read back from the two file
layouts; then the share of greedy tokens equal to transformers' `generate`, and the bf16
model's error beside transformers' own bf16 model's.

    python -m benchmarks.internvl_parity
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mode_jax.convert import internvl as convert
from mode_jax.eval import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers
from tests import test_internvl_parity as parity  # noqa: E402


def main() -> None:
    batch = parity.BATCH
    print("float32 parity (relative logit error):")
    for variant in sorted(parity.VARIANTS):
        hf = parity.hf_model(variant)
        err = parity.rel_err(convert.from_torch(hf)(batch).logits,
                             parity.torch_logits(hf, batch), batch["attention_mask"])
        print(f"  InternVLForConditionalGeneration {variant:24s} {err:.2e}")
    hf = parity.hf_model()
    ref = parity.torch_logits(hf, batch)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(Path(d) / "saved")
        (Path(d) / "fused").mkdir()
        parity._save_in_memory_layout(hf, Path(d) / "fused")
        for layout in ("saved", "fused"):
            err = parity.rel_err(convert.from_directory(Path(d) / layout)(batch).logits, ref,
                                 batch["attention_mask"])
            print(f"  from_directory, {layout:5s} layout {'':17s} {err:.2e}")
    got = generate.greedy_generate(convert.from_torch(hf), batch, max_new_tokens=8,
                                   eos_token_id=79)
    inputs = {k: torch.tensor(v) for k, v in batch.items() if k != "image_num_patches"}
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=79,
                             pad_token_id=0)[:, batch["input_ids"].shape[1]:].numpy()
    same = float(np.mean(got.tokens[:, :theirs.shape[1]] == theirs))
    print(f"greedy generation, 8 tokens x {len(theirs)} rows: {100 * same:.1f}% equal")
    ours, theirs_bf16 = parity.bf16_errors(hf)
    print(f"bf16 logits vs float32 transformers: ours {ours:.2e}, transformers bf16 "
          f"{theirs_bf16:.2e}")
    print("command: python -m benchmarks.internvl_parity")


if __name__ == "__main__":
    main()
