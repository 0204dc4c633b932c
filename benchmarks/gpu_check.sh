#!/usr/bin/env bash
# On the GPU machine: the Triton and Mosaic GPU kernel tests compiled (`-m gpu`, one process per case, in parallel:
# float32 Triton kernels take about a minute each to compile), then the engine's greedy parity gpu == reference.
#   bash benchmarks/gpu_check.sh [LOG_DIR]      (default $OUT or /tmp)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
log=${1:-${OUT:-/tmp}}
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
ids=$(python3 -m pytest -q -m gpu --collect-only tests/kernels/test_gpu_kernel.py tests/kernels/test_gpu_mosaic.py -p no:cacheprovider | grep '::')
echo "$ids" | xargs -P 16 -I{} sh -c \
  'python3 -m pytest -q -m gpu -p no:cacheprovider "{}" >/dev/null 2>&1 && echo "PASS {}" || echo "FAIL {}"' \
  | sort > "$log/gpu_tests.txt"
echo "compiled kernel tests: $(grep -c ^PASS "$log/gpu_tests.txt") passed, $(grep -c ^FAIL "$log/gpu_tests.txt") failed"
grep ^FAIL "$log/gpu_tests.txt"
python3 benchmarks/engine_parity.py 2>&1 | grep -v Warning | tee "$log/engine_parity.txt" | tail -8
