"""Token-level sensitivity estimators against plain per-expert loops (no model needed)."""

import logging

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.calib import sensitivity as sens
from mode_jax.quant import rtn

E, K, D, F, N, GROUP = 6, 2, 16, 8, 40, 8
BITS = np.array([2, 3, 4], np.int32)


def _experts(rng):
    gate_up = rng.normal(size=(E, D, 2 * F)).astype(np.float32) / np.sqrt(D)
    down = rng.normal(size=(E, F, D)).astype(np.float32) / np.sqrt(F)
    return gate_up, down


def _tokens(rng, grads=True, starve=None):
    """Random cached tokens; expert `starve` gets no key-vision token."""
    ids = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int32)
    modality = rng.choice([sens.TEXT, sens.KEY, sens.REDUNDANT], size=N).astype(np.int8)
    if starve is not None:
        modality[(ids == starve).any(-1) & (modality == sens.KEY)] = sens.REDUNDANT
    g2 = (lambda: rng.random((N, D)).astype(np.float32)) if grads else (lambda: None)
    return sens.LayerTokens(
        x=rng.normal(size=(N, D)).astype(np.float32),
        ids=ids,
        weights=rng.random((N, K)).astype(np.float32),
        modality=modality,
        g2_fisher=g2(),
        g2_loss=g2(),
    )


def _loop_costs(tokens, gate_up, down, num_samples):
    """Every estimator by its definition: one expert, one bit, one token at a time."""
    out = {k: np.zeros((E, len(BITS))) for k in
           ("expert_mse_text", "expert_mse_vision", "fisher_text", "fisher_vision", "pmq_err",
            "gemq_cost")}
    codes = {"text": sens.TEXT, "vision": sens.KEY}
    for e in range(E):
        for j, b in enumerate(BITS):
            gu_q = np.asarray(rtn.fake_quantize(jnp.asarray(gate_up[e]), int(b), GROUP))
            dn_q = np.asarray(rtn.fake_quantize(jnp.asarray(down[e]), int(b), GROUP))
            count = {m: 0 for m in codes}
            for t in range(N):
                slots = np.flatnonzero(tokens.ids[t] == e)
                if not slots.size:
                    continue
                w = tokens.weights[t, slots[0]]
                x = tokens.x[t]
                h, hq = x @ gate_up[e], x @ gu_q
                y = (h[:F] / (1 + np.exp(-h[:F])) * h[F:]) @ down[e]
                yq = (hq[:F] / (1 + np.exp(-hq[:F])) * hq[F:]) @ dn_q
                diff = yq.astype(np.float64) - y
                dz2 = (w * diff) ** 2
                out["pmq_err"][e, j] += dz2.sum() / (N * D)
                out["gemq_cost"][e, j] += (tokens.g2_loss[t] * dz2).sum() / num_samples
                for m, c in codes.items():
                    if tokens.modality[t] == c:
                        count[m] += 1
                        out[f"expert_mse_{m}"][e, j] += np.mean(diff**2)
                        out[f"fisher_{m}"][e, j] += 0.5 * (tokens.g2_fisher[t] * dz2).sum() / (
                            num_samples)
            for m in codes:
                out[f"expert_mse_{m}"][e, j] /= max(count[m], 1)
    return out


def test_vmapped_costs_equal_per_expert_loop():
    rng = np.random.default_rng(0)
    gate_up, down = _experts(rng)
    tokens = _tokens(rng)
    guq, dnq = sens.quantize_layer(jnp.asarray(gate_up), jnp.asarray(down), BITS, GROUP)
    got = sens.layer_costs(tokens, jnp.asarray(gate_up), jnp.asarray(down), guq, dnq,
                           num_samples=3, chunk=4)
    want = _loop_costs(tokens, gate_up, down, num_samples=3)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == (E, len(BITS))
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-9, err_msg=k)
    assert (want["expert_mse_text"][:, 0] > want["expert_mse_text"][:, -1]).all()  # 2 < 4 bits
    only_mse = sens.expert_mse(tokens, jnp.asarray(gate_up), jnp.asarray(down), guq, dnq)
    np.testing.assert_allclose(only_mse["vision"], want["expert_mse_vision"], rtol=2e-4)


