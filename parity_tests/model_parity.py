"""Model parity: the PyTorch model (plain and TBO) against the JAX spec, on one scenario.

A ``ModelCase`` describes a batch over a KV cache that already holds each sequence's prefix.
``build_world`` turns it into concrete arrays (numpy): a request-to-token table whose slots are
a random permutation of the pool, a pool filled with random keys/values (so every read through
the table is real and every stale read shows), token ids, positions, the tree mask. Both sides
run from the same arrays and the same weights.

Errors are ``max|x - y| / max|y|`` per tensor (relative to the tensor's scale).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import torch

# JAX is imported where the spec runs (run_jax, _jitted, supported_compile_options), not here:
# an expert-parallel rank (parity_tests/ep_parity.py) builds its batches with this module but
# runs only the PyTorch side, and importing JAX would cost it 2 s of CPU.
from tbo_parity.reference.weights import ModelConfig as RefConfig
from tbo_parity.reference.weights import init_weights
from tbo_parity.torch_impl.attention import TboAttnBackend, TorchAttnBackend
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.config import ModelConfig as TorchConfig
from tbo_parity.torch_impl.forward_batch import ForwardBatch, VerifyInput
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.kv_cache import KVPool
from tbo_parity.torch_impl.model import MoEModel

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}



def supported_compile_options(candidates: dict) -> dict:
    """The XLA options this jaxlib accepts (option names come and go between releases)."""
    import jax

    kept = {}
    for name, value in candidates.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
        except Exception:  # an unknown option is an XlaRuntimeError/JaxRuntimeError
            continue
        kept[name] = value
    return kept


# The JAX spec runs jitted per shape with a quick compile: a tiny model gains nothing from
# XLA's optimisation passes, and compile time dominates a parity run. The program is compiled
# as one LLVM module, not split for parallel code generation (on 2 cores the split costs more
# CPU time than it saves: 8% of test_cuda_graph.py and test_reference_model.py's time). Built
# on first use, not at import: probing the options starts JAX's runtime, and a process that
# only imports this module (a test collection, a fork server) must not hold its threads.
_STATIC = ("cfg", "mode", "draft_token_num")


@functools.cache
def fast_compile() -> dict:
    return supported_compile_options(dict(
        xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
        xla_cpu_use_fusion_emitters=False, xla_cpu_parallel_codegen_split_count=1))


@functools.cache
def _jitted(tbo: bool):
    import jax

    from tbo_parity.reference import model as ref_model
    from tbo_parity.reference import operations as ref_ops

    if tbo:
        return jax.jit(ref_ops.forward_tbo, static_argnames=_STATIC + ("children", "executor"),
                       compiler_options=fast_compile())
    return jax.jit(ref_model.forward, static_argnames=_STATIC, compiler_options=fast_compile())


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A batch to run. ``prefix_lens``: tokens already cached per sequence (for DECODE the
    new token lands after them; for TARGET_VERIFY they are the committed tokens)."""

    mode: str
    prefix_lens: tuple
    extend_lens: Optional[tuple] = None  # EXTEND
    draft_token_num: Optional[int] = None  # TARGET_VERIFY
    tree: bool = False  # TARGET_VERIFY: a random draft tree instead of a chain
    seed: int = 0


# The scenarios of the parity suite and of `tbo-parity run`, by name.
CASES = {
    "extend-balanced": ModelCase("EXTEND", (0, 4, 0, 7), (6, 4, 5, 5)),
    "extend-two-chunk-prefixed": ModelCase("EXTEND", (4, 6), (3, 20), seed=1),
    "extend-one-sequence": ModelCase("EXTEND", (9,), (17,), seed=2),
    "extend-skewed": ModelCase("EXTEND", (3, 0, 5, 1, 2), (2, 1, 40, 1, 3), seed=3),
    "extend-empty-piece": ModelCase("EXTEND", (2, 0), (1, 2), seed=4),
    "decode": ModelCase("DECODE", (5, 9, 3, 7, 2), seed=5),
    "decode-one-sequence": ModelCase("DECODE", (6,), seed=6),
    "target-verify-chain": ModelCase("TARGET_VERIFY", (5, 9, 3, 4), draft_token_num=3, seed=7),
    "target-verify-tree": ModelCase("TARGET_VERIFY", (5, 9, 3), draft_token_num=4, tree=True,
                                    seed=8),
    "idle": ModelCase("IDLE", ()),
}
PADDED = {"decode-padded": (ModelCase("DECODE", (5, 9, 3), seed=9), 2),
          "target-verify-padded": (ModelCase("TARGET_VERIFY", (5, 9, 3), draft_token_num=2,
                                              seed=10), 3)}


