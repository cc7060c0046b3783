"""A forward pass with experts split over a mesh equals the single-device forward.

Each script runs in its own process so XLA can be given host devices without affecting other
tests: a fork of a server that has imported jax, flax and mode_jax (main_forks.py), whose
XLA_FLAGS take effect when the script starts its JAX backend.
"""

import os
import textwrap
import types

import pytest
from main_forks import Forks


@pytest.fixture(scope="module")
def cpu_forks():
    """Forks on the CPU platform even where a GPU is (host devices are what the scripts split)."""
    with Forks(env={"JAX_PLATFORMS": "cpu"}) as server:
        yield server


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    import mode_jax
    from mode_jax import sharding
    from mode_jax.calib import sources

    assert len(jax.devices()) == 8
    model = mode_jax.load("tests/fixtures/kimivl-tiny")
    cfg = model.config
    batch = sources.random_batches(cfg, n=8, batch_size=8, seed=0)[0]  # 8 alike images
    grid = tuple(map(tuple, batch["image_grid_hws"]))
    fwd = nnx.jit(lambda m, ids, mask, px: m.forward(ids, mask, px, grid, return_routing=True))
    want = fwd(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

    mesh = sharding.make_mesh(expert=4)
    sharding.shard_model(model, mesh)
    gate_up = model.language_model.layers[1].mlp.experts.gate_up[...]
    assert gate_up.sharding.spec == jax.sharding.PartitionSpec("expert"), gate_up.sharding
    assert len(gate_up.addressable_shards) == 8
    assert gate_up.addressable_shards[0].data.shape[0] == gate_up.shape[0] // 4
    sb = sharding.shard_batch(batch, mesh)
    assert sb["input_ids"].sharding.spec == jax.sharding.PartitionSpec("data")
    got = fwd(model, sb["input_ids"], sb["attention_mask"], sb["pixel_values"])
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits),
                               rtol=1e-5, atol=1e-5)
    for (gi, _), (wi, _) in zip(got.routing, want.routing):
        np.testing.assert_array_equal(np.sort(np.asarray(gi), -1), np.sort(np.asarray(wi), -1))
    # Expert parallel: each device runs its own experts; no layer's experts are gathered.
    hlo = fwd.lower(model, sb["input_ids"], sb["attention_mask"], sb["pixel_values"]
                    ).compile().as_text()
    stacks = {"f32[%s]" % ",".join(map(str, a.shape)) for a in (gate_up, model.language_model
              .layers[1].mlp.experts.down[...])}
    gathered = [line for line in hlo.splitlines() if "all-gather" in line.split("=", 1)[-1]]
    assert not [g for g in gathered if any(s in g for s in stacks)], (stacks, gathered)
    assert "all-reduce" in hlo

    import logging  # 8 experts over an expert axis of 3: kept whole, and the user told so
    from jax.sharding import PartitionSpec as P
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mode_jax.sharding").addHandler(handler)
    sharding.shard_model(model, sharding.make_mesh(expert=3, devices=jax.devices()[:6]))
    assert model.language_model.layers[1].mlp.experts.gate_up[...].sharding.spec == P()
    (warning,) = [r.getMessage() for r in records]
    assert "stacks of [8] experts" in warning and "axis of 3 devices" in warning, warning
    print("SHARDED_OK")
