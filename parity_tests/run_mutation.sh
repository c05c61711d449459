#!/usr/bin/env bash
# The mutation run of docs/testing.md ("The mutation run"), on the CPU of a machine with many
# cores, in slices: each call runs `mutmut run` for at most SECONDS and can be called again
# with the mutants/ folder it left (mutmut resumes: a mutant with a result is not run again,
# unless it is named).
#
#   parity_tests/run_mutation.sh [WORKERS] [SECONDS] [MUTANT_PATTERN ...]
#
# WORKERS: mutmut's --max-children (default: the number of cores). SECONDS: stop after this
# long (default: no limit); what finished is saved. MUTANT_PATTERN: fnmatch patterns of mutant
# names to run first (e.g. '*graph_replay*'); none: every mutant not yet run.
# With $OUT set, the results and mutants/ come back as files under it.
#
# The run is on the CPU whatever the machine holds (CUDA hidden, JAX on the CPU), with the
# quick Hypothesis profile, one pytest process per mutant, and one JAX compilation cache that
# every worker shares (a program the clean run compiled is loaded, not compiled again; a
# mutant that changes a program compiles its own).
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${1:-$(nproc)}
seconds=${2:-0}
shift $(( $# < 2 ? $# : 2 ))

export CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu HYPOTHESIS_PROFILE=quick OMP_NUM_THREADS=1
export TBO_PARITY_ONE_PROCESS=1 PYTHONDONTWRITEBYTECODE=1
# One folder for every worker (parity_tests/conftest.py sets the cache's other settings).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tbo-parity-mutation-jax}
mkdir -p "$JAX_COMPILATION_CACHE_DIR"

start=$(date +%s)
if [ "$seconds" -gt 0 ]; then
  timeout --signal=INT --kill-after=30 "$seconds" python3 parity_tests/mutmut_run.py run --max-children "$workers" "$@"
else
  python3 parity_tests/mutmut_run.py run --max-children "$workers" "$@"
fi
status=$?
echo "mutmut run: exit $status after $(( $(date +%s) - start )) s with $workers workers"

python3 parity_tests/mutmut_run.py results --all true > mutation-results.txt 2>&1
awk '{print $NF}' mutation-results.txt | sort | uniq -c
if [ -n "${OUT:-}" ]; then
  cp mutation-results.txt "$OUT/"
  tar czf "$OUT/mutants.tgz" --exclude='__pycache__' mutants
fi
