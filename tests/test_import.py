"""``insight import``: Kineto / Chrome trace JSON into Insight runs.

Every expected number is computed in the test from the raw JSON (json.load here is fine: the inputs are
small), never taken from the importer: a real CUDA trace (HTA's AlexNet sample, ../shared/data/kineto), a CPU
torch.profiler trace made by tests/data/make_cpu_trace.py, small synthetic Kineto traces whose step
categories are worked out by hand, a generic Chrome trace, two ranks, our own export (round trip) and
malformed files (one line on stderr, exit 2, no run left behind).
"""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insight import analysis
from insight.analysis import gpu
from insight.cli import main as cli_main
from insight.export import export_csv
from insight.trace import open_run
from test_dashboard_pages import find, text

ROOT = Path(__file__).resolve().parents[1]
ALEXNET = ROOT.parent / "shared" / "data" / "kineto" / "alexnet_gpu.pt.trace.json.gz"
CPU_TRACE = ROOT / "tests" / "data" / "torch_cpu_mlp.pt.trace.json.gz"
CATS = [f"{c}_ns" for c in gpu.CATEGORIES]


def _raw(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _import(tmp_path: Path, *traces, name="run", expect=0) -> Path:
    out = tmp_path / "runs" / name
    rc = cli_main(["import", *map(str, traces), "--output", str(out)])
    assert rc == expect
    return out


def _tasks(run: Path, rank: int = 0) -> pd.DataFrame:
    return pd.read_parquet(run / f"rank_{rank}" / "tasks.parquet")


def _write(path: Path, doc, gz: bool = False) -> Path:
    data = json.dumps(doc).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# -- a real CUDA trace ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alexnet(tmp_path_factory):
    return _import(tmp_path_factory.mktemp("alex"), ALEXNET, name="alexnet")


def test_alexnet_kernels_streams_and_steps_equal_the_raw_json(alexnet):
    raw = [e for e in _raw(ALEXNET)["traceEvents"] if isinstance(e, dict)]
    kernels = [e for e in raw if e.get("ph") == "X" and e.get("cat") == "kernel"]
    per_stream = Counter()
    for e in kernels:
        per_stream[f"gpu{e['pid']}.stream{e['tid']}"] += round(e["dur"] * 1000)
    steps = [e for e in raw if e.get("ph") == "X" and re.fullmatch(r"ProfilerStep#\d+", str(e.get("name")))]
    expected_steps = len(steps) or 1  # no ProfilerStep: the whole trace is one step (the TensorBoard plugin's rule)

    t = _tasks(alexnet)
    assert (t["kind"] == "kernel").sum() == len(kernels) == 79
    by_stream = gpu.kernel_time_by_stream(alexnet)
    assert dict(zip(by_stream["stream"], by_stream["total_ns"])) == dict(per_stream)
    assert int(by_stream["kernels"].sum()) == len(kernels)
    run = open_run(alexnet)
    assert len(run.table("steps")) == expected_steps == run.manifest["step_count"]
    assert run.manifest["source"] == "kineto"
    props = _raw(ALEXNET)["deviceProperties"][0]
    assert run.manifest["device"]["target"] == props["name"]
    assert run.manifest["device"]["capacity_bytes"] == props["totalGlobalMem"]


def test_alexnet_every_device_task_links_to_its_launch(alexnet):
    raw = _raw(ALEXNET)["traceEvents"]
    launch = {e["args"]["correlation"]: e["name"] for e in raw
              if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    t = _tasks(alexnet)
    dev = t[t["kind"].isin(["kernel", "memcpy_h2d", "memcpy_d2h", "memcpy_d2d", "memset"])]
    assert len(dev) == sum(1 for e in raw if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    assert (dev["launch_task"] >= 0).all()
    src = t.iloc[dev["launch_task"].to_numpy()]
    assert list(src["name"]) == [launch[c] for c in dev["correlation"]]
    assert (src["correlation"].to_numpy() == dev["correlation"].to_numpy()).all()
    # the flows table holds the ac2g arrows, bound to the launch and the kernel
    flows = pd.read_parquet(alexnet / "rank_0" / "flows.parquet")
    ac2g = flows[flows["cat"] == "ac2g"]
    pairs = {e["id"] for e in raw if e.get("ph") == "s"} & {e["id"] for e in raw if e.get("ph") == "f"}
    assert len(ac2g) == len(pairs)
    assert (ac2g["src_task"] >= 0).all() and (ac2g["dst_task"] >= 0).all()
    assert (t["correlation"].to_numpy()[ac2g["src_task"]] == t["correlation"].to_numpy()[ac2g["dst_task"]]).all()


def test_alexnet_category_breakdown_tiles_each_step(alexnet):
    bd = gpu.gpu_step_breakdown(alexnet)
    assert len(bd) == 1
    assert (bd[CATS].sum(axis=1) == bd["step_time_ns"]).all()
    assert (bd[CATS] >= 0).all().all()
    raw = _raw(ALEXNET)["traceEvents"]
    # nothing outranks kernels: Kernel is the length of the union of the kernel intervals (two streams overlap)
    ks = sorted((round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)) for e in raw if e.get("cat") == "kernel")
    assert ks[0][0] >= min(round(e["ts"] * 1000) for e in raw if e.get("cat") == "cpu_op")  # all inside the step
    union, reach = 0, None
    for a, b in ks:
        if reach is None or a > reach:
            union, reach = union + (b - a), b
        elif b > reach:
            union, reach = union + (b - reach), b
    assert union < sum(b - a for a, b in ks)  # they do overlap
    assert int(bd["kernel_ns"].iloc[0]) == union
    assert "Kernel" in "\n".join(gpu.report_lines(alexnet))


def test_alexnet_report_and_analyses_run(alexnet):
    rc = subprocess.run([sys.executable, "-m", "insight.cli", "report", str(alexnet)], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert "Top op types" in rc.stdout
    top = gpu.top_kernels(alexnet, None)
    assert int(top["calls"].sum()) == 79
    idle = gpu.idle_time_by_stream(alexnet)
    assert set(idle["stream"]) == set(gpu.kernel_time_by_stream(alexnet)["stream"])
    assert np.allclose(idle["host_wait_ns"] + idle["kernel_wait_ns"] + idle["other_ns"], idle["idle_ns"])


# -- synthetic Kineto traces with hand-worked categories -----------------------------------------------------
def _x(cat, name, ts, dur, pid=100, tid=100, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _gpu_trace():
    """Two steps. Step 1 (host 0..100 us): DataLoader 0-5, cpu op 5-30 launching a kernel (10-15 -> 20-50 on
    stream 7) and a memcpy (16-18 -> 40-60). Step 2 (host 100..200): cpu op 150-195 launching an NCCL kernel
    (190-195 -> 198-230 on stream 20), so the step ends at 230 on the device. Times in us."""
    ev = [
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": 7, "args": {"name": "stream 7 "}},
        _x("user_annotation", "ProfilerStep#1", 0, 100),
        _x("user_annotation", "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 0, 5),
        _x("cpu_op", "aten::mm", 5, 25, **{"External id": 1}),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=11, **{"External id": 1}),
        _x("kernel", "void gemm_kernel<float>(float*)", 20, 30, pid=0, tid=7, correlation=11, **{"External id": 1}),
        _x("cuda_runtime", "cudaMemcpyAsync", 16, 2, correlation=12, **{"External id": 1}),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 40, 20, pid=0, tid=7, correlation=12, bytes=4096),
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 11, "pid": 100, "tid": 100, "ts": 10},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 11, "pid": 0, "tid": 7, "ts": 20, "bp": "e"},
        _x("user_annotation", "ProfilerStep#2", 100, 100),
        _x("cpu_op", "nccl:all_reduce", 150, 45, **{"External id": 2}),
        _x("cuda_runtime", "cudaLaunchKernel", 190, 5, correlation=13, **{"External id": 2}),
        _x("kernel", "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)", 198, 32, pid=0, tid=20, correlation=13),
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 100, "tid": 100, "ts": 6,
         "args": {"Addr": 4096, "Bytes": 1024, "Total Allocated": 1024, "Total Reserved": 2048, "Device Type": 1,
                  "Device Id": 0}},
        {"ph": "i", "s": "t", "name": "[memory]", "pid": 100, "tid": 100, "ts": 29,
         "args": {"Addr": 4096, "Bytes": -1024, "Total Allocated": 0, "Total Reserved": 2048, "Device Type": 1,
                  "Device Id": 0}},
        {"ph": "Z", "name": "something new", "pid": 1, "tid": 1, "ts": 3},
        {"ph": "C", "name": "counter", "pid": 1, "tid": 1, "ts": 3, "args": {"v": 1}},
    ]
    return {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "Test GPU", "totalGlobalMem": 1 << 30}],
            "traceEvents": ev, "baseTimeNanoseconds": 1_700_000_000_000_000_000}