""")


def _run_on_8_host_devices(forks, script: str, devices: int = 8, timeout: int = 300):
    """`script` in a process with `devices` host devices (and the suite's other XLA flags)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {"XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}
    proc = forks.run(["-c", script], env=env, timeout=timeout)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


def test_expert_parallel_forward_matches(cpu_forks):
    """The forward with the experts split over "expert" (each device running its own, no
    layer's experts gathered) equals one device's; an expert count the expert axis does not
    divide is kept whole, with a warning."""
    _run_on_8_host_devices(cpu_forks, SCRIPT)


DATA_FORWARD_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    import mode_jax
    from mode_jax import sharding
    from mode_jax.calib import sources
    from mode_jax.models.batch import embed_split, split_embedder

    assert len(jax.devices()) == 2
    model = mode_jax.load("tests/fixtures/kimivl-tiny")
    assert model.config.text.topk_method == "noaux_tc"  # the router's bias goes in too
    batch = sources.random_batches(model.config, n=4, batch_size=4, seed=0)[0]
    grid = tuple(map(tuple, batch["image_grid_hws"]))
    fwd = nnx.jit(lambda m, ids, mask, px: m.forward(ids, mask, px, grid, return_routing=True))
    want = fwd(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert len(set(grid)) == 1 and len(grid) == 4  # images of one grid: split over "data"

    def embedded(model, b):
        graphdef, state = split_embedder(model)
        args = (graphdef, state, b["input_ids"], b["pixel_values"], grid)
        flops = embed_split.lower(*args).compile().cost_analysis()["flops"]  # per device
        return np.asarray(embed_split(*args)[0]), flops

    want_h, want_flops = embedded(model, batch)
    mesh = sharding.make_mesh(expert=1)
    sharding.shard_model(model, mesh)
    sb = sharding.shard_batch(batch, mesh)
    got_h, got_flops = embedded(model, sb)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-6)
    assert got_flops < 0.6 * want_flops, (got_flops, want_flops)  # each device: its 2 images
    args = (model, sb["input_ids"], sb["attention_mask"], sb["pixel_values"])
    got = fwd(*args)
    # half the rows per matmul may round differently (2e-7 here; bit for bit on the testbed)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=1e-5,
                               atol=1e-6)
    for (gi, gw), (wi, ww) in zip(got.routing, want.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(gi), np.asarray(wi))
        np.testing.assert_allclose(np.asarray(gw), np.asarray(ww), rtol=1e-5)
    hlo = fwd.lower(*args).compile().as_text()
    assert "all-reduce" not in hlo, "a layer's output was summed over devices"
    gathered = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert not [g for g in gathered if "f32[" in g.split("all-gather(")[0]], gathered
    print("SHARDED_OK")
""")


def test_data_parallel_forward_routes_and_runs_experts_on_each_devices_rows(cpu_forks):
    """With experts replicated and rows split over "data", each device routes its own rows and
    runs the experts on them, as one device would: the same routing and logits (to rounding),
    and no scores, activations or outputs cross devices (left to XLA's partitioner,
    every MoE layer gathered all rows' router scores for the top-k, sorted all rows on each
    device and all-reduced its output; only the image placement's token counts are gathered).
    The vision program runs each device's share of the images (XLA's count of its work per
    device about halves; the pixel values reach every device whole), with the same
    embeddings."""
    _run_on_8_host_devices(cpu_forks, DATA_FORWARD_SCRIPT, devices=2)


@pytest.mark.parametrize("shape,count,rows,axes", [
    ({"data": 2, "expert": 4}, 8, 8 * 16, ("data", "expert")),  # every device: one image
    ({"data": 2, "expert": 4}, 4, 4 * 16, ("data",)),  # 8 does not divide 4: over "data"
    ({"data": 2, "expert": 4}, 3, 3 * 16, ()),
    ({"data": 1, "expert": 2}, 2, 2 * 16, ("expert",)),  # expert parallel only: still split
    ({"data": 4, "expert": 1}, 8, 8, ("data",)),  # InternVL: one tile a row
    ({"data": 1, "expert": 1}, 4, 64, ()),
])
def test_alike_images_split_over_the_devices_that_divide_them(shape, count, rows, axes):
    from mode_jax.models import batch as batch_lib

    mesh = types.SimpleNamespace(axis_names=tuple(shape), shape=shape)
    assert batch_lib._image_axes(mesh, count, rows) == axes
    assert batch_lib._image_axes(None, count, rows) == ()


FAMILIES_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    import internvl_tiny, qwen3vl_tiny
    from mode_jax import sharding
    from mode_jax.calib import sources

    assert len(jax.devices()) == 8
    internvl_batch = sources.random_batches(internvl_tiny.CONFIG, 2, 2, seed=0)[0]
    qwen3vl_alike = sources.random_batches(qwen3vl_tiny.CONFIG, 2, 2, seed=0)[0]  # 2 alike
    for tiny, batch in ((qwen3vl_tiny, qwen3vl_tiny.batch(0)), (qwen3vl_tiny, qwen3vl_alike),
                        (internvl_tiny, internvl_batch)):
        model = tiny.model()
        want = model(batch, return_routing=True)
        mesh = sharding.make_mesh(expert=4)
        sharding.shard_model(model, mesh)
        down = model.language_model.layers[0].mlp.experts.down[...]
        assert down.sharding.spec == jax.sharding.PartitionSpec("expert"), down.sharding
        got = model(sharding.shard_batch(batch, mesh), return_routing=True)
        np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits),
                                   rtol=1e-5, atol=1e-5)
        for (gi, _), (wi, _) in zip(got.routing, want.routing):
            np.testing.assert_array_equal(np.sort(np.asarray(gi), -1),
                                          np.sort(np.asarray(wi), -1))
    print("SHARDED_OK")
""")


