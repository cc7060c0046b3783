"""The portable-arithmetic switch of the testbed's training script (portable_math.py)."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from mode_jax.testbed import portable_math, train

X86_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_max_isa=AVX2")


def test_the_instruction_set_cap_is_only_asked_for_on_x86():
    assert portable_math.flags("x86_64") == X86_FLAGS
    assert portable_math.flags("aarch64") == X86_FLAGS[:1]


def test_enable_adds_the_flags_keeps_the_users_own_and_overrides_a_conflicting_cap():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_max_isa=AVX512"}
    portable_math.enable(env, started=lambda: False)
    given = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=4" in given
    assert "--xla_cpu_max_isa=AVX512" not in given
    assert all(f in given for f in portable_math.flags())
    assert portable_math.in_effect(env)
    before = env["XLA_FLAGS"]
    portable_math.enable(env, started=lambda: True)  # already in effect: nothing to do
    assert env["XLA_FLAGS"] == before


def test_enabling_after_jax_started_is_a_clear_error_not_a_silent_no_op():
    jnp.zeros(1).block_until_ready()
    assert portable_math._backend_started()  # the private probe still answers
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    with pytest.raises(RuntimeError, match="XLA_FLAGS .* before JAX starts"):
        portable_math.enable(env)
    assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0"


def test_train_refuses_portable_math_in_a_process_whose_backend_runs_without_it(tmp_path):
    if portable_math.in_effect():
        pytest.skip("this test process already runs with the portable flags")
    with pytest.raises(RuntimeError, match="portable_math needs XLA_FLAGS"):
        train.train(train.TrainConfig(portable_math=True), tmp_path)
    assert not any(tmp_path.iterdir())


_PROBE = """
import hashlib, sys
import numpy as np
from mode_jax.testbed import portable_math
if sys.argv[1] == "enable":
    portable_math.enable()
import jax, jax.numpy as jnp
r = np.random.default_rng(0)
a, b = (jnp.asarray(r.standard_normal(s, np.float32)) for s in ((64, 512), (512, 256)))
y = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T)(a, b)
print(portable_math.in_effect(), hashlib.md5(np.asarray(y).tobytes()).hexdigest())
"""


def test_enable_at_the_start_of_a_process_computes_as_the_flags_set_by_hand():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def run(mode, extra):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                             text=True, check=True, env=env | extra, cwd=Path(__file__).parents[1])
        return out.stdout.split()

    enabled = run("enable", {})
    by_hand = run("plain", {"XLA_FLAGS": " ".join(portable_math.flags())})
    assert enabled == by_hand and enabled[0] == "True"
    assert run("plain", {})[0] == "False"


def test_describe_records_the_flags_and_the_cores():
    got = portable_math.describe({"XLA_FLAGS": " ".join(portable_math.flags())})
    assert got["portable_math"] and got["xla_flags"].split() == list(portable_math.flags())
    assert got["cores"] >= 1 and got["machine"]
