"""CUDA-graph replay parity: a runner's replays against the eager forward and the JAX spec.

A ``GraphHarness`` holds a model, one serving layout (a request table and KV pools that every
step shares, since graphs capture their addresses) and a ``CudaGraphRunner`` over them. For a
step it builds a random batch of the given size on that layout and runs it three ways from the
same starting pool: the runner (a padded replay), the eager forward, and the JAX spec (which
knows nothing of padding). ``check_step`` compares them:

- hidden states and logits of the real rows, and both KV pools on every slot but the
  padding slot (relative error against the dtype's bound, see ``BOUNDS``);
- the expert load (exactly): padding must count for nothing;
- the replay changed no slot of the pool other than the batch's own and the padding slot.

On a CPU the runner runs the same static-buffer path with the captured forward called eagerly
(``use_cuda_graph=False``); on a GPU it replays real CUDA graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from parity_tests import model_parity as mp
from torch_impl.cuda_graph_runner import CudaGraphRunner
from torch_impl.kv_cache import KVPool


@dataclasses.dataclass(frozen=True)
class GraphScenario:
    mode: str  # DECODE or TARGET_VERIFY
    draft_token_num: Optional[int] = None
    tree: bool = False

    @property
    def token_num_per_seq(self) -> int:
        return 1 if self.mode == "DECODE" else self.draft_token_num


SCENARIOS = {
    "decode": GraphScenario("DECODE"),
    "verify-chain": GraphScenario("TARGET_VERIFY", 3),
    "verify-tree": GraphScenario("TARGET_VERIFY", 4, tree=True),
}
DRAFT_TOKEN_NUMS = (3, 4)


class GraphHarness:
    """A model on ``device``, a serving layout for up to ``max_bs`` requests, and a runner."""

    def __init__(self, *, device: str, dtype_name: str = "float32", tbo: bool,
                 max_bs: int, max_context_len: int = 24, seed: int = 0,
                 graph_context_len: Optional[int] = None, **runner_kwargs):
        """``max_context_len``: columns of the layout's table (and the longest sequence the
        harness generates); ``graph_context_len``: what the runner captures for (default the
        same). ``runner_kwargs`` go to ``CudaGraphRunner``."""
        self.device, self.dtype_name = torch.device(device), dtype_name
        self.dtype = mp.TORCH_DTYPES[dtype_name]
        # bf16 routes densely: see parity_tests/test_model_parity.py.
        routing = {"num_experts": 4, "top_k": 4} if dtype_name == "bfloat16" else {}
        self.ref_cfg, _, self.weights, self.model = mp.make_models(
            seed=seed, dtype=self.dtype, device=self.device, **routing)
        self.max_context_len = max_context_len
        self.layout = mp.serving_layout(self.ref_cfg, max_bs, max_context_len, seed)
        self.req_to_token = torch.tensor(self.layout.req_to_token, device=self.device)
        self.pool = KVPool(torch.tensor(self.layout.k_pool).to(self.device, self.dtype),
                           torch.tensor(self.layout.v_pool).to(self.device, self.dtype))
        self.initial = self.pool.clone()
        runner_kwargs = {"draft_token_nums": DRAFT_TOKEN_NUMS, "max_bs": max_bs} | runner_kwargs
        self.runner = CudaGraphRunner(
            self.model, self.pool, self.req_to_token,
            max_context_len=graph_context_len or max_context_len,
            padding_slot=self.layout.padding_slot, padding_req_row=self.layout.padding_req_row,
            tbo=tbo, use_cuda_graph=self.device.type == "cuda", **runner_kwargs)

    def world(self, scenario: GraphScenario, batch_size: int, seed: int) -> mp.World:
        """A random batch of ``batch_size`` sequences on the layout: cached prefixes of 1 to
        as many tokens as leave room for the step's own."""
        rng = np.random.default_rng(seed)
        room = self.max_context_len - scenario.token_num_per_seq
        prefix = tuple(int(p) for p in rng.integers(1, room + 1, size=batch_size))
        case = mp.ModelCase(scenario.mode, prefix, draft_token_num=scenario.draft_token_num,
                            tree=scenario.tree, seed=seed)
        return mp.build_world(case, self.ref_cfg, self.layout)

    def batch(self, world: mp.World):
        return mp.torch_batch(world, dtype=self.dtype, device=self.device,
                              pools=(self.req_to_token, self.pool))

    def _snapshot(self, out) -> dict:
        """Copies (on a CPU ``.float().cpu().numpy()`` of a float32 tensor would alias the
        live pool, which the next run resets: the copy is what makes the pool checks real)."""
        def copy(tensor):
            return np.array(tensor.float().cpu().numpy(), copy=True)

        return {"hidden": copy(out.hidden), "logits": copy(out.logits),
                "k_pool": copy(self.pool.k), "v_pool": copy(self.pool.v),
                "expert_load": np.array(out.expert_load.cpu().numpy(), copy=True)}

    def reset_pool(self) -> None:
        self.pool.k.copy_(self.initial.k)
        self.pool.v.copy_(self.initial.v)

    def run_runner(self, world: mp.World) -> tuple:
        """(outputs, RunnerOutput) of the runner on the world, from the initial pool."""
        self.reset_pool()
        result = self.runner.forward(self.batch(world))
        return self._snapshot(result.output), result

    def run_eager(self, world: mp.World) -> dict:
        self.reset_pool()
        return self._snapshot(self.runner.eager(self.batch(world)))

    def run_spec(self, world: mp.World) -> dict:
        weights = self.weights
        if self.dtype_name == "bfloat16":
            world, weights = mp.bf16_oracle_inputs(world, weights)
        return mp.run_jax(world, self.ref_cfg, weights)


