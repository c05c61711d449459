"""Expert parallelism on 2 and 4 gloo ranks (CPU processes): every rank's outputs equal the
single-device JAX spec on its own batch, and the exchange equals one device's dispatch.

Each launch runs the ranks as processes with a timeout and kills them all on failure, so no
test can hang (parity_tests/ep_parity.py). Bounds: float32, the model bound 1e-5
(parity_tests/test_model_parity.py): the sharded model computes the same float32 products as
one device, only batched per expert instead of per pair, so only the summation order differs
(measured <= 1.1e-6 for the model, <= 3.4e-7 for one layer).
"""

from __future__ import annotations

import tempfile

import pytest

from tbo_parity.parity_tests import background, ep_parity
from tbo_parity.parity_tests.model_parity import BOUNDS

LAUNCH_TIMEOUT_S = 240  # a 4-rank run takes about 40 s on a 2-core machine
DISPATCHERS = sorted(ep_parity.DEFAULT_DISPATCHERS)  # layout/transport pairs a CPU run checks
_launch = ep_parity.check_launch  # bound now: the launches run beside tests that monkeypatch it


def _launched(nproc: int, args=()) -> list:
    """``ep_parity.check_launch`` of ``nproc`` ranks with ``args`` (the ranks, then the spec
    in this process), as a background job runs it."""
    with tempfile.TemporaryDirectory(prefix=f"ep{nproc}-") as out_dir:
        return _launch(nproc, out_dir, args, timeout_s=LAUNCH_TIMEOUT_S,
                       base_env=background.environ(), stop=background.stopping)


# The launches run as background jobs (parity_tests/background.py): each takes 10 to 20 s of
# waiting on rank processes, which the tests before it fill.
for _n in (2, 4):
    background.job(f"ep-{_n}ranks", background.reads(__name__, fixture="reports", param=_n))(
        lambda n=_n: _launched(n))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def reports(request):
    n = request.param
    return n, background.result(f"ep-{n}ranks")


def _rows(reports, check):
    return [(r["rank"], row) for r in reports for row in r["rows"] if row["check"] == check]


def test_every_rank_reported(reports):
    n, reps = reports
    assert sorted(r["rank"] for r in reps) == list(range(n))
    assert all(r["world_size"] == n for r in reps)
    # the ranks run the PyTorch side only; the spec runs once per batch in this process
    assert not any(r["imported_jax"] for r in reps)


def test_sharded_layer_equals_one_device(reports):
    """dispatch -> local experts -> combine over the ranks == LocalDispatcher with all experts,
    for uniform and uneven routings, an expert that receives nothing, padding rows and a rank
    with no tokens."""
    _, reps = reports
    rows = _rows(reps, "layer")
    assert {row["name"] for _, row in rows} == {"uniform", "uneven", "empty-expert", "padding",
                                               "idle-rank"}
    assert {row["transport"] for _, row in rows} == set(ep_parity.DEFAULT_DISPATCHERS)
    for rank, row in rows:
        assert row["error"] <= BOUNDS["float32"], (rank, row)
    # the scenarios are what they say: nothing goes to expert 1, one rank sends no token
    assert all(row["pairs_to_expert_1"] == 0 for _, row in rows if row["name"] == "empty-expert")
    assert any(row["tokens"] == 0 for _, row in rows if row["name"] == "idle-rank")


def test_model_on_every_rank_equals_spec(reports):
    """Plain and TBO, DECODE / TARGET_VERIFY / EXTEND, an idle rank, an empty child A, every
    rank idle, every rank's child A empty, a padded batch: each rank's hidden states, logits,
    KV pools and expert load have the spec's shapes and equal the single-device spec's on that
    rank's batch."""
    n, reps = reports
    rows = _rows(reps, "model")
    names = {row["name"] for _, row in rows}
    assert names == set(ep_parity.model_scenarios(n))
    # both layouts, and the packed layout over both of its transports
    assert {row["transport"] for _, row in rows} == set(ep_parity.DEFAULT_DISPATCHERS)
    assert {row["tbo"] for _, row in rows} == {False, True}
    assert {row["mode"] for _, row in rows} == {"DECODE", "TARGET_VERIFY", "EXTEND", "IDLE"}
    for rank, row in rows:
        assert row["error"] <= BOUNDS["float32"], (rank, row)
        assert row["expert_load_equal"], (rank, row)
        assert row["shapes_equal"], (rank, row)
    assert any(row["zero_load_experts"] > 0 for _, row in rows if row["mode"] != "IDLE"), \
        "no scenario left an expert without tokens"


def test_every_rank_idle_at_once_completes_with_the_smallest_decode_step(reports):
    """No rank has a token, plain and TBO: the step completes on every rank (no rank left
    waiting in an exchange), with empty outputs and no expert load, as the spec gives. The
    agreed step is the rule's for no busy rank: capacity = the largest micro-batch (0) raised
    to the smallest legal one, 1; the layout IDLE's own, decode (IDLE is DECODE at
    ``real_bs = 0``, docs/spec.md); the micro-batches the caller's. Its other side, one idle
    rank among busy ones, is the ``idle-rank`` scenario above."""
    n, reps = reports
    rows = [(rank, row) for rank, row in _rows(reps, "model") if row["name"] == "all-idle"]
    assert sorted((rank, row["tbo"], row["transport"]) for rank, row in rows) == \
        [(r, tbo, d) for r in range(n) for tbo in (False, True) for d in DISPATCHERS]
    for rank, row in rows:
        assert (row["mode"], row["tokens"]) == ("IDLE", 0), (rank, row)
        assert (row["capacity"], row["micro_batches"], row["strategy"]) == \
            (1, 2 if row["tbo"] else 1, "decode"), (rank, row)
        assert row["shapes_equal"] and row["expert_load_equal"], (rank, row)
        assert row["error"] == 0.0, (rank, row)  # nothing to compute: exactly the spec's


