"""A small DeepSeek-style MoE decoder whose layer is written once, as operations.

Each layer is the list of steps in ``LAYOUTS``: attention-input prep (fused add + RMSNorm),
q/k/v projections, the attention core (KV-cache write, then attention over the paged cache),
MLP-input prep, router gate, expert selection, dispatch, routed experts, combine, shared
experts, layer output. ``|`` marks a yield point. The plain forward
runs the list straight through; two-batch overlap steps two micro-batches through the same
list (``overlap.model_forward_maybe_tbo``). The math is docs/model.md's.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``H`` hidden, ``Q`` heads, ``D``
head dim, ``E`` experts, ``K`` top-k, ``I`` intermediate, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import nn

from tbo_parity.torch_impl import moe
from tbo_parity.torch_impl.config import ModelConfig, check_weights
from tbo_parity.torch_impl.empty_batch import (EXCHANGE_OPERATIONS, exchange_only, is_empty,
                                               is_empty_state)
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.forward_mode import strategy_for  # noqa: F401 (re-exported)
from tbo_parity.torch_impl.expert_parallel import EPStep, micro_batch_rows
from tbo_parity.torch_impl.operations import State, YieldOperation
from tbo_parity.torch_impl.overlap import model_forward_maybe_tbo

# The two published layouts (docs/spec.md, "Overlapped execution"); the schedule is data.
# reference.model.LAYOUTS is the same text (its operations have these names without "op_"),
# kept equal by parity_tests/test_layout_names.py.
LAYOUTS = {
    "prefill": ("attn_input_prep attn_qkv attn_core mlp_input_prep router_gate select_experts "
                "dispatch_launch | dispatch_wait routed_experts combine_launch | "
                "shared_experts combine_wait layer_output"),
    "decode": ("attn_input_prep attn_qkv | attn_core mlp_input_prep router_gate select_experts | "
               "dispatch_launch shared_experts | dispatch_wait routed_experts combine_launch | "
               "combine_wait layer_output |"),
}
DELTA_STAGES = {"prefill": 0, "decode": 2}


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * moe.float32_operand(weight)).to(x.dtype)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple:
    """``(cos, sin)``, each ``[T, 1, D]`` float32, for ``rope``: the NeoX angles of positions
    ``[T]`` at frequencies ``inv_freq [D/2]``, laid out for the rotate-half form (``sin``'s
    first half negated). They depend on the positions only, so a step computes them once."""
    angle = positions.to(inv_freq.dtype)[:, None, None] * inv_freq  # [T, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rope(x: torch.Tensor, tables: tuple) -> torch.Tensor:
    """NeoX rotary of x ``[T, Q, D]`` with ``rotary_tables``: ``[x1*cos - x2*sin,
    x2*cos + x1*sin]`` in float32, rounded once to x's dtype.

    Computed as ``x*cos + rotate_half(x)*sin`` with ``rotate_half(x) = [x2, x1]``: the same
    products and the same roundings (``x2*(-sin)`` is exactly ``-(x2*sin)``, and adding it is
    exactly subtracting), in 4 operators instead of 7, and no conversion of the halves."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x32 = moe.float32_operand(x)
    rotated = torch.cat([x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def _param(array: np.ndarray, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(array).to(device=device, dtype=dtype),
                        requires_grad=False)


class MoEDecoderLayer(nn.Module):
    """One layer; every public ``op_*`` method is one operation over a micro-batch ``State``.

    A state carries ``hidden_states``, ``residual``, ``forward_batch``, ``attn_backend`` and
    ``expert_load`` (a ``moe.ExpertLoad``, one entry per layer) between operations, and
    ``rotary`` (the step's ``rotary_tables``, from the first layer on).
    """

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict, dispatcher, *, dtype,
                 device):
        super().__init__()
        self.cfg, self.layer, self.dispatcher = cfg, layer, dispatcher
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "router", "experts_gate",
                     "experts_up", "experts_down", "shared_gate", "shared_up", "shared_down"):
            dt = torch.float32 if name == "router" else dtype  # the gate runs in float32
            weight = weights[f"layers.{layer}.{name}"]
            if name.startswith("experts_"):  # a rank holds only its own experts
                weight = dispatcher.experts_of(weight)
            setattr(self, name, _param(weight, dt, device))
        self.group_limited = moe.group_limited_routing(cfg, weights, layer, device=device)
        inv_freq = np.power(cfg.rope_theta, -np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        self.register_buffer("inv_freq", torch.as_tensor(inv_freq, dtype=torch.float32,
                                                         device=device), persistent=False)

    def operations(self, strategy: str, *, empty: bool = False) -> list:
        """The layer's operations in ``strategy``'s layout; ``empty``: those of an empty
        micro-batch under expert parallelism (``empty_batch.EXCHANGE_OPERATIONS``, the rest
        skipped, the yields kept)."""
        ops = []
        for name in LAYOUTS[strategy].split():
            if name == "|":
                ops.append(YieldOperation())
            elif not empty or name in EXCHANGE_OPERATIONS:
                ops.append(getattr(self, f"op_{name}"))
        return ops

    # --- attention ---------------------------------------------------------------------------

    def op_attn_input_prep(self, s: State):
        hidden, residual = s.pop("hidden_states"), s.pop("residual")
        residual = hidden if residual is None else hidden + residual
        s.residual = residual
        s.attn_input = rmsnorm(residual, self.attn_norm, self.cfg.rms_eps)

    def op_attn_qkv(self, s: State):
        """q/k/v projections and rotary; touches nothing shared (the cache is not written)."""
        x = s.pop("attn_input")  # [T, H]
        shape = (x.shape[0], self.cfg.num_heads, self.cfg.head_dim)
        if "rotary" not in s:  # the first layer's; every layer has the same inv_freq
            s.rotary = rotary_tables(s.forward_batch.positions, self.inv_freq)
        s.q = rope((x @ self.wq).view(shape), s.rotary)
        s.k = rope((x @ self.wk).view(shape), s.rotary)
        s.v = (x @ self.wv).view(shape)

    def op_attn_core(self, s: State):
        """Writes this layer's k, v into the cache, then attends through the table (the
        backend's ``forward`` does both), in one stage: docs/spec.md, "Overlapped execution"."""
        out = s.attn_backend.forward(s.pop("q"), s.pop("k"), s.pop("v"), layer=self.layer,
                                     batch=s.forward_batch)  # [T, Q, D]
        s.hidden_states = out.flatten(1) @ self.wo

    # --- MoE -------------------------------------------------------------------------------

    def op_mlp_input_prep(self, s: State):
        residual = s.pop("hidden_states") + s.pop("residual")
        s.residual = residual
        s.mlp_input = rmsnorm(residual, self.mlp_norm, self.cfg.rms_eps)

    def op_router_gate(self, s: State):
        s.router_logits = s.mlp_input.float() @ self.router  # [T, E] float32

    def op_select_experts(self, s: State):
        weights, ids = moe.select_experts(
            s.pop("router_logits"), top_k=self.cfg.top_k, scoring=self.cfg.scoring,
            num_token_non_padded=0 if is_empty_state(s) else s.forward_batch.num_real_tokens,
            group_limited=self.group_limited)
        s.topk_weights, s.topk_ids = weights, ids
        s.expert_load.add(ids, self.cfg.num_experts)  # counted once, after the last layer

    def op_dispatch_launch(self, s: State):
        s.dispatch_handle = self.dispatcher.dispatch_launch(
            s.mlp_input, s.pop("topk_weights"), s.pop("topk_ids"), micro_batch=s.micro_batch,
            capacity=s.ep_capacity)

    def op_dispatch_wait(self, s: State):
        s.dispatched = self.dispatcher.dispatch_wait(s.pop("dispatch_handle"))

    def op_routed_experts(self, s: State):
        s.expert_out = self.dispatcher.experts(s.dispatched, self.experts_gate,
                                               self.experts_up, self.experts_down)

    def op_combine_launch(self, s: State):
        s.combine_handle = self.dispatcher.combine_launch(s.pop("expert_out"),
                                                          s.pop("dispatched"))

    def op_shared_experts(self, s: State):
        x = s.pop("mlp_input")
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j in range(self.cfg.num_shared_experts):
            out = out + moe.swiglu(x, self.shared_gate[j], self.shared_up[j],
                                   self.shared_down[j])
        s.shared_out = out

    def op_combine_wait(self, s: State):
        routed_out = self.dispatcher.combine_wait(s.pop("combine_handle"))
        if not is_empty_state(s):  # an empty micro-batch has nothing to keep
            s.routed_out = routed_out

    def op_layer_output(self, s: State):
        # routed and shared outputs are float32 sums, rounded to the model dtype once here
        s.hidden_states = (s.pop("routed_out") + s.pop("shared_out")).to(s.residual.dtype)


@dataclasses.dataclass
class ModelOutput:
    hidden: torch.Tensor  # [T, H] after the final norm
    logits: torch.Tensor  # [T, V]
    expert_load: torch.Tensor  # [num_layers, E] (token, k) pairs routed to each expert


class MoEModel(nn.Module):
    """Embedding, ``num_layers`` MoE decoder layers, final norm and LM head."""

    def __init__(self, cfg: ModelConfig, weights: dict, *, dtype=torch.float32, device="cpu",
                 dispatcher=None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg must be a torch_impl ModelConfig, got {type(cfg).__name__}")
        check_weights(cfg, weights)
        self.cfg = cfg
        self.dispatcher = dispatcher or moe.LocalDispatcher(cfg.num_experts)
        self.embed = _param(weights["embed"], dtype, device)
        self.layers = nn.ModuleList(
            MoEDecoderLayer(cfg, layer, weights, self.dispatcher, dtype=dtype, device=device)
            for layer in range(cfg.num_layers))
        self.final_norm = _param(weights["final_norm"], dtype, device)
        self.lm_head = _param(weights["lm_head"], dtype, device)

    def operations(self, forward_mode) -> tuple:
        """(all layers' operations as one list, delta_stages) for this mode."""
        strategy = strategy_for(forward_mode)
        ops = [op for layer in self.layers for op in layer.operations(strategy)]
        return ops, DELTA_STAGES[strategy]

    @property
    def expert_parallel(self) -> bool:
        """Whether the routed experts are sharded over several ranks."""
        return getattr(self.dispatcher, "world_size", 1) > 1

    def check_ep_step(self, batch: ForwardBatch, ep_step) -> None:
        """ValueError unless ``ep_step`` fits this rank's batch: checked before anything
        launches, since a rank that fails mid-step would leave its peers waiting."""
        if not self.expert_parallel:
            if ep_step is not None:
                raise ValueError("ep_step is given but the model's dispatcher is local")
            return
        if not isinstance(ep_step, EPStep):
            raise ValueError("ep_step (an EPStep every rank agrees on) is required when the "
                             f"experts are sharded over ranks, got {ep_step!r}")
        if not is_empty(batch):  # an empty batch runs whatever layout its peers agreed
            if strategy_for(batch.forward_mode) != ep_step.strategy:
                raise ValueError(f"ep_step.strategy is {ep_step.strategy!r} but this rank's "
                                 f"{batch.forward_mode.name} batch runs "
                                 f"{strategy_for(batch.forward_mode)!r}")
            if (batch.tbo_children is not None) != (ep_step.micro_batches == 2):
                raise ValueError(f"ep_step.micro_batches is {ep_step.micro_batches} but the "
                                 f"batch is {'' if batch.tbo_children else 'not '}split")
        self.dispatcher.check_capacity(ep_step.capacity, micro_batch_rows(batch))

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, attn_backend, *, profile: bool = False,
                ep_step: Optional[EPStep] = None) -> ModelOutput:
        """Plain forward, or two-batch overlap when ``batch.tbo_children`` is set (then
        ``attn_backend`` is a ``TboAttnBackend`` initialised from the batch).

        ``ep_step``: with experts sharded over ranks, what every rank agrees on for this step
        (capacity, one or two micro-batches, layout). An empty batch (an idle rank) or an
        empty child is skipped on one rank and runs only its exchanges under expert
        parallelism, so all ranks exchange in the same order (``torch_impl/empty_batch.py``)."""
        self.check_ep_step(batch, ep_step)
        hidden = self.embed[batch.input_ids]  # [T, H]
        exchanges = None  # what an empty micro-batch runs: nothing on one rank
        if self.expert_parallel:
            exchanges = [op for layer in self.layers
                         for op in layer.operations(ep_step.strategy, empty=True)]
        if is_empty(batch):
            load = torch.zeros(self.cfg.num_layers, self.cfg.num_experts, dtype=torch.int64,
                               device=hidden.device)
            if exchanges is not None:
                load = exchange_only(exchanges, DELTA_STAGES[ep_step.strategy], ep_step,
                                     hidden_size=self.cfg.hidden_size, dtype=hidden.dtype,
                                     device=hidden.device)
            return ModelOutput(hidden, hidden @ self.lm_head, load)
        ops, delta = self.operations(batch.forward_mode)
        hidden, residual, load = model_forward_maybe_tbo(
            ops, delta, batch, hidden, attn_backend=attn_backend, profile=profile,
            ep_capacity=None if ep_step is None else ep_step.capacity,
            empty_operations=exchanges)
        hidden = rmsnorm(hidden + residual, self.final_norm, self.cfg.rms_eps)
        return ModelOutput(hidden, hidden @ self.lm_head, load)
