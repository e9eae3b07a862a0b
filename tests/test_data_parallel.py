"""Data-parallel training over MPI (issue 13): two processes under mpirun equal one process with the global
batch, AllReduce buckets as configured, per-rank traces in one run, stragglers, overlap, broken ranks.

The mpirun runs need OpenMPI and mpi4py (scripts/test.sh installs both); each run is started once per module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradcheck_util import check_gradients, param
from insight.analysis.cluster import cluster_report
from insight.cli import main as insight_main
from runtime import Model, communication, context, nn
from runtime.communication import CommunicationError
from runtime.core import Tensor
from runtime.dataset import NumpySlicesDataset
from runtime.ops import api as F
from runtime.ops import comm as C
from synthetic_runs import write_manifest, write_table

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
N_PARAMS = 8          # LeNet5 of the example: 2 conv weights + 3 x (Dense weight, bias)
FUSION = "2,5"        # -> buckets [0, 1], [2, 3, 4], [5, 6, 7]

DRIVER = textwrap.dedent("""\
    import sys
    import numpy as np
    import insight
    from runtime.examples import data_parallel as dp
    run_dir, out_dir = sys.argv[1], sys.argv[2]
    args = dp.parse_args(sys.argv[3:] + ["--quiet"])
    rank, size = dp.setup(args)
    with insight.Profiler(output_path=run_dir, profile_memory=False):
        res = dp.train(args)
    np.savez(f"{out_dir}/rank_{rank}.npz", losses=res["losses"], **{"param/" + k: v for k, v in res["params"].items()})