@dataclasses.dataclass
class World:
    """Concrete arrays of a case (numpy), shared by both sides."""

    case: ModelCase
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    out_cache_loc: np.ndarray  # [T]
    req_pool_indices: np.ndarray  # [B]
    seq_lens: np.ndarray  # [B]
    extend_lens: Optional[np.ndarray]
    prefix_lens: Optional[np.ndarray]
    custom_mask: Optional[np.ndarray]  # [M] bool
    req_to_token: np.ndarray  # [R, L]
    k_pool: np.ndarray  # [layers, P, N, D]
    v_pool: np.ndarray
    num_token_non_padded: int


def _draft_tree(rng, d: int, tree: bool) -> tuple:
    """(visible [d, d] bool, depth [d]) of a chain or a random tree rooted at draft 0."""
    parent = [-1] + [int(rng.integers(0, r)) if tree else r - 1 for r in range(1, d)]
    visible, depth = np.eye(d, dtype=bool), np.zeros(d, dtype=np.int64)
    for r in range(1, d):
        visible[r] |= visible[parent[r]]
        depth[r] = depth[parent[r]] + 1
    return visible, depth


@dataclasses.dataclass(frozen=True)
class ServingLayout:
    """Pools shared by many batches, as a CUDA-graph runner needs them (it captures their
    addresses): ``req_to_token [R, L]`` whose rows ``0..R-2`` map positions to distinct random
    slots, row ``R-1`` reserved for padding, and pools of ``P`` slots, the last reserved for
    padding (never in a request's row). Pools start random so that every stale read shows."""

    req_to_token: np.ndarray  # [R, L]
    k_pool: np.ndarray  # [layers, P, N, D]
    v_pool: np.ndarray

    @property
    def padding_req_row(self) -> int:
        return self.req_to_token.shape[0] - 1

    @property
    def padding_slot(self) -> int:
        return self.k_pool.shape[1] - 1


def serving_layout(cfg: RefConfig, num_requests: int, max_context_len: int,
                   seed: int = 0) -> ServingLayout:
    rng = np.random.default_rng(seed)
    num_slots = num_requests * max_context_len + 1
    table = np.full((num_requests + 1, max_context_len), num_slots - 1, np.int64)
    table[:-1] = rng.permutation(num_slots - 1).reshape(num_requests, max_context_len)
    shape = (cfg.num_layers, num_slots, cfg.num_heads, cfg.head_dim)
    return ServingLayout(table, rng.normal(size=shape).astype(np.float32),
                         rng.normal(size=shape).astype(np.float32))


