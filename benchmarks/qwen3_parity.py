"""Qwen3-MoE / Qwen3-VL-MoE against transformers on the tests' tiny random models, on CPU.

Relative error = max |ours - transformers| / max |transformers| over real tokens (float32
logits). Printed: the text model per case of tests/test_qwen3_moe_parity.py; the whole
Qwen3-VL-MoE per batch of tests/test_qwen3_vl_moe_parity.py; and a wider text model in bf16
against float32 transformers, beside transformers' own bf16 model, with the share of
(token, MoE layer) pairs routed to the same experts as transformers' bf16 model.

    python -m benchmarks.qwen3_parity
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from mode_jax.convert import qwen3_vl_moe as convert
from mode_jax.models import qwen3_moe as q3
from tests import test_qwen3_moe_parity as text_parity
from tests import test_qwen3_vl_moe_parity as vl_parity


def text_cases() -> None:
    for case in text_parity.CASES:
        model = text_parity.torch_model(case.hf)
        jm = text_parity.convert(model, q3.TextConfig.from_hf(model.config))
        ids, mask = text_parity.batch(case, model.config.vocab_size)
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()
        out = np.asarray(jm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
        print(f"  Qwen3MoeForCausalLM {case.name:28s} {text_parity.rel_err(out, ref, mask):.2e}")


def vl_batches() -> None:
    hf = vl_parity.hf_model()
    ours = convert.from_torch(hf)
    for name, (grids, rows, t, left_pad) in sorted(vl_parity.BATCHES.items()):
        batch = vl_parity.make_batch(grids, rows, t, left_pad)
        err = vl_parity.rel_err(ours(batch).logits, vl_parity.torch_logits(hf, batch),
                                batch["attention_mask"])
        print(f"  Qwen3VLMoeForConditionalGeneration {name:36s} {err:.2e}")


def bf16() -> None:
    ours, theirs, same = text_parity.bf16_errors()
    print(f"  bf16 logits vs float32 transformers: ours {ours:.2e}, transformers bf16 "
          f"{theirs:.2e}")
    print("  routing equal to transformers bf16, per MoE layer: "
          + ", ".join(f"{100 * s:.1f}%" for s in same))


if __name__ == "__main__":
    print("float32 parity (relative logit error):")
    text_cases()
    vl_batches()
    print("bf16:")
    bf16()
    print("command: python -m benchmarks.qwen3_parity")