""")


@pytest.fixture(autouse=True)
def _stand_alone():
    context.reset_auto_parallel_context()
    yield
    context.reset_auto_parallel_context()


def mpirun(n: int, argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.fail("mpirun is not installed: install OpenMPI (apt-get install openmpi-bin libopenmpi-dev) and mpi4py "
                    "(pip install -e '.[distributed]'), as scripts/test.sh does")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [exe, *root, "--oversubscribe", "-n", str(n), "-x", "OMP_NUM_THREADS=1", sys.executable, *argv]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _profiled(base: Path, name: str, *args: str) -> tuple[Path, Path]:
    run, out = base / "runs" / name, base / "out" / name
    out.mkdir(parents=True)
    driver = base / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    mpirun(2, [str(driver), str(run), str(out), *args])
    return run, out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("dp")


@pytest.fixture(scope="module")
def reference(base):
    out = base / "out" / "reference"
    subprocess.run([sys.executable, "-m", "runtime.examples.data_parallel", "--stand-alone", "--steps", "50",
                    "--out", str(out), "--quiet"], cwd=ROOT, check=True, timeout=TIMEOUT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return np.load(out / "rank_0.npz")


@pytest.fixture(scope="module")
def fused(base):
    return _profiled(base, "fused", "--steps", "50", "--fusion", FUSION)


@pytest.fixture(scope="module")
def unfused(base):
    return _profiled(base, "unfused", "--steps", "50")


@pytest.fixture(scope="module")
def straggler(base):
    return _profiled(base, "straggler", "--steps", "30", "--fusion", FUSION, "--delay-rank", "1", "--delay-ms", "20",
                     "--prefetch", "2")


def _params(npz) -> dict:
    return {k[6:]: npz[k] for k in npz.files if k.startswith("param/")}


# -- two processes == one process with the global batch ------------------------------------------------------
def test_two_ranks_equal_one_process_with_the_global_batch(fused, reference):
    _, out = fused
    r0, r1 = np.load(out / "rank_0.npz"), np.load(out / "rank_1.npz")
    assert len(r0["losses"]) == len(reference["losses"]) == 50
    np.testing.assert_array_equal(r0["losses"], r1["losses"])  # every rank reports the global batch's loss
    np.testing.assert_allclose(r0["losses"], reference["losses"], rtol=1e-5)
    ref, p0, p1 = _params(reference), _params(r0), _params(r1)
    assert sorted(ref) == sorted(p0) and len(ref) == N_PARAMS
    for name, want in ref.items():
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=f"{name}: ranks diverged")
        rel = np.linalg.norm(p0[name] - want) / np.linalg.norm(want)
        assert rel <= 1e-6, f"{name}: 2 ranks vs 1 process differ by {rel:.2e} (relative)"


def _allreduce_tasks(run: Path, rank: int) -> pd.DataFrame:
    t = pd.read_parquet(run / f"rank_{rank}" / "tasks", columns=["step", "name", "op", "stream", "bytes"])
    return t[t["op"] == "all_reduce"]


def test_fusion_config_gives_one_allreduce_per_bucket_and_the_same_parameters(fused, unfused):
    run_f, out_f = fused
    run_u, out_u = unfused
    for rank in (0, 1):
        ar = _allreduce_tasks(run_f, rank)
        per_step = ar.groupby("step").size()
        assert len(per_step) == 50 and (per_step == 3).all()
        assert (ar["stream"] == "comm").all()
        assert sorted(ar["name"].unique()) == ["AllReduce_bucket0", "AllReduce_bucket1", "AllReduce_bucket2"]
        ar_u = _allreduce_tasks(run_u, rank)
        assert (ar_u.groupby("step").size() == N_PARAMS).all()
    # bytes of each bucket: its gradients (float32), plus the 4-byte loss in the bucket launched first (the last)
    sizes = [p.size for p in _params(np.load(out_f / "rank_0.npz")).values()]
    names = list(_params(np.load(out_f / "rank_0.npz")))
    order = [names.index(n) for n in ("conv1.weight", "conv2.weight", "fc1.weight", "fc1.bias", "fc2.weight",
                                      "fc2.bias", "fc3.weight", "fc3.bias")]
    sizes = [sizes[k] for k in order]
    want = {"AllReduce_bucket0": 4 * sum(sizes[:2]), "AllReduce_bucket1": 4 * sum(sizes[2:5]),
            "AllReduce_bucket2": 4 * sum(sizes[5:]) + 4}
    got = _allreduce_tasks(run_f, 0).groupby("name")["bytes"].first().to_dict()
    assert got == want
    pf, pu = _params(np.load(out_f / "rank_0.npz")), _params(np.load(out_u / "rank_0.npz"))
    for name in pf:
        np.testing.assert_array_equal(pf[name], pu[name], err_msg=f"{name}: fused vs unfused AllReduce")


def test_the_run_lists_both_ranks(fused):
    run, _ = fused
    m = json.loads((run / "manifest.json").read_text())
    assert m["ranks"] == [0, 1] and m["group_size"] == 2 and m["status"] == "complete"
    assert m["rank_status"]["1"]["step_count"] == m["rank_status"]["0"]["step_count"] == 50
    for r in (0, 1):
        frag = json.loads((run / f"rank_{r}" / "manifest.json").read_text())
        assert frag["ranks"] == [r] and frag["status"] == "complete"
        assert sum(pq.read_metadata(f).num_rows for f in (run / f"rank_{r}" / "steps").glob("part-*.parquet")) == 50


SPARSE = textwrap.dedent("""\
    import sys
    import numpy as np
    from runtime import Model, communication, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.train.callback import Callback

    class Net(nn.Cell):  # an embedding table (sparse gradient, LazyAdam) and a Dense layer (dense gradient)
        def __init__(self):
            super().__init__()
            self.embedding, self.fc = nn.Embedding(500, 8), nn.Dense(4 * 8, 2)

        def construct(self, ids):
            return self.fc(self.embedding(ids).reshape(ids.shape[0], -1))

    class Losses(Callback):
        def __init__(self):
            self.values = []

        def step_end(self, rc):
            self.values.append(float(rc.original_args()["net_outputs"]))

    out, parallel = sys.argv[1], sys.argv[2] == "dp"
    if parallel:
        communication.init()
        context.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True)
    rank, size = communication.rank_and_size()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, size=(256, 4)).astype(np.int32)
    labels = (ids.sum(1) % 2).astype(np.int32)
    for mode in (context.GRAPH_MODE, context.PYNATIVE_MODE):
        context.set_context(mode=mode, seed=rank)  # each rank draws other initial weights: rank 0's are broadcast
        net = Net()
        model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                      nn.LazyAdam(net.trainable_params(), learning_rate=0.01), progress=False)
        ds = NumpySlicesDataset((ids, labels), ["ids", "label"]).batch(32 // size, drop_remainder=True)
        rec = Losses()
        model.train(2, ds, callbacks=[rec])
        np.savez(f"{out}/{mode}_{rank}.npz", losses=rec.values, table=net.embedding.embedding_table.data,
                 w=net.fc.weight.data)
""")


def test_sparse_gradients_and_pynative_over_two_ranks_equal_one_process(base):
    """Also: the ranks initialise their weights from different seeds; rank 0's are broadcast at the first step."""
    script, one, two = base / "sparse.py", base / "sparse-one", base / "sparse-two"
    script.write_text(SPARSE)
    one.mkdir(), two.mkdir()
    subprocess.run([sys.executable, str(script), str(one), "alone"], cwd=ROOT, check=True, timeout=TIMEOUT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    mpirun(2, [str(script), str(two), "dp"])
    for mode in (context.GRAPH_MODE, context.PYNATIVE_MODE):
        ref, r0, r1 = (np.load(d / f"{mode}_{r}.npz") for d, r in ((one, 0), (two, 0), (two, 1)))
        assert len(ref["losses"]) == len(r0["losses"]) == 16
        np.testing.assert_array_equal(r0["losses"], r1["losses"])
        np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=1e-5)
        for k in ("table", "w"):
            np.testing.assert_array_equal(r0[k], r1[k])
            assert np.linalg.norm(r0[k] - ref[k]) / np.linalg.norm(ref[k]) <= 1e-6, (mode, k)


# -- stragglers, overlap, broken ranks -----------------------------------------------------------------------
def test_a_slow_data_pipeline_makes_its_rank_the_straggler(straggler, capsys):
    run, _ = straggler
    rep = cluster_report(run)
    s = rep.stragglers
    assert set(s["rank"]) == {1}, s  # rank 1 only (on a loaded machine its step time may be over the margin too)
    assert "iteration interval" in set(s["metric"]), s
    r0, r1 = rep.ranks.set_index("rank").loc[0], rep.ranks.set_index("rank").loc[1]
    # rank 1 waits for each batch (up to 20 ms, less on a machine so busy that the steps slow down too) ...
    assert r1.iteration_interval_ms > max(3.0, 2 * r0.iteration_interval_ms)
    assert r0.comm_ms > r1.comm_ms  # ... while rank 0 waits for rank 1 inside its AllReduce
    assert insight_main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "straggler: rank 1 -- iteration interval" in out and "straggler: rank 0" not in out
    assert "Cluster: 2 ranks (group size 2)" in out


def _union(iv: list) -> list:
    out = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _intersection(a: list, b: list) -> int:
    total = 0
    for s1, e1 in a:
        for s2, e2 in b:
            total += max(0, min(e1, e2) - max(s1, s2))
    return total


def test_overlap_equals_a_hand_computation_from_the_task_table(fused):
    run, _ = fused
    rep = cluster_report(run)
    for rank in (0, 1):
        t = pd.read_parquet(run / f"rank_{rank}" / "tasks")
        t = t[(t["kind"] == "kernel") & (t["step"] >= 0)]
        steps = sorted(t["step"].unique())[1:]  # the first step is excluded from the averages
        comm_total = over_total = 0
        for s in steps:
            ts = t[t["step"] == s]
            comm = _union(ts.loc[ts["stream"] == "comm", ["start_ns", "end_ns"]].values.tolist())
            comp = _union(ts.loc[ts["stream"] != "comm", ["start_ns", "end_ns"]].values.tolist())
            comm_total += sum(e - s_ for s_, e in comm)
            over_total += _intersection(comm, comp)
        row = rep.ranks.set_index("rank").loc[rank]
        assert comm_total > 0
        assert row.overlap_pct == pytest.approx(100.0 * over_total / comm_total, abs=1e-9)
        assert row.comm_alone_ms == pytest.approx((comm_total - over_total) / len(steps) / 1e6, rel=1e-9)


def _tiny_cluster(base: Path, intervals: dict) -> Path:
    """A 2-rank run in the trace format; ``intervals[rank]`` = [(stream, start_us, end_us)] for one step."""
    run = base / "tiny"
    tables = {}
    for rank, iv in intervals.items():
        rows = [{"step": 1, "graph": "train_step", "task_id": k, "name": f"t{k}", "op": "all_reduce" if s == "comm"
                 else "matmul", "kind": "kernel", "stream": s, "stream_id": 3 if s == "comm" else 0, "scope": "",
                 "phase": "update", "start_ns": a * 1000, "end_ns": b * 1000, "dur_ns": (b - a) * 1000, "flops": 0,
                 "bytes": 64, "shape": "", "dtype": "float32", "fused_ops": ""} for k, (s, a, b) in enumerate(iv)]
        df = pd.DataFrame(rows).astype({"step": np.int32, "task_id": np.int32, "stream_id": np.int8})
        tables["tasks"] = write_table(run, "tasks", df, rank=rank)
        steps = pd.DataFrame({"step": np.int32([1]), "epoch": np.int32([1]), "begin_ns": [0], "get_next_start_ns": [0],
                              "get_next_end_ns": [0], "fp_start_ns": [0], "bp_end_ns": [30_000], "end_ns": [60_000],
                              "fp_start_op": "t0", "bp_end_op": "t1", "loss": 1.0, "sink": True})
        tables["steps"] = write_table(run, "steps", steps, rank=rank)
    write_manifest(run, tables, step_count=1, streams=("aicore0", "comm"), ranks=sorted(intervals),
                   group_size=len(intervals))
    return run


def test_overlap_of_known_intervals(tmp_path):
    # rank 0: comm [10, 30] us; compute [0, 15] and [25, 40] (and [12, 14] nested) -> 5 + 5 us of 20 overlap
    # rank 1: comm [0, 10] and [50, 60]; compute [5, 55] -> 5 + 5 of 20 overlap; 10 us communicating alone
    run = _tiny_cluster(tmp_path, {0: [("aicore0", 0, 15), ("aicore0", 12, 14), ("comm", 10, 30), ("aicore0", 25, 40)],
                                   1: [("comm", 0, 10), ("aicore0", 5, 55), ("comm", 50, 60)]})
    rep = cluster_report(run)
    r = rep.ranks.set_index("rank")
    assert r.loc[0, "overlap_pct"] == pytest.approx(50.0) and r.loc[1, "overlap_pct"] == pytest.approx(50.0)
    assert r.loc[0, "comm_ms"] == pytest.approx(0.020) and r.loc[0, "comm_alone_ms"] == pytest.approx(0.010)
    assert r.loc[1, "comm_ms"] == pytest.approx(0.020) and r.loc[1, "comm_alone_ms"] == pytest.approx(0.010)
    assert (r["status"] == "ok").all() and rep.stragglers.empty


def test_ranks_that_disagree_or_are_missing_are_reported_per_rank(fused, tmp_path, capsys):
    src, _ = fused
    run = tmp_path / "broken"
    shutil.copytree(src, run)
    steps = pd.read_parquet(run / "rank_1" / "steps")
    shutil.rmtree(run / "rank_1" / "steps")
    steps[steps["step"] < 40].to_parquet(run / "rank_1" / "steps.parquet", index=False)  # rank 1 lost 10 steps
    m = json.loads((run / "manifest.json").read_text())
    m["group_size"] = 3  # a third rank never wrote anything
    (run / "manifest.json").write_text(json.dumps(m))
    rep = cluster_report(run)
    r = rep.ranks.set_index("rank")
    assert list(r.index) == [0, 1, 2]
    assert r.loc[2, "status"] == "missing" and "rank 2" in r.loc[2, "message"]
    assert r.loc[0, "status"] == "steps differ" and "50 steps" in r.loc[0, "message"]
    assert r.loc[1, "status"] == "ok" and r.loc[1, "steps"] == 40
    assert r.loc[0, "steps_compared"] == r.loc[1, "steps_compared"] == 39  # the 40 common steps, first excluded
    assert r.loc[0, "step_time_ms"] > 0 and r.loc[1, "step_time_ms"] > 0  # the readable ranks still show
    assert insight_main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "problem: rank 2: no rank_2/ directory" in out and "problem: rank 0: recorded 50 steps" in out


def test_rank_manifests_merge_whatever_order_the_ranks_finish_in(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from insight.profiler import merge_rank_manifests

    def fragment(rank, status, steps):
        d = tmp_path / f"rank_{rank}"
        d.mkdir(exist_ok=True)
        m = {"schema_version": 1, "run_id": "x", "name": "run", "created": "", "start_perf_ns": 1 + rank,
             "status": status, "ranks": [rank], "group_size": 3, "step_count": steps,
             "streams": [{"stream_id": 3 if rank else 0, "name": "comm" if rank else "aicore0"}],
             "tables": {"tasks": f"rank_{rank}/tasks.parquet"}}
        (d / "manifest.json").write_text(json.dumps(m))

    fragment(0, "complete", 50)
    fragment(1, "running", 20)
    m = merge_rank_manifests(tmp_path)
    assert m["status"] == "running" and m["ranks"] == [0, 1] and m["group_size"] == 3
    assert m["rank_status"]["1"] == {"status": "running", "step_count": 20, "start_perf_ns": 2, "created": ""}
    assert [s["name"] for s in m["streams"]] == ["aicore0", "comm"]
    fragment(1, "complete", 50)
    fragment(2, "complete", 50)
    with ThreadPoolExecutor(8) as pool:  # several ranks merging at once: every merge sees every fragment
        list(pool.map(lambda _: merge_rank_manifests(tmp_path), range(32)))
    final = json.loads((tmp_path / "manifest.json").read_text())
    assert final["status"] == "complete" and final["ranks"] == [0, 1, 2] and final["step_count"] == 50
    fragment(2, "failed", 10)
    assert merge_rank_manifests(tmp_path)["status"] == "failed"


def test_a_profiler_in_an_mpirun_job_before_init_says_so(tmp_path, monkeypatch):
    import insight

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(communication._state, "comm", None)
    with pytest.raises(insight.ProfilerError, match=r"one of 2 started by mpirun.*init\(\) has not been called"):
        insight.Profiler(output_path=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- in-process: the pass, the primitive, sharding, errors (a process without mpirun is a group of one) ------------
def _lenet_model():
    from runtime.examples.data_parallel import LeNet5
    net = LeNet5()
    return net, Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                      nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)


@pytest.mark.parametrize("fusion,buckets", [([2, 5], 3), ([], N_PARAMS), ([7], 2)])
def test_the_pass_puts_one_allreduce_per_bucket_on_the_comm_stream(digits, fusion, buckets):
    xtr, ytr, _, _ = digits
    context.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True,
                                      all_reduce_fusion_config=fusion)
    _, model = _lenet_model()
    exe = model.train_graph(xtr[:32], ytr[:32])
    ar = [t for t in exe.tl.tasks if t.op == "all_reduce"]
    assert len(ar) == buckets and all(t.stream == "comm" for t in ar)
    assert sorted(t.node.attrs["bucket"] for t in ar) == list(range(buckets))
    # each AllReduce waits (an event) only for its own gradients: the comm stream is not one wait at the end
    waits = [t for t in exe.tl.streams["comm"] if t.kind == "event_wait"]
    assert len(waits) == buckets
    # launched in the order the backward makes the gradients ready: the last layer's bucket first
    assert ar[0].node.attrs["bucket"] == buckets - 1


def test_a_group_of_one_trains_like_stand_alone(digits):
    xtr, ytr, _, _ = digits
    losses = {}
    for mode in ("stand_alone", "data_parallel"):
        context.set_context(seed=3)
        context.set_auto_parallel_context(parallel_mode=mode, all_reduce_fusion_config=[2, 5])
        net, model = _lenet_model()
        losses[mode] = [model.train_step(xtr[k:k + 32], ytr[k:k + 32]) for k in range(0, 160, 32)]
        losses[mode + "_params"] = [p.data.copy() for p in net.trainable_params()]
    assert losses["stand_alone"] == losses["data_parallel"]
    for a, b in zip(losses["stand_alone_params"], losses["data_parallel_params"]):
        np.testing.assert_array_equal(a, b)


def test_a_failing_stream_does_not_wait_for_a_collective_that_never_completes(digits, monkeypatch):
    import threading
    import time

    from runtime.ops.registry import get_primitive

    xtr, ytr, _, _ = digits
    peer = threading.Event()  # the other rank, which never arrives: it waits for this rank's step

    def blocked(*xs, **attrs):
        peer.wait(60)
        return np.concatenate([np.ravel(x) for x in xs])

    def broken(*a, **k):
        raise FloatingPointError("a kernel failed on this rank")
    monkeypatch.setattr(get_primitive("all_reduce"), "kernel", blocked)
    monkeypatch.setattr(get_primitive("conv2d_grad_filter"), "kernel", broken)
    context.set_auto_parallel_context(parallel_mode="data_parallel", all_reduce_fusion_config=[2, 5])
    _, model = _lenet_model()
    t0 = time.monotonic()
    try:
        with pytest.raises(FloatingPointError, match="a kernel failed on this rank"):
            model.train_step(xtr[:32], ytr[:32])
        assert time.monotonic() - t0 < 30  # raised while the comm stream was still blocked
    finally:
        peer.set()


def test_sparse_gradients_are_all_gathered_as_rows_not_densified():
    from runtime.examples.host_placement import WideDeepish  # an embedding table trained by LazyAdam
    context.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True)
    net = WideDeepish()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.LazyAdam(net.trainable_params(), learning_rate=0.01), progress=False)
    ids = np.random.default_rng(0).integers(0, 1000, size=(16, 4)).astype(np.int32)
    exe = model.train_graph(ids, np.zeros(16, np.int32))
    ops = [t.op for t in exe.tl.tasks]
    gathers = [t for t in exe.tl.tasks if t.op == "all_gather"]
    assert len(gathers) == 2 and {t.stream for t in gathers} == {"comm"}  # indices and rows
    assert "gather_grad" not in ops  # the table's gradient is never densified
    table_bytes = net.embedding.embedding_table.data.nbytes
    assert all(t.node.nbytes < table_bytes / 100 for t in gathers)


