set -x
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
nvidia-smi topo -m 2>&1 | head -5
python - <<'P'
import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), torch.cuda.get_device_name(0))
P
run2() { # name script args...
  local port=$((29500 + RANDOM % 1000))
  for r in 0 1; do RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout 240 python "$@" > /tmp/log_$(basename $1)_$r.txt 2>&1 & done; wait
  tail -60 /tmp/log_$(basename $1)_0.txt; tail -5 /tmp/log_$(basename $1)_1.txt
}
timeout 200 python benchmarks/probes/p17_sdpa.py $OUT 2>&1 | tail -8
run2 benchmarks/probes/p17_link.py $OUT nvlink
(export NCCL_P2P_DISABLE=1; run2 benchmarks/probes/p17_link.py $OUT p2p_off)
run2 benchmarks/probes/p17_prefill_profile.py $OUT
ls -la $OUT
