#!/usr/bin/env bash
# What a session that is lent a GPU owes the Triton kernels, in one call of the device tool (10 minutes at most):
#
#     run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# 1. the Triton and backend tests on CUDA (the same tests CI runs under the CPU interpreter);
# 2. bench/kernel_triton.py --tune: autotune the decode shapes (the cache goes to $OUT/autotune.json), then time
#    every kernel against cuBLAS with the heuristic and the tuned configs.
# Everything lands in $OUT (the device tool brings it back), or in bench/results when $OUT is unset. Each step has its
# own time limit, so a slow step cannot take the others' results with it. The machine's own python3 holds torch,
# triton and transformers; nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench/results}"
mkdir -p "$out"
export SPARSEFX_AUTOTUNE_CACHE="$out/autotune.json"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/codegen/triton tests/codegen/test_backend.py \
    tests/sequential/test_cuda.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -15
timeout 360 python3 bench/kernel_triton.py --tune --out "$out" 2>&1 | tee "$out/kernel_triton.log" | tail -60