def test_synthetic_gpu_trace_categories_by_hand(tmp_path, capsys):
    src = _write(tmp_path / "t.json", _gpu_trace())
    run = _import(tmp_path, src)
    out = capsys.readouterr().out
    assert "1 ph 'Z' events" in out and "1 counter values" in out  # counted and reported
    bd = gpu.gpu_step_breakdown(run).set_index("step")
    us = 1000
    # step 1 = [0, 100]: kernel 20-50; memcpy 50-60 (40-50 is kernel); runtime 10-15, 16-18; DataLoader 0-5;
    # CPU exec 5-10, 15-16, 18-20; other 60-100
    s1 = bd.loc[1]
    assert (s1.start_ns, s1.end_ns) == (0, 100 * us)
    assert [s1[c] for c in CATS] == [30 * us, 10 * us, 0, 0, 7 * us, 5 * us, 8 * us, 40 * us]
    # step 2 = [100, 230] (its NCCL kernel ends at 230): communication 150-195 (the host op, outranking the
    # launch at 190-195) + 198-230 (the NCCL kernel); other 100-150 and 195-198
    s2 = bd.loc[2]
    assert (s2.start_ns, s2.end_ns) == (100 * us, 230 * us)
    assert [s2[c] for c in CATS] == [0, 0, 0, 77 * us, 0, 0, 0, 53 * us]
    assert (bd[CATS].sum(axis=1) == bd["step_time_ns"]).all()
    # the step markers: forward = the step's first host op, no backward: fp+bp ends with the forward work
    st = open_run(run).table("steps").set_index("step")
    assert st.loc[1, "fp_start_op"] == "aten::mm" and st.loc[1, "get_next_end_ns"] == 5 * us
    t = _tasks(run)
    k = t[t["kind"] == "kernel"].set_index("op")
    assert set(k.index) == {"gemm_kernel", "all_reduce"}  # an NCCL kernel's op is its collective
    assert k.loc["gemm_kernel", "scope"] == "aten::mm" and k.loc["gemm_kernel", "phase"] == "forward"
    assert k.loc["gemm_kernel", "step"] == 1 and k.loc["all_reduce", "step"] == 2
    assert t.loc[t["kind"] == "memcpy_d2h", "bytes"].tolist() == [4096]
    # the stream running only NCCL kernels is the format's "comm" stream: the step trace's AllReduce sees it
    assert set(t.loc[t["kind"] == "kernel", "stream"]) == {"gpu0.stream7", "comm"}
    assert analysis.step_breakdown(run).set_index("step")["allreduce_ns"].to_dict() == {1: 0, 2: 32 * us}
    mem = open_run(run).table("memory")
    assert mem["action"].tolist() == ["alloc", "free"] and mem["op"].tolist() == ["aten::mm", "aten::mm"]
    peak = analysis.memory_peak(run)
    assert peak.peak_bytes == 1024 and peak.capacity == 1 << 30 and peak.allocations == peak.frees == 1
    assert open_run(run).manifest["created"].startswith("2023-11-14")  # baseTimeNanoseconds is Unix time


