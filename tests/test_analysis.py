"""insight.analysis on synthetic runs with known numbers (tests/synthetic_runs.py)."""
import json

import numpy as np
import pandas as pd
import pytest

import insight.analysis as A
from insight.trace import TraceError, open_run
from synthetic_runs import (MB, input_share_run, set_manifest, training_run, truncate, write_manifest,
                            write_table)

SLOW_MAP = (
    {"op_id": 0, "op_type": "batch", "parent_id": -1, "num_workers": 1, "queue_capacity": 16, "depths": [0, 0, 1]},
    {"op_id": 1, "op_type": "map", "parent_id": 0, "num_workers": 1, "queue_capacity": 16, "depths": [0, 1]},
    {"op_id": 2, "op_type": "numpy_slices", "parent_id": 1, "num_workers": 1, "queue_capacity": 16, "depths": [16, 15]},
)
SLOW_SOURCE = (
    {"op_id": 0, "op_type": "batch", "parent_id": -1, "num_workers": 1, "queue_capacity": 16, "depths": [0, 0, 2]},
    {"op_id": 1, "op_type": "map", "parent_id": 0, "num_workers": 4, "queue_capacity": 16, "depths": [0, 1]},
    {"op_id": 2, "op_type": "numpy_slices", "parent_id": 1, "num_workers": 1, "queue_capacity": 16, "depths": [0, 1, 0]},
)


@pytest.fixture
def run(tmp_path):
    return training_run(tmp_path, "r", allreduce_us=300, empty_steps=(3,))


def test_breakdown_sums_to_step_time_with_known_parts(run):
    bd = A.step_breakdown(run.path)
    assert list(bd["step"]) == run.steps
    parts = bd["iteration_interval_ns"] + bd["fp_bp_ns"] + bd["tail_ns"]
    assert (parts == bd["step_time_ns"]).all()
    np.testing.assert_allclose(bd["iteration_interval_ms"] + bd["fp_bp_ms"] + bd["tail_ms"], bd["step_time_ms"])
    assert list(bd["step_time_ns"]) == run.step_time_ns
    assert list(bd["iteration_interval_ns"]) == run.interval_ns  # the first one from begin_ns
    assert (bd["fp_bp_ns"] == run.fp_bp_ns).all() and (bd["tail_ns"] == run.tail_ns).all()
    assert (bd["allreduce_ns"] == run.allreduce_ns).all() and (bd["allreduce_ms"] == 0.3).all()
    assert bd["fp_start_op"].iloc[0] == "conv2d_1" and bd["bp_end_op"].iloc[0] == "conv2d_grad_5"


def test_summary_excludes_the_first_step(run):
    s = A.step_summary(run.path)
    assert s.steps == 5 and s.steps_averaged == 4 and s.excluded_steps == [1]
    assert s.iteration_interval_ms == pytest.approx(1.0)  # the 5 ms first interval is left out
    assert s.fp_bp_ms == pytest.approx(2.1) and s.tail_ms == pytest.approx(0.3)
    assert s.step_time_ms == pytest.approx(3.4) and s.allreduce_ms == pytest.approx(0.3)
    assert (s.fp_start_op, s.bp_end_op) == ("conv2d_1", "conv2d_grad_5")
    # device busy = the union of aicore0 and comm kernels (not the GetNext wait): fp/bp 2.1 + tail 0.3 of 3.4 ms
    assert s.device_utilization == pytest.approx(2.4 / 3.4)


def test_single_step_and_steps_not_starting_at_one(tmp_path):
    one = A.step_summary(training_run(tmp_path, "one", n_steps=1).path)
    assert one.steps == one.steps_averaged == 1 and one.excluded_steps == []
    assert one.iteration_interval_ms == pytest.approx(5.0)
    late = A.step_breakdown(training_run(tmp_path, "late", first_step=1000, n_steps=3).path)
    assert list(late["step"]) == [1000, 1001, 1002]


