#!/usr/bin/env bash
# Expert parallelism on NPROC GPUs of one host (default 2; a lent nvidia-h100-x2 / -x4), from
# the root:
#
#   [NPROC=4] [BENCH_ARGS="--noknobs"] bash parity_tests/run_ep_gpu_suite.sh [parity|bench|all]
#
#   parity  EP parity on NPROC GPUs, both transports, eager and CUDA graphs (the pytest GPU
#           test on 2 GPUs, then the launcher on NPROC, printing the worst errors)
#   bench   benchmarks/overlap.py --nproc=NPROC (decode sweep, knobs, prefill, emulated slow
#           link, timeline step; BENCH_ARGS adds or overrides flags)
#
# Writes logs and results under $OUT (default /tmp/tbo-ep) and prints a short summary last.
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
# One pytest process: the GPU tests lie almost all in the second process's files, and its
# junit report and durations come from the first process only (parity_tests/second_process.py)
export TBO_PARITY_ONE_PROCESS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/tbo-ep}
STAGE=${1:-all}
NPROC=${NPROC:-2}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -n 4
  python3 -c "import sys, torch, jax; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version()); \
print('jax', jax.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
if [[ $STAGE == parity || $STAGE == all ]]; then
  if [[ $NPROC == 2 ]]; then
    timeout 300 python3 -m pytest parity_tests/test_expert_parallel.py -q -m gpu \
      -p no:cacheprovider -rs --junitxml="$OUT/ep-junit.xml" > "$OUT/ep-pytest.log" 2>&1 || status=1
    grep -E "passed|failed|^FAILED|Error" "$OUT/ep-pytest.log" | tail -n 20
  fi
  timeout 200 python3 - /tmp/tbo-ep-parity "$OUT/ep-parity-worst.txt" <<'PY' || status=1
import json, sys
from tbo_parity.parity_tests.ep_parity import check_launch
import os
reps = check_launch(int(os.environ.get("NPROC", "2")), sys.argv[1],
              ["--device=cuda", "--dispatchers=packed/all_to_all,packed/exact,capacity/all_to_all,capacity/copy_engine", "--graphs"], timeout_s=180)
bad = [(r["rank"], row) for r in reps for row in r["rows"]
       if row.get("error", 0) > 1e-5 or not row.get("expert_load_equal", True)
       or row.get("bitwise_equal") is False]
print("ranks", len(reps), "rows", sum(len(r["rows"]) for r in reps), "failing", len(bad))
for rank, row in bad[:10]:
    print("FAILED", rank, row)
worst = {}
for r in reps:
    for row in r["rows"]:
        if "error" in row:
            key = (row["check"], row.get("transport"))
            worst[key] = max(worst.get(key, 0.0), row["error"])
with open(sys.argv[2], "w") as f:
    for key, err in sorted(worst.items()):
        print("worst", key, f"{err:.2e}")
        print("worst", key, f"{err:.2e}", file=f)
sys.exit(1 if bad else 0)
PY
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  # rank logs stay on the machine; only the results come back
  timeout 560 python3 benchmarks/overlap.py --nproc="$NPROC" --out_dir=/tmp/tbo-bench \
    --commit="${COMMIT:-unknown}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || status=1
  cp /tmp/tbo-bench/overlap-benchmark.* /tmp/tbo-bench/timeline.json /tmp/tbo-bench/timeline-graph.json "$OUT/" 2>/dev/null
  tail -n 3 /tmp/tbo-bench/rank*.log
  grep -vE "^\| (default|4|8|16) \|" "$OUT/bench.log" | tail -n 60
fi
exit $status
