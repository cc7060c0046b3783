"""The regex mapping engine on small hand-made models: placement, dtypes, and its error report."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mode_jax.convert import mapping
from mode_jax.convert.mapping import MappingError, Rule

E, D, F = 3, 4, 5


class Experts(nnx.Module):
    def __init__(self):
        self.gate_up = nnx.Param(jnp.zeros((E, D, 2 * F), jnp.bfloat16))
        self.down = nnx.Param(jnp.zeros((E, F, D), jnp.bfloat16))


class Tiny(nnx.Module):
    def __init__(self):
        self.layers = nnx.List([nnx.Dict(proj=nnx.Param(jnp.zeros((D, 2)))) for _ in range(2)])
        self.experts = Experts()
        self.bias = nnx.Param(jnp.zeros((E,), jnp.float32))


PER_EXPERT = [
    Rule(r"layers\.(?P<l>\d+)\.proj\.weight", "layers.{l}.proj", mapping.transpose),
    Rule(
        r"experts\.(?P<e>\d+)\.gate_proj\.weight",
        "experts.gate_up",
        mapping.transpose,
        mapping.expert_half(0),
    ),
    Rule(
        r"experts\.(?P<e>\d+)\.up_proj\.weight",
        "experts.gate_up",
        mapping.transpose,
        mapping.expert_half(1),
    ),
    Rule(r"experts\.(?P<e>\d+)\.down_proj\.weight", "experts.down", mapping.transpose,
         mapping.expert()),
    Rule(r"bias", "bias"),
]
FUSED = [
    PER_EXPERT[0],
    Rule(r"experts\.gate_up_proj", "experts.gate_up", mapping.transpose),
    Rule(r"experts\.down_proj", "experts.down", mapping.transpose),
    Rule(r"bias", "bias"),
]


def abstract():
    return nnx.eval_shape(Tiny)


def torch_style_tensors(rng):
    """Per-expert PyTorch-layout tensors plus their fused equivalents."""
    gate = rng.standard_normal((E, F, D)).astype(np.float32)
    up = rng.standard_normal((E, F, D)).astype(np.float32)
    down = rng.standard_normal((E, D, F)).astype(np.float32)
    common = {
        "layers.0.proj.weight": rng.standard_normal((2, D)).astype(np.float32),
        "layers.1.proj.weight": rng.standard_normal((2, D)).astype(np.float32),
        "bias": rng.standard_normal((E,)).astype(np.float32),
    }
    per_expert = dict(common)
    for e in range(E):
        per_expert[f"experts.{e}.gate_proj.weight"] = gate[e]
        per_expert[f"experts.{e}.up_proj.weight"] = up[e]
        per_expert[f"experts.{e}.down_proj.weight"] = down[e]
    fused = dict(common)
    fused["experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)  # [E, 2F, D]
    fused["experts.down_proj"] = down  # [E, D, F]
    return gate, up, down, per_expert, fused


def test_per_expert_and_fused_layouts_land_in_the_same_places():
    gate, up, down, per_expert, fused = torch_style_tensors(np.random.default_rng(0))
    specs = mapping.target_specs(abstract())
    a = mapping.fill(per_expert.items(), PER_EXPERT, specs)
    b = mapping.fill(iter(fused.items()), FUSED, specs)
    assert a["experts.gate_up"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert a["bias"].dtype == np.float32
    bf = lambda x: x.astype(ml_dtypes.bfloat16)
    for e in range(E):
        np.testing.assert_array_equal(a["experts.gate_up"][e, :, :F], bf(gate[e].T))
        np.testing.assert_array_equal(a["experts.gate_up"][e, :, F:], bf(up[e].T))
        np.testing.assert_array_equal(a["experts.down"][e], bf(down[e].T))
    np.testing.assert_array_equal(a["layers.1.proj"], per_expert["layers.1.proj.weight"].T)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_convert_builds_a_concrete_model():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(1))
    model = mapping.convert(per_expert.items(), PER_EXPERT, abstract())
    assert model.experts.gate_up[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.layers[0]["proj"][...]), per_expert["layers.0.proj.weight"].T
    )
    np.testing.assert_array_equal(np.asarray(model.bias[...]), per_expert["bias"])


def test_ignore_skips_keys():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(2))
    specs = mapping.target_specs(abstract())
    plain = mapping.fill(per_expert.items(), PER_EXPERT, specs)
    per_expert["rotary.inv_freq"] = np.ones(3)
    with pytest.raises(mapping.MappingError, match="rotary.inv_freq"):
        mapping.fill(per_expert.items(), PER_EXPERT, specs)
    skipped = mapping.fill(per_expert.items(), PER_EXPERT, specs, ignore=[r".*inv_freq"])
    assert skipped.keys() == plain.keys()
    for k in plain:
        np.testing.assert_array_equal(skipped[k], plain[k])


def test_one_error_lists_every_problem():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(3))
    del per_expert["experts.1.up_proj.weight"]  # gate_up partly unfilled
    del per_expert["layers.1.proj.weight"]  # target never written
    per_expert["extra.weight"] = np.ones(2)  # matches no rule
    per_expert["other.thing"] = np.ones(2)  # matches no rule
    per_expert["experts.0.down_proj.weight"] = np.ones((D, F + 1))  # wrong shape
    del per_expert["experts.2.down_proj.weight"]  # ... and down has a missing piece too
    bad = per_expert["bias"].copy()
    bad[1] = np.nan
    per_expert["bias"] = bad
    with pytest.raises(MappingError) as err:
        mapping.fill(per_expert.items(), PER_EXPERT, mapping.target_specs(abstract()))
    msg = str(err.value)
    assert "source keys matching no rule (2)" in msg
    assert "extra.weight" in msg and "other.thing" in msg
    assert (
        "experts.0.down_proj.weight: shape mismatch for experts.down[0]: expected (5, 4), "
        "got (6, 4) (source shape (4, 6))" in msg
    )
    assert "bias: 1 non-finite value(s)" in msg
    assert f"experts.gate_up {(E, D, 2 * F)}: {E * D * 2 * F - D * F} of {E * D * 2 * F}" in msg
    assert "layers.1.proj (4, 2): 0 of 8 elements written" in msg
    # a target is unfilled only for what no bad tensor above explains: down lacks expert 2
    assert "experts.down (3, 5, 4): 20 of 60 elements written (20 more in bad tensors" in msg
    assert "bias (3,)" not in msg.split("not fully filled")[1]  # its one tensor is named above
    assert "model parameters not fully filled (3)" in msg


def test_bf16_overflow_is_reported_as_non_finite():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(4))
    per_expert["experts.2.gate_proj.weight"] = np.full((F, D), 1e39, np.float64)
    with pytest.raises(MappingError, match=r"experts\.2\.gate_proj\.weight: 20 non-finite"):
        mapping.fill(per_expert.items(), PER_EXPERT, mapping.target_specs(abstract()))


def test_duplicate_and_out_of_range_and_unknown_target():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(5))
    items = list(per_expert.items())
    items.append(("experts.2.down_proj.weight", np.zeros((D, F))))  # written twice
    items.append(("experts.7.down_proj.weight", np.zeros((D, F))))  # E = 3
    items.append(("layers.9.proj.weight", np.zeros((2, D))))  # no layer 9
    with pytest.raises(MappingError) as err:
        mapping.fill(items, PER_EXPERT, mapping.target_specs(abstract()))
    msg = str(err.value)
    assert "experts.2.down_proj.weight: writes experts.down[2], already written by " \
           "experts.2.down_proj.weight" in msg
    assert "experts.7.down_proj.weight: index experts.down[7] is outside experts.down" in msg
    assert "layers.9.proj.weight: maps to 'layers.9.proj', which the model does not have" in msg


def test_bad_template_and_bad_half_are_clear():
    with pytest.raises(ValueError, match="half must be 0"):
        mapping.expert_half(2)
    rules = [Rule(r"layers\.(?P<l>\d+)\.proj\.weight", "layers.{layer}.proj")]
    with pytest.raises(ValueError, match="uses group 'layer'"):
        mapping.fill([("layers.0.proj.weight", np.zeros((2, D)))], rules,
                     mapping.target_specs(abstract()))


def test_load_into_reports_missing_values():
    with pytest.raises(MappingError, match="no value for model parameters: .*bias"):
        mapping.load_into(abstract(), {})


def test_put_moves_each_target_as_soon_as_its_last_piece_arrives():
    """With `put`, a target leaves the host the moment it is complete (so conversion never
    holds a host copy of the whole model); a write after that is still reported."""
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(6))
    items = list(per_expert.items())
    consumed, put_at = [0], {}

    def stream(pairs):
        for pair in pairs:
            consumed[0] += 1
            yield pair

    def put(path, buf):
        put_at[path] = consumed[0]
        return jnp.asarray(buf)

    arrays = mapping.fill(stream(items), PER_EXPERT, mapping.target_specs(abstract()), put=put)
    names = [n for n, _ in items]
    last_piece = {"layers.0.proj": names.index("layers.0.proj.weight") + 1,
                  "layers.1.proj": names.index("layers.1.proj.weight") + 1,
                  "bias": names.index("bias") + 1,
                  "experts.gate_up": max(names.index(f"experts.{e}.{p}_proj.weight")
                                         for e in range(E) for p in ("gate", "up")) + 1,
                  "experts.down": names.index(f"experts.{E - 1}.down_proj.weight") + 1}
    assert put_at == last_piece
    want = mapping.fill(items, PER_EXPERT, mapping.target_specs(abstract()))
    for path, value in want.items():
        assert isinstance(arrays[path], jnp.ndarray)
        np.testing.assert_array_equal(np.asarray(arrays[path]), value)

    items.append(("experts.0.down_proj.weight", np.zeros((D, F))))  # after down is complete
    with pytest.raises(MappingError, match=r"experts\.0\.down_proj\.weight: writes "
                       r"experts\.down\[0\], but every element of experts\.down was already "
                       r"written \(last by experts\.2\.down_proj\.weight\)"):
        mapping.fill(items, PER_EXPERT, mapping.target_specs(abstract()), put=put)


def test_integer_tensor_for_a_float_parameter_is_refused():
    _, _, _, per_expert, _ = torch_style_tensors(np.random.default_rng(5))
    per_expert["layers.0.proj.weight"] = np.ones((2, D), np.int32)
    with pytest.raises(MappingError) as err:
        mapping.fill(per_expert.items(), PER_EXPERT, mapping.target_specs(abstract()))
    # one problem, one line: the parameter it was meant for is not listed again as unfilled
    assert str(err.value).startswith(
        "checkpoint does not match the model: bad tensor: layers.0.proj.weight: stored as "
        "int32, but layers.0.proj is a float32 parameter")
    assert "\n" not in str(err.value)
