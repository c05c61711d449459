"""Probe: all_to_all_single bandwidth (eager and in a CUDA graph on a side stream)."""
import json, os, sys
import torch, torch.distributed as dist
from tbo_parity.parity_tests.ep_parity import init_rank
out, tag = sys.argv[1], sys.argv[2]
rank, world, device = init_rank("cuda")
res = {"p2p_disable": os.environ.get("NCCL_P2P_DISABLE"), "rows": []}
side = torch.cuda.Stream(device)
for mb in (1, 4, 16, 64, 256):
    n = mb * 2**20 // 2
    x = torch.full((n,), float(rank + 1), dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        dist.all_to_all_single(y, x)
    torch.cuda.synchronize(); dist.barrier()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        dist.all_to_all_single(y, x)
    e.record(); e.synchronize()
    eager = s.elapsed_time(e) / 10
    # graph capture on a side stream
    ok, gms, err = False, None, None
    try:
        g = torch.cuda.CUDAGraph()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=side):
            dist.all_to_all_single(y, x)
        x.fill_(float(10 * (rank + 1))); y.zero_()
        torch.cuda.synchronize(); dist.barrier()
        s.record()
        for _ in range(10):
            g.replay()
        e.record(); e.synchronize()
        gms = s.elapsed_time(e) / 10
        half = n // world
        ok = all(bool((y[i * half:(i + 1) * half] == 10 * (i + 1)).all()) for i in range(world))
    except Exception as ex:
        err = repr(ex)[:300]
    # bytes each rank sends to its peers (the part leaving the GPU)
    sent = x.numel() * 2 * (world - 1) / world
    res["rows"].append({"MB": mb, "eager_ms": eager, "graph_ms": gms, "graph_ok": ok, "err": err,
                        "GBps_out": sent / (eager * 1e-3) / 1e9})
    if rank == 0:
        print(tag, res["rows"][-1], flush=True)
if rank == 0:
    json.dump(res, open(os.path.join(out, f"link_{tag}.json"), "w"), indent=1)
dist.barrier(); dist.destroy_process_group()
