"""bf16 error of the NNX DeepSeek-V3 text model against float32 transformers, on CPU.

Uses the tiny random models of tests/test_deepseek_v3_parity.py. Relative error of a token =
max over the vocabulary of |logits - reference| / max |reference| (over all real tokens). A
"flip" is a (token, MoE layer) whose sorted expert ids differ from the float32 reference.
Printed per case: the JAX model in bf16 (all real tokens, and only tokens without a flip), the
JAX model in float32, and transformers itself cast to bf16, all against transformers float32.

    python -m benchmarks.deepseek_v3_bf16_error
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import torch

from mode_jax.models import deepseek_v3 as ds
from tests import test_deepseek_v3_parity as parity


def torch_bf16_error(case) -> float:
    ref = parity.torch_reference(case)
    model = copy.deepcopy(ref["model"]).to(torch.bfloat16)
    for layer in model.model.layers:  # transformers keeps the correction bias in float32
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.data = (
                layer.mlp.gate.e_score_correction_bias.data.float())
    ids, mask = ref["ids"], ref["mask"]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(parity.positions_of(mask))).logits
    return parity.rel_err(logits.float().numpy(), ref["logits"], mask)


def main():
    print(f"{'case':48s} {'jax bf16':>9s} {'no-flip':>9s} {'flips':>7s} {'jax fp32':>9s} "
          f"{'torch bf16':>10s}")
    for case in parity.CASES:
        ref = parity.torch_reference(case)
        _, per_token, flipped = parity.bf16_errors(case)
        fp32 = ds.forward(parity.converted(case), jnp.asarray(ref["ids"]),
                          attention_mask=jnp.asarray(ref["mask"])).logits
        pairs = flipped.size * len(parity.converted(case).config.moe_layers)
        print(f"{case.name:48s} {per_token.max():9.2e} {per_token[flipped == 0].max():9.2e} "
              f"{int(flipped.sum()):>3d}/{pairs:<3d} "
              f"{parity.rel_err(fp32, ref['logits'], ref['mask']):9.2e} "
              f"{torch_bf16_error(case):10.2e}")
    print("reproduce: python -m benchmarks.deepseek_v3_bf16_error")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
