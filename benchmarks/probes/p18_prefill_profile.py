"""Probe (issue 18): where a large step's time goes in each layout's dispatch -> experts ->
combine, one rank (NCCL world of 1), 8 experts, top-8 (no waste in either layout, so the
difference is the layout's own passes). Kernel tables from torch.profiler, one H200, bf16."""
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from tbo_parity.torch_impl.packed_dispatch import make_dispatcher

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
dev, dt = torch.device("cuda"), torch.bfloat16
E, K, H, I, T = 8, 8, 7168, 2048, int(os.environ.get("TOKENS", "4096"))
g = torch.Generator(device=dev).manual_seed(0)
w = [torch.randn(E, H, I, generator=g, device=dev).to(dt) * 0.01 for _ in range(2)]
down = torch.randn(E, I, H, generator=g, device=dev).to(dt) * 0.01
hidden = torch.randn(T, H, generator=g, device=dev).to(dt)
ids = torch.rand(T, E, generator=g, device=dev).topk(K, dim=-1).indices
weights = torch.full((T, K), 1.0 / K, device=dev)
for layout in ("capacity", "packed"):
    d = make_dispatcher(E, layout=layout, top_k=K, hidden_size=H, max_capacity=T, dtype=dt,
                        device=dev)

    def step():
        h = d.dispatch_wait(d.dispatch_launch(hidden, weights, ids, micro_batch=0, capacity=T))
        out = d.experts(h, w[0], w[1], down)
        return d.combine_wait(d.combine_launch(out, h))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        step()
    e.record()
    e.synchronize()
    print(f"== {layout}: {s.elapsed_time(e) / 10:.3f} ms per dispatch+experts+combine, T={T}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                    max_name_column_width=70))
    del d
dist.destroy_process_group()