def test_expert_parallel_forward_matches_on_the_other_families(cpu_forks):
    """The same on Qwen3-VL-MoE (M-RoPE positions and DeepStack additions on sharded data;
    three images of two grids run whole, two alike split over "data") and on InternVL (its two
    tiles split), in one subprocess."""
    _run_on_8_host_devices(cpu_forks, FAMILIES_SCRIPT)


QUANTIZE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mode_jax import sharding
    from mode_jax.calib import sensitivity

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    gu = rng.normal(size=(32, 64, 48)).astype(np.float32)
    dn = rng.normal(size=(32, 24, 64)).astype(np.float32)
    bits = np.array([2, 4], np.int32)
    want = sensitivity.quantize_layer(gu, dn, bits, 32)
    mesh = sharding.make_mesh(expert=8)
    spec = NamedSharding(mesh, P("expert"))
    sgu, sdn = jax.device_put(gu, spec), jax.device_put(dn, spec)
    got = sensitivity.quantize_layer(sgu, sdn, bits, 32)
    for g, w in zip(got, want):  # the partitioned program may round differently (1 ulp)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    hlo = sensitivity._quantize_layer.lower(sgu, sdn, bits, 32).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, "experts moved between devices"
    print("SHARDED_OK")
""")


def test_sharded_experts_are_fake_quantized_in_place(cpu_forks):
    """The sensitivity copies of experts split over 8 devices equal the single-device ones
    (to float rounding),
    and the compiled program moves no expert between devices (each step takes every device's
    share)."""
    _run_on_8_host_devices(cpu_forks, QUANTIZE_SCRIPT)


COSTS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_sensitivity as ts
    from mode_jax import sharding
    from mode_jax.calib import sensitivity

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    gate_up, down = ts._experts(rng)
    tokens = ts._tokens(rng)
    kw = dict(num_samples=3, chunk=4, bits=ts.BITS, group_size=ts.GROUP)
    want = sensitivity.layer_costs(tokens, jnp.asarray(gate_up), jnp.asarray(down), None, None,
                                   **kw)
    spec = NamedSharding(sharding.make_mesh(expert=2), P("expert"))
    calls, layer_sums = [], sensitivity._layer_sums
    sensitivity._layer_sums = lambda *a: calls.append(a) or layer_sums(*a)
    got = sensitivity.layer_costs(tokens, jax.device_put(gate_up, spec),
                                  jax.device_put(down, spec), None, None, **kw)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-9, err_msg=k)
    assert len(calls) == 2  # two chunks of 4 of the 6 experts, each across both shards
    for args in calls:
        compiled = layer_sums.lower(*args).compile()
        hlo = compiled.as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, "a layer's experts moved"
        # The chunk's experts are split over "data" (4): each device fake-quantizes and runs
        # its own (one of the 4; the chunk padded to a multiple of 4) on all their tokens.
        index = args[2]
        assert index.sharding.spec == P("data") and index.shape[0] == 4, index.sharding
        one = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, args)
        alone = layer_sums.lower(*one).compile().cost_analysis()["flops"]
        flops = compiled.cost_analysis()["flops"]
        assert flops < 0.3 * alone, (compiled.cost_analysis(), alone)  # measured: 0.25
    print("SHARDED_OK")
""")