def test_counter_events_become_the_counters_table(tmp_path, capsys):
    """``C`` events: one row per numeric series, named by the event (and its id), the process by its M name,
    in time order with the step holding each value; a non-numeric value is counted, not imported."""
    ev = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "trainer"}},
          _x("user_annotation", "ProfilerStep#0", 0, 50, pid=7, tid=1),
          _x("user_annotation", "ProfilerStep#1", 50, 50, pid=7, tid=1),
          _x("cpu_op", "aten::mm", 10, 5, pid=7, tid=1)]
    expect = []
    for k, t in enumerate([60.5, 5, 30, 95]):
        ev.append({"ph": "C", "name": "GPU memory", "pid": 7, "ts": t,
                   "args": {"allocated": 1000 * k, "reserved": 2.5 * k}})
        expect += [("GPU memory", "allocated", "trainer", round(t * 1000), 1000 * k, int(t >= 50)),
                   ("GPU memory", "reserved", "trainer", round(t * 1000), 2.5 * k, int(t >= 50))]
    ev.append({"ph": "C", "name": "queue", "id": 3, "pid": 8, "ts": 20, "args": {"depth": 4, "label": "x"}})
    expect.append(("queue 3", "depth", "8", 20_000, 4, 0))
    src = _write(tmp_path / "c.json", {"schemaVersion": 1, "traceEvents": ev})
    run = _import(tmp_path, src)
    out = capsys.readouterr().out
    assert "9 counter values" in out and "1 counter values that are not numbers" in out
    r = open_run(run)
    assert r.manifest["tables"]["counters"] == "rank_0/counters.parquet"
    c = r.table("counters")  # through the reader, with its schema checks
    assert c.equals(pd.read_parquet(run / r.manifest["tables"]["counters"]))
    got = list(c[["name", "series", "process", "t_ns", "value", "step"]].itertuples(index=False, name=None))
    assert got == sorted(expect, key=lambda row: row[3])  # (a stable sort: series in args order)
    assert r.manifest["import"]["files"][0]["counts"]["counters"] == 9


