"""Probe: are SDPA's GPU backends bit-repeatable on the decode shapes (masked, q len 1)?"""
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = torch.device("cuda")
for B, L, Q in ((128, 2048, 1), (256, 8192, 1), (32, 2048, 4)):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, 8, Q, 128, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16, generator=g)
    lens = torch.randint(L // 2, L + 1, (B,), device=dev, generator=g)
    mask = (torch.arange(L, device=dev)[None, :] < lens[:, None])[:, None, None, :].expand(B, 1, Q, L)
    for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([be]):
                outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for _ in range(5)]
            same = all(torch.equal(outs[0], o) for o in outs)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with sdpa_kernel([be]):
                s.record()
                for _ in range(5): F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                e.record(); e.synchronize()
            print(B, L, Q, be.name, "repeatable", same, f"{s.elapsed_time(e)/5:.3f} ms", flush=True)
        except Exception as ex:
            print(B, L, Q, be.name, "ERR", repr(ex)[:150], flush=True)
    with torch.no_grad():
        outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for _ in range(5)]
    print(B, L, Q, "default repeatable", all(torch.equal(outs[0], o) for o in outs), flush=True)
