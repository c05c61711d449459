"""Probe (issue 18): where does the packed layout's small-step expert path (expert-padded
bmm, grouped_swiglu below a tile) spend its time against the capacity layout's bmm?
Kernel table from torch.profiler, one H200, bf16, 8 local experts, H=7168, I=2048."""
import torch
from torch.profiler import ProfilerActivity, profile

from tbo_parity.torch_impl import packed_dispatch as pd
from tbo_parity.torch_impl.expert_parallel import expert_swiglu

dev, dt = "cuda", torch.bfloat16
L, H, I, P = 8, 7168, 2048, 32
g = torch.Generator(device=dev).manual_seed(0)
w = [torch.randn(L, H, I, generator=g, device=dev).to(dt) * 0.01 for _ in range(2)]
down = torch.randn(L, I, H, generator=g, device=dev).to(dt) * 0.01
recv = torch.randn(L * P, H, generator=g, device=dev).to(dt)
ends = torch.arange(1, L + 1, device=dev, dtype=torch.int32) * P
block = recv.view(L, P, H)


def graph(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    return gr.replay


def ms(fn, n=50):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        fn()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


cases = {"capacity bmm": lambda: expert_swiglu(block, w[0], w[1], down),
         "packed fallback": lambda: pd.grouped_swiglu(recv, ends, w[0], w[1], down,
                                                       per_expert=P),
         "packed grouped": lambda: pd.grouped_swiglu(recv, ends, w[0], w[1], down,
                                                      per_expert=pd.TILE_ROWS + 1)}
for name, fn in cases.items():
    rep = graph(fn)
    print(f"{name}: graph {ms(rep):.3f} ms, eager {ms(fn):.3f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
