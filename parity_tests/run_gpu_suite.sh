#!/usr/bin/env bash
# The GPU part of the parity suite, in one call (for a lent H100: `bash parity_tests/run_gpu_suite.sh`
# from the repository root). Writes logs under $OUT (default /tmp/tbo-gpu) and prints a short
# table last. The JAX spec runs on the CPU (the oracle); PyTorch runs on the GPU.
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tbo-gpu}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, jax; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('jax', jax.__version__)"
} > "$OUT/env.txt" 2>&1
status=0
timeout 900 python3 -m pytest parity_tests -q -m gpu -p no:cacheprovider -rs \
  --junitxml="$OUT/gpu-junit.xml" > "$OUT/gpu-pytest.log" 2>&1 || status=1
timeout 600 python3 -m parity_tests.cli run --device=cuda --dtype=float32 --cases_per_mode=200 \
  > "$OUT/run-float32.txt" 2>&1 || status=1
timeout 600 python3 -m parity_tests.cli run --device=cuda --dtype=bfloat16 --cases_per_mode=20 \
  > "$OUT/run-bfloat16.txt" 2>&1 || status=1
cat "$OUT/env.txt"
tail -n 3 "$OUT/gpu-pytest.log"
grep -E "^(check|model)" "$OUT/run-float32.txt" "$OUT/run-bfloat16.txt" | sed 's/^.*run-//'
exit $status