def test_all_reduce_gradient_float64():
    a, b = param(np.random.default_rng(0).standard_normal((3, 4))), param(np.arange(5.0))

    def fn():
        flat = C.all_reduce([a, b], op="mean", bucket=0)
        return F.mul(flat, flat)
    check_gradients(fn, [a, b], ["a", "b"])


def test_all_reduce_shape_errors():
    from runtime.ops.registry import ShapeError
    with pytest.raises(ShapeError, match="all_reduce: the tensors of one bucket must share a dtype"):
        C.all_reduce([Tensor(np.zeros(3, np.float32)), Tensor(np.zeros(2, np.float64))])
    with pytest.raises(ShapeError, match="op must be one of"):
        C.all_reduce([Tensor(np.zeros(3, np.float32))], op="prod")


def test_fusion_config_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        context.set_auto_parallel_context(all_reduce_fusion_config=[5, 2])
    with pytest.raises(ValueError, match="parallel_mode must be"):
        context.set_auto_parallel_context(parallel_mode="model_parallel")
    assert communication.fusion_buckets(5, [2, 4]) == [[0, 1], [2, 3], [4]]
    assert communication.fusion_buckets(3, []) == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"split indices must lie in 1\.\.7 for a step with 8 gradients"):
        communication.fusion_buckets(8, [2, 9])