def test_sensitivity_of_sharded_experts_moves_only_the_chunk(cpu_forks):
    """expert_mse / pmq / fisher / gemq of a layer whose experts are split over the mesh equal
    the single-device ones, and each chunk's program never gathers the layer's experts (the
    chunk's own experts arrive by one chunk-sized reduction) and splits the chunk's experts
    over the "data" axis (per device, 0.25 of the single-device work at data=4)."""
    _run_on_8_host_devices(cpu_forks, COSTS_SCRIPT)


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    import mode_jax
    from mode_jax import sharding
    from mode_jax.calib import passes, sources
    from mode_jax.eval import generate
    from mode_jax.quant import apply, serialize

    assert len(jax.devices()) == 4
    model = mode_jax.load("tests/fixtures/kimivl-tiny")
    cfg, text = model.config, model.config.text
    batches = sources.random_batches(cfg, n=6, batch_size=2, seed=0)
    batches.append(sources.random_batches(cfg, n=1, batch_size=1, seed=1)[0])  # odd: replicated
    scfg = passes.StatsConfig(image_token_id=cfg.media_placeholder_token_id,
                              special_token_ids=(1, 2))
    bits = np.full((len(text.moe_layers), text.n_routed_experts), 3, np.int32)
    bits[:, ::3] = 2

    def run(m):
        return {
            "freq": passes.frequency_pass(m, batches, scfg),
            "tokens": passes.collect_tokens(m, batches, scfg).layers,
            "trace": passes.hessian_trace_pass(m, batches[:2], num_probes=4,
                                               image_token_id=scfg.image_token_id),
        }

    def forwards(m):  # float logits, greedy tokens, the RTN-packed model's stored arrays
        rtn = apply.quantize_model(m, None, bits, apply.QuantConfig(method="rtn", group_size=32))
        return {"logits": m(batches[0]).logits,
                "generated": generate.greedy_generate(m, batches[0], 3, 0),
                "packed": serialize.to_artifact(rtn[0])[0]["params"]}

    def gptq(m):
        q = apply.quantize_model(m, [batches[0], batches[-1]], bits,  # split + replicated
                                 apply.QuantConfig(group_size=32, block_size=32,  # experts only
                                                   attention_bits=16, shared_expert_bits=16,
                                                   dense_mlp_bits=16))[0]
        return nnx.state(q)

    want = run(model)
    want["gptq"] = gptq(model)
    want.update(forwards(model))
    assert sharding.model_mesh(model) is None
    lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))  # placed by other code, on a mesh without "data"
    own = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))
    lin.kernel.value = jax.device_put(lin.kernel[...], jax.sharding.NamedSharding(own, P()))
    assert sharding.model_mesh(lin) is None
    mesh = sharding.make_mesh(expert=2)  # data = 2: each batch's rows split over two
    sharding.shard_model(model, mesh)
    assert sharding.model_mesh(model) is mesh
    dev, _ = passes.device_batch(model, batches[0])
    for key in ("input_ids", "attention_mask"):
        assert dev[key].sharding.spec == P("data"), dev[key].sharding
        assert {s.data.shape[0] for s in dev[key].addressable_shards} == {1}
    assert dev["pixel_values"].sharding.spec == P()
    odd, _ = passes.device_batch(model, batches[-1])
    assert odd["input_ids"].sharding.spec == P()
    got = run(model)
    solved = []  # each device solves its share of every expert stack: 2 of the 8 experts
    solve = apply.gptq.gptq_quantize_experts
    apply.gptq.gptq_quantize_experts = lambda w, *a, **k: solved.append(w.shape) or solve(
        w, *a, **k)
    got["gptq"] = gptq(model)
    apply.gptq.gptq_quantize_experts = solve
    assert solved and all(shape[0] == 2 for shape in solved), solved
    got.update(forwards(model))
    # the evaluation's forward: split too, and equal (the packed model's: PACKED_SCRIPT)
    assert got["logits"].sharding.spec == P("data"), got["logits"].sharding
    np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(want["logits"]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["generated"].tokens, want["generated"].tokens)
    assert sorted(got["packed"]) == sorted(want["packed"])  # RTN, each device its experts
    for k, v in want["packed"].items():
        np.testing.assert_array_equal(got["packed"][k], v, err_msg=k)

    for k, v in want["freq"].items():  # counts exactly; the weight sums to float rounding
        np.testing.assert_allclose(got["freq"][k], v, rtol=1e-6, err_msg=k)
        if not k.startswith("weight"):
            np.testing.assert_array_equal(got["freq"][k], v, err_msg=k)
    for g, w in zip(got["tokens"], want["tokens"], strict=True):
        for name in w._fields:
            a, b = getattr(g, name), getattr(w, name)
            if name in ("ids", "modality"):
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["trace"], want["trace"], rtol=1e-4, atol=1e-6)
    # The Hessian sums run in another order, so a scale or code at a rounding boundary may flip
    # and GPTQ's error feedback carries it on (README): nearly all equal, none far off.
    for (path, w), (_, g) in zip(nnx.to_flat_state(want["gptq"]),
                                 nnx.to_flat_state(got["gptq"]), strict=True):
        a, b = np.asarray(g[...]), np.asarray(w[...])
        assert np.mean(a == b) >= 0.95, (path, np.mean(a == b))
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=2e-2, err_msg=str(path))
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_data_parallel_passes_and_gptq_match_one_device(cpu_forks):
    """With the model on a (data=2, expert=2) mesh, the passes, GPTQ's walk and the evaluation's
    forwards (float, greedy generation) split each batch's rows over "data" (a batch that does
    not divide stays replicated), and what they compute equals the one-device run: counts,
    routing, tokens and RTN's packed arrays exactly, floats and GPTQ's codes to rounding. (The
    packed model's forward on this mesh: test_packed_experts_split_over_the_mesh_match_one_device.)
    (logit_kl is checked split across two processes, in test_multihost.py.)"""
    _run_on_8_host_devices(cpu_forks, DATA_PARALLEL_SCRIPT, devices=4)