# The bound each comparison is held to: (metric, bound). "max" is model_parity's
# max|x - y| / max|y| per tensor; "norm" is ||x - y|| / ||y|| per tensor.
#
# float32: every pair within the model bound, elementwise.
# bfloat16: replay vs eager is the same bf16 model on the same inputs, so it is held to the model
# bound elementwise. Against the float32 spec the bf16 model is held to the model bound
# *normwise*: the elementwise maximum samples the tail of some twenty bf16 roundings per
# value, and that tail grows with the number of rows compared. Measured (CPU, eager, no graph
# involved): 12 fixed model scenarios <= 1.8e-2 elementwise, but random batches of 9 to 16
# sequences reach 3.05e-2 elementwise while staying at 0.9e-2 to 1.4e-2 normwise. The
# elementwise figure is still reported for every step.
BOUNDS = {
    "float32": {"eager": ("max", 1e-5), "spec": ("max", 1e-5)},
    "bfloat16": {"eager": ("max", 2e-2), "spec": ("norm", 2e-2)},
}


def normwise_errors(got: dict, want: dict) -> dict:
    """||got - want|| / ||want|| for each float output."""
    errors = {}
    for name in mp.OUTPUTS:
        x, y = got[name].astype(np.float64), want[name].astype(np.float64)
        errors[name] = float(np.linalg.norm(x - y)) / max(float(np.linalg.norm(y)), 1e-30)
    return errors


def _without_padding_slot(outputs: dict, padding_slot: int) -> dict:
    kept = np.arange(outputs["k_pool"].shape[1]) != padding_slot
    return outputs | {"k_pool": outputs["k_pool"][:, kept], "v_pool": outputs["v_pool"][:, kept]}


def check_step(h: GraphHarness, world: mp.World, *, spec: bool = True) -> dict:
    """Run the world three ways and compare (see the module docstring). ``ok`` sums it up."""
    replayed, result = h.run_runner(world)
    eager = h.run_eager(world)
    slot = h.layout.padding_slot
    runs = {"replay": replayed, "eager": eager}
    if spec:
        runs["spec"] = h.run_spec(world)
    trimmed = {name: _without_padding_slot(out, slot) for name, out in runs.items()}
    pairs = [("replay", "eager")] + ([("replay", "spec"), ("eager", "spec")] if spec else [])
    report = {"replayed": result.replayed, "graph_bs": None}
    if result.replayed:
        report["graph_bs"] = h.runner.plan(h.batch(world)).graph_bs
    bounds = BOUNDS[h.dtype_name]
    held = []
    for a, b in pairs:
        report[f"{a}_vs_{b}"] = max(mp.relative_errors(trimmed[a], trimmed[b]).values())
        report[f"{a}_vs_{b}_norm"] = max(normwise_errors(trimmed[a], trimmed[b]).values())
        report[f"load_{a}_vs_{b}"] = bool(np.array_equal(runs[a]["expert_load"],
                                                         runs[b]["expert_load"]))
        metric, bound = bounds[b]
        error = report[f"{a}_vs_{b}" + ("_norm" if metric == "norm" else "")]
        held.append(error <= bound and report[f"load_{a}_vs_{b}"])
    report["load_total_replay"] = int(replayed["expert_load"].sum())
    report["load_total_eager"] = int(eager["expert_load"].sum())
    initial_k = h.initial.k.float().cpu().numpy()
    changed = np.flatnonzero((replayed["k_pool"] != initial_k).any(axis=(0, 2, 3)))
    allowed = set(world.out_cache_loc.tolist()) | {slot}
    report["stray_slots"] = sorted(set(changed.tolist()) - allowed)
    report["ok"] = result.replayed and not report["stray_slots"] and all(held)
    return report