def build_world(case: ModelCase, cfg: RefConfig,
                layout: Optional[ServingLayout] = None) -> World:
    """The case's arrays over a fresh random table and pool, or over ``layout``'s (then the
    case's sequences take random distinct request rows of it, never the padding row)."""
    rng = np.random.default_rng(case.seed)
    prefix = list(case.prefix_lens)
    bs = len(prefix)
    if case.mode == "EXTEND":
        new = list(case.extend_lens)
    else:
        new = [1 if case.mode == "DECODE" else case.draft_token_num] * bs
    if layout is None:
        width = max((p + n for p, n in zip(prefix, new)), default=0) + 1
        rows = rng.permutation(bs + 2)[:bs]  # req pool rows, not in sequence order
        table = np.zeros((bs + 2, width), dtype=np.int64)
        slots = rng.permutation(bs * width + 5)  # P slots; some never used
        table[rows] = slots[:bs * width].reshape(bs, width)
    else:
        table = layout.req_to_token
        rows = rng.permutation(layout.padding_req_row)[:bs]
        if max((p + n for p, n in zip(prefix, new)), default=0) > table.shape[1]:
            raise ValueError(f"case {case} does not fit the layout's {table.shape[1]} columns")
    ids, positions, locs, masks = [], [], [], []
    for s in range(bs):
        columns = np.arange(prefix[s], prefix[s] + new[s])
        locs.append(table[rows[s], columns])
        ids.append(rng.integers(0, cfg.vocab_size, size=new[s]))
        if case.mode == "TARGET_VERIFY":
            visible, depth = _draft_tree(rng, new[s], case.tree)
            block = np.concatenate([np.ones((new[s], prefix[s]), bool), visible], axis=1)
            masks.append(block.reshape(-1))
            positions.append(prefix[s] + depth)
        else:
            positions.append(columns)
    seq_lens = np.asarray([p + (n if case.mode != "TARGET_VERIFY" else 0)
                           for p, n in zip(prefix, new)], dtype=np.int64)
    if layout is None:
        pool_shape = (cfg.num_layers, len(slots), cfg.num_heads, cfg.head_dim)
        k_pool = rng.normal(size=pool_shape).astype(np.float32)
        v_pool = rng.normal(size=pool_shape).astype(np.float32)
    else:
        k_pool, v_pool = layout.k_pool, layout.v_pool

    def flat(parts):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    return World(
        case=case, input_ids=flat(ids), positions=flat(positions),
        out_cache_loc=flat(locs), req_pool_indices=rows.astype(np.int64),
        seq_lens=seq_lens,
        extend_lens=np.asarray(new) if case.mode == "EXTEND" else None,
        prefix_lens=np.asarray(prefix) if case.mode == "EXTEND" else None,
        custom_mask=np.concatenate(masks) if masks else None,
        req_to_token=table, k_pool=k_pool, v_pool=v_pool,
        num_token_non_padded=int(sum(new)))


def pad_world(world: World, num_padding: int) -> World:
    """The world with ``num_padding`` padding sequences appended, as a CUDA graph of a larger
    batch pads a DECODE/TARGET_VERIFY batch: each padding sequence has one cached token, reads
    a dummy table row and writes a dummy slot (a new last slot of the pool), token id 0.
    ``num_token_non_padded`` stays the real count."""
    case = world.case
    if case.mode not in ("DECODE", "TARGET_VERIFY"):
        raise ValueError(f"padding applies to DECODE and TARGET_VERIFY, not {case.mode}")
    per_seq = 1 if case.mode == "DECODE" else case.draft_token_num
    dummy_slot = world.k_pool.shape[1]
    width = max(world.req_to_token.shape[1], 1 + per_seq)
    table = np.full((world.req_to_token.shape[0] + 1, width), dummy_slot, np.int64)
    table[:-1, :world.req_to_token.shape[1]] = world.req_to_token
    padded_tokens = num_padding * per_seq
    mask = None
    if world.custom_mask is not None:
        mask = np.concatenate([world.custom_mask,
                               np.ones(num_padding * per_seq * (1 + per_seq), bool)])

    def grow(pool):
        return np.concatenate([pool, np.zeros_like(pool[:, :1])], axis=1)

    return dataclasses.replace(
        world,
        input_ids=np.concatenate([world.input_ids, np.zeros(padded_tokens, np.int64)]),
        positions=np.concatenate([world.positions, np.zeros(padded_tokens, np.int64)]),
        out_cache_loc=np.concatenate([world.out_cache_loc,
                                      np.full(padded_tokens, dummy_slot, np.int64)]),
        req_pool_indices=np.concatenate([world.req_pool_indices,
                                         np.full(num_padding, table.shape[0] - 1, np.int64)]),
        seq_lens=np.concatenate([world.seq_lens, np.ones(num_padding, np.int64)]),
        custom_mask=mask, req_to_token=table, k_pool=grow(world.k_pool),
        v_pool=grow(world.v_pool))


# --- running each side -----------------------------------------------------------------------


