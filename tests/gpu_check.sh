#!/usr/bin/env bash
# The GPU kernels checked from a CPU, in an environment with the gpu-check extra (Python >= 3.12):
#   python3.12 -m venv .venv-gpu && . .venv-gpu/bin/activate && pip install -e ".[gpu-check]"
#   tests/gpu_check.sh
# 1. Triton's interpreter runs every Triton kernel through its real wrapper (float32), in its own
#    process: TRITON_INTERPRET=1 must be set before triton is imported.
# 2. Without the interpreter: lowering for CUDA, the compile gate (sm_80 / sm_90a / sm_100a
#    resources read by ptxas), the jax_triton shim, and the kernels under shard_map.
# Exit status: non-zero if either run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OPS="tests/test_gated_delta.py tests/test_simple_gla.py tests/test_titans_op.py"
export JAX_PLATFORMS=cpu TRITON_DEFAULT_FP_FUSION=1
status=0
start=$SECONDS
echo "== gpu-check 1/2: Triton kernels in Triton's interpreter"
TRITON_INTERPRET=1 "$PY" -m pytest -p no:cacheprovider tests/test_triton_*.py $OPS -k triton || status=1
echo "== gpu-check 1/2 took $(( SECONDS - start )) s"; start=$SECONDS
echo "== gpu-check 2/2: lowering for CUDA and the compile gate"
"$PY" -m pytest -p no:cacheprovider tests/test_triton_*.py $OPS -k triton || status=1
echo "== gpu-check 2/2 took $(( SECONDS - start )) s"
exit $status
