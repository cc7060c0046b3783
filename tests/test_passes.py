"""The calibration passes on a tiny DeepSeek-V3 against plain loops and brute-force re-forwards."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mode_jax.calib import frequency, passes
from mode_jax.calib import sensitivity as sens
from mode_jax.models import deepseek_v3 as dv
from mode_jax.quant import rtn

IMG, SPECIAL, GROUP = 5, (1, 2, 3), 8
BITS = (2, 4)
CFG = dv.TextConfig(
    vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=1.5,
)


@pytest.fixture(scope="module")
def model():
    """Random weights at a scale where routing and quantization matter: kernels with std
    1/sqrt(fan_in), random correction biases. Filled from numpy (an eager init compiles every
    op separately, which is slow)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dv.DeepseekV3(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "e_score_correction_bias":
            return (rng.normal(size=leaf.shape) * 0.1).astype(leaf.dtype)
        fan_in = 1 if name == "embedding" else leaf.shape[-2]
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def _batch(seed, b, t):
    """Image runs, special tokens after them, right and left padding, random embeddings."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, CFG.vocab_size, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        start, n = rng.integers(1, 3), rng.integers(4, 9)
        ids[i, start:start + n] = IMG
        ids[i, start + n] = SPECIAL[i % 3]
    mask[1, -3:] = 0
    if b > 2:
        mask[2, :2] = 0
    emb = rng.normal(size=(b, t, CFG.hidden_size)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "inputs_embeds": emb}


BATCHES = [_batch(0, 3, 16), _batch(1, 2, 20)]


def _loop_classes(model, batch, cfg):
    """Token classes per MoE layer from the model's own attention scores, by plain loops."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    q = frequency.query_mask(jnp.asarray(ids), jnp.asarray(mask), IMG,
                             jnp.asarray(SPECIAL), cfg.attention_mode)
    out = dv.forward(model, inputs_embeds=jnp.asarray(batch["inputs_embeds"]),
                     attention_mask=jnp.asarray(mask), image_query_mask=q, return_routing=True)
    b, t = ids.shape
    classes = []
    for i in CFG.moe_layers:
        src = cfg.judge_layer if cfg.attention_mode == "judge_layer" else i
        scores = np.asarray(out.image_scores[src])
        cls = np.full((b, t), "", object)
        for s in range(b):
            pos = [j for j in range(t) if mask[s, j] and ids[s, j] == IMG]
            n_key = max(1, math.floor(cfg.key_ratio * len(pos)))
            key = set(sorted(pos, key=lambda j: (-scores[s, j], j))[:n_key])
            for j in range(t):
                if mask[s, j]:
                    cls[s, j] = "text" if ids[s, j] != IMG else ("key" if j in key else "redundant")
        classes.append(cls)
    routing = [tuple(np.asarray(a) for a in r) for r in out.routing]
    return classes, routing, out