def run_jax(world: World, cfg: RefConfig, weights: dict, *, tbo: bool = False,
            executor=None) -> dict:
    """The JAX spec's outputs (plain, or TBO through reference.split's children)."""
    import jax
    import jax.numpy as jnp

    from tbo_parity.reference import model as ref_model
    from tbo_parity.reference import split as spec

    case = world.case

    def i32(x):
        return None if x is None else jnp.asarray(x, jnp.int32)

    inputs = ref_model.ModelInputs(
        input_ids=i32(world.input_ids), positions=i32(world.positions),
        out_cache_loc=i32(world.out_cache_loc), req_pool_indices=i32(world.req_pool_indices),
        seq_lens=i32(world.seq_lens), extend_prefix_lens=i32(world.prefix_lens),
        extend_seq_lens=i32(world.extend_lens),
        custom_mask=None if world.custom_mask is None else jnp.asarray(world.custom_mask),
        req_to_token=i32(world.req_to_token),
        num_token_non_padded=jnp.int32(world.num_token_non_padded))
    kwargs = dict(cfg=cfg, mode=case.mode, draft_token_num=case.draft_token_num)
    if tbo:
        mode = spec.ForwardMode[case.mode]
        children = spec.derive_children(
            mode, world.seq_lens.tolist(),
            None if world.extend_lens is None else world.extend_lens.tolist(),
            None if world.prefix_lens is None else world.prefix_lens.tolist(),
            spec.token_num_per_seq(mode, case.draft_token_num))
        extra = {} if executor is None else {"executor": executor}
        out = _jitted(True)(weights, inputs, world.k_pool, world.v_pool,
                               children=children, **kwargs, **extra)
    else:
        out = _jitted(False)(weights, inputs, world.k_pool, world.v_pool, **kwargs)
    out = jax.device_get(out)
    return {"hidden": np.asarray(out.hidden), "logits": np.asarray(out.logits),
            "k_pool": np.asarray(out.k_pool), "v_pool": np.asarray(out.v_pool),
            "expert_load": np.asarray(out.expert_load)}


def torch_batch(world: World, *, dtype, device, pools: Optional[tuple] = None) -> ForwardBatch:
    """The world as a ForwardBatch on ``device``. ``pools``: ``(req_to_token, KVPool)`` to use
    instead of fresh copies of the world's (a CUDA-graph runner's own pools)."""
    case = world.case

    def t(x):  # a copy: a run must never write into the world's arrays
        return None if x is None else torch.tensor(x, device=device)

    if pools is None:
        pools = (t(world.req_to_token), KVPool(t(world.k_pool).to(dtype),
                                               t(world.v_pool).to(dtype)))
    seq_lens = torch.tensor(world.seq_lens)
    batch = ForwardBatch(
        forward_mode=ForwardMode[case.mode], batch_size=len(world.seq_lens),
        input_ids=t(world.input_ids), positions=t(world.positions),
        out_cache_loc=t(world.out_cache_loc), req_pool_indices=t(world.req_pool_indices),
        seq_lens=seq_lens.to(device), seq_lens_cpu=seq_lens,
        num_token_non_padded=world.num_token_non_padded, req_to_token=pools[0],
        kv_pool=pools[1])
    if case.mode == "EXTEND":
        lens, prefix = torch.tensor(world.extend_lens), torch.tensor(world.prefix_lens)
        batch.extend_seq_lens, batch.extend_seq_lens_cpu = lens.to(device), lens
        batch.extend_prefix_lens, batch.extend_prefix_lens_cpu = prefix.to(device), prefix
        batch.extend_start_loc = (torch.cumsum(lens, 0) - lens).to(device)
        batch.extend_num_tokens = int(lens.sum())
    if case.mode == "TARGET_VERIFY":
        batch.spec_info = VerifyInput(
            draft_token_num=case.draft_token_num, draft_tokens=t(world.input_ids),
            positions=t(world.positions), custom_mask=t(world.custom_mask))
    return batch


def run_torch(world: World, model: MoEModel, *, tbo: bool, dtype=torch.float32,
              make_backend=TorchAttnBackend) -> dict:
    """The PyTorch model's outputs, plain or with two-batch overlap, on the model's device,
    with ``make_backend``'s attention (the reference by default)."""
    batch = torch_batch(world, dtype=dtype, device=model.embed.device)
    backend = TboAttnBackend(make_backend)
    if tbo:
        batch = TboForwardBatchPreparer().prepare(batch)
    backend.init_forward_metadata(batch)
    out = model(batch, backend)
    pool = batch.kv_pool
    return {name: value.float().cpu().numpy() for name, value in (
        ("hidden", out.hidden), ("logits", out.logits), ("k_pool", pool.k),
        ("v_pool", pool.v))} | {"expert_load": out.expert_load.cpu().numpy()}


