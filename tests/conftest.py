"""Suite-wide fixtures.

Compiled programs are shared through one persistent compilation cache per test session (a
temporary directory, removed at the end): both xdist processes and every `main.py` subprocess
the pipeline tests start compile the same tiny-model programs, and a warm cache takes a
`configs/tiny.py` run from about 48 s to 15 s. Only XLA's compile step is cached (keyed by the
program, jax version and flags); tracing, and so every jit cache count a test asserts, is
unchanged. A run that sets JAX_COMPILATION_CACHE_DIR itself keeps its own directory.

XLA:CPU maps every compiled executable's code and data into the process (about three memory
mappings each) and keeps them while jax's caches hold the executable. One pytest process
compiles tens of thousands of programs, and past Linux's `vm.max_map_count` (65530 by default)
the next compilation aborts the interpreter ("Fatal Python error: Aborted" inside
`backend_compile_and_load`). Dropping the caches after each test module releases them.

Most of the suite's time is XLA compiling tiny-model programs that then run for milliseconds,
so the suite asks XLA:CPU for cheap code generation (`TEST_XLA_FLAGS`): LLVM at -O0 and without
its expensive passes, and fusions emitted by XLA:CPU's older LLVM IR emitters rather than its
MLIR fusion emitters, which cost more to compile. The HLO optimisations that decide what is
computed, and in which order, are the same as in a normal run; the code generated for them
differs in the last bits (the testbed's logits move by at most about 1e-5 from a default run's,
8e-6 with -O0 alone). tests/test_passes.py took 77 s instead of 127 s with the first two flags
(2026-12-05); the third took the whole suite from 25:41 to 17:08 under `-n 2` (47:30 to 31:28
CPU, 2026-12-07). `main.py` outside the suite, and benchmarks/, keep XLA's defaults. Flags already
in XLA_FLAGS are kept (set MODE_JAX_TEST_DEFAULT_XLA=1 to leave XLA_FLAGS untouched).
"""

import gc
import os
import shutil
import tempfile

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                  "--xla_cpu_use_fusion_emitters=false")
if not os.environ.get("MODE_JAX_TEST_DEFAULT_XLA"):  # before jax starts a backend; inherited
    _flags = os.environ.get("XLA_FLAGS", "").split()  # by xdist workers and main.py runs
    _names = {f.split("=")[0] for f in _flags}
    os.environ["XLA_FLAGS"] = " ".join(
        [*_flags, *(f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _names)])

import jax  # noqa: E402
import pytest  # noqa: E402

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller: xdist workers inherit it
    _OWN_CACHE = tempfile.mkdtemp(prefix="mode_jax_test_jit_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))

# On GPUs, float32 matmuls default to TF32 (a 10-bit mantissa). The suite compares float32
# paths with float32/float64 references, so it asks for true float32 products there; CPU
# runs already get them, and are left exactly as they were.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def forks():
    """Runs of main.py forked from one server that has done its imports (main_forks.py)."""
    from main_forks import Forks

    with Forks() as server:
        yield server


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first (stable otherwise). The suite runs in two processes, one
    file per process at a time (`--dist loadfile`, in collection order): long files started
    last leave one process working alone at the end, so they are started first."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
