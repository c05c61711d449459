"""Probe (issue 18): does torch.ops.symm_mem.all_to_all_vdev_2d (NVSHMEM, device-side splits)
run and capture in a CUDA graph on this torch? World size 1 here (one GPU lent)."""
import json, os, traceback
import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

res = {"torch": torch.__version__}
try:
    res["schema"] = str(torch.ops.symm_mem.all_to_all_vdev_2d.default._schema)
except Exception as exc:
    res["schema"] = repr(exc)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
dev = torch.device("cuda", 0)
try:
    symm_mem.set_backend("NVSHMEM")
    res["backend"] = "NVSHMEM"
except Exception as exc:
    res["backend"] = repr(exc)[:300]
group_name = dist.group.WORLD.group_name
try:
    symm_mem.enable_symm_mem_for_group(group_name)
except Exception as exc:
    res["enable"] = repr(exc)[:200]
ne, H = 4, 256
try:
    inp = symm_mem.empty(64 * H, dtype=torch.bfloat16, device=dev).view(64, H)
    out = symm_mem.empty(128 * H, dtype=torch.bfloat16, device=dev).view(128, H)
    in_splits = symm_mem.empty(ne, dtype=torch.int64, device=dev)
    oso = symm_mem.empty((2, ne), dtype=torch.int64, device=dev)
    inp.copy_(torch.randn(64, H, device=dev))
    in_splits.copy_(torch.tensor([3, 0, 10, 5], device=dev))
    torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, oso, group_name)
    torch.cuda.synchronize()
    res["eager_out_splits_offsets"] = oso.tolist()
    res["eager_rows_equal"] = bool(torch.equal(out[:18], inp[:18]))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, oso, group_name)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, oso, group_name)
    in_splits.copy_(torch.tensor([1, 2, 3, 4], device=dev))
    out.zero_()
    g.replay(); torch.cuda.synchronize()
    res["captured_replay_out_splits_offsets"] = oso.tolist()
    res["captured_rows_equal"] = bool(torch.equal(out[:10], inp[:10]))
    res["captures"] = True
except Exception as exc:
    res["error"] = traceback.format_exc()[-1500:]
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "p18_vdev.json"), "w"), indent=1)
dist.destroy_process_group()