def test_stacked_costs_equal_the_per_expert_loop_of_each_layer(caplog):
    """Two layers dispatched together (one of them starving expert 2 of vision tokens) give
    each layer's loop figures, in layer order, and log the starved expert under its layer id."""
    rng = np.random.default_rng(3)
    layers = [(_tokens(rng), *_experts(rng)), (_tokens(rng, starve=2), *_experts(rng))]
    runs = []
    for tokens, gate_up, down in layers:
        gu, dn = jnp.asarray(gate_up), jnp.asarray(down)
        runs.append((tokens, gu, dn, *sens.quantize_layer(gu, dn, BITS, GROUP)))
    with caplog.at_level(logging.INFO, logger="mode_jax.calib.sensitivity"):
        got = sens.stacked_costs(runs, num_samples=2, layer_ids=[4, 9], chunk=4)
    for j, (tokens, gate_up, down) in enumerate(layers):
        want = _loop_costs(tokens, gate_up, down, num_samples=2)
        for k in want:
            assert got[k].shape == (2, E, len(BITS))
            np.testing.assert_allclose(got[k][j], want[k], rtol=2e-4, atol=1e-9, err_msg=k)
    assert "MoE layer 9: experts [2] received no vision token" in caplog.text
    with pytest.raises(ValueError, match="at least one layer"):
        sens.stacked_costs([], num_samples=1)


def test_expert_without_modality_tokens_is_zero_and_logged(caplog):
    rng = np.random.default_rng(1)
    gate_up, down = _experts(rng)
    tokens = _tokens(rng, starve=2)
    guq, dnq = sens.quantize_layer(jnp.asarray(gate_up), jnp.asarray(down), BITS, GROUP)
    with caplog.at_level(logging.INFO, logger="mode_jax.calib.sensitivity"):
        got = sens.layer_costs(tokens, jnp.asarray(gate_up), jnp.asarray(down), guq, dnq,
                               num_samples=1, layer=7)
    for v in got.values():
        assert np.isfinite(v).all()
    np.testing.assert_array_equal(got["expert_mse_vision"][2], 0.0)
    np.testing.assert_array_equal(got["fisher_vision"][2], 0.0)
    assert (got["expert_mse_text"][2] > 0).all()
    assert "MoE layer 7: experts [2] received no vision token" in caplog.text


def test_expert_buffers_group_pairs_by_expert():
    rng = np.random.default_rng(2)
    tokens = _tokens(rng)
    buf = sens.expert_buffers(tokens.ids, tokens.weights, E)
    assert buf.index.shape[1] >= 8 and (buf.index.shape[1] & (buf.index.shape[1] - 1)) == 0
    for e in range(E):
        rows, slots = np.nonzero(tokens.ids == e)
        n = len(rows)
        np.testing.assert_array_equal(buf.index[e, :n], rows)
        np.testing.assert_array_equal(buf.weight[e, :n], tokens.weights[rows, slots])
        assert buf.valid[e, :n].all() and not buf.valid[e, n:].any()
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 6\)"):
        sens.expert_buffers(np.array([[0, 6]]), np.ones((1, 2)), E)


def test_bad_bits_are_one_clear_error():
    with pytest.raises(ValueError, match="bits"):
        sens.check_bits([2, 9])
    with pytest.raises(ValueError, match="non-empty"):
        sens.check_bits([])


def test_hutchinson_is_exact_for_a_diagonal_hessian_per_expert_block():
    # loss = 0.5 * sum(a * p^2): H is diagonal, so v^T H v = tr(H) for every Rademacher v.
    rng = np.random.default_rng(3)
    params = {"gate_up": jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32),
              "down": jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32)}
    scale = {k: jnp.asarray(rng.random(v.shape), jnp.float32) for k, v in params.items()}

    def loss(p):
        return sum(0.5 * jnp.sum(scale[k] * p[k] ** 2) for k in p)

    got = sens.hutchinson_block_traces(loss, params, 3, jax.random.key(0))
    for k in params:
        np.testing.assert_allclose(got[k], np.asarray(scale[k]).reshape(4, -1).sum(-1),
                                   rtol=1e-5)


