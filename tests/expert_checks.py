"""Shared check: GPTQ's per-expert output error against round-to-nearest's on the same tokens.

The reference inputs are rebuilt from the fake-quantized model (same codes as the packed one),
so each expert's gate/up sees exactly the MoE inputs routed to it during the sequential walk,
and its down projection sees the activations of the quantized gate/up.
"""

import numpy as np

from mode_jax.quant import rtn


def expert_inputs(fake, batches):
    """Per MoE layer, per routed expert: the real tokens' MoE inputs routed to it in `fake`
    (one forward per batch serves every layer)."""
    moe_layers = fake.config.text.moe_layers
    xs, ids = [[] for _ in moe_layers], [[] for _ in moe_layers]
    for b in batches:
        out = fake(b, return_routing=True, return_mlp_inputs=True)
        real = np.asarray(b["attention_mask"], bool).reshape(-1)
        for moe_i, layer in enumerate(moe_layers):
            xs[moe_i].append(np.asarray(out.mlp_inputs[layer]).reshape(real.size, -1)[real])
            ids[moe_i].append(np.asarray(out.routing[moe_i][0]).reshape(real.size, -1)[real])
    out = []
    for x, i in zip(xs, ids, strict=True):
        x, i = np.concatenate(x), np.concatenate(i)
        out.append([x[(i == e).any(-1)] for e in range(fake.config.text.n_routed_experts)])
    return out


def swiglu(x, gate_up):
    f = gate_up.shape[1] // 2
    h = x @ gate_up
    return h[:, :f] / (1 + np.exp(-h[:, :f])) * h[:, f:]


def _err(inp, w, w_hat):
    return float(np.sum((inp @ (w - w_hat)) ** 2))


def assert_gptq_beats_rtn_per_expert(model, fake, batches, report, bit_map, group_size):
    """Assert GPTQ < RTN output error for every routed expert that got calibration tokens, each
    at its width in `bit_map [L_moe, E]`; returns the (moe layer, expert) pairs that got none
    (their count is checked too)."""
    skipped = []
    for moe_i, (layer, inputs) in enumerate(zip(model.config.text.moe_layers,
                                                expert_inputs(fake, batches), strict=True)):
        fp = model.language_model.layers[layer].mlp.experts
        fq = fake.language_model.layers[layer].mlp.experts
        w_gu, w_dn = np.asarray(fp.gate_up[...]), np.asarray(fp.down[...])
        g_gu, g_dn = np.asarray(fq.gate_up[...]), np.asarray(fq.down[...])
        assert report["expert_tokens"][moe_i] == [len(x) for x in inputs]
        for e, x in enumerate(inputs):
            if len(x) == 0:
                skipped.append((moe_i, e))
                continue
            bits = int(bit_map[moe_i][e])
            r_gu = np.asarray(rtn.fake_quantize(w_gu[e], bits, group_size))
            r_dn = np.asarray(rtn.fake_quantize(w_dn[e], bits, group_size))
            assert _err(x, w_gu[e], g_gu[e]) < _err(x, w_gu[e], r_gu), (moe_i, e, "gate_up")
            act = swiglu(x, g_gu[e])
            assert _err(act, w_dn[e], g_dn[e]) < _err(act, w_dn[e], r_dn), (moe_i, e, "down")
    return skipped