def test_op_table_totals_equal_task_durations_and_shares_sum_to_one(run):
    ops = A.op_stats(run.path)
    types = A.op_type_stats(run.path)
    assert ops["total_ns"].sum() == run.task_total_ns == types["total_ns"].sum()
    assert ops["share"].sum() == pytest.approx(1.0) and types["share"].sum() == pytest.approx(1.0)
    assert ops["calls"].sum() == run.n_tasks
    conv = ops.set_index("name").loc["conv2d_1"]
    assert (conv["op"], conv["calls"], conv["scope"], conv["shapes"], conv["dtypes"]) == (
        "conv2d", 5, "LeNet/conv1", "32x16x8x8", "float32")
    assert conv["avg_ms"] == pytest.approx(0.4) and conv["min_ms"] == conv["max_ms"] == pytest.approx(0.4)
    assert conv["flops"] == 5 * 2_000_000 and conv["flop_per_s"] == pytest.approx(2e6 / 0.4e-3)
    mm = types.set_index("op").loc["matmul"]  # two ops of one type
    assert (mm["ops"], mm["calls"]) == (2, 10) and mm["total_ms"] == pytest.approx(4.0)
    gn = ops.set_index("name").loc["GetNext"]
    assert gn["max_ms"] == pytest.approx(2.5) and gn["min_ms"] == pytest.approx(0.5)
    kernels = A.op_stats(run.path, kinds=("kernel",))
    assert "GetNext" not in set(kernels["name"]) and kernels["share"].sum() == pytest.approx(1.0)