GPTQ_LOOP_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mode_jax import sharding
    from mode_jax.quant import gptq

    assert len(jax.devices()) == 2
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 64, 48)).astype(np.float32)
    x = rng.normal(size=(8, 256, 64)).astype(np.float32)
    h = np.einsum("etk,etl->ekl", x, x) / 128
    bits = np.array([2, 3] * 4, np.int32)
    want = gptq.gptq_quantize_experts(w, h, bits, group_size=32, block_size=32)
    for expert in (1, 2):  # the same stack on both devices, then split between them
        mesh = sharding.make_mesh(expert=expert)
        spec = NamedSharding(mesh, P("expert") if expert > 1 else P())
        args = [jax.device_put(a, spec) for a in (w, h, bits)]
        for _ in range(100):
            got = gptq.gptq_quantize_experts(*args, group_size=32, block_size=32)
            np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    print("SHARDED_OK")
""")


def test_gptq_of_expert_stacks_on_two_host_devices_does_not_hang(cpu_forks):
    """Batched LAPACK calls on XLA:CPU with as many devices as pool threads could block every
    thread (`gptq._upper_inverse_factor_each`): before the fix this loop hung within a few
    iterations on 2 cores, whether the stack was replicated or split over the devices."""
    _run_on_8_host_devices(cpu_forks, GPTQ_LOOP_SCRIPT, devices=2, timeout=150)


PACKED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    import mode_jax
    from mode_jax import sharding
    from mode_jax.calib import sources
    from mode_jax.quant import apply, qlinear, serialize
    from mode_jax.quant import quantized_moe as qmoe

    assert len(jax.devices()) == 4
    model = mode_jax.load("tests/fixtures/kimivl-tiny")
    text = model.config.text
    pair = sources.random_batches(model.config, n=2, batch_size=2, seed=0)[0]
    one = sources.random_batches(model.config, n=1, batch_size=1, seed=1)[0]  # rows replicated
    bits = np.full((len(text.moe_layers), text.n_routed_experts), 3, np.int32)
    bits[:, [0, 3, 5]] = 2  # groups of 3 (b2), 4 (b3) and 1 (b4) experts
    bits[:, 1] = 4
    q = apply.quantize_model(model, None, bits, apply.QuantConfig(
        method="rtn", group_size=32, use_kernels=True))[0]

    def outputs():  # (decode takes the same path with fewer rows)
        out = {"pair": q(pair).logits, "one": q(one).logits}
        apply.set_use_kernels(q, False)
        out["xla"] = q(pair).logits
        apply.set_use_kernels(q, True)
        return {k: np.asarray(v) for k, v in out.items()}

    def stored():
        arrays, meta = serialize.to_artifact(q)
        return arrays["params"], meta, serialize.theoretical_nbytes(q)

    want, want_stored = outputs(), stored()
    experts = q.language_model.layers[text.moe_layers[0]].mlp.experts
    want_dequantized = experts.dequantized()
    mesh = sharding.make_mesh(expert=2)  # data = 2
    sharding.shard_model(q, mesh)
    assert experts.mesh is mesh
    for name, size in (("b2", 3), ("b3", 4), ("b4", 1)):  # padded to 4, 4, 2: half on each
        g = experts.groups[name]
        assert (g.size, g.padding) == (size, size % 2), (name, g.size, g.padding)
        assert list(np.asarray(g.expert_ids[...])[size:]) == [-1] * (size % 2)
        for a in (*[p[...] for p in g.gate_up.planes], g.gate_up.scales[...], g.down.scales[...]):
            assert a.sharding.spec == P("expert"), (name, a.sharding)
            assert a.addressable_shards[0].data.shape[0] == (size + 1) // 2
    got = outputs()
    assert q(pair).logits.sharding.spec == P("data")  # the split rows stay split
    for key in ("pair", "one", "xla"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    fake = apply.fake_quantized(q)  # its float copy is placed as it is, and computes the same
    fake_experts = fake.language_model.layers[text.moe_layers[0]].mlp.experts
    assert sharding.model_mesh(fake) is mesh and fake_experts.mesh is mesh
    assert fake_experts.gate_up[...].sharding.spec == P("expert")
    np.testing.assert_allclose(np.asarray(fake(pair).logits), want["xla"], rtol=1e-5, atol=1e-5)
    # What is read or stored sees the real experts only.
    np.testing.assert_array_equal(serialize.bit_map(q), bits)
    for a, b in zip(experts.dequantized(), want_dequantized, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params, meta, nbytes = stored()
    assert (meta, nbytes) == want_stored[1:]
    assert sorted(params) == sorted(want_stored[0])
    for k, v in params.items():
        np.testing.assert_array_equal(v, want_stored[0][k], err_msg=k)
    assert experts.groups["b2"].padding == 1  # the copy was stripped, not the placed model

    # One program per device: the packed experts are never gathered, the partial outputs summed.
    groups = tuple(qmoe.GroupWeights(g.expert_ids[...], g.gate_up.packed, g.down.packed)
                   for g in experts.groups.values())
    rows = NamedSharding(mesh, P("data"))
    x = jax.device_put(np.ones((8, text.hidden_size), np.float32), rows)
    ids = jax.device_put(np.tile(np.arange(2, dtype=np.int32), (8, 1)), rows)
    hlo = qmoe.experts_forward_on_mesh.lower(groups, x, ids, x[:, :2], mesh=mesh,
                                             use_kernels=True).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo

    # The packed dense layers (attention, shared experts) run their kernel on each device's rows.
    linears = [m for _, m in nnx.iter_graph(q) if isinstance(m, qlinear.QLinear)]
    assert linears and all(m.mesh is mesh and m.use_kernels for m in linears)

    def kernel_operands(jaxpr, inside=False):  # (inside a shard_map, 2-D operand shapes)
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield inside, [v.aval.shape for v in eqn.invars if len(v.aval.shape) == 2]
            for v in eqn.params.values():
                sub = getattr(v, "jaxpr", v)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from kernel_operands(sub, inside or eqn.primitive.name == "shard_map")

    w = linears[0].weight.packed
    x = jax.device_put(np.ones((64, w.k), np.float32), rows)
    calls = list(kernel_operands(jax.make_jaxpr(linears[0])(x).jaxpr))
    assert len(calls) == 1 and calls[0][0], calls  # one kernel, inside the shard_map
    assert max(shape[0] for shape in calls[0][1]) < 64, calls  # on its share of the rows
    np.testing.assert_array_equal(np.asarray(linears[0](x)), np.asarray(qlinear.linear(x, w)))

    sharding.shard_model(q, sharding.make_mesh(expert=1))  # re-placed: the phantoms go again
    assert [g.padding for g in experts.groups.values()] == [0, 0, 0]
    for k, v in nnx.to_flat_state(nnx.state(q)):
        np.testing.assert_array_equal(np.asarray(v[...]), want_stored[0][".".join(map(str, k))])
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_packed_experts_split_over_the_mesh_match_one_device(cpu_forks):
    """A packed model placed on a (data=2, expert=2) mesh pads each bit group with phantom
    experts to an even count and holds half of it per device, runs its Pallas kernels
    (interpret mode) once per device on that device's experts and rows (the packed dense
    layers' kernels too, on the device's rows), and gives the
    one-device logits (split rows, replicated rows, the XLA path); its bit map, dequantized
    weights, artifact and byte counts are those of the unplaced model."""
    _run_on_8_host_devices(cpu_forks, PACKED_SCRIPT, devices=4)


MESH_EXPORT_SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mode_jax import sharding
    from mode_jax.quant import qlinear
    from mode_jax.quant import quantized_moe as qmoe
    from pallas_kernels import packing

    assert len(jax.devices()) == 4
    mesh = sharding.make_mesh(expert=2)  # data = 2
    D, F, K, TOKENS = 256, 128, 2, 64
    SIZE = 4  # experts per bit group: 2 on each device

    def abstract(bits, size, k, cols, parts, spec):
        w = jax.eval_shape(lambda q, s: packing.pack(q, s, bits, parts=parts),
                           jax.ShapeDtypeStruct((size, k, cols), jnp.int32),
                           jax.ShapeDtypeStruct((size, -(-k // 128), cols), jnp.bfloat16))
        on = NamedSharding(mesh, spec)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), w)

    def arg(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    def kernel_calls(exported, marker):  # operand shapes of each kernel call
        calls = [line for line in exported.mlir_module().splitlines()
                 if "custom_call @" + marker in line]
        return [re.findall(r"tensor<([0-9x]+)x\\w+>", c.rsplit(": (", 1)[1].split(") ->")[0])
                for c in calls]

    for platform, backend, marker in (("cuda", "triton", "__gpu$xla.gpu.triton"),
                                      ("tpu", "mosaic_tpu", "tpu_custom_call")):
        # kernel_options picks the kernel of jax.default_backend() (CPU here): name the target's,
        # and trace again (the jitted forwards would reuse the other platform's kernel).
        jax.clear_caches()
        options = {"backend": backend, "interpret": False, "dequant": None}
        qmoe.kernel_options = qlinear.kernel_options = lambda *_, o=options: o
        checks = [jax.export.DisabledSafetyCheck.custom_call(marker)] if platform == "cuda" else []

        def export(fn, *args):
            return jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=checks)(*args)

        groups = tuple(qmoe.GroupWeights(arg((SIZE,), jnp.int32, P()),
                                         abstract(b, SIZE, D, 2 * F, 2, P("expert")),
                                         abstract(b, SIZE, F, D, 1, P("expert")))
                       for b in (2, 4))
        rows = P("data")
        moe = export(lambda g, x, i, w: qmoe.experts_forward_on_mesh(
            g, x, i, w, mesh=mesh, use_kernels=True),
            groups, arg((TOKENS, D), jnp.bfloat16, rows), arg((TOKENS, K), jnp.int32, rows),
            arg((TOKENS, K), jnp.float32, rows))
        assert moe.nr_devices == 4
        module = moe.mlir_module()
        assert "all_gather" not in module and "all_reduce" in module, platform
        calls = kernel_calls(moe, marker)
        assert len(calls) == 2, (platform, calls)  # one launch per projection, all bit groups
        for shapes in calls:  # each device's rows (TOKENS / 2 tokens x K slots), its 2 experts
            assert f"{TOKENS // 2 * K}x" in " ".join(shapes), (platform, shapes)
            packed = [s for s in shapes if s.count("x") >= 2]
            assert packed and all(s.startswith(f"{SIZE // 2}x") for s in packed), (platform, shapes)

        w = jax.tree.map(lambda a: arg(a.shape[1:], a.dtype, P()),  # one [D, F] weight
                         abstract(4, 1, D, F, 1, P()))
        dense = export(lambda x, w: qlinear.linear_on_mesh(x, w, mesh=mesh),
                       arg((TOKENS, D), jnp.bfloat16, rows), w)
        assert "all_gather" not in dense.mlir_module(), platform
        (shapes,) = kernel_calls(dense, marker)
        assert f"{TOKENS // 2}x{D}" in shapes, (platform, shapes)  # the device's rows only
    print("SHARDED_OK")
""")


def test_mesh_forwards_lower_for_cuda_and_tpu_per_device(cpu_forks):
    """The packed model's forwards on a (data=2, expert=2) mesh export for CUDA (Triton) and TPU
    (Mosaic) from this CPU: one kernel launch per projection, each on its device's rows and
    experts (never gathered; the expert outputs summed by one all-reduce). The sharded path
    has not run on a GPU or TPU; this is as far as a CPU checks it."""
    _run_on_8_host_devices(cpu_forks, MESH_EXPORT_SCRIPT, devices=4)


def test_mesh_rejects_uneven_expert_axis():
    import pytest

    from mode_jax import sharding

    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(expert=3, devices=[object()] * 4)
