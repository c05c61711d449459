export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
timeout 90 python benchmarks/probes/p17_det.py 2>&1 | grep -v Warn
for prio in high normal; do
mkdir -p /tmp/d_$prio
timeout 200 python benchmarks/overlap.py --nproc=2 --out_dir=/tmp/d_$prio --links=network,nvlink --tokens=256 --long_context=0 --prefill_tokens= \
  --iters=5 --repeats=5 --comm_priority=$prio --transports=all_to_all > /tmp/d_$prio/bench.log 2>&1
echo "prio=$prio rc=$?"; grep -E "^\| (nvlink|network) \| 2048" /tmp/d_$prio/bench.log
python - <<P
import json; r=json.load(open("/tmp/d_$prio/overlap-network-rank0.json")); print([ (x['tokens'], x['repeatable']) for x in r['decode']]); g=r.get('graph_timeline',{}); print({k:v for k,v in g.items() if k not in ('intervals','raw_kernels')})
P
done
cp /tmp/d_high/overlap-network-rank0.json $OUT/diag-network-high.json
cp /tmp/d_normal/overlap-network-rank0.json $OUT/diag-network-normal.json
tail -5 /tmp/d_high/rank0.log