# -- a CPU torch.profiler trace ------------------------------------------------------------------------------
def test_cpu_torch_profiler_trace_imports_with_steps_and_ops(tmp_path):
    raw = _raw(CPU_TRACE)["traceEvents"]
    steps = sorted(int(m.group(1)) for e in raw if (m := re.fullmatch(r"ProfilerStep#(\d+)", str(e.get("name")))))
    cpu_ops = Counter(e["name"] for e in raw if e.get("cat") == "cpu_op")
    mem = [e for e in raw if e.get("name") == "[memory]"]
    run = _import(tmp_path, CPU_TRACE)
    st = open_run(run).table("steps")
    assert sorted(st["step"]) == steps and len(steps) >= 3
    t = _tasks(run)
    got = Counter(t.loc[t["kind"] == "cpu_op", "name"])
    assert got == cpu_ops
    ops = analysis.op_stats(run).set_index("name")
    assert ops.loc["aten::addmm", "calls"] == cpu_ops["aten::addmm"]
    # shapes: Input Dims [[4], [32, 64], [64, 4]] -> "4,32x64,64x4"; dtypes: Input type joined
    raw_mm = [e for e in raw if e.get("name") == "aten::addmm"]
    want = sorted((",".join("x".join(map(str, d)) for d in e["args"]["Input Dims"]), ",".join(e["args"]["Input type"]))
                  for e in raw_mm)
    mm = t[t["name"] == "aten::addmm"]
    assert sorted(zip(mm["shape"], mm["dtype"])) == want and all(w[0] for w in want)
    # phases: autograd's ops are backward, the optimizer's are update, the DataLoader's input
    ph = t.groupby("phase")["name"].agg(set)
    assert any(n.startswith("autograd::engine::evaluate_function") for n in ph["backward"])
    assert "Optimizer.step#SGD.step" in ph["update"] and "aten::linear" in ph["forward"]
    assert any(n.startswith("enumerate(DataLoader)#") for n in ph["input"])
    bd = analysis.step_breakdown(run)
    assert (bd["iteration_interval_ns"] + bd["fp_bp_ns"] + bd["tail_ns"] == bd["step_time_ns"]).all()
    assert (bd["fp_bp_ns"] > 0).all() and (bd["iteration_interval_ns"] > 0).all()
    g = gpu.gpu_step_breakdown(run)
    assert (g[CATS].sum(axis=1) == g["step_time_ns"]).all() and (g["dataloader_ns"] > 0).all()
    m = open_run(run).table("memory")
    assert len(m) == len(mem) and set(m["device"]) == {"device"}  # a CPU-only trace: the CPU is the device
    assert analysis.memory_peak(run).peak_bytes == max(e["args"]["Total Allocated"] for e in mem)
    # no device, so no device-utilisation advice: neither in the analysis nor in the CSV export
    assert "low_utilization" not in {r.id for r in analysis.recommendations(run)}
    written = export_csv(run, tmp_path / "csv")
    advice = pd.read_csv(next(p for p in written if p.name.startswith("recommendations")))
    assert "low_utilization" not in set(advice["id"])


# -- round trip: our export -> import -----------------------------------------------------------------------
def test_round_trip_of_our_chrome_export(tmp_path):
    from insight.export import export_chrome
    from synthetic_runs import training_run

    base = tmp_path / "base"
    base.mkdir()
    orig = training_run(base, "synth").path
    trace = tmp_path / "synth.trace.json.gz"
    export_chrome(orig, trace, gzip=True)
    back = _import(tmp_path, trace, name="back")
    cols = ["graph", "name", "op", "kind", "calls", "total_ns", "min_ms", "max_ms", "stream", "scope", "shapes",
            "dtypes", "flops"]
    pd.testing.assert_frame_equal(analysis.op_stats(orig)[cols], analysis.op_stats(back)[cols])
    keys = ["step", "start_ns", "fp_start_ns", "bp_end_ns", "end_ns", "step_time_ns", "device_busy_ns"]
    pd.testing.assert_frame_equal(analysis.step_breakdown(orig)[keys], analysis.step_breakdown(back)[keys])
    assert open_run(back).manifest["source"] == "chrome"


