"""The pure parts of ``benchmarks/overlap.py``'s report: the replayed-graph timeline built from
a kernel trace, the crossover, bit-identity across launches and the targets' verdicts.
Synthetic inputs, so every expected value is worked out here by hand."""

from __future__ import annotations

from tbo_parity.benchmarks import overlap as ob

NAMES = [["prep"], ["core"], ["launch"]]


def kernel(name, ts, dur, stream=7):
    return {"name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_graph_intervals_attribute_kernels_to_the_marked_stage():
    """Two stages of A then one of B; kernels on any stream belong to the stage whose marker
    last started before them; NCCL kernels are the exchanges, labelled in capture order."""
    kernels = [
        kernel("spin_kernel", 0, 1), kernel("gemm", 2, 10), kernel("copy", 13, 2, stream=9),
        kernel("spin_kernel", 20, 1), kernel("attn", 22, 8, stream=11),
        kernel("ncclDevKernel_SendRecv", 25, 30, stream=13),
        kernel("spin_kernel", 40, 1), kernel("gemm", 42, 4),
    ]
    stages = [(0, 0), (0, 1), (1, 0)]
    exchanges = [("dispatch", 0), ("dispatch (layout)", 0)]  # the layout permute is no NCCL
    got = ob.graph_intervals(sorted(kernels, key=lambda k: k["ts"]), stages, exchanges, NAMES)
    compute = [i for i in got["intervals"] if i["lane"] == "compute"]
    comm = [i for i in got["intervals"] if i["lane"] == "comm"]
    assert [(i["label"], i["start_ms"], i["end_ms"]) for i in compute] == [
        ("a0: prep", 0.002, 0.015), ("a1: core", 0.022, 0.030), ("b0: prep", 0.042, 0.046)]
    assert [(i["micro_batch"], i["label"], i["start_ms"], i["end_ms"]) for i in comm] == [
        ("a", "dispatch", 0.025, 0.055)]
    assert got["step_ms"] == 0.055 and got["nccl_kernels"] == 1 and got["exchanges"] == 1


def test_graph_intervals_refuse_a_trace_whose_markers_do_not_match():
    kernels = [kernel("spin_kernel", 0, 1), kernel("gemm", 2, 10)]
    got = ob.graph_intervals(kernels, [(0, 0), (1, 0)], [], NAMES)
    assert got == {"error": "1 marker kernels for 2 stages"}


def test_graph_intervals_leave_out_exchanges_they_cannot_match():
    """Two exchanges noted at capture but one NCCL kernel in the trace: no comm lane rather
    than a wrong one."""
    kernels = [kernel("spin_kernel", 0, 1), kernel("ncclKernel", 2, 5)]
    got = ob.graph_intervals(kernels, [(0, 0)], [("dispatch", 0), ("combine", 0)], NAMES)
    assert not [i for i in got["intervals"] if i["lane"] == "comm"]


def row(tokens, speedup, link="network", context=2048, transport="all_to_all",
        layout="packed", **extra):
    return {"link": link, "context": context, "layout": layout, "transport": transport,
            "tokens": tokens, "speedup": speedup} | extra


def test_crossover_is_the_first_count_from_which_tbo_always_wins():
    rows = [row(32, 0.9), row(128, 1.1), row(256, 0.99), row(512, 1.2), row(1024, 1.3),
            row(32, 1.5, link="nvlink"), row(64, 0.5, link="nvlink")]
    assert ob.crossover(rows) == {"network/2048/packed/all_to_all": 512,
                                  "nvlink/2048/packed/all_to_all": None}


def test_bitwise_compares_every_transport_on_every_link():
    digests = {"nvlink": {"2048/32/capacity/all_to_all": "x",
                          "2048/32/capacity/copy_engine": "x",
                          "2048/64/capacity/all_to_all": "y", "2048/64/packed/all_to_all": "w"},
               "network": {"2048/32/capacity/all_to_all": "x",
                           "2048/64/capacity/all_to_all": "z",
                           "2048/64/packed/exact": "w"}}
    assert ob.bitwise(digests) == {"2048/32/capacity": True, "2048/64/capacity": False,
                                   "2048/64/packed": True}
    # one run of a key compares nothing: neither equal nor different
    alone = ob.bitwise({"nvlink": {"2048/32/packed/all_to_all": "x"}})
    assert alone == {"2048/32/packed": None}
    report = {"decode": [], "prefill": [], "bitwise": alone, "experts": [],
              "env": {"world_size": 1, "experts_per_rank": 8}}
    verdict = {t["target"]: t["met"] for t in ob.targets(report)}
    assert verdict["logits bit for bit equal across transports and links"] is None


def test_targets_are_met_missed_or_not_measured():
    decode = [row(256, 1.3, hidden_fraction=0.9, limit_ratio=1.05),
              row(512, 1.2, hidden_fraction=0.7, limit_ratio=1.2),
              row(32, 0.5, hidden_fraction=0.1, limit_ratio=2.0)]  # below 256: not judged
    report = {"decode": decode, "prefill": [], "bitwise": {"2048/256": True},
              "env": {"world_size": 2, "experts_per_rank": 8}, "experts": []}
    verdicts = {t["target"]: t["met"] for t in ob.targets(report)}
    decode_graphs = "network, decode graphs, T >= 256: "
    assert verdicts[decode_graphs + "TBO >= 1.25x plain"] is False  # 1.2x at 512 misses
    assert verdicts[decode_graphs + "TBO <= 1.10x max(compute, comm)"] is False
    assert verdicts[decode_graphs + "hidden fraction >= 0.8"] is False
    assert verdicts["nvlink, prefill, T >= 4096: TBO no slower than plain"] is None  # none run
    assert verdicts["logits bit for bit equal across transports and links"] is True
    good = {"decode": decode[:1], "prefill": [], "bitwise": {}, "experts": [],
            "env": {"world_size": 2, "experts_per_rank": 8}}
    assert all(t["met"] in (True, None) for t in ob.targets(good))


def step_row(tokens, layout, ms, transport="all_to_all"):
    return row(tokens, 1.0, layout=layout, transport=transport, compute_plain_ms=ms,
               compute_ms=ms, plain_ms=ms, tbo_ms=ms)


def expert_row(tokens, layout, grouped, real_tflops, computed_tflops, weight_gb_per_s=0.0):
    return {"link": "network", "layout": layout, "tokens": tokens, "grouped_gemm": grouped,
            "real_pairs": 10, "rows_computed": 10 if grouped else 300, "local_experts": 2,
            "real_tflops": real_tflops, "computed_tflops": computed_tflops,
            "weight_gb_per_s": weight_gb_per_s}


def test_layout_ratios_pair_each_packed_row_with_its_capacity_twin():
    """Packed over capacity at the same (link, context, T), all_to_all only; a T measured in
    one layout alone, or another transport, has no ratio."""
    decode = [step_row(32, "packed", 1.0), step_row(32, "capacity", 4.0),
              step_row(64, "packed", 3.0), step_row(1024, "capacity", 2.0),
              step_row(32, "capacity", 0.5, transport="copy_engine")]
    got = ob.layout_ratios(decode)
    assert [(r["tokens"], r["plain_ms"], r["tbo_ms"]) for r in got] == [(32, 0.25, 0.25)]


def test_layout_targets_judge_each_figure_against_its_bound():
    """The compute ratio (judged at 2 ranks, 8 experts per rank, T=1024, bound 0.75), the
    real-row TFLOPS against 70% of the bmm's, the weight bandwidth against 60% of the copy
    bandwidth (judged only from 128 experts per rank), no slower at T=32; each on both sides
    of its bound."""
    def verdicts(env, decode, experts, copy=None):
        report = {"env": env, "decode": decode, "experts": experts,
                  "copy_bandwidth": {"gb_per_s": copy} if copy else None}
        return [t["met"] for t in ob.layout_targets(report)]

    env = {"world_size": 2, "experts_per_rank": 8}
    ok = [step_row(1024, "packed", 0.74), step_row(1024, "capacity", 1.0),
          step_row(32, "packed", 1.0), step_row(32, "capacity", 1.0)]
    fast = [expert_row(1024, "packed", True, 71.0, 71.0), expert_row(1024, "capacity", False,
                                                                     25.0, 100.0)]
    assert verdicts(env, ok, fast) == [True, True, True, None, True]
    slow = [step_row(1024, "packed", 0.76), step_row(1024, "capacity", 1.0),
            step_row(32, "packed", 1.01), step_row(32, "capacity", 1.0)]
    weak = [expert_row(1024, "packed", False, 69.0, 69.0), expert_row(1024, "capacity", False,
                                                                      25.0, 100.0)]
    assert verdicts(env, slow, weak) == [False, False, False, None, False]
    assert verdicts({"world_size": 1, "experts_per_rank": 8}, slow, [])[1] is None
    big = {"world_size": 2, "experts_per_rank": 128}
    streaming = [expert_row(32, "packed", True, 1.0, 1.0, weight_gb_per_s=599.0),
                 expert_row(256, "packed", True, 1.0, 1.0, weight_gb_per_s=600.0)]
    assert verdicts(big, [], streaming, copy=1000.0)[3] is False
    assert verdicts(big, [], streaming[1:], copy=1000.0)[3] is True
    assert verdicts(big, [], streaming, copy=None)[3] is None
