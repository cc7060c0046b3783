"""Shared check: GPTQ's per-expert output error against round-to-nearest's on the same tokens.

The reference inputs are rebuilt from the fake-quantized model (same codes as the packed one),
so each expert's gate/up sees exactly the MoE inputs routed to it during the sequential walk,
and its down projection sees the activations of the quantized gate/up.
"""

import numpy as np

from mode_jax.quant import rtn


def expert_inputs(fake, batches, moe_i):
    """Per routed expert: the real tokens' MoE inputs routed to it in `fake`."""
    layer = fake.config.text.moe_layers[moe_i]
    xs, ids = [], []
    for b in batches:
        out = fake(b, return_routing=True, return_mlp_inputs=True)
        real = np.asarray(b["attention_mask"], bool).reshape(-1)
        xs.append(np.asarray(out.mlp_inputs[layer]).reshape(real.size, -1)[real])
        ids.append(np.asarray(out.routing[moe_i][0]).reshape(real.size, -1)[real])
    xs, ids = np.concatenate(xs), np.concatenate(ids)
    return [xs[(ids == e).any(-1)] for e in range(fake.config.text.n_routed_experts)]


def swiglu(x, gate_up):
    f = gate_up.shape[1] // 2
    h = x @ gate_up
    return h[:, :f] / (1 + np.exp(-h[:, :f])) * h[:, f:]


def _err(inp, w, w_hat):
    return float(np.sum((inp @ (w - w_hat)) ** 2))


def assert_gptq_beats_rtn_per_expert(model, fake, batches, report, bits, group_size):
    """Assert GPTQ < RTN output error for every routed expert that got calibration tokens;
    returns the (moe layer, expert) pairs that got none (their count is checked too)."""
    skipped = []
    for moe_i, layer in enumerate(model.config.text.moe_layers):
        fp = model.language_model.layers[layer].mlp.experts
        fq = fake.language_model.layers[layer].mlp.experts
        w_gu, w_dn = np.asarray(fp.gate_up[...]), np.asarray(fp.down[...])
        g_gu, g_dn = np.asarray(fq.gate_up[...]), np.asarray(fq.down[...])
        r_gu = np.asarray(rtn.fake_quantize(fp.gate_up[...], bits, group_size))
        r_dn = np.asarray(rtn.fake_quantize(fp.down[...], bits, group_size))
        inputs = expert_inputs(fake, batches, moe_i)
        assert report["expert_tokens"][moe_i] == [len(x) for x in inputs]
        for e, x in enumerate(inputs):
            if len(x) == 0:
                skipped.append((moe_i, e))
                continue
            assert _err(x, w_gu[e], g_gu[e]) < _err(x, w_gu[e], r_gu[e]), (moe_i, e, "gate_up")
            act = swiglu(x, g_gu[e])
            assert _err(act, w_dn[e], g_dn[e]) < _err(act, w_dn[e], r_dn[e]), (moe_i, e, "down")
    return skipped