def bf16_oracle_inputs(world: World, weights: dict) -> tuple:
    """(world, weights) rounded to bfloat16 and back, except the float32 router: what a bf16
    model holds, so that the float32 spec computes the same model without rounding."""

    def rounded(array):
        return torch.tensor(array).to(torch.bfloat16).float().numpy()

    held = {name: w if name.endswith("router") else rounded(w) for name, w in weights.items()}
    return dataclasses.replace(world, k_pool=rounded(world.k_pool),
                               v_pool=rounded(world.v_pool)), held


def make_models(seed: int = 0, *, dtype=torch.float32, device="cpu", **overrides) -> tuple:
    """(JAX config, torch config, numpy weights, torch model) from one set of fields."""
    ref_cfg = RefConfig(**overrides)
    torch_cfg = TorchConfig(**dataclasses.asdict(ref_cfg))
    weights = init_weights(ref_cfg, seed)
    return ref_cfg, torch_cfg, weights, MoEModel(torch_cfg, weights, dtype=dtype, device=device)


OUTPUTS = ("hidden", "logits", "k_pool", "v_pool")


def relative_errors(got: dict, want: dict, rows: Optional[slice] = None,
                    names=OUTPUTS) -> dict:
    """max|got - want| / max|want| for each float output (rows: token rows to compare)."""
    errors = {}
    for name in names:
        x, y = got[name].astype(np.float64), want[name].astype(np.float64)
        if rows is not None and name in ("hidden", "logits"):
            x, y = x[rows], y[rows]
        scale = max(float(np.abs(y).max(initial=0.0)), 1e-30)
        errors[name] = float(np.abs(x - y).max(initial=0.0)) / scale
    return errors


# --- one scenario, all comparisons (used by `tbo-parity run`) -------------------------------

BOUNDS = {"float32": 1e-5, "bfloat16": 2e-2}  # justified in parity_tests/test_model_parity.py


def run_oracle(world: World, cfg: RefConfig, weights: dict, dtype_name: str) -> dict:
    """The plain spec's outputs as the oracle of a ``dtype_name`` model: for bfloat16 the
    float32 spec fed the bf16-rounded weights and cache (``bf16_oracle_inputs``)."""
    if dtype_name == "bfloat16":
        world, weights = bf16_oracle_inputs(world, weights)
    return run_jax(world, cfg, weights)


def compare_case(world: World, ref_cfg: RefConfig, weights: dict, model: MoEModel,
                 dtype_name: str) -> dict:
    """Every comparison of one scenario: torch plain vs JAX, torch TBO vs torch plain, torch TBO
    vs JAX, and JAX TBO vs JAX plain; for bfloat16 the JAX oracle gets the bf16-rounded
    weights and cache. Returns the max relative error per pair (``<pair>``), per pair and
    tensor (``errors``), whether the expert loads agree (``expert_load_equal``), what failed
    (``failures``, one line each: pair, tensor, error against the bound, or the load) and
    ``ok``."""
    dtype = TORCH_DTYPES[dtype_name]
    if dtype_name == "bfloat16":
        world, weights = bf16_oracle_inputs(world, weights)
    spec_out = run_jax(world, ref_cfg, weights)
    spec_tbo = run_jax(world, ref_cfg, weights, tbo=True)
    plain = run_torch(world, model, tbo=False, dtype=dtype)
    tbo = run_torch(world, model, tbo=True, dtype=dtype)
    pairs = {"plain_vs_jax": (plain, spec_out), "tbo_vs_plain": (tbo, plain),
             "tbo_vs_jax": (tbo, spec_out), "jax_tbo_vs_jax": (spec_tbo, spec_out)}
    bound = BOUNDS[dtype_name]
    result = {"errors": {}, "failures": []}
    for name, (a, b) in pairs.items():
        errors = relative_errors(a, b)
        result["errors"][name] = errors
        result[name] = max(errors.values())
        result["failures"] += [f"{name} {tensor}: {error:.2e} > bound {bound:.0e}"
                               for tensor, error in errors.items() if error > bound]
        if not np.array_equal(a["expert_load"], b["expert_load"]):
            result["failures"].append(f"{name} expert_load: {a['expert_load'].tolist()} != "
                                      f"{b['expert_load'].tolist()}")
    result["expert_load_equal"] = not any("expert_load" in f for f in result["failures"])
    result["ok"] = not result["failures"]
    return result
