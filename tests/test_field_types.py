"""Config fields of the wrong type are named when the config is made, not deep inside jax."""

import dataclasses

import numpy as np
import pytest

from mode_jax.models import field_types, moonvit
from mode_jax.models.deepseek_v3 import TextConfig


@dataclasses.dataclass(frozen=True)
class _Example:
    size: int
    eps: float = 1e-5
    name: str = "x"
    flag: bool = True
    kernel: tuple[int, int] = (2, 2)
    grid: tuple[int, ...] = ()
    optional: int | None = None


@pytest.mark.parametrize("field,value,needle", [
    ("size", "64", "size must be an integer, got '64'"),
    ("size", 64.0, "size must be an integer, got 64.0"),
    ("size", True, "size must be an integer, got True"),
    ("eps", "1e-5", "eps must be a number"),
    ("name", 3, "name must be a string"),
    ("flag", 1, "flag must be true/false"),
    ("kernel", 2, "kernel must be a list of 2 integers, got 2"),
    ("kernel", (2, 2, 2), "kernel must be a list of 2 integers"),
    ("grid", (1, "2"), "grid must be a list of integers"),
    ("optional", 1.5, "optional must be an integer or null"),
])
def test_a_wrong_type_is_named(field, value, needle):
    config = dataclasses.replace(_Example(size=4), **{field: value})
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        field_types.check(config)


def test_right_types_pass_including_numpy_scalars_and_ints_for_floats():
    field_types.check(_Example(size=np.int64(4), eps=1, kernel=(2, np.int32(2)), grid=(1, 2, 3),
                               optional=7))


def test_every_bad_field_is_listed_at_once():
    with pytest.raises(ValueError, match="size must be .*; name must be"):
        field_types.check(_Example(size="4", name=None))


def test_model_configs_check_their_fields():
    with pytest.raises(ValueError, match="hidden_size must be an integer, got '64'"):
        TextConfig(vocab_size=8, hidden_size="64", intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=1, kv_lora_rank=4, qk_nope_head_dim=4,
                   qk_rope_head_dim=4, v_head_dim=4)
    with pytest.raises(ValueError, match="vision_config: merge_kernel must be a list of 2"):
        moonvit.VisionConfig.from_kimi_vl({"hidden_size": 32, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 8,
                                           "merge_kernel_size": 2})
