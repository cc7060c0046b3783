#!/usr/bin/env bash
# The GPU checks the open kernel and statistics issues wait for, as one run of at most 9.7
# minutes (a session is lent 15 device minutes, machine start included). From the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Prepare once, here (the GPU image has jax 0.11.2 for CUDA, flax, optax, orbax, torch and
# triton; transformers there is older than the 5.23 whose kimi_k25 reference benchmarks.stats
# reads):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.23.0 ml-collections==1.1.0
# Each step has its own time limit, so a hang in one still leaves the others' figures.
# Outputs: $OUT/device.txt, tests.txt (native kernel tests), kernels.txt (the kernel table,
# "magic" and "registers" side by side, and one launch over a 2+3+4-bit layer against one launch
# per bit group), sweep.txt (tiles for "registers"), stats.txt
# (statistics pass and sensitivity speed), memory_plan.txt (device memory of each step at
# Kimi-VL-A3B's widths).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, triton; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null; } > "$OUT/device.txt" 2>&1
timeout 100 python3 -m pytest -q tests/test_grouped_matmul.py -k "TestGroupedMatmul and not Interpret" \
  2>&1 | tee "$OUT/tests.txt"
timeout 250 python3 -m benchmarks.kernels --bits 2,3,4 --tokens 1,16,512 --dequant magic,registers \
  --mixed 2+3+4 \
  2>&1 | tee "$OUT/kernels.txt"
# The tiles for "registers" (the table above uses the frozen "magic" tiles for both modes).
timeout 60 python3 -m benchmarks.kernels --sweep --bits 4 --tokens 4 --dequant registers \
  2>&1 | tee "$OUT/sweep.txt"
timeout 130 python3 -m benchmarks.stats 2>&1 | tee "$OUT/stats.txt"
# Compile-only (no weights): the GPU's own memory figures for each calibration and sensitivity
# step at Kimi-VL-A3B's widths, 4 decoder layers.
timeout 40 python3 -m benchmarks.memory_plan --layers 4 --trace_layers 1 2>&1 | tee "$OUT/memory_plan.txt"