def test_every_rank_with_an_empty_micro_batch_at_once_equals_spec(reports):
    """One sequence per rank: under TBO child A (micro-batch 0) is empty on every rank at once
    (docs/spec.md, split case 11), so every rank sends nothing in micro-batch 0's exchanges
    and receives nothing; child B carries all tokens. Plain and TBO, every rank's outputs equal
    the spec's, at the capacity of the largest rank's batch (3 TARGET_VERIFY tokens; rank 0's
    one DECODE token sits below it)."""
    n, reps = reports
    rows = [(rank, row) for rank, row in _rows(reps, "model")
            if row["name"] == "all-child-a-empty"]
    assert sorted((rank, row["tbo"], row["transport"]) for rank, row in rows) == \
        [(r, tbo, d) for r in range(n) for tbo in (False, True) for d in DISPATCHERS]
    for rank, row in rows:
        assert row["tokens"] == (3 if rank % 2 else 1), (rank, row)
        assert row["child_tokens"] == ([0, row["tokens"]] if row["tbo"] else None), (rank, row)
        assert (row["capacity"], row["micro_batches"], row["strategy"]) == \
            (3, 2 if row["tbo"] else 1, "decode"), (rank, row)
        assert row["shapes_equal"] and row["expert_load_equal"], (rank, row)
        assert row["error"] <= BOUNDS["float32"], (rank, row)


def test_the_transports_of_a_layout_agree_bit_for_bit(reports):
    """Within a layout every transport delivers the same bytes to the same rows, so the layer
    outputs are equal bit for bit: packed over the fixed-region all-to-all and over the exact
    one (only real rows moved, counts read on the host)."""
    _, reps = reports
    rows = _rows(reps, "layer-transports")
    assert {row["layout"] for _, row in rows} == {"packed", "capacity"}
    assert all(row["transports"] == 2 for _, row in rows if row["layout"] == "packed")
    assert all(row["bitwise_equal"] for _, row in rows), rows


# The negative tests share one launch: each fault is planted in the dispatchers of its own
# layout on rank 0, so each test reads the rows of its layout's transports only.
@background.job("ep-faults", background.reads(__name__, "test_a_count_one_row_short_is_caught",
                                              "test_a_misrouted_exchange_is_caught"))
def _faults_launch() -> list:
    return _launched(2, ["--fault=counts_short", "--fault=rotate_destinations",
                         "--dispatchers=packed/all_to_all,packed/exact,capacity/all_to_all",
                         "--scenarios=decode,extend"])


def _faulty_rows(reps, check: str, transport: str) -> list:
    """The rows of one check and transport that hold work (tokens; a mode other than IDLE)."""
    return [row for _, row in _rows(reps, check) if row["transport"] == transport
            and (row["tokens"] if check == "layer" else row["mode"] != "IDLE")]


def test_a_count_one_row_short_is_caught():
    """Negative test for the packed layout: rank 0 reports one row fewer for its first
    non-empty (destination, local expert), so that expert's last row is never computed and
    the rows after it are filed under the wrong expert. Both transports, layer and model."""
    reps = background.result("ep-faults")
    for transport in ("packed/all_to_all", "packed/exact"):
        for check in ("layer", "model"):
            rows = _faulty_rows(reps, check, transport)
            assert any(row["error"] > BOUNDS["float32"] for row in rows), (transport, check)


def test_a_misrouted_exchange_is_caught():
    """Negative test: rank 0 sends each destination the block meant for the next rank. The
    layer and model checks must both see it."""
    reps = background.result("ep-faults")
    for check in ("layer", "model"):
        rows = _faulty_rows(reps, check, "capacity/all_to_all")
        assert any(row["error"] > BOUNDS["float32"] for row in rows), check


def test_launch_reports_a_failing_rank_and_kills_the_rest(tmp_path):
    with pytest.raises(RuntimeError, match="rank"):
        ep_parity.launch(2, str(tmp_path), ["--device=bogus"], timeout_s=LAUNCH_TIMEOUT_S)


def test_launch_rejects_bad_nproc(tmp_path):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="nproc"):
            ep_parity.launch(bad, str(tmp_path), timeout_s=1)


GPU_DISPATCHERS = ("packed/all_to_all", "packed/exact", "capacity/all_to_all",
                   "capacity/copy_engine")


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_two_gpus_both_transports_eager_and_graphs(tmp_path):
    """On 2 GPUs (NCCL): the same checks with every transport of both layouts, plus CUDA-graph
    replay (plain and TBO, DECODE and TARGET_VERIFY, every rank replaying the largest rank's
    graph) for every capturable one; the transports' layer outputs bit for bit equal within a
    layout."""
    reps = ep_parity.check_launch(2, str(tmp_path), ["--device=cuda",
                                                     f"--dispatchers={','.join(GPU_DISPATCHERS)}",
                                                     "--graphs"], timeout_s=LAUNCH_TIMEOUT_S)
    for check in ("layer", "model", "graph"):
        rows = _rows(reps, check)
        want = {d for d in GPU_DISPATCHERS if check != "graph" or not d.endswith("/exact")}
        assert {row["transport"] for _, row in rows} == want
        for rank, row in rows:
            assert row["error"] <= BOUNDS["float32"], (rank, row)
            assert row.get("expert_load_equal", True), (rank, row)
    assert {row["tbo"] for _, row in _rows(reps, "graph")} == {False, True}
    assert all(row["bitwise_equal"] for _, row in _rows(reps, "layer-transports"))
