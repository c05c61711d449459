#!/usr/bin/env bash
# Issue 18 on ONE GPU (the only kind lent): the packed layout's GPU test, then
# benchmarks/overlap.py at 1 rank for each EXPERTS (experts per rank), both layouts side by side.
# At 1 rank there is no exchange to hide (TBO's speedup is not measured here), but the layout's
# compute, the grouped GEMM and the weight streaming are the same as on every rank of N.
set -u
export PYTHONPATH=. JAX_PLATFORMS=cpu TBO_PARITY_ONE_PROCESS=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, jax; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'jax', jax.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 150 python3 -m pytest -q -m gpu parity_tests/test_packed_dispatch.py -p no:cacheprovider -rs > "$OUT/gpu-pytest.log" 2>&1
tail -n 3 "$OUT/gpu-pytest.log"
for E in ${EXPERTS:-8 32}; do
  tokens=32,256,1024
  if [[ $E -ge 128 ]]; then tokens=${BIG_TOKENS:-32,128,256}; fi
  dir=/tmp/bench-e$E
  prefill=${PREFILL:-4096}
  if [[ $E -ge 128 ]]; then prefill=${BIG_PREFILL:-1024}; fi
  timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/overlap.py --nproc=1 --links=nvlink \
    --experts_per_rank=$E --tokens=$tokens --long_context=0 --prefill_tokens=$prefill \
    --layers=2 --transports=all_to_all,exact --timeline_tokens=0 --iters=10 --repeats=5 \
    --commit="${COMMIT:-unknown}" --out_dir=$dir > /tmp/bench-e$E.log 2>&1
  echo "e$E rc=$?"; tail -n 5 /tmp/bench-e$E.log
  cp $dir/overlap-benchmark.json "$OUT/e$E.json" 2>/dev/null
  cp $dir/overlap-benchmark.md "$OUT/e$E.md" 2>/dev/null || cp /tmp/bench-e$E.log "$OUT/e$E.log"
done