def test_op_time_per_step_and_top_n(run):
    per = A.op_time_per_step(run.path, "conv2d_1")
    assert list(per["step"]) == run.steps and (per["calls"] == 1).all() and np.allclose(per["total_ms"], 0.4)
    assert A.op_time_per_step(run.path, "matmul", by="op")["calls"].tolist() == [2] * 5
    ops = A.op_stats(run.path)
    top = A.top_n(ops, 3, other=True)
    assert len(top) == 4 and top["name"].iloc[-1] == "(other)"
    assert top["total_ms"].sum() == pytest.approx(ops["total_ms"].sum())
    assert top["share"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("share,klass", [(0.04, "not"), (0.10, "moderately"), (0.30, "highly")])
def test_input_bound_classes(tmp_path, share, klass):
    r = input_share_run(tmp_path, f"in{share}", share)
    p = A.data_pipeline(r.path)
    assert p.input_share == pytest.approx(share, abs=1e-3)
    assert p.input_bound == klass
    ids = {x.id for x in A.recommendations(r.path)}
    assert ("input_bound" in ids) == (klass != "not")


def test_input_share_counts_input_copies_after_fp_start(tmp_path):
    r = training_run(tmp_path, "h2d", h2d_us=500, fwd=(("conv2d_1", "conv2d", 1000, "N"),),
                     bwd=(("conv2d_grad_2", "conv2d_grad", 1000, "N"),), upd=(), interval_us=500)
    # (0.5 interval + 0.5 copy) / (0.5 + 2.5) ms
    assert A.step_summary(r.path).input_share == pytest.approx(1.0 / 3.0)


def test_pipeline_flags_the_slow_map_op(tmp_path):
    r = training_run(tmp_path, "slowmap", pipeline=SLOW_MAP)
    p = A.data_pipeline(r.path)
    ops = p.ops.set_index("op_id")
    assert ops.loc[1, "flagged"] and not ops.loc[0, "flagged"] and not ops.loc[2, "flagged"]
    assert ops.loc[1, "queue_usage"] == pytest.approx(0.5 / 16) and ops.loc[1, "child_usage"] == pytest.approx(15.5 / 16)
    # root depths cycle 0,0,1 over 100 samples; the 2 leading (start-up) and 1 trailing (drain) zeros
    # do not count: 64 empty of 97
    assert p.host_queue_samples == 97 and p.host_queue_empty_ratio == pytest.approx(64 / 97)
    assert p.verdict == "data_processing"
    assert (p.bottleneck_op_id, p.bottleneck_op_type) == (1, "map")
    assert any("map op #1" in a and "num_parallel_workers" in a for a in p.advice)
    rec = {x.id: x for x in A.recommendations(r.path)}["data_processing"]
    assert "map op #1" in rec.title and rec.value == pytest.approx(64 / 97) and rec.threshold == 0.3
    assert rec.severity == "critical"


def test_pipeline_flags_a_slow_source_and_the_consumer_case(tmp_path):
    p = A.data_pipeline(training_run(tmp_path, "slowsrc", pipeline=SLOW_SOURCE).path)
    ops = p.ops.set_index("op_id")
    assert ops.loc[2, "flagged"] and "< 0.6" in ops.loc[2, "reason"] and not ops.loc[1, "flagged"]
    assert (p.verdict, p.bottleneck_op_type) == ("data_processing", "numpy_slices")
    assert any("faster source" in a for a in p.advice)
    full = A.data_pipeline(training_run(tmp_path, "full").path)  # every queue >= 0.8 by default
    assert full.consumer_bottleneck and full.verdict == "none" and full.bottleneck_op_id is None
    assert not full.ops["flagged"].any() and any("consumer" in a for a in full.advice)


def test_device_queue_empty_means_data_transfer(run):
    p = A.data_pipeline(run.path)
    assert p.verdict == "data_transfer" and (p.device_queue_empty_pops, p.device_queue_pops) == (1, 4)
    dq = p.device_queue.set_index("step")
    assert dq.loc[3, "empty"] == 1 and dq["empty"].sum() == 1 and (dq["pops"] == 1).all()
    assert dq.loc[3, "get_wait_ms"] == pytest.approx(0.5)
    assert any("prefetch size" in a for a in p.advice)


def _host_queue_at_getnext(r, empty_steps, busy_depth=8, others=(10, 10)):
    """Rewrite the run's queue samples: one root-queue sample inside every step's GetNext wait, empty in
    ``empty_steps`` (the pipeline had no batch then), ``busy_depth`` batches elsewhere."""
    bd = A.step_breakdown(r.path)
    rows = []
    for b in bd.itertuples():
        t = int(b.fp_start_ns) - 100_000
        rows.append({"pipeline_id": 0, "op_id": 0, "t_ns": t, "depth": 0 if b.step in empty_steps else busy_depth,
                     "capacity": 16})
        for op, depth in zip((1, 2), others):
            rows.append({"pipeline_id": 0, "op_id": op, "t_ns": t, "depth": depth, "capacity": 16})
    write_table(r.path, "dataset_queues", pd.DataFrame(rows).astype(
        {"pipeline_id": np.int32, "op_id": np.int32, "depth": np.int32, "capacity": np.int32}))


def test_one_verdict_with_a_noise_floor(tmp_path):
    """input-bound: not, and GetNext found the queue empty once in 200 steps: not a bottleneck (the demo's
    "input-bound: not (4.0%)" beside "verdict: data transfer is the bottleneck" is gone)."""
    r = input_share_run(tmp_path, "quiet", 0.03, n_steps=201, empty_steps=(50,))
    p = A.data_pipeline(r.path)
    assert (p.device_queue_empty_pops, p.device_queue_pops) == (1, 200)
    assert p.input_bound == "not" and p.verdict == "none" and "1%" in p.verdict_reason
    ids = {x.id for x in A.recommendations(r.path)}
    assert not ids & {"data_transfer", "data_processing", "input_bound"}
    # two empties in 100 steps is over the floor
    r2 = input_share_run(tmp_path, "two", 0.03, n_steps=101, empty_steps=(20, 70))
    assert A.data_pipeline(r2.path).verdict == "data_transfer"


def test_getnext_waits_are_attributed_by_the_host_queue(tmp_path):
    # the host queue is empty in only 3 of 20 samples (15% < 30%), but exactly when GetNext waited: the pipeline
    # had no batch -- data processing, not transfer
    r = training_run(tmp_path, "starved", n_steps=20, empty_steps=(5, 9, 13))
    _host_queue_at_getnext(r, (5, 9, 13))
    p = A.data_pipeline(r.path)
    assert p.host_queue_empty_ratio == pytest.approx(3 / 20) and p.device_queue_empty_pops == 3
    assert (p.empty_pops_host_empty, p.empty_pops_host_ready) == (3, 0)
    assert p.verdict == "data_processing" and "waited while the host queue was empty" in p.verdict_reason
    rec = {x.id: x for x in A.recommendations(r.path)}["data_processing"]
    assert rec.value == pytest.approx(3 / 19) and rec.threshold == 0.01
    # the same waits with batches on the host: they had not reached the device -- transfer
    r2 = training_run(tmp_path, "slowcopy", n_steps=20, empty_steps=(5, 9, 13))
    _host_queue_at_getnext(r2, ())
    p2 = A.data_pipeline(r2.path)
    assert (p2.empty_pops_host_empty, p2.empty_pops_host_ready) == (0, 3) and p2.verdict == "data_transfer"


def test_a_starved_host_queue_seen_full_once_is_still_data_processing(tmp_path):
    """Why test_profiled_slow_map_is_input_bound_and_named failed on a loaded machine: the host queue of a slow
    map is almost always empty; when the sampler caught a batch in it once (the feeder thread late to pop it),
    "from its first batch to its last" shrank to that one sample, the empty ratio dropped to 0% and the old
    rules said data transfer. The window now spans the GetNext calls that waited, and the waits, attributed by
    the host queue during them, say data processing too."""
    steps = tuple(range(1, 21))
    r = training_run(tmp_path, "starved", n_steps=20, empty_steps=steps, pipeline=SLOW_MAP)
    # one sample catches a batch, in step 11; the map's output queue is empty, the source's full
    _host_queue_at_getnext(r, set(steps) - {11}, busy_depth=1, others=(0, 15))
    p = A.data_pipeline(r.path)
    # steps 2..20 (the first step is left out, as everywhere): 18 empty of 19, not 0% of 1
    assert p.host_queue_samples == 19 and p.host_queue_empty_ratio == pytest.approx(18 / 19)
    assert (p.empty_pops_host_empty, p.empty_pops_host_ready) == (18, 1)
    assert p.verdict == "data_processing" and (p.bottleneck_op_type, p.bottleneck_op_id) == ("map", 1)


@pytest.mark.parametrize("kw", [dict(pipeline=SLOW_MAP), dict(empty_steps=(3,)), dict(), dict(pipeline=None, sink=False),
                                dict(empty_steps=(2, 3, 4), interval_us=20, first_interval_us=20)])
def test_every_view_states_the_same_verdict(tmp_path, kw):
    from insight.cli import report_lines

    r = training_run(tmp_path, "v", **kw)
    ov = A.overview(r.path)
    p = ov.pipeline
    text = "\n".join(report_lines(r.path))
    assert f"verdict: {p.verdict_text[0].lower() + p.verdict_text[1:]}" in text
    ids = {x.id for x in ov.advice}
    assert ("data_processing" in ids) == (p.verdict == "data_processing")
    assert ("data_transfer" in ids) == (p.verdict == "data_transfer")
    if p.verdict in ("data_processing", "data_transfer"):
        assert p.input_bound != "not" or (p.device_queue_empty_ratio or 0) >= 0.01


def test_pipeline_analyses_the_most_sampled_structure(tmp_path):
    from synthetic_runs import write_pipeline
    r = training_run(tmp_path, "two", pipeline=None)
    train = write_pipeline(r.path, SLOW_MAP, pipeline_ids=(0, 1))
    # an eval pipeline with another structure and fewer samples would be a different table; write both
    pipes = pd.concat([pd.read_parquet(r.path / train["dataset_pipeline"]),
                       pd.DataFrame([{"pipeline_id": 7, "op_id": 0, "op_type": "numpy_slices", "parent_id": -1,
                                      "num_workers": 1, "queue_capacity": 16}]).astype(
                           {c: np.int32 for c in ("pipeline_id", "op_id", "parent_id", "num_workers", "queue_capacity")})])
    write_table(r.path, "dataset_pipeline", pipes)
    p = A.data_pipeline(r.path)
    assert p.pipeline_ids == [0, 1] and list(p.ops["op_id"]) == [0, 1, 2] and p.bottleneck_op_id == 1


def test_memory_peak_and_live_tensors(run):
    pk = A.memory_peak(run.path)
    assert pk.peak_bytes == run.peak_bytes and pk.step == run.peak_step and pk.capacity == run.capacity
    assert set(pk.live["name"]) == set(run.peak_tensors) and pk.live_bytes == run.peak_bytes
    assert pk.live["name"].iloc[0] == "params" and pk.share_of_capacity == pytest.approx(run.peak_bytes / run.capacity)
    big = pk.live.set_index("name").loc["big_tensor"]
    assert (big["op"], big["size"], big["shape"], big["dtype"], big["scope"]) == (
        "conv2d_grad_5", 4 * MB, "32x32x8x8", "float32", "LeNet")
    assert pk.fragmentation == 0.0 and pk.untracked_bytes == 0  # contiguous live blocks: one free hole
    assert pk.allocations == 1 + 5 * 2 + 1 and pk.frees == 5 * 2 + 1


def test_memory_timeline_is_downsampled_with_the_peak_kept(tmp_path):
    r = training_run(tmp_path, "long", n_steps=800, peak_step=537, pipeline=None)
    tl = A.memory_timeline(r.path)
    assert 1000 < len(tl) <= 2002 and tl["t_ns"].is_monotonic_increasing
    assert tl["in_use"].max() == r.peak_bytes
    assert tl.loc[tl["in_use"].idxmax(), "step"] == 537
    assert len(A.memory_timeline(r.path, max_points=10_000)) == 1 + 800 * 4 + 2


def test_memory_by_kind_pool_and_planned(tmp_path):
    from synthetic_runs import POOL_KERNEL, POOL_QUEUE, POOL_WORKSPACE
    r = training_run(tmp_path, "pool", pool=True)
    assert A.memory_sources(r.path) == ["pool", "planned"]
    pk = A.memory_peak(r.path)  # the pool: what the device really held
    assert pk.source == "pool" and pk.peak_bytes == r.pool_peak_bytes
    assert set(pk.live["kind"]) == {"parameter", "activation_reserve", "kernel_pool", "queue"}
    assert pk.live.set_index("kind")["size"].to_dict() == {
        "parameter": 8 * MB, "activation_reserve": 9 * MB, "kernel_pool": POOL_KERNEL, "queue": POOL_QUEUE}
    assert pk.step in r.steps  # pool events carry no step: the step holding the peak's time
    # the plan's liveness is still there, labelled as such, and never added to the pool's blocks
    planned = A.memory_peak(r.path, source="planned")
    assert planned.source == "planned" and planned.peak_bytes == r.peak_bytes
    u = A.memory_usage(r.path, max_points=100_000)
    kinds = ["parameter", "activation_reserve", "workspace", "queue", "kernel_pool"]
    assert list(u.columns) == ["t_ns", "t_ms", *kinds, "untracked", "in_use"]
    assert (u[kinds].sum(axis=1) + u["untracked"] == u["in_use"]).all() and (u["untracked"] == 0).all()
    assert u["workspace"].max() == POOL_WORKSPACE and u["in_use"].max() == r.pool_peak_bytes
    pu = A.memory_usage(r.path, source="planned", max_points=100_000)
    assert list(pu.columns) == ["t_ns", "t_ms", "parameter", "activation", "untracked", "in_use"]
    assert pu["in_use"].max() == r.peak_bytes and pu["activation"].max() == r.peak_bytes - 8 * MB
    # an old run (no source column) is all planned; live tensors at a time come from one source
    old = training_run(tmp_path, "old")
    assert A.memory_sources(old.path) == ["planned"] and A.memory_peak(old.path).source == "planned"
    lt = A.memory_intervals(r.path)
    assert lt.source == "pool" and A.in_use_at(lt, pk.t_ns) == pk.peak_bytes
    assert A.live_at(lt, pk.t_ns)["size"].sum() == pk.peak_bytes


def test_fragmentation_from_offsets(tmp_path):
    run = tmp_path / "frag"
    rows = [("alloc", "a", 0, 100), ("alloc", "b", 100, 100), ("alloc", "c", 300, 100), ("free", "b", -1, 100)]
    in_use, recs = 0, []
    for k, (act, name, off, size) in enumerate(rows):
        in_use += size if act == "alloc" else -size
        recs.append({"t_ns": k, "action": act, "device": "device", "kind": "activation", "tensor": name, "op": "x",
                     "scope": "", "size": size, "offset": off, "in_use": in_use, "capacity": 1000, "step": 0,
                     "shape": "", "dtype": ""})
    write_table(run, "memory", pd.DataFrame(recs))
    write_manifest(run, {"memory": "rank_0/memory.parquet"})
    pk = A.memory_peak(run)
    # at the peak a, b, c are live at [0,200) and [300,400): holes 100 and 600 -> 1 - 600/700
    assert pk.peak_bytes == 300 and pk.fragmentation == pytest.approx(1 - 600 / 700)
    # bytes in use that no recorded allocation explains: the holes may not be free, so no figure
    pd.DataFrame(recs).assign(in_use=lambda d: d["in_use"] + 50).to_parquet(run / "rank_0" / "memory.parquet")
    pk = A.memory_peak(run)
    assert pk.untracked_bytes == 50 and pk.fragmentation is None


def test_recommendations_cite_their_numbers(tmp_path):
    r = training_run(tmp_path, "hot", allreduce_us=800, capacity=20 * MB, param_bytes=10 * MB)
    recs = {x.id: x for x in A.recommendations(r.path)}
    assert recs["peak_memory"].value == pytest.approx(r.peak_bytes / (20 * MB)) and recs["peak_memory"].threshold == 0.9
    assert "big_tensor" in recs["peak_memory"].detail
    comm = recs["communication"]
    assert comm.value == pytest.approx(0.8 / (1.0 + 2.1 + 0.8)) and comm.threshold == 0.1
    it = recs["iteration_interval"]
    assert it.value == pytest.approx(1.0) and it.threshold == 0.5 and "1.000 ms" in it.detail
    for x in recs.values():
        assert x.severity in ("critical", "warning", "info") and x.title and x.detail and x.metric
        assert isinstance(x.value, float) and isinstance(x.threshold, float)
    order = [x.severity for x in A.recommendations(r.path)]
    assert order == sorted(order, key=["critical", "warning", "info"].index)
    quiet = training_run(tmp_path, "quiet", interval_us=50, first_interval_us=50, pipeline=None, sink=False)
    ids = {x.id for x in A.recommendations(quiet.path)}
    assert not ids & {"iteration_interval", "input_bound", "peak_memory", "communication", "low_utilization"}


def test_low_utilisation(tmp_path):
    r = input_share_run(tmp_path, "idle", 0.6)
    rec = {x.id: x for x in A.recommendations(r.path)}["low_utilization"]
    # busy: 2 ms of kernels in a 5 ms step (the GetNext wait in the 3 ms interval does not count)
    assert rec.value == pytest.approx(2.0 / 5.0) and rec.threshold == 0.5


def test_compare_runs(tmp_path):
    a = training_run(tmp_path, "a")
    fwd_b = (("conv2d_1", "conv2d", 200, "LeNet/conv1"), ("relu_2", "relu", 100, "LeNet/relu"),
             ("softmax_9", "softmax", 50, "LeNet/sm"))
    bwd_b = (("matmul_grad_4", "matmul", 900, "G"), ("conv2d_grad_5", "conv2d_grad", 800, "G"))
    b = training_run(tmp_path, "b", fwd=fwd_b, bwd=bwd_b, n_steps=10)
    c = A.compare_runs(a.path, b.path)
    st = {m: (x, y) for m, x, y in zip(c.steps["metric"], c.steps["a"], c.steps["b"])}
    assert st["fp_bp_ms"] == pytest.approx((2.1, 2.05))
    ops = c.ops.set_index("op")
    assert ops.loc["softmax", "status"] == "added" and ops.loc["softmax", "ms_per_step_b"] == pytest.approx(0.05)
    assert ops.loc["conv2d", "status"] == "faster" and ops.loc["conv2d", "diff_ms"] == pytest.approx(-0.2)
    assert ops.loc["matmul", "status"] == "slower" and ops.loc["matmul", "diff_ms"] == pytest.approx(0.1)
    assert ops.loc["relu", "status"] == "same"
    c2 = A.compare_runs(b.path, a.path)
    assert c2.ops.set_index("op").loc["softmax", "status"] == "removed"
    assert (c.a, c.b) == ("a", "b")


ALL = [A.step_breakdown, A.step_summary, A.op_stats, A.op_type_stats, A.data_pipeline, A.memory_timeline,
       A.memory_peak, A.recommendations, lambda p: A.op_time_per_step(p, "conv2d_1"), lambda p: A.compare_runs(p, p)]


@pytest.mark.parametrize("fn", ALL)
def test_truncated_parquet_is_one_trace_error(tmp_path, fn):
    r = training_run(tmp_path, "bad")
    table = {A.memory_timeline: "memory", A.memory_peak: "memory"}.get(fn, "steps" if fn in (
        A.step_breakdown, A.step_summary, A.data_pipeline, A.recommendations, ALL[-1]) else "tasks")
    truncate(r.path / "rank_0" / f"{table}.parquet")
    with pytest.raises(TraceError) as e:
        fn(r.path)
    msg = str(e.value)
    assert "'bad'" in msg and f"rank_0/{table}.parquet" in msg and "\n" not in msg


def test_truncated_part_file_and_missing_column(tmp_path):
    r = training_run(tmp_path, "parts", parts=3)
    assert A.op_stats(r.path)["total_ns"].sum() == r.task_total_ns  # a run still recording reads fine
    truncate(r.path / "rank_0" / "tasks" / "part-00001.parquet")
    with pytest.raises(TraceError, match="part-00001"):
        A.op_stats(r.path)
    r2 = training_run(tmp_path, "nocol")
    p = r2.path / "rank_0" / "steps.parquet"
    pd.read_parquet(p).drop(columns=["fp_start_ns"]).to_parquet(p)
    with pytest.raises(TraceError, match="rank_0/steps.parquet has no column 'fp_start_ns'"):
        A.step_breakdown(r2.path)
    r3 = training_run(tmp_path, "badtype")
    p = r3.path / "rank_0" / "tasks.parquet"
    pd.read_parquet(p).assign(start_ns="soon").to_parquet(p)
    with pytest.raises(TraceError, match="column 'start_ns'"):
        A.op_stats(r3.path)


def test_missing_manifest_and_newer_schema(tmp_path):
    r = training_run(tmp_path, "m")
    set_manifest(r.path, schema_version=99)
    with pytest.raises(TraceError, match="schema version 99"):
        A.step_breakdown(r.path)
    (r.path / "manifest.json").unlink()
    for fn in ALL:
        with pytest.raises(TraceError, match="no manifest.json"):
            fn(r.path)


def test_absent_tables_give_empty_results(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    write_manifest(run, {})
    assert A.step_breakdown(run).empty and A.op_stats(run).empty and A.op_type_stats(run).empty
    s = A.step_summary(run)
    assert s.steps == 0
    p = A.data_pipeline(run)
    assert p.verdict == "unknown" and p.input_bound == "unknown" and p.ops.empty
    pk = A.memory_peak(run)
    assert pk.peak_bytes == 0 and pk.capacity == 64 * MB
    assert A.recommendations(run) == []
    assert A.memory_timeline(run).empty


def test_functions_accept_a_run_object(run):
    r = open_run(run.path)
    assert A.step_summary(r).steps == 5 and len(A.op_stats(r)) == 10
    assert json.loads((run.path / "manifest.json").read_text())["name"] == "r"


# -- integration: real runs recorded by insight.Profiler ---------------------------------------------------
def _profiler():
    import insight
    return insight.Profiler


class _StepEnds:
    """A callback recording perf_counter_ns at every step end: the measured step times."""

    def __init__(self):
        import time
        self.clock = time.perf_counter_ns
        self.t = []

    def __getattr__(self, name):  # begin/epoch_begin/... do nothing
        return lambda ctx: None

    def step_end(self, ctx):
        self.t.append(self.clock())


def _train_digits(run_dir, digits, *, map_fn, workers=2, n=None, epochs=2, seed=3):
    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.models import LeNetDigits

    xtr, ytr, _, _ = digits
    if n:
        xtr, ytr = xtr[:n], ytr[:n]
    context.set_context(mode=context.GRAPH_MODE, seed=seed)
    ds = (NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=seed)
          .map(map_fn, input_columns="image", num_parallel_workers=workers).batch(32, drop_remainder=True))
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    ends = _StepEnds()
    with _profiler()(output_path=run_dir):
        model.train(epochs, ds, callbacks=[ends], dataset_sink_mode=True)
    return ends


def _scale(x):
    return x * 2.0 - 1.0


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits):
    run = tmp_path_factory.mktemp("profiled") / "digits"
    ends = _train_digits(run, digits, map_fn=_scale)
    return run, ends.t