def test_shards_partition_each_pass_deterministically():
    x = np.arange(11)
    shards = [[int(v) for b in NumpySlicesDataset((x,), ["x"], shuffle=True, seed=5, num_shards=3, shard_id=i)
               for v in b[0].reshape(-1)] for i in range(3)]
    again = [[int(v) for b in NumpySlicesDataset((x,), ["x"], shuffle=True, seed=5, num_shards=3, shard_id=i)
              for v in b[0].reshape(-1)] for i in range(3)]
    assert shards == again
    assert all(len(s) == 4 for s in shards)  # ceil(11 / 3): every rank runs the same number of steps
    flat = sorted(v for s in shards for v in s)
    assert set(flat) == set(range(11)) and len(flat) == 12  # one row repeated to pad the last shard
    assert NumpySlicesDataset((x,), ["x"], num_shards=3, shard_id=2).batch(2).get_dataset_size() == 2
    with pytest.raises(ValueError, match="shard_id must be an int in 0..2"):
        NumpySlicesDataset((x,), ["x"], num_shards=3, shard_id=3)
    with pytest.raises(ValueError, match="give num_shards and shard_id together"):
        NumpySlicesDataset((x,), ["x"], num_shards=3)


def test_init_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    monkeypatch.setattr(communication._state, "comm", None)
    with pytest.raises(CommunicationError, match="the Python package 'mpi4py' is not installed"):
        communication.init()
    with pytest.raises(CommunicationError, match=r"get_rank: call runtime.communication.init\(\) first"):
        communication.get_rank()