# -- generic Chrome traces, several ranks ----------------------------------------------------------------------
def test_generic_chrome_trace_imports_as_lanes_and_tasks(tmp_path):
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "Browser"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Main"}},
          {"ph": "B", "name": "Layout", "cat": "blink", "pid": 1, "tid": 2, "ts": 10.5},
          {"ph": "X", "name": "Paint", "cat": "blink", "pid": 1, "tid": 2, "ts": 11, "dur": 2},
          {"ph": "E", "pid": 1, "tid": 2, "ts": 20.25},
          {"ph": "X", "name": "IO", "cat": "net", "pid": 1, "tid": 3, "ts": 5, "dur": 30}]
    run = _import(tmp_path, _write(tmp_path / "chrome.json", ev))  # a bare array, no Kineto fields
    t = _tasks(run).sort_values("start_ns")
    assert list(t["name"]) == ["IO", "Layout", "Paint"]
    assert list(t["stream"]) == ["Browser/3", "Browser/Main", "Browser/Main"]
    assert list(t["dur_ns"]) == [30_000, 9_750, 2_000]
    st = open_run(run).table("steps")
    assert len(st) == 1 and st["end_ns"].iloc[0] - st["begin_ns"].iloc[0] == 30_000
    assert open_run(run).manifest["source"] == "chrome"


def test_two_ranks_are_one_run_on_one_clock(tmp_path):
    def trace(rank, base_ns):
        return {"distributedInfo": {"rank": rank, "world_size": 2}, "baseTimeNanoseconds": base_ns,
                "traceEvents": [_x("user_annotation", "ProfilerStep#0", 0, 50), _x("cpu_op", "aten::add", 10, 5)]}
    a = _write(tmp_path / "r1.json.gz", trace(1, 2_000_000), gz=True)
    b = _write(tmp_path / "r0.json.gz", trace(0, 1_000_000), gz=True)
    run = _import(tmp_path, a, b)
    r = open_run(run)
    assert r.ranks == [0, 1]
    t0, t1 = _tasks(run, 0), _tasks(run, 1)
    assert t0["start_ns"].tolist() == [10_000] and t1["start_ns"].tolist() == [1_010_000]  # rank 1 starts 1 ms later
    assert len(r.table("steps", rank=1)) == 1
    dup = _write(tmp_path / "again.json", trace(0, 0))
    before = set(tmp_path.iterdir())
    assert cli_main(["import", str(b), str(dup), "--output", str(tmp_path / "dup")]) == 2
    assert set(tmp_path.iterdir()) == before  # the first rank was written, then everything removed


