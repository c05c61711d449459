"""Probe: profile one eager EXTEND step, plain vs TBO, silent transport (compute only)."""
import json, os, sys
import torch, torch.distributed as dist
from tbo_parity.benchmarks import overlap as ob
from tbo_parity.parity_tests.ep_parity import init_rank
from tbo_parity.torch_impl.attention import TboAttnBackend
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.expert_parallel import agree_ep_step

out = sys.argv[1]
rank, world, device = init_rank("cuda")
dtype = torch.bfloat16
cfg = ob.model_config(world, 4, False)
cs = torch.cuda.Stream(device)
d = ob.make_dispatcher(cfg, "none", max_capacity=4096, device=device, dtype=dtype, comm_stream=cs)
model = ob.build_model(cfg, d, device=device, dtype=dtype, seed=1 + rank)
res = {}
for total in (1024, 4096):
    seqs, length = total // 64, 64
    srv = ob.serving(cfg, seqs, length, device=device, dtype=dtype)
    for tbo in (False, True):
        batch = ob.extend_batch(cfg, srv, seqs, length, device=device)
        if tbo:
            batch = TboForwardBatchPreparer().prepare(batch)
        step = agree_ep_step(batch, micro_batches=2 if tbo else 1)
        def fn():
            b = TboAttnBackend(); b.init_forward_metadata(batch)
            return model(batch, b, ep_step=step)
        ms = ob.timed(fn, iters=1, repeats=5, device=device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(); torch.cuda.synchronize()
        ka = prof.key_averages()
        dev = sorted(ka, key=lambda e: -e.self_device_time_total)[:12]
        cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]
        key = f"{total}/{'tbo' if tbo else 'plain'}"
        res[key] = {"ms": ms,
                    "device_total_ms": sum(e.self_device_time_total for e in ka) / 1e3,
                    "top_device": [(e.key, e.count, round(e.self_device_time_total / 1e3, 3)) for e in dev],
                    "top_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in cpu]}
        if rank == 0:
            print(key, json.dumps(res[key], indent=0)[:3000], flush=True)
            if False:
                prof.export_chrome_trace(os.path.join(out, f"prefill_{key.replace('/', '_')}.json"))
if rank == 0:
    json.dump(res, open(os.path.join(out, "prefill_profile.json"), "w"), indent=1)
dist.barrier(); dist.destroy_process_group()