@pytest.mark.parametrize("mode,judge", [("per_layer", -1), ("judge_layer", 0)])
def test_frequency_counts_equal_python_loop(model, mode, judge):
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3, attention_mode=mode, judge_layer=judge)
    got = passes.frequency_pass(model, BATCHES, cfg)
    n_moe, e, k = len(CFG.moe_layers), CFG.n_routed_experts, CFG.num_experts_per_tok
    want = {c: np.zeros((n_moe, e), np.int64) for c in frequency.TOKEN_CLASSES}
    wsum, ntok = np.zeros((n_moe, e)), dict.fromkeys(frequency.TOKEN_CLASSES, 0)
    for batch in BATCHES:
        classes, routing, _ = _loop_classes(model, batch, cfg)
        for j in range(n_moe):
            ids, weights = routing[j]
            for s, t in zip(*np.nonzero(batch["attention_mask"]), strict=True):
                names = ["all", classes[j][s, t]] + (["image"] if classes[j][s, t] != "text"
                                                     else [])
                if j == 0:
                    for c in names:
                        ntok[c] += 1
                for slot in range(k):
                    for c in names:
                        want[c][j, ids[s, t, slot]] += 1
                    wsum[j, ids[s, t, slot]] += weights[s, t, slot]
    for c in frequency.TOKEN_CLASSES:
        np.testing.assert_array_equal(got[f"count_{c}"], want[c], err_msg=c)
        assert got[f"count_{c}"].dtype == np.int64
        assert int(got[f"num_tokens_{c}"]) == ntok[c]
        np.testing.assert_array_equal(got[f"count_{c}"].sum(-1), ntok[c] * k)
    np.testing.assert_allclose(got["weight_sum_all"], wsum, rtol=1e-5)
    assert int(got["num_samples"]) == 5
    assert want["key"].sum() > 0 and want["redundant"].sum() > 0


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _reforward(graphdef, state, batch, layer=-1, gate_up=None, down=None, select=None, bump=None):
    """Brute-force fp forward, layer by layer; decoder layer `layer` (if >= 0) outputs
    where(select, its output with experts `gate_up`/`down`, its fp output) + bump.
    Returns the last-position logits [B, V]."""
    model = nnx.merge(graphdef, state)
    mask = batch["attention_mask"]
    h = batch["inputs_embeds"]
    ctx, _ = model.context(mask)
    for i, lyr in enumerate(model.layers):
        out, _ = lyr(h, ctx)
        if i == layer:
            replaced = nnx.merge(graphdef, state).layers[i]
            replaced.mlp.experts.gate_up[...] = gate_up
            replaced.mlp.experts.down[...] = down
            out = jnp.where(select[..., None], replaced(h, ctx)[0], out) + bump
        h = out
    return sens.last_logits(model.logits(h), sens.last_positions(mask))


def _forward_with(model, batch, layer=-1, gate_up=None, down=None, select=None, bump=None):
    graphdef, state = nnx.split(model)
    dev = {k: jnp.asarray(batch[k]) for k in ("attention_mask", "inputs_embeds")}
    if layer >= 0:
        experts = model.layers[layer].mlp.experts
        gate_up = experts.gate_up[...] if gate_up is None else gate_up
        down = experts.down[...] if down is None else down
        select = np.zeros(batch["attention_mask"].shape, bool) if select is None else select
        bump = np.zeros(batch["inputs_embeds"].shape, np.float32) if bump is None else bump
    return np.asarray(_reforward(graphdef, state, dev, layer, gate_up, down, select, bump))


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)