def test_hutchinson_converges_to_block_trace_with_cross_terms():
    # A dense Hessian coupling experts: the per-block estimate stays unbiased.
    rng = np.random.default_rng(4)
    n_e, size = 3, 4
    a = rng.normal(size=(n_e * size, n_e * size))
    h = jnp.asarray(a @ a.T / 10, jnp.float32)
    p0 = jnp.zeros((n_e, size), jnp.float32)
    got = sens.hutchinson_block_traces(lambda p: 0.5 * p.reshape(-1) @ h @ p.reshape(-1), p0,
                                       4000, jax.random.key(1))
    want = np.diag(np.asarray(h)).reshape(n_e, size).sum(-1)
    # Rademacher variance per probe: 2 * sum of the block rows' squared off-diagonal entries.
    hh = np.asarray(h)
    var = [2 * (np.sum(hh[i * size:(i + 1) * size] ** 2)
                - np.sum(np.diag(hh)[i * size:(i + 1) * size] ** 2)) for i in range(n_e)]
    np.testing.assert_array_less(np.abs(np.asarray(got) - want), 5 * np.sqrt(np.array(var) / 4000))


def _softmax_ce(z, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(z, -1), labels[..., None], -1).sum()


def test_gauss_newton_equals_hessian_for_outputs_linear_in_the_params():
    # z = sum_e x W_e: no second derivative of z, so G = H and the same probes give the same
    # estimates.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=5))
    params = {"gate_up": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)}

    def outputs(p):
        return jnp.einsum("td,edv->tv", x, p["gate_up"])

    def hvp(z, u):
        q = jax.nn.softmax(z, -1)
        return q * u - q * (q * u).sum(-1, keepdims=True)

    key = jax.random.key(2)
    want = sens.hutchinson_block_traces(lambda p: _softmax_ce(outputs(p), labels), params, 5, key)
    got = sens.hutchinson_gauss_newton_block_traces(outputs, hvp, params, 5, key)
    np.testing.assert_allclose(got["gate_up"], want["gate_up"], rtol=1e-4, atol=1e-5)


def test_gauss_newton_converges_to_the_block_traces_of_j_h_j():
    # A nonlinear two-expert model with next-token targets: G = J^T H_z J built explicitly.
    rng = np.random.default_rng(7)
    b, t, d, v, n_e = 2, 5, 3, 6, 2
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    ids[1, 2] = 5  # an image placeholder target: not counted
    mask = np.ones((b, t), np.int32)
    mask[1, -1] = 0
    x = jnp.asarray(rng.normal(size=(b, t - 1, d)), jnp.float32)
    params = {"gate_up": jnp.asarray(rng.normal(size=(n_e, d, 4)), jnp.float32),
              "down": jnp.asarray(rng.normal(size=(n_e, 4, v)), jnp.float32)}

    def outputs(p):
        h = jnp.tanh(jnp.einsum("btd,edf->ebtf", x, p["gate_up"]))
        return jnp.einsum("ebtf,efv->btv", h, p["down"])

    hvp = sens.next_token_output_hvp(jnp.asarray(ids), jnp.asarray(mask), 5, 7.0)
    probes = 3000
    got = sens.hutchinson_gauss_newton_block_traces(outputs, hvp, params, probes,
                                                    jax.random.key(3))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    z = outputs(params)
    jac = jax.jacfwd(lambda f: outputs(unravel(f)).reshape(-1))(flat)  # [b*(t-1)*v, P]

    def loss_of_outputs(zz):  # next_token_nll reads the logits of positions [:, :-1]
        full = jnp.concatenate([zz, jnp.zeros_like(zz[:, :1])], 1)
        return sens.next_token_nll(full, jnp.asarray(ids), jnp.asarray(mask), 5) / 7.0

    h_z = jax.hessian(loss_of_outputs)(z).reshape(z.size, z.size)
    g = np.asarray(jac.T @ h_z @ jac, np.float64)
    assert np.linalg.eigvalsh(g).min() > -1e-4  # positive semi-definite
    offset = 0
    for k in sorted(params):  # ravel_pytree's order; an expert's entries are contiguous
        per = params[k][0].size
        for e in range(n_e):
            rows = np.arange(offset + e * per, offset + (e + 1) * per)
            exact = np.trace(g[np.ix_(rows, rows)])
            # per-probe variance: 2 * the squared off-diagonal entries of those rows
            var = 2 * ((g[rows] ** 2).sum() - (np.diag(g)[rows] ** 2).sum())
            assert abs(float(got[k][e]) - exact) < 5 * np.sqrt(var / probes) + 1e-6, (k, e)
        offset += params[k].size


