"""A small DeepSeek-style MoE decoder whose layer is written once, as operations.

Each layer is the list of steps in ``LAYOUTS``: attention-input prep (fused add + RMSNorm),
attention over the paged KV cache, MLP-input prep, router gate, expert selection, dispatch,
routed experts, combine, shared expert, output. ``|`` marks a yield point. The plain forward
runs the list straight through; two-batch overlap steps two micro-batches through the same
list (``overlap.model_forward_maybe_tbo``). The math is docs/model.md's.

Shape letters: ``T`` tokens, ``H`` hidden, ``N`` heads, ``D`` head dim, ``E`` experts,
``K`` top-k, ``I`` intermediate, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from torch_impl import moe
from torch_impl.config import ModelConfig, check_weights
from torch_impl.forward_batch import ForwardBatch
from torch_impl.operations import State, YieldOperation
from torch_impl.overlap import model_forward_maybe_tbo

# The two published layouts (docs/spec.md, "Overlapped execution"); the schedule is data.
LAYOUTS = {
    "prefill": ("attn_input_prep attn_qkv attn_core mlp_input_prep router_gate select_experts "
                "dispatch_launch | dispatch_wait routed_experts combine_launch | "
                "shared_experts combine_wait layer_output"),
    "decode": ("attn_input_prep attn_qkv | attn_core mlp_input_prep router_gate select_experts | "
               "dispatch_launch shared_experts | dispatch_wait routed_experts combine_launch | "
               "combine_wait layer_output |"),
}
DELTA_STAGES = {"prefill": 0, "decode": 2}


def strategy_for(forward_mode) -> str:
    """EXTEND overlaps with the prefill layout, DECODE and TARGET_VERIFY with the decode one."""
    if forward_mode.is_extend():
        return "prefill"
    if forward_mode.is_uniform():
        return "decode"
    raise ValueError(f"forward_mode {forward_mode.name} has no operations strategy")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """NeoX rotary: x [T, N, D], positions [T], inv_freq [D/2]."""
    angle = positions.to(inv_freq.dtype)[:, None, None] * inv_freq  # [T, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(angle.dtype), x[..., half:].to(angle.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _param(array: np.ndarray, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(array).to(device=device, dtype=dtype),
                        requires_grad=False)


class MoEDecoderLayer(nn.Module):
    """One layer; every public ``op_*`` method is one operation over a micro-batch ``State``.

    A state carries ``hidden_states``, ``residual``, ``forward_batch``, ``attn_backend`` and
    ``expert_load`` (a list, one entry per layer) between operations.
    """

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict, dispatcher, *, dtype,
                 device):
        super().__init__()
        self.cfg, self.layer, self.dispatcher = cfg, layer, dispatcher
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "router", "experts_gate",
                     "experts_up", "experts_down", "shared_gate", "shared_up", "shared_down"):
            dt = torch.float32 if name == "router" else dtype  # the gate runs in float32
            setattr(self, name, _param(weights[f"layers.{layer}.{name}"], dt, device))
        inv_freq = np.power(cfg.rope_theta, -np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        self.register_buffer("inv_freq", torch.as_tensor(inv_freq, dtype=torch.float32,
                                                         device=device), persistent=False)

    def operations(self, strategy: str) -> list:
        return [YieldOperation() if name == "|" else getattr(self, f"op_{name}")
                for name in LAYOUTS[strategy].split()]

    # --- attention ---------------------------------------------------------------------------

    def op_attn_input_prep(self, s: State):
        hidden, residual = s.pop("hidden_states"), s.pop("residual")
        residual = hidden if residual is None else hidden + residual
        s.residual = residual
        s.attn_input = rmsnorm(residual, self.attn_norm, self.cfg.rms_eps)

    def op_attn_qkv(self, s: State):
        x = s.pop("attn_input")  # [T, H]
        shape = (x.shape[0], self.cfg.num_heads, self.cfg.head_dim)
        positions = s.forward_batch.positions
        s.q = rope((x @ self.wq).view(shape), positions, self.inv_freq)
        s.k = rope((x @ self.wk).view(shape), positions, self.inv_freq)
        s.v = (x @ self.wv).view(shape)

    def op_attn_core(self, s: State):
        out = s.attn_backend.forward(s.pop("q"), s.pop("k"), s.pop("v"), layer=self.layer,
                                     batch=s.forward_batch)  # [T, N, D]
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
            num_token_non_padded=s.forward_batch.num_real_tokens)
        s.topk_weights, s.topk_ids = weights, ids
        s.expert_load.append(moe.expert_load(ids, self.cfg.num_experts))

    def op_dispatch_launch(self, s: State):
        s.dispatch_handle = self.dispatcher.dispatch_launch(
            s.mlp_input, s.pop("topk_weights"), s.pop("topk_ids"))

    def op_dispatch_wait(self, s: State):
        s.dispatched = self.dispatcher.dispatch_wait(s.pop("dispatch_handle"))

    def op_routed_experts(self, s: State):
        s.expert_out = moe.routed_experts(s.dispatched, self.experts_gate, self.experts_up,
                                          self.experts_down)

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
        s.routed_out = self.dispatcher.combine_wait(s.pop("combine_handle"))

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

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, attn_backend, *, profile: bool = False
                ) -> ModelOutput:
        """Plain forward, or two-batch overlap when ``batch.tbo_children`` is set (then
        ``attn_backend`` is a ``TboAttnBackend`` initialised from the batch)."""
        hidden = self.embed[batch.input_ids]  # [T, H]
        if batch.forward_mode.is_idle() or batch.num_tokens == 0:
            empty_load = torch.zeros(self.cfg.num_layers, self.cfg.num_experts,
                                     dtype=torch.int64, device=hidden.device)
            return ModelOutput(hidden, hidden @ self.lm_head, empty_load)
        ops, delta = self.operations(batch.forward_mode)
        hidden, residual, load = model_forward_maybe_tbo(
            ops, delta, batch, hidden, attn_backend=attn_backend, profile=profile)
        hidden = rmsnorm(hidden + residual, self.final_norm, self.cfg.rms_eps)
        return ModelOutput(hidden, hidden @ self.lm_head, load)