def test_logit_kl_equals_brute_force_reforward(model):
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    batches = BATCHES[:1]
    got = passes.logit_kl_pass(model, batches, cfg, BITS, GROUP, chunk=3)
    want = np.zeros((len(CFG.moe_layers), CFG.n_routed_experts, len(BITS), 2))
    for batch in batches:
        classes, _, out = _loop_classes(model, batch, cfg)
        p = _log_softmax(_forward_with(model, batch))
        for j, layer in enumerate(CFG.moe_layers):
            experts = model.layers[layer].mlp.experts
            for e in range(CFG.n_routed_experts):
                for bi, bits in enumerate(BITS):
                    gu, dn = experts.gate_up[...], experts.down[...]
                    gu = gu.at[e].set(rtn.fake_quantize(gu[e], bits, GROUP))
                    dn = dn.at[e].set(rtn.fake_quantize(dn[e], bits, GROUP))
                    for m, name in enumerate(("text", "key")):
                        z = _forward_with(model, batch, layer, gu, dn, classes[j] == name)
                        q = _log_softmax(z)
                        want[j, e, bi, m] += (np.exp(p) * (p - q)).sum()
    want /= sum(int((b["attention_mask"].sum(1) > 0).sum()) for b in batches)
    assert want.max() > 1e-3  # the quantization is visible
    np.testing.assert_allclose(got["logit_kl_text"], want[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["logit_kl_vision"], want[..., 1], rtol=1e-4, atol=1e-5)


def test_token_cache_inputs_classes_and_fisher_gradient(model):
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    batch = BATCHES[0]
    lengths = batch["attention_mask"].sum(1)
    cap = int(lengths[:2].sum())  # room for exactly two whole samples
    cache = passes.collect_tokens(model, BATCHES, cfg, max_tokens=cap)
    assert (cache.num_samples, cache.num_skipped) == (2, 3)
    classes, routing, _ = _loop_classes(model, batch, cfg)
    out = dv.forward(model, inputs_embeds=jnp.asarray(batch["inputs_embeds"]),
                     attention_mask=jnp.asarray(batch["attention_mask"]), return_mlp_inputs=True)
    rows = batch["attention_mask"].astype(bool) & (np.arange(3) < 2)[:, None]
    code = {"text": sens.TEXT, "key": sens.KEY, "redundant": sens.REDUNDANT}
    for j, layer in enumerate(CFG.moe_layers):
        tok = cache.layers[j]
        assert tok.x.shape == (cap, CFG.hidden_size)
        np.testing.assert_allclose(tok.x, np.asarray(out.mlp_inputs[layer])[rows], atol=1e-5)
        np.testing.assert_array_equal(tok.ids, routing[j][0][rows])
        np.testing.assert_array_equal(tok.modality, [code[c] for c in classes[j][rows]])

    # g2_fisher is the squared derivative of sum_b log p(fp argmax | last) w.r.t. the MoE output
    j, layer = 0, CFG.moe_layers[0]
    argmax = _forward_with(model, batch).argmax(-1)
    tok_rows = np.argwhere(rows)
    r = int(np.argmax(cache.layers[j].g2_fisher.max(-1)))
    d = int(np.argmax(cache.layers[j].g2_fisher[r]))
    s, t = tok_rows[r]

    def objective(eps):
        bump = np.zeros(batch["inputs_embeds"].shape, np.float32)
        bump[s, t, d] = eps
        z = _log_softmax(_forward_with(model, batch, layer, bump=bump))
        return z[np.arange(3), argmax][:2].sum()  # rows past the cap are not in the cache

    eps = 1e-2
    grad = (objective(eps) - objective(-eps)) / (2 * eps)
    np.testing.assert_allclose(cache.layers[j].g2_fisher[r, d], grad**2, rtol=2e-2)


def test_sensitivity_pass_assembles_the_artifact(model):
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    out = passes.sensitivity_pass(model, BATCHES, cfg, bits=BITS, group_size=GROUP,
                                  estimator="fisher", baselines=False)
    shape = (len(CFG.moe_layers), CFG.n_routed_experts, len(BITS))
    names = {f"{e}_{m}" for e in ("expert_mse", "fisher", "delta") for m in ("text", "vision")}
    assert set(out) == names | {"bits", "num_samples"}
    np.testing.assert_array_equal(out["bits"], BITS)
    assert int(out["num_samples"]) == 5
    for name in names:
        assert out[name].shape == shape and np.isfinite(out[name]).all(), name
    np.testing.assert_array_equal(out["delta_text"], out["fisher_text"])
    assert (out["fisher_text"][..., 0] > out["fisher_text"][..., -1]).all()  # 2 bits hurt more
    with pytest.raises(ValueError, match="estimator must be one of"):
        passes.sensitivity_pass(model, BATCHES, cfg, bits=BITS, group_size=GROUP,
                                estimator="mse")


def test_gptq_sensitivity_copies_reach_every_estimator(model):
    """quantizer="gptq": the pass quantizes each layer's experts by GPTQ on that layer's cached
    tokens, and logit_kl is still the exact KL of a brute-force re-forward with those copies."""
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    batches = BATCHES[:1]
    out = passes.sensitivity_pass(model, batches, cfg, bits=BITS, group_size=GROUP,
                                  estimator="logit_kl", baselines=False, quantizer="gptq")
    cache = passes.collect_tokens(model, batches, cfg, gradients=False)
    copies = []
    for tok, layer in zip(cache.layers, CFG.moe_layers, strict=True):
        experts = model.layers[layer].mlp.experts
        copies.append(sens.gptq_quantize_layer(experts.gate_up[...], experts.down[...], BITS,
                                               GROUP, tok.x, tok.ids))
    mse = passes.token_costs(model, cache, BITS, GROUP, quantized=copies)
    rtn_mse = passes.token_costs(model, cache, BITS, GROUP)
    for m in ("text", "vision"):
        np.testing.assert_allclose(out[f"expert_mse_{m}"], mse[f"expert_mse_{m}"], rtol=1e-6)
        assert not np.allclose(out[f"expert_mse_{m}"], rtn_mse[f"expert_mse_{m}"])

    batch = batches[0]
    classes, _, _ = _loop_classes(model, batch, cfg)
    p = _log_softmax(_forward_with(model, batch))
    j, layer, bi = 0, CFG.moe_layers[0], 0  # the last layer moves only the last tokens
    tok = cache.layers[j]
    e = int(np.argmax([min(((tok.ids == x).any(-1) & (tok.modality == c)).sum()
                           for c in (sens.TEXT, sens.KEY)) for x in range(CFG.n_routed_experts)]))
    experts = model.layers[layer].mlp.experts
    gu = experts.gate_up[...].at[e].set(copies[j][0][bi, e])
    dn = experts.down[...].at[e].set(copies[j][1][bi, e])
    for m, name in enumerate(("text", "vision")):
        q = _log_softmax(_forward_with(model, batch, layer, gu, dn,
                                       classes[j] == ("text", "key")[m]))
        want = (np.exp(p) * (p - q)).sum() / 3
        assert want > 1e-6  # the expert has tokens of both modalities
        np.testing.assert_allclose(out[f"logit_kl_{name}"][j, e, bi], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        passes.sensitivity_pass(model, batches, cfg, bits=BITS, group_size=GROUP,
                                baselines=False, quantizer="awq")


def test_bad_config_and_batches_are_clear_errors(model):
    with pytest.raises(ValueError, match="attention_mode"):
        passes.StatsConfig(IMG, attention_mode="sideways")
    with pytest.raises(ValueError, match="key_ratio"):
        passes.StatsConfig(IMG, key_ratio=0.0)
    cfg = passes.StatsConfig(IMG)
    with pytest.raises(ValueError, match="lacks 'attention_mask'"):
        passes.frequency_pass(model, [{"input_ids": np.zeros((1, 4), np.int32)}], cfg)
    with pytest.raises(ValueError, match="no calibration batches"):
        passes.frequency_pass(model, [], cfg)
    with pytest.raises(ValueError, match="DeepseekV3"):
        passes.text_model(object())


@pytest.mark.slow
@pytest.mark.parametrize(("curvature", "layers_per_pass", "batch_size"),
                         [("hessian", 0, 2), ("gauss_newton", 0, 2), ("hessian", 1, 1)])
def test_hessian_trace_matches_exact_block_traces(model, curvature, layers_per_pass,
                                                  batch_size):
    """Within 5 standard errors of the exact per-expert trace of a batch of two random
    sequences, probing every MoE layer in one pass, or one layer per pass with each sequence
    its own batch (no padding: the batch loss is the mean of the sequences', so is its
    Hessian; the variance bound below counts every cross term, so it holds for both)."""
    batch = passes.random_token_batches(CFG.vocab_size, num_samples=2, length=8, batch_size=2,
                                        seed=0, exclude=(IMG,))
    probes = 100
    split = passes.random_token_batches(CFG.vocab_size, num_samples=2, length=8,
                                        batch_size=batch_size, seed=0, exclude=(IMG,))
    got = passes.hessian_trace_pass(model, split, image_token_id=IMG, num_probes=probes, seed=1,
                                    curvature=curvature, layers_per_pass=layers_per_pass)
    assert got.shape == (len(CFG.moe_layers), CFG.n_routed_experts)

    graphdef, experts, rest = nnx.split(model, passes._is_routed_expert, ...)
    dev, _ = passes.device_batch(model, batch[0])
    ids, mask = dev["input_ids"], dev["attention_mask"]

    def loss_of_logits(logits, ids, mask):
        return sens.next_token_nll(logits, ids, mask, IMG) / (ids.shape[0] * (ids.shape[1] - 1))

    def loss(params):
        return loss_of_logits(nnx.merge(graphdef, params, rest)(ids, attention_mask=mask).logits,
                              ids, mask)

    flat, unravel = jax.flatten_util.ravel_pytree(experts)
    if curvature == "hessian":
        hvp = jax.jit(lambda v: jax.flatten_util.ravel_pytree(
            jax.jvp(jax.grad(loss), (experts,), (unravel(v),))[1])[0])
    else:  # G v = J^T H_z J v, H_z = the cross-entropy's Hessian in the logits (jax.hessian)
        def logits(params):
            return nnx.merge(graphdef, params, rest)(ids, attention_mask=mask).logits

        z, pullback = jax.vjp(logits, experts)
        h_z = jax.hessian(lambda zz: loss_of_logits(zz, ids, mask))(z)
        hvp = jax.jit(lambda v: jax.flatten_util.ravel_pytree(pullback(jnp.tensordot(
            h_z, jax.jvp(logits, (experts,), (unravel(v),))[1], z.ndim))[0])[0])
    offsets = np.cumsum([0] + [x.size for x in jax.tree.leaves(experts)])
    leaves = jax.tree_util.tree_flatten_with_path(experts)[0]
    for j, layer in enumerate(CFG.moe_layers):
        for e in (0, CFG.n_routed_experts - 1):
            idx = []
            for (path, leaf), off in zip(leaves, offsets[:-1], strict=True):
                if path[1].key == layer:
                    per = leaf[...].size // CFG.n_routed_experts
                    idx.extend(range(off + e * per, off + (e + 1) * per))
            basis = np.zeros((len(idx), flat.size), flat.dtype)  # one unit vector per row
            basis[np.arange(len(idx)), idx] = 1.0
            cols = np.concatenate([np.asarray(jax.vmap(hvp)(basis[s:s + 128]))
                                   for s in range(0, len(idx), 128)])
            block = cols[:, idx]
            exact = np.trace(block)
            var = 2 * ((cols**2).sum() - (np.diag(block) ** 2).sum())
            assert abs(got[j, e] - exact) < 5 * np.sqrt(var / probes) + 1e-6, (layer, e)


def test_kimivl_fixture_counts_match_published_routing():
    """On the Kimi-VL fixture (images through MoonViT), the counts follow the experts that
    Kimi-VL's published PyTorch code selected."""
    from mode_jax import api

    fixture = "tests/fixtures/kimivl-tiny"
    ref = np.load(f"{fixture}/reference.npz")
    kimi = api.load(fixture)
    batch = {"input_ids": ref["input_ids"], "attention_mask": np.ones_like(ref["input_ids"]),
             "pixel_values": ref["pixel_values"], "image_grid_hws": ref["image_grid_hws"]}
    placeholder = kimi.config.media_placeholder_token_id
    cfg = passes.StatsConfig(placeholder, key_ratio=0.25)
    got = passes.frequency_pass(kimi, [batch], cfg)
    routed = ref["routed_ids_layer1"]
    image = ref["input_ids"][0] == placeholder
    e = kimi.config.text.n_routed_experts
    np.testing.assert_array_equal(got["count_all"][0], np.bincount(routed.reshape(-1), minlength=e))
    np.testing.assert_array_equal(got["count_image"][0],
                                  np.bincount(routed[image].reshape(-1), minlength=e))
    np.testing.assert_array_equal(got["count_key"] + got["count_redundant"], got["count_image"])
    assert int(got["num_tokens_key"]) == max(1, math.floor(0.25 * image.sum()))
    with pytest.raises(ValueError, match="image placeholder id is 40"):
        passes.frequency_pass(kimi, [batch], passes.StatsConfig(placeholder + 1))


def test_negative_hutchinson_estimates_become_zero_and_are_logged(caplog):
    trace = np.array([[0.5, -1e-3, 2.0], [-4.0, 0.0, 1.0]])
    with caplog.at_level("INFO", logger="mode_jax.calib.passes"):
        got = passes.nonnegative_trace(trace)
    np.testing.assert_array_equal(got, [[0.5, 0.0, 2.0], [0.0, 0.0, 1.0]])
    assert "2 negative Hutchinson estimates set to 0" in caplog.text
    assert "(0, 1), (1, 0)" in caplog.text
    np.testing.assert_array_equal(trace[0, 1], -1e-3)  # the input is left alone


def test_auto_trace_blocks_fit_the_free_device_memory(model):
    """The auto block size: every layer without memory figures (CPU) or when they fit,
    otherwise as many layers' probe-sized arrays as half the free memory holds."""
    per_layer = passes._device_bytes(model.layers[CFG.moe_layers[0]].mlp.experts)
    need = passes.TRACE_ARRAYS_PER_PARAM * per_layer / passes.TRACE_MEMORY_SHARE
    assert passes.auto_layers_per_pass(model, stats=None) == 0
    for fit, want in ((0.5, 1), (1.0, 1), (1.5, 1), (2.0, 0), (9.0, 0)):  # 2 MoE layers
        stats = {"bytes_limit": int(need * fit) + 1000, "bytes_in_use": 1000}
        assert passes.auto_layers_per_pass(model, stats=stats) == want, fit
    assert passes.layer_blocks((1, 2, 5), 2) == [(1, 2), (5,)]
    assert passes.layer_blocks((1, 2, 5), 0) == [(1, 2, 5)]
    with pytest.raises(ValueError, match="layers_per_pass"):
        passes.hessian_trace_pass(model, BATCHES, image_token_id=IMG, layers_per_pass=-1)


def test_sensitivity_never_holds_every_layers_quantized_copies(model, monkeypatch):
    """Round-to-nearest copies of the experts (B per expert) are made a chunk of experts at a
    time inside the token estimators and one layer at a time for logit_kl, never for the whole
    model at once: at every estimator call at most one layer's copies are live arrays."""
    copy_shapes = {(len(BITS), *model.layers[i].mlp.experts.gate_up[...].shape)
                   for i in CFG.moe_layers}
    seen = []

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            live = [a for a in jax.live_arrays() if a.shape in copy_shapes and not a.is_deleted()]
            seen.append((name, len(live)))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sens, "_layer_sums", spy(sens._layer_sums, "token"))
    monkeypatch.setattr(passes, "_kl_layer", spy(passes._kl_layer, "kl"))
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    passes.sensitivity_pass(model, BATCHES, cfg, bits=BITS, group_size=GROUP,
                            estimator="logit_kl", baselines=False)
    assert {name for name, _ in seen} == {"token", "kl"}
    assert max(n for name, n in seen if name == "token") == 0, seen
    assert max(n for name, n in seen if name == "kl") == 1, seen


def test_token_estimators_bound_the_layer_caches_on_the_device(model, monkeypatch):
    """Past `max_inflight_bytes` the host waits for a layer before sending the next one's
    token cache: with a bound of 0 every layer is finished before the next is sent, with the
    default (a small model) every layer is sent before the first wait; same results."""
    cfg = passes.StatsConfig(IMG, SPECIAL, key_ratio=0.3)
    cache = passes.collect_tokens(model, BATCHES, cfg, gradients=True)
    events = []
    launch, wait = sens._launch, jax.block_until_ready

    def spy_launch(*args, **kwargs):
        run = launch(*args, **kwargs)
        events.append(("sent", id(run.parts)))
        return run

    def spy_wait(x):
        events.append(("waited", id(x)))
        return wait(x)

    monkeypatch.setattr(sens, "_launch", spy_launch)
    monkeypatch.setattr(sens.jax, "block_until_ready", spy_wait)
    runs = [(t, model.layers[i].mlp.experts.gate_up[...], model.layers[i].mlp.experts.down[...],
             None, None) for t, i in zip(cache.layers, CFG.moe_layers, strict=True)]
    results = {}
    for limit in (0, sens.MAX_INFLIGHT_BYTES):
        events.clear()
        results[limit] = sens.stacked_costs(runs, num_samples=cache.num_samples, bits=BITS,
                                            group_size=GROUP, max_inflight_bytes=limit)
        sent = [key for kind, key in events if kind == "sent"]
        assert len(sent) == len(CFG.moe_layers)
        if limit == 0:  # sent, waited, sent, waited, ..., sent
            assert events == [e for key in sent[:-1] for e in (("sent", key), ("waited", key))] \
                + [("sent", sent[-1])]
        else:
            assert [kind for kind, _ in events] == ["sent"] * len(CFG.moe_layers)
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[sens.MAX_INFLIGHT_BYTES][k])