def test_objectives_match_numpy():
    rng = np.random.default_rng(5)
    b, t, v, img = 3, 7, 11, 4
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    ids[0, 2] = img
    mask = np.ones((b, t), np.int32)
    mask[1, -2:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    last = np.asarray(sens.last_positions(jnp.asarray(mask)))
    np.testing.assert_array_equal(last, [6, 4, 6])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = 0.0
    for i in range(b):
        for j in range(t - 1):
            if mask[i, j] and mask[i, j + 1] and ids[i, j + 1] != img:
                nll -= logp[i, j, ids[i, j + 1]]
    got = sens.next_token_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), img)
    np.testing.assert_allclose(float(got), nll, rtol=1e-5)
    ll = sens.last_logits(jnp.asarray(logits), jnp.asarray(last))
    want = sum(logp[i, last[i]].max() for i in range(b))
    np.testing.assert_allclose(float(sens.argmax_logprob(ll)), want, rtol=1e-5)
    q = rng.normal(size=(b, v)).astype(np.float32)
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    p = logp[np.arange(b), last]
    np.testing.assert_allclose(np.asarray(sens.kl_last(jnp.asarray(p), jnp.asarray(q))),
                               (np.exp(p) * (p - lq)).sum(-1), rtol=1e-5)


def test_gptq_copies_use_each_experts_own_tokens_and_recomputed_down_inputs():
    """gptq_quantize_layer against GPTQ on Hessians built here by a plain loop over tokens."""
    from mode_jax.quant import gptq

    rng = np.random.default_rng(7)
    gate_up, down = _experts(rng)
    tokens = _tokens(rng, grads=False)
    ids = tokens.ids.copy()
    ids[ids == 4] = 5  # expert 4 gets no token: round-to-nearest
    ids[:, 1] = np.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 4, ids[:, 1])
    bits = np.array([2, 3], np.int32)
    gu_q, dn_q = sens.gptq_quantize_layer(gate_up, down, bits, GROUP, tokens.x, ids)
    assert gu_q.shape == (2, E, D, 2 * F) and dn_q.shape == (2, E, F, D)

    def silu_glu(h):
        return h[:, :F] / (1 + np.exp(-h[:, :F])) * h[:, F:]

    for e in range(E):
        x = tokens.x[(ids == e).any(-1)].astype(np.float64)
        for j, b in enumerate(bits):
            if not len(x):
                np.testing.assert_allclose(gu_q[j, e], rtn.fake_quantize(gate_up[e], int(b), GROUP),
                                           atol=1e-6)
                continue
            h = 2 * x.T @ x / len(x)
            want_gu = gptq.gptq_quantize(gate_up[e], h.astype(np.float32), int(b),
                                         group_size=GROUP, block_size=GROUP).weight
            np.testing.assert_allclose(gu_q[j, e], want_gu, atol=1e-5)
            act = silu_glu(x @ np.asarray(want_gu).astype(np.float64))
            h_dn = 2 * act.T @ act / len(x)
            want_dn = gptq.gptq_quantize(down[e], h_dn.astype(np.float32), int(b),
                                         group_size=GROUP, block_size=GROUP).weight
            np.testing.assert_allclose(dn_q[j, e], want_dn, atol=1e-5)
            # and GPTQ does what it is for: less output error on these tokens than RTN
            ref = x @ gate_up[e]
            rtn_gu = np.asarray(rtn.fake_quantize(gate_up[e], int(b), GROUP))
            assert (np.sum((x @ np.asarray(gu_q[j, e]) - ref) ** 2)
                    <= np.sum((x @ rtn_gu - ref) ** 2) + 1e-9)
