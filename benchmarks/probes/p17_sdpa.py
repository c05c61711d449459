"""Probe: decode attention over gathered bf16 K/V with SDPA at real contexts; graph capture."""
import json, os, sys, math
import torch
import torch.nn.functional as F
out = sys.argv[1]
dev = torch.device("cuda")
res = []
N, D = 8, 128
for B, L in ((256, 2048), (256, 8192), (1024, 2048)):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    P = B * L + 1
    k = torch.randn(P, N, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(P, N, D, device=dev, dtype=torch.bfloat16)
    table = torch.arange(B * L, device=dev).view(B, L)
    lens = torch.randint(L // 2, L + 1, (B,), device=dev)
    q = torch.randn(B, N, 1, D, device=dev, dtype=torch.bfloat16)
    base = torch.cuda.max_memory_allocated()
    def step():
        kk = k[table].transpose(1, 2)  # [B, N, L, D]
        vv = v[table].transpose(1, 2)
        mask = (torch.arange(L, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    o = step(); torch.cuda.synchronize()
    # reference in float32 on 4 sequences
    kk = k[table[:4]].float().transpose(1, 2); vv = v[table[:4]].float().transpose(1, 2)
    sc = (q[:4].float() @ kk.transpose(-1, -2)) / math.sqrt(D)
    sc = sc.masked_fill(~(torch.arange(L, device=dev)[None, :] < lens[:4, None])[:, None, None, :], float("-inf"))
    ref = sc.softmax(-1) @ vv
    err = (o[:4].float() - ref).abs().max().item()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3): step()
    s.record()
    for _ in range(10): step()
    e.record(); e.synchronize(); eager = s.elapsed_time(e) / 10
    g = torch.cuda.CUDAGraph()
    st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        step()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        og = step()
    s.record()
    for _ in range(10): g.replay()
    e.record(); e.synchronize(); gms = s.elapsed_time(e) / 10
    # gather-only cost
    s.record()
    for _ in range(10): k[table]; v[table]
    e.record(); e.synchronize(); gather = s.elapsed_time(e) / 10
    kv_bytes = 2 * B * L * N * D * 2
    row = {"B": B, "L": L, "eager_ms": eager, "graph_ms": gms, "gather_ms": gather,
           "max_err_vs_fp32": err, "peak_extra_GiB": peak, "kv_GB": kv_bytes / 1e9,
           "GBps_kv": kv_bytes / (gms * 1e-3) / 1e9}
    print(row, flush=True); res.append(row)
    del k, v, table
json.dump(res, open(os.path.join(out, "sdpa.json"), "w"), indent=1)
