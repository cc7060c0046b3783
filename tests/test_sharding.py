"""A forward pass with experts split over a mesh equals the single-device forward.

Runs in a subprocess so XLA can be given 8 host devices without affecting other tests.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    import mode_jax
    from mode_jax import sharding
    from mode_jax.calib import sources

    assert len(jax.devices()) == 8
    model = mode_jax.load("tests/fixtures/kimivl-tiny")
    cfg = model.config
    batch = sources.random_batches(cfg, n=4, batch_size=4, seed=0)[0]
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
    print("SHARDED_OK")
""")


def _run_on_8_host_devices(script: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


def test_expert_parallel_forward_matches():
    _run_on_8_host_devices(SCRIPT)


FAMILIES_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    import internvl_tiny, qwen3vl_tiny
    from mode_jax import sharding
    from mode_jax.calib import sources

    assert len(jax.devices()) == 8
    internvl_batch = sources.random_batches(internvl_tiny.CONFIG, 2, 2, seed=0)[0]
    for tiny, batch in ((qwen3vl_tiny, qwen3vl_tiny.batch(0)), (internvl_tiny, internvl_batch)):
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


def test_expert_parallel_forward_matches_on_the_other_families():
    """The same on Qwen3-VL-MoE (M-RoPE positions and DeepStack additions on sharded data)
    and on InternVL (tiles), in one subprocess."""
    _run_on_8_host_devices(FAMILIES_SCRIPT)


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


def test_sharded_experts_are_fake_quantized_in_place():
    """The sensitivity copies of experts split over 8 devices equal the single-device ones
    (to float rounding),
    and the compiled program moves no expert between devices (each step takes every device's
    share)."""
    _run_on_8_host_devices(QUANTIZE_SCRIPT)


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
        hlo = layer_sums.lower(*args).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, "a layer's experts moved"
    print("SHARDED_OK")
""")


def test_sensitivity_of_sharded_experts_moves_only_the_chunk():
    """expert_mse / pmq / fisher / gemq of a layer whose experts are split over the mesh equal
    the single-device ones, and each chunk's program never gathers the layer's experts: the
    chunk's own experts arrive by one chunk-sized reduction."""
    _run_on_8_host_devices(COSTS_SCRIPT)


def test_mesh_rejects_uneven_expert_axis():
    import pytest

    from mode_jax import sharding

    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(expert=3, devices=[object()] * 4)
