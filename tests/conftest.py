"""Suite-wide fixtures.

XLA:CPU maps every compiled executable's code and data into the process (about three memory
mappings each) and keeps them while jax's caches hold the executable. One pytest process
compiles tens of thousands of programs, and past Linux's `vm.max_map_count` (65530 by default)
the next compilation aborts the interpreter ("Fatal Python error: Aborted" inside
`backend_compile_and_load`). Dropping the caches after each test module releases them.
"""

import gc

import jax
import pytest

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



def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first (stable otherwise). The suite runs in two processes, one
    file per process at a time (`--dist loadfile`, in collection order): long files started
    last leave one process working alone at the end, so they are started first."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
