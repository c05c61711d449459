#!/usr/bin/env bash
# The GPU part of the parity suite (for a lent H100/H200), from the repository root:
#
#   bash parity_tests/run_gpu_suite.sh [tests|run|bench|all]   (default: all)
#
#   tests  pytest -m gpu: model parity, CUDA-graph replay parity for every batch size, negative
#          tests (stale TBO counts, padding written to a real slot)
#   run    tbo-parity run --device=cuda, float32 and bfloat16
#   bench  benchmarks/cuda_graph.py (eager vs graph decode steps, host cost of a replay)
#
# Writes logs and results under $OUT (default /tmp/tbo-gpu) and prints a short summary last.
# The JAX spec runs on the CPU (the oracle); PyTorch runs on the GPU.
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
# One pytest process: the GPU tests lie almost all in the second process's files, and its
# junit report and durations come from the first process only (parity_tests/second_process.py)
export TBO_PARITY_ONE_PROCESS=1
OUT=${OUT:-/tmp/tbo-gpu}
STAGE=${1:-all}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, jax; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('jax', jax.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
if [[ $STAGE == tests || $STAGE == all ]]; then
  timeout 560 python3 -m pytest parity_tests -q -m gpu -p no:cacheprovider -rs --durations=8 -o junit_family=legacy \
    --junitxml="$OUT/gpu-junit.xml" > "$OUT/gpu-pytest.log" 2>&1 || status=1
  grep -E "passed|failed|^FAILED|Error" "$OUT/gpu-pytest.log" | tail -n 20
fi
if [[ $STAGE == run || $STAGE == all ]]; then
  timeout 300 python3 -m tbo_parity.cli run --device=cuda --dtype=float32 \
    --cases_per_mode=200 > "$OUT/run-float32.txt" 2>&1 || status=1
  timeout 300 python3 -m tbo_parity.cli run --device=cuda --dtype=bfloat16 \
    --cases_per_mode=20 > "$OUT/run-bfloat16.txt" 2>&1 || status=1
  grep -vE "^(split|$)" "$OUT/run-float32.txt" "$OUT/run-bfloat16.txt" | sed 's/^.*run-//'
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  timeout 400 python3 benchmarks/cuda_graph.py --out_dir="$OUT" \
    --commit="${COMMIT:-unknown}" > "$OUT/bench.log" 2>&1 || status=1
  tail -n 40 "$OUT/bench.log"
fi
exit $status