def test_profiled_digits_breakdown_matches_measured_step_time(digits_run):
    run, ends = digits_run
    bd = A.step_breakdown(run)
    assert len(bd) == len(ends) > 50
    assert (bd["iteration_interval_ns"] + bd["fp_bp_ns"] + bd["tail_ns"] == bd["step_time_ns"]).all()
    # measured: step end to step end by the training loop's clock (a step_end callback). The first
    # step is left out as in every average; so is the second, whose recorded interval rightly holds the
    # collectors' one-off work after the first step (reading the task table), which happens before the
    # first step_end callback and so is missing from the measured difference.
    measured = np.diff(np.asarray(ends, np.int64))[1:]
    recorded = bd["step_time_ns"].to_numpy()[2:]
    assert abs(recorded.sum() / measured.sum() - 1) < 0.02
    assert np.median(np.abs(recorded / measured - 1)) < 0.02
    s = A.summarize(bd)
    assert s.excluded_steps == [int(bd["step"].iloc[0])] and s.fp_start_op and s.bp_end_op
    assert 0 < s.device_utilization <= 1


def test_profiled_digits_op_table_and_chrome_export(digits_run, tmp_path):
    run, _ = digits_run
    tasks = pd.read_parquet(run / "rank_0" / "tasks")  # a profiled run's table: a directory of part files
    work = tasks[~tasks["kind"].isin(["event_record", "event_wait"])]
    ops = A.op_stats(run)
    assert ops["total_ns"].sum() == (work["end_ns"] - work["start_ns"]).sum()
    assert ops["calls"].sum() == len(work) and ops["share"].sum() == pytest.approx(1.0)
    assert A.op_type_stats(run)["total_ns"].sum() == ops["total_ns"].sum()
    from insight.export import export_chrome
    export_chrome(run, tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] not in ("step", "step_phase", "host_op")]
    assert len(xs) == len(tasks)
    flows = [e for e in doc["traceEvents"] if e["ph"] == "f"]
    assert len(flows) >= len(A.step_breakdown(run)) - 1  # TransferData -> GetNext, about one per step


def _slow_scale(x):
    import time
    time.sleep(0.0015)
    return x * 2.0 - 1.0


def test_profiled_slow_map_is_input_bound_and_named(tmp_path, digits):
    run = tmp_path / "slow"
    _train_digits(run, digits, map_fn=_slow_scale, workers=1, n=320, epochs=2)
    p = A.data_pipeline(run)
    assert p.input_bound in ("moderately", "highly"), p.input_share
    assert p.verdict == "data_processing" and (p.bottleneck_op_type, p.bottleneck_op_id) == ("map", 1)
    recs = {r.id: r for r in A.recommendations(run)}
    assert "input_bound" in recs and "map op #1" in recs["input_bound"].detail
    assert "map op #1" in recs["data_processing"].title and "num_parallel_workers" in recs["data_processing"].detail