# -- malformed input: one line, exit 2, nothing left behind ---------------------------------------------------
def _malformed_cases(tmp_path: Path) -> dict:
    good = json.dumps(_gpu_trace()).encode()
    gz = gzip.compress(good)
    missing_ts = _gpu_trace()
    del missing_ts["traceEvents"][5]["ts"]
    huge_ts = _gpu_trace()
    huge_ts["traceEvents"][5]["ts"] = 1e300  # its nanoseconds would not fit in int64
    return {
        "truncated.json.gz": gz[: len(gz) // 2],
        "truncated.json": good[: len(good) * 2 // 3],
        "toplevel.json": b"42",
        "string.json": b'"traceEvents"',
        "nots.json": json.dumps(missing_ts).encode(),
        "hugets.json": json.dumps(huge_ts).encode(),
        "badjson.json": good.replace(b'"dur": 30', b'"dur": 30 x', 1),
        "events-not-array.json": b'{"traceEvents": {"ph": "X"}}',
    }


def test_malformed_inputs_give_one_line_exit_2_and_no_run(tmp_path, capsys):
    cases = _malformed_cases(tmp_path)
    outdir = tmp_path / "runs"
    outdir.mkdir()
    for k, (fname, data) in enumerate(cases.items()):
        src = tmp_path / fname
        src.write_bytes(data)
        out = outdir / fname.replace(".", "_")
        if k == 0:  # the real command once, in its own process
            p = subprocess.run([sys.executable, "-m", "insight.cli", "import", str(src), "--output", str(out)],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
            rc, err = p.returncode, p.stderr
        else:
            rc = cli_main(["import", str(src), "--output", str(out)])
            err = capsys.readouterr().err
        assert rc == 2, (fname, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(src) in lines[0], (fname, err)
        assert "Traceback" not in err
        if fname not in ("events-not-array.json",):
            assert re.search(r"at byte \d+", lines[0]), (fname, lines[0])
        assert not out.exists(), fname
        assert list(outdir.iterdir()) == [], (fname, list(outdir.iterdir()))


def test_malformed_offsets_point_at_the_problem(tmp_path):
    missing_ts = _gpu_trace()
    del missing_ts["traceEvents"][5]["ts"]
    data = json.dumps(missing_ts).encode()
    src = tmp_path / "nots.json"
    src.write_bytes(data)
    from insight.importer import MalformedTrace, import_traces

    with pytest.raises(MalformedTrace) as e:
        import_traces([src], tmp_path / "out")
    # the offset is where the event without ts begins
    at = e.value.offset
    assert data[at:at + 1] == b"{" and b'"name": "void gemm_kernel' in data[at:at + 120]
    assert "has no \"ts\"" in str(e.value)
    cut = json.dumps(_gpu_trace()).encode()[:1000]
    src.write_bytes(cut)
    with pytest.raises(MalformedTrace) as e:
        import_traces([src], tmp_path / "out")
    assert "truncated" in str(e.value) and 900 <= e.value.offset <= 1000


# -- every dashboard page on imported runs (the pages' layout functions, in-process) ---------------------------
def _imported_base(root: Path) -> Path:
    base = root / "runs"
    for name, traces in (("alexnet", [ALEXNET]), ("cpu", [CPU_TRACE])):
        assert cli_main(["import", *map(str, traces), "--output", str(base / name)]) == 0
    gpu_trace = _write(root / "gpu.json.gz", _gpu_trace(), gz=True)
    assert cli_main(["import", str(gpu_trace), "--output", str(base / "gpu")]) == 0
    r0, r1 = _gpu_trace(), _gpu_trace()
    r0["distributedInfo"], r1["distributedInfo"] = {"rank": 0}, {"rank": 1}
    assert cli_main(["import", str(_write(root / "r0.json", r0)), str(_write(root / "r1.json", r1)),
                     "--output", str(base / "two-ranks")]) == 0
    return base


@pytest.fixture(scope="module")
def dash_app(tmp_path_factory):
    from dashboard.app import create_app
    from dashboard.data import store

    base = _imported_base(tmp_path_factory.mktemp("imported"))
    app = create_app(base, reload_interval=0)
    return {"base": base, "store": store()}


@pytest.mark.parametrize("run_id", ["alexnet", "cpu", "gpu", "two-ranks"])
@pytest.mark.parametrize("page", ["overview", "operators", "pipeline", "timeline", "memory", "cluster"])
def test_every_page_renders_for_imported_runs(dash_app, run_id, page):
    import importlib

    from dashboard.data import set_store

    set_store(dash_app["store"])
    lay = importlib.import_module(f"dashboard.pages.{page}").layout(run_id=run_id)
    err = find(lay, "error-panel")
    assert err is None, f"{page} of {run_id}: {text(err)}"
    assert find(lay, "not-found") is None


def test_page_contents_for_an_imported_gpu_run(dash_app):
    import importlib

    from dashboard.data import set_store

    set_store(dash_app["store"])
    run = dash_app["base"] / "alexnet"
    s = analysis.step_summary(run)
    lay = importlib.import_module("dashboard.pages.overview").layout(run_id="alexnet")
    assert text(find(lay, "stat-avg-step")) == f"{s.step_time_ms:.3f} ms"
    types = analysis.op_type_stats(run)
    lay = importlib.import_module("dashboard.pages.operators").layout(run_id="alexnet")
    assert text(find(lay, "ops-top-type")) == str(types["op"].iloc[0])
    data = analysis.load_timeline(run)
    assert {"gpu0.stream7", "gpu0.stream20", "host"} <= {ln.key for ln in data.lanes}
    lay = importlib.import_module("dashboard.pages.compare").layout(a="alexnet", b="cpu")
    assert find(lay, "error-panel") is None
    peak = analysis.memory_peak(dash_app["base"] / "cpu")
    lay = importlib.import_module("dashboard.pages.memory").layout(run_id="cpu")
    assert text(find(lay, "mem-peak")) == f"{peak.peak_bytes / 2**20:.2f} MB"


# -- the same in the browser -----------------------------------------------------------------------------------
@pytest.mark.browser
@pytest.mark.parametrize("page", ["overview", "operators", "timeline", "memory"])
def test_browser_opens_the_pages_of_an_imported_run(browser_imported, page):
    from test_browser import READY, _figure_ready, _open, _settle, _severe, _wait_text

    e2e = browser_imported
    run = "cpu" if page == "memory" else "alexnet"
    _open(e2e, f"/run/{run}/{page}")
    text_id, graph_id = READY[page]
    _wait_text(e2e.driver, text_id)
    _figure_ready(e2e.driver, graph_id)
    _settle(e2e.driver)
    assert not e2e.driver.find_elements("id", "error-panel")
    assert _severe(e2e.driver) == [], f"console errors on the {page} page of {run}"


@pytest.fixture(scope="module")
def browser_imported(tmp_path_factory):
    """The real server on a base dir of imported runs and one headless Chromium (tests/test_browser.py's way)."""
    import os
    import time
    from types import SimpleNamespace

    from browser_util import chrome_driver, chromedriver_path, stop_server
    from test_browser import _free_port, _http

    if chromedriver_path() is None:
        pytest.skip("chromedriver is not installed")

    tmp = tmp_path_factory.mktemp("imported_e2e")
    base = _imported_base(tmp)
    state = tmp / "state"
    state.mkdir()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(state), PYTHONUNBUFFERED="1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    err = open(tmp / "server.err", "w+")
    server = subprocess.Popen([sys.executable, "-m", "insight.cli", "start", "--summary-base-dir", str(base),
                               "--port", str(port), "--reload-interval", "1"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=err)
    driver = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"the server exited: {Path(err.name).read_text()[-2000:]}"
            try:
                if _http(url + "/", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 90 s"
            time.sleep(0.2)
        driver = chrome_driver(1400, 1200)
        yield SimpleNamespace(base=base, url=url, driver=driver)
    finally:
        if driver is not None:
            driver.quit()
        stop_server(server, port, env, ROOT)
        err.close()


# -- the streaming reader itself --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_reader_cuts_anywhere_and_gives_the_events_json_load_gives(tmp_path, chunk):
    """Tiny chunks force cuts inside strings holding '}', inside nested args (objects in lists) and inside
    numbers; the pieces must still be exactly the events, and keys after the array must be read."""
    from insight.importer.reader import TraceReader

    ev = [{"ph": "X", "name": 'a}, {"b": 1}]', "ts": 1.5, "dur": 2, "pid": 1, "tid": 1,
           "args": {"nested": [{"x": {"y": "}"}}, {"z": []}], "s": 'é}\\"}'}},
          {"ph": "i", "name": "[memory]", "ts": 123456789012, "pid": 1, "tid": 1, "args": {"Bytes": -5}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "main }"}}] * 5
    doc = {"schemaVersion": 1, "deviceProperties": [{"id": 0, "x": [1, {"}": "{"}]}], "traceEvents": ev,
           "traceName": "t}", "baseTimeNanoseconds": 1234567890123456789}
    src = tmp_path / "t.json"
    src.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    r = TraceReader(src, chunk=chunk)
    got = [e for batch in r.batches() for e in batch]
    assert got == ev
    assert r.header == {k: v for k, v in doc.items() if k != "traceEvents"}
    gz = tmp_path / "t.json.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert [e for batch in TraceReader(gz, chunk=chunk).batches() for e in batch] == ev


# -- the Cython scanner (the fast path of pass 1) against the orjson path --------------------------------------
def _tricky_events() -> list:
    """Events of every kind and many odd shapes: each one the scanner takes must become exactly the columns the
    orjson path makes of it; the ones it leaves (escapes, floats as integer args, our exporter's args, ...)
    go through orjson."""
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "python"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": "main thread", "args": {"name": "main"}},
          {"ph": "M", "name": "process_sort_index", "pid": 1, "args": {"sort_index": 3}}]
    for k in range(40):
        ts = [1.5 + k, 10 + k, 1.25e3 + k, 1234567.891 + k, 1700000000123456.7 + k, 0.1 + 0.2 * k][k % 6]
        ev.append({"ph": "X", "cat": ["cpu_op", "kernel", None, "gpu_memcpy"][k % 4],
                   "name": ["aten::mm", 'quote " and \\ back', "é unicode", "tab\there", "[memory]"][k % 5],
                   "pid": [1, "1", None, -3][k % 4], "tid": ["main thread", 7, 2**40, None][k % 4],
                   "ts": ts, "dur": [2, 0.001, 3.5e-2, -1, 12345.678][k % 5],
                   "args": [{"correlation": k, "External id": k * 3, "bytes": 4096, "flops": 10**15},
                            {"Input Dims": [[32, 64], [64], []], "Input type": ["float", "float", ""]},
                            {"Input Dims": [[1, 2, 3]], "nested": {"a": [1, {"b": None}], "c": True}},
                            {"correlation": 1.5}, {"External id": "7"}, {"bytes": "12"}, {"flops": None},
                            {"op": "MatMul", "step": 1, "task_id": 4, "graph": "g", "scope": "s", "phase": "fp"},
                            None, [1, 2], "text", {}][k % 12]})
        if k % 7 == 3:
            del ev[-1]["name"]
        if k % 11 == 5:
            del ev[-1]["dur"]
        ev.append({"ph": "sft"[k % 3], "id": k if k % 9 else f"s{k}", "pid": 1, "tid": 7, "ts": ts + 1,
                   "cat": "ac2g", "name": "ac2g", **({"bp": "e"} if k % 2 else {})})
        ev.append({"ph": "i", "name": "[memory]" if k % 4 else "mark", "pid": 1, "tid": 7, "ts": ts, "s": "t",
                   "args": {"Bytes": [1024, -1024, 2.5, 7][k % 4], "Addr": 2**45 + k, "Total Allocated": 4096,
                            "Total Reserved": 8192, "Device Type": 1, "Device Id": 0}})
        ev.append({"ph": ["B", "E", "C", "Z", "I", "M"][k % 6], "name": ["range", "thread_name"][k % 2], "pid": 1,
                   "tid": 7, "ts": ts, "args": [{"value": k}, ["not", "an", "object"], {"name": k}][k % 3]})
    return ev


@pytest.mark.parametrize("chunk", [64, 3000, 1 << 20])
def test_scanner_gives_the_columns_of_the_orjson_path(tmp_path, chunk):
    from insight.importer.events import EventColumns
    from insight.importer.reader import TraceReader

    ev = _tricky_events()
    if chunk == 64:  # a bare array, gzipped, that ends without its ']' (as streamed writers may)
        text = json.dumps(ev, indent=1)[:-1].rstrip()
    else:
        text = json.dumps({"schemaVersion": 1, "traceEvents": ev}, indent=1, ensure_ascii=chunk != 3000)
    text = text.replace('"dur": 2,', '"dur": 2, "dur": 3,', 1)  # a duplicate key: the last one counts
    src = tmp_path / "t.json"
    src.write_bytes(gzip.compress(text.encode()) if chunk == 64 else text.encode())
    got = []
    for scan in (False, True):
        cols = EventColumns()
        TraceReader(src, chunk=chunk, scan=cols.scan if scan else None).run(cols.feed)
        cols.finish()
        vals, lanes = cols.strings.array(), np.array(cols.lane_keys + [None], object)
        out = {"n": cols.n_events, "threads": cols.thread_names, "processes": cols.process_names,
               "skipped": dict(cols.skipped)}
        for table, names in (("slices", ("name", "cat", "shape", "dtype", "a_op", "a_graph", "a_scope", "a_phase")),
                             ("flows", ("cat", "id_str")), ("memory", ())):
            t = getattr(cols, table).all()
            decoded = [vals[a] if c in names else lanes[a] if c == "lane" else a for c, a in t.items()]
            # (rows in file order, except that a B/E pair is added after the X slices of its batch)
            out[table] = sorted(map(repr, zip(*decoded)))
        c = cols.counters
        out["counters"] = sorted(map(repr, zip(c["ts"], vals[c["name"]], vals[c["series"]], c["pid"], c["value"])))
        out["first_dur"] = int(cols.slices.get("dur")[0])
        got.append((out, cols.n_scanned))
    (slow, n0), (fast, n1) = got
    assert n0 == 0 and n1 >= len(ev) // 4  # the scanner read a good part of it, in every chunking
    assert fast == slow
    assert fast["n"] == len(ev) and fast["first_dur"] == 3000 and len(fast["slices"]) > 30
    assert len(fast["counters"]) >= 3
