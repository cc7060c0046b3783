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
"""

import gc
import os
import shutil
import tempfile

import jax
import pytest

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
