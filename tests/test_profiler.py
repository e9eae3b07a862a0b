"""insight.Profiler and the collectors: what a profiled digits-CNN training writes, read back with insight.trace."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import insight
from insight import Profiler, ProfilerError, schedule
from insight.trace import live_parts, open_run
from runtime.device.memory import align
from runtime import Model, context, hooks, nn
from runtime.dataset import NumpySlicesDataset
from runtime.models import LeNetDigits

N_TRAIN = 160  # 5 steps of 32 per epoch
ALL_TABLES = {"tasks", "steps", "memory", "graphs", "device_queue", "dataset_pipeline", "dataset_ops",
              "dataset_queues", "host_ops"}


def _model():
    net = LeNetDigits(channels=(8, 16), hidden=32)
    return Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                 nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)


def _dataset(digits, n=N_TRAIN):
    xtr, ytr, _, _ = digits
    return NumpySlicesDataset((xtr[:n], ytr[:n]), ["image", "label"], shuffle=True, seed=0).batch(
        32, drop_remainder=True)


def _n_tasks(model) -> int:
    exe = list(model._train_graphs.values())[0]
    return len(exe.tl.tasks)


@pytest.fixture(autouse=True)
def _no_leftover_profiler():
    yield
    from insight import profiler as mod
    if mod._active is not None:  # a failed test must not leave the next one with an active profiler
        mod._active.stop()
    assert not hooks.listening


# -- a full run, both data modes ------------------------------------------------------------------------------
@pytest.mark.parametrize("sink", [False, True], ids=["feed", "sink"])
def test_profiled_training_writes_a_consistent_run(tmp_path, digits, sink):
    context.set_context(device_memory="2MB")  # small enough that "in_use <= capacity" means something
    model = _model()
    run_dir = tmp_path / "base" / "run1"
    with Profiler(run_dir, flush_interval=0.05) as prof:
        model.train(2, _dataset(digits), dataset_sink_mode=sink)
    assert not hooks.listening
    assert prof.analyse() == run_dir
    n_tasks, n_steps = _n_tasks(model), 10

    run = open_run(run_dir)
    m = run.manifest
    assert m["schema_version"] == 1 and m["status"] == "complete" and m["name"] == "run1"
    assert len(m["run_id"]) == 32 and m["ranks"] == [0] and m["step_count"] == n_steps
    assert isinstance(m["start_perf_ns"], int) and m["created"].endswith("+00:00")
    assert m["device"] == {"target": "Ascend", "capacity_bytes": 2 << 20}
    assert {"stream_id": 0, "name": "aicore0"} in m["streams"]
    assert m["options"]["profile_memory"] and m["options"]["data_process"] and m["options"]["schedule"] is None
    assert m["runtime"]["python"] and m["runtime"]["version"]
    # one part directory per table (empty tables too), every part live (none left over), no temporary files
    assert set(m["tables"]) == ALL_TABLES
    assert all(v == f"rank_0/{t}/" for t, v in m["tables"].items())
    assert sorted(os.listdir(run_dir / "rank_0")) == sorted(ALL_TABLES)
    for t in ALL_TABLES:
        names = os.listdir(run_dir / "rank_0" / t)
        assert names and sorted(live_parts(names)[0]) == sorted(names), (t, names)
    assert sorted(os.listdir(run_dir)) == ["manifest.json", "rank_0"]

    steps = run.table("steps")
    assert steps["step"].tolist() == list(range(n_steps))
    assert steps["epoch"].tolist() == [1] * 5 + [2] * 5
    assert steps["sink"].tolist() == [sink] * n_steps
    assert steps["step"].dtype == np.int32 and steps["begin_ns"].dtype == np.int64 and steps["sink"].dtype == bool
    order = ["begin_ns", "get_next_start_ns", "get_next_end_ns", "fp_start_ns", "bp_end_ns", "end_ns"]
    marks = steps[order].to_numpy()
    assert (marks >= 0).all() and (np.diff(marks, axis=1) >= 0).all()
    assert (marks[:, 3] < marks[:, 4]).all()                           # fp+bp takes time
    assert (marks[1:, 0] >= marks[:-1, 5]).all()                       # steps do not overlap
    assert steps["fp_start_op"].str.startswith("conv2d").all() and (steps["bp_end_op"] != "").all()
    assert np.isfinite(steps["loss"]).all()

    tasks = run.table("tasks")
    assert str(tasks["stream_id"].dtype) == "int8" and tasks["task_id"].dtype == np.int32
    assert (tasks["dur_ns"] == tasks["end_ns"] - tasks["start_ns"]).all() and (tasks["dur_ns"] >= 0).all()
    graph_rows = tasks[tasks["task_id"] >= 0]
    assert len(graph_rows) == n_steps * n_tasks
    per = graph_rows.groupby("step")["task_id"]
    assert per.count().tolist() == [n_tasks] * n_steps and (per.nunique() == n_tasks).all()
    assert set(graph_rows["graph"]) == {"train_step"} and set(graph_rows["stream"]) == {"aicore0"}
    inputs = tasks[tasks["task_id"] < 0]
    if sink:  # one GetNext per step, plus the feeder's copies (outside any step)
        get_next = inputs[inputs["kind"] == "get_next"]
        assert get_next["step"].tolist() == list(range(n_steps)) and set(get_next["stream"]) == {"aicore0"}
        transfer = inputs[inputs["name"] == "TransferData"]
        assert len(transfer) >= n_steps - 8 and (transfer["step"] == -1).all() and (transfer["graph"] == "data_sink").all()
        assert (transfer["shape"] == "32x1x8x8").all()
        assert len(tasks) == n_steps * n_tasks + n_steps + len(transfer)
        assert len(run.table("device_queue")) >= n_steps  # the pops at least
    else:
        assert inputs["name"].tolist() == ["feed_inputs"] * n_steps and sorted(inputs["step"]) == list(range(n_steps))
        assert len(tasks) == n_steps * (n_tasks + 1)
        # the batch's bytes (32 images of 8x8 float32 and 32 int labels), host stream, each copy in its step's
        # input window and before the step's first kernel
        copies = inputs.sort_values("step")
        assert set(copies["stream"]) == {"host"} and set(copies["kind"]) == {"memcpy_h2d"}
        assert set(copies["bytes"]) == {32 * 64 * 4 + 32 * np.dtype(np.int32).itemsize}, set(copies["bytes"])
        assert (copies["start_ns"].to_numpy() == steps["get_next_start_ns"].to_numpy()).all()
        assert (copies["end_ns"].to_numpy() == steps["get_next_end_ns"].to_numpy()).all()
        assert (copies["end_ns"].to_numpy() <= steps["fp_start_ns"].to_numpy()).all()
    # each step's tasks lie inside the step
    span = graph_rows.groupby("step").agg(lo=("start_ns", "min"), hi=("end_ns", "max"))
    assert (span["lo"].to_numpy() == steps["fp_start_ns"].to_numpy()).all()
    assert (span["hi"].to_numpy() == steps["end_ns"].to_numpy()).all()

    graphs = run.table("graphs")
    assert graphs["graph"].tolist() == ["train_step"] and graphs["nodes"].iloc[0] > 0
    assert graphs["compile_start_ns"].iloc[0] <= graphs["compile_end_ns"].iloc[0] and "conv2d" in graphs["dump"].iloc[0]
    params = int(graphs["parameter_bytes"].iloc[0])
    assert params > 0 and graphs["planned_peak"].iloc[0] > 0

    allmem = run.table("memory")
    assert set(allmem["source"]) == {"planned", "pool"}
    # the pool's real allocations: every device parameter (weights and optimizer state) once, announced
    # at the profiler's start, and the step's activation reserve of exactly the planned peak
    pool = allmem[allmem["source"] == "pool"]
    assert set(pool["kind"]) >= {"parameter", "activation_reserve"} | ({"queue"} if sink else set())
    if sink:  # each batch holds a queue block from its push to its pop
        q = pool[pool["kind"] == "queue"]
        assert (q["action"] == "alloc").sum() >= n_steps and (q["size"] == 32 * 64 * 4 + 32 * 4).all()
    device_params = list(model._train_graphs.values())[0].tl.device_params
    palloc = pool[(pool["kind"] == "parameter") & (pool["action"] == "alloc")]
    assert sorted(palloc["tensor"]) == sorted(p.name for p in device_params)
    assert int(palloc["size"].sum()) == sum(p.data.nbytes for p in device_params)  # the model's sizes
    assert sum(align(p.data.nbytes) for p in device_params) == params  # the pool's aligned blocks
    reserve = pool[pool["kind"] == "activation_reserve"]
    assert (reserve["size"] == graphs["planned_peak"].iloc[0]).all()
    assert (pool["in_use"] <= pool["capacity"]).all()
    mem = allmem[allmem["source"] == "planned"]
    assert len(mem) and set(mem["action"]) == {"alloc", "free"} and set(mem["kind"]) == {"activation"}
    assert (mem["in_use"] <= mem["capacity"]).all() and (mem["capacity"] == 2 << 20).all()
    assert (mem["in_use"] >= params).all()
    assert (mem["in_use"] - params).max() <= graphs["planned_peak"].iloc[0]
    assert sorted(mem["step"].unique()) == list(range(n_steps))
    for step, g in mem.groupby("step", sort=True):
        assert (np.diff(g["t_ns"].to_numpy()) >= 0).all()
        assert g["in_use"].iloc[-1] == params  # back to the parameter baseline at the end of each step
        assert (g["action"] == "alloc").sum() == (g["action"] == "free").sum()

    pipe = run.table("dataset_pipeline")
    assert {"batch", "shuffle", "numpy_slices"} <= set(pipe["op_type"]) or {"batch", "numpy_slices"} <= set(pipe["op_type"])
    assert (pipe.groupby("pipeline_id")["parent_id"].min() == -1).all()
    ops = run.table("dataset_ops")
    assert len(ops) and (ops["rows"] >= 0).all()


def test_two_streams(tmp_path, digits):
    """Cross-stream event tasks are rows like any other; memory rows per step are sorted and balanced."""
    context.set_context(compute_streams=2)
    model = _model()
    with Profiler(tmp_path / "run"):
        model.train(1, _dataset(digits, 96))
    run = open_run(tmp_path / "run")
    exe = list(model._train_graphs.values())[0]
    tasks = run.table("tasks")
    assert len(tasks[tasks["task_id"] >= 0]) == 3 * len(exe.tl.tasks)
    assert {"event_record", "event_wait"} <= set(tasks["kind"]) and {"aicore0", "aicore1"} <= set(tasks["stream"])
    assert {s["name"] for s in run.manifest["streams"]} >= {"aicore0", "aicore1", "host"}
    # the two compute streams really run at once: some aicore0 kernel overlaps some aicore1 kernel in time
    k = tasks[(tasks["kind"] == "kernel") & (tasks["task_id"] >= 0)]
    a = k[k["stream"] == "aicore0"][["start_ns", "end_ns"]].to_numpy()
    b = k[k["stream"] == "aicore1"][["start_ns", "end_ns"]].to_numpy()
    assert len(a) and len(b)
    overlap = np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0])
    assert (overlap > 0).any(), "aicore0 and aicore1 never ran at the same time"
    mem, params = run.table("memory"), int(run.table("graphs")["parameter_bytes"].iloc[0])
    mem = mem[mem["source"] == "planned"]
    for _, g in mem.groupby("step"):
        assert (np.diff(g["t_ns"].to_numpy()) >= 0).all() and g["in_use"].iloc[-1] == params
        assert (g["in_use"] >= params).all()


def test_memory_template_matches_the_general_expansion(tmp_path, digits):
    from collectors import GraphRegistry, MemoryCollector
    from collectors.tasks import StepStore
    model = _model()
    events = []
    fn = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        model.train(1, _dataset(digits, 96))
    finally:
        hooks.unsubscribe(fn)
    registry = GraphRegistry()
    registry.register(next(ev for k, ev in events if k == "task_table"))
    store = StepStore(registry)
    mc = MemoryCollector(store)
    for k, ev in events:
        if k == "step_tasks":
            store.append(ev)
    (group,) = store.take("memory")
    assert group.uniform
    fast, slow = mc._expand_uniform(group, 0), mc._expand_general(group, 0)
    assert fast is not None and fast.num_rows == slow.num_rows > 0
    assert fast.to_pandas().equals(slow.to_pandas())


def test_parts_while_running_then_compaction(tmp_path, digits):
    model = _model()
    prof = Profiler(tmp_path / "run", flush_interval=0.05)
    model.train(1, _dataset(digits))
    parts = tmp_path / "run" / "rank_0" / "tasks"
    deadline = time.time() + 10
    def flushed():  # the writer renames the part files first, then rewrites the manifest
        if not (prof._writer.rows["steps"] == 5 and any(parts.glob("part-*.parquet"))):
            return False
        m = json.loads((tmp_path / "run" / "manifest.json").read_text())
        return m.get("step_count") == 5 and "tasks" in m.get("tables", {})

    while not flushed() and time.time() < deadline:
        time.sleep(0.02)
    run = open_run(tmp_path / "run")  # readable while recording, from the parts
    assert run.manifest["status"] == "running" and run.manifest["tables"]["tasks"] == "rank_0/tasks/"
    assert run.manifest["step_count"] == 5 and run.table("steps")["step"].tolist() == list(range(5))
    assert len(run.table("tasks")) == 5 * (_n_tasks(model) + 1)
    assert not list(parts.glob(".*"))  # no temporary files left behind
    prof.stop()
    run = open_run(tmp_path / "run")
    assert run.manifest["status"] == "complete" and not list(parts.glob(".*"))
    assert len(run.table("tasks")) == 5 * (_n_tasks(model) + 1)


# -- API rules ------------------------------------------------------------------------------------------------
def test_only_one_active_profiler(tmp_path):
    p1 = Profiler(tmp_path / "a")
    with pytest.raises(ProfilerError, match="another Profiler is already recording to .*a"):
        Profiler(tmp_path / "b")
    p2 = Profiler(tmp_path / "c", start_profile=False)
    with pytest.raises(ProfilerError, match="only one Profiler can be active"):
        p2.start()
    with pytest.raises(ProfilerError, match="already recording"):
        p1.start()
    p1.stop()
    p2.start()  # fine once the first one stopped
    p2.stop()
    with pytest.raises(ProfilerError, match="finished"):
        p2.start()
    assert not hooks.listening


def test_overwrite_protection(tmp_path, digits):
    run_dir = tmp_path / "run"
    with Profiler(run_dir):
        pass
    first = open_run(run_dir).manifest["run_id"]
    with pytest.raises(ProfilerError, match=str(run_dir)):
        Profiler(run_dir)
    assert open_run(run_dir).manifest["run_id"] == first  # untouched
    (run_dir / "notes.txt").write_text("mine")
    with Profiler(run_dir, overwrite=True):
        _model().train(1, _dataset(digits, 64))
    run = open_run(run_dir)
    assert run.manifest["run_id"] != first and run.manifest["status"] == "complete"
    assert len(run.table("steps")) == 2 and (run_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(ProfilerError, match="not a directory"):
        Profiler(run_dir / "notes.txt")


def test_memory_and_dataset_tables_are_optional(tmp_path, digits):
    with Profiler(tmp_path / "run", profile_memory=False, data_process=False):
        _model().train(1, _dataset(digits, 64), dataset_sink_mode=True)
    run = open_run(tmp_path / "run")
    assert set(run.manifest["tables"]) == {"tasks", "steps", "graphs", "host_ops"}
    for t in ("memory", "device_queue", "dataset_pipeline", "dataset_ops", "dataset_queues"):
        assert not run.has_table(t)
    assert len(run.table("steps")) == 2 and run.table("steps")["sink"].all()


def test_callback_records_only_the_step_range(tmp_path, digits):
    model = _model()
    model.train(1, _dataset(digits, 64))  # global steps 0, 1 before: numbering does not restart
    prof = Profiler(tmp_path / "run", start_profile=False)
    model.train(2, _dataset(digits), callbacks=[prof.callback(4, 7)])  # global steps 2..11
    assert not prof.running and not hooks.listening
    run = open_run(prof.analyse())
    assert run.manifest["status"] == "complete" and run.manifest["options"]["step_range"] == [4, 7]
    assert run.table("steps")["step"].tolist() == [4, 5, 6, 7]
    tasks = run.table("tasks")
    assert sorted(tasks["step"].unique()) == [4, 5, 6, 7]
    assert len(tasks) == 4 * (_n_tasks(model) + 1)
    with pytest.raises(ProfilerError, match="start_profile=False"):
        Profiler(tmp_path / "run2").callback(1, 2)


def test_callback_from_the_first_step(tmp_path, digits):
    model = _model()
    prof = Profiler(tmp_path / "run", start_profile=False)
    model.train(1, _dataset(digits), callbacks=[prof.callback(0, 1)])
    assert open_run(tmp_path / "run").table("steps")["step"].tolist() == [0, 1]


def test_schedule_writes_only_active_steps(tmp_path, digits):
    model = _model()
    model.train(1, _dataset(digits, 96))  # steps 0..2: profiling starts mid-training, at global step 3
    sched = schedule(wait=1, warmup=1, active=2, repeat=2, skip_first=1)
    with Profiler(tmp_path / "run", schedule=sched):
        model.train(3, _dataset(digits))  # steps 3..17; schedule index k = step - 3
    # k: 0 skip | 1 wait, 2 warmup, 3-4 active | 5 wait, 6 warmup, 7-8 active | done
    run = open_run(tmp_path / "run")
    expect = [3 + k for k in (3, 4, 7, 8)]
    assert run.table("steps")["step"].tolist() == expect
    tasks = run.table("tasks")
    assert sorted(tasks["step"].unique()) == expect and len(tasks) == 4 * (_n_tasks(model) + 1)
    assert sorted(run.table("memory")["step"].unique()) == expect
    assert run.manifest["options"]["schedule"] == {"wait": 1, "warmup": 1, "active": 2, "repeat": 2, "skip_first": 1}


def test_schedule_semantics_match_torch():
    s = schedule(wait=2, warmup=1, active=2)
    acts = [s(k).name for k in range(6)]
    assert acts == ["NONE", "NONE", "WARMUP", "RECORD", "RECORD_AND_SAVE", "NONE"]
    assert not s.finished(100)
    with pytest.raises(ProfilerError, match="active"):
        schedule(wait=1, warmup=0, active=0)


def test_pynative_host_ops(tmp_path, digits):
    context.set_context(mode=context.PYNATIVE_MODE)
    with Profiler(tmp_path / "run"):
        _model().train(1, _dataset(digits, 64))
    run = open_run(tmp_path / "run")
    ops = run.table("host_ops")
    assert len(ops) > 50 and "conv2d" in set(ops["op"]) and (ops["end_ns"] >= ops["start_ns"]).all()
    steps = run.table("steps")
    assert steps["step"].tolist() == [0, 1] and (steps["fp_start_ns"] == -1).all()
    assert (steps["end_ns"] > steps["begin_ns"]).all()


def test_lazy_exports():
    assert insight.Profiler is Profiler and insight.schedule is schedule
    code = "import sys, insight.trace; assert 'runtime' not in sys.modules, 'insight.trace imported the runtime'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# -- a crash keeps what was flushed -------------------------------------------------------------------------
CRASH_SCRIPT = """
import sys
from runtime import Model, context, nn
from runtime.dataset import NumpySlicesDataset
from runtime.dataset.digits import load_digits_split
from runtime.models import LeNetDigits
from insight import Profiler

context.set_context(mode=context.GRAPH_MODE, seed=0)
xtr, ytr, _, _ = load_digits_split(seed=0)
net = LeNetDigits(channels=(8, 16), hidden=32)
model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
              nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
ds = NumpySlicesDataset((xtr[:320], ytr[:320]), ["image", "label"]).batch(32, drop_remainder=True)
prof = Profiler(sys.argv[1], flush_interval=0.1)
model.train(100000, ds, dataset_sink_mode=len(sys.argv) > 2)
"""


@pytest.mark.parametrize("sink", [False, True], ids=["feed", "sink"])
def test_sigkill_keeps_flushed_steps_readable(tmp_path, sink):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)] + (["sink"] if sink else []),
                            cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        parts = run_dir / "rank_0" / "steps"
        while time.time() < deadline and proc.poll() is None:
            if len(list(parts.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert len(list(parts.glob("part-*.parquet"))) >= 3, "no flushes within 60 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    run = open_run(run_dir)
    assert run.manifest["status"] == "running"
    steps = run.table("steps")
    assert len(steps) >= 1 and steps["step"].tolist() == list(range(len(steps)))
    assert run.manifest["step_count"] <= len(steps)
    tasks = run.table("tasks")
    graph = run.table("graphs")
    assert graph["graph"].tolist() == ["train_step"]
    per_step = tasks[tasks["task_id"] >= 0].groupby("step").size()
    n_tasks = per_step.max()
    # every step on disk is complete: its tasks were written before it
    assert (per_step.reindex(steps["step"]).to_numpy() == n_tasks).all()
    assert (tasks["dur_ns"] == tasks["end_ns"] - tasks["start_ns"]).all()
    mem = run.table("memory")
    assert set(steps["step"]) <= set(mem["step"])


# -- the data pipeline's queue sampler ---------------------------------------------------------------------------
def test_one_sampler_thread_samples_the_pipeline_of_every_epoch(tmp_path, digits):
    """Model.train iterates a new pipeline per epoch: all of them are sampled (dataset_queues rows for every
    pipeline of dataset_pipeline), by one shared sampler thread that is never doubled and ends with the profiler."""
    import threading

    from runtime.dataset import config
    from runtime.train.callback import Callback

    class Watch(Callback):
        def step_end(self, run_context):
            counts.append(sum(t.name == "dataset-sampler" for t in threading.enumerate()))

    def slow(x):  # 0.5 ms per row: an epoch of 160 rows lasts far longer than the sampling interval
        time.sleep(0.0005)
        return x

    counts = []
    xtr, ytr, _, _ = digits
    ds = NumpySlicesDataset((xtr[:N_TRAIN], ytr[:N_TRAIN]), ["image", "label"], shuffle=True, seed=0).map(
        slow, "image").batch(32, drop_remainder=True)
    config.set_monitor_sampling_interval(2)
    try:
        with Profiler(tmp_path / "run", flush_interval=0.05):
            _model().train(3, ds, callbacks=[Watch()])
    finally:
        config.set_monitor_sampling_interval(10)
    run = open_run(tmp_path / "run")
    pipelines = set(run.table("dataset_pipeline")["pipeline_id"])
    queues = run.table("dataset_queues")
    assert len(pipelines) == 3 and set(queues["pipeline_id"]) == pipelines
    assert set(queues.groupby("pipeline_id")["op_id"].nunique()) == {3}  # map, batch, source: every queue
    assert set(counts) == {1}  # one sampler thread at every step, never one per pipeline
    deadline = time.monotonic() + 2
    while any(t.name == "dataset-sampler" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "dataset-sampler" for t in threading.enumerate())  # nobody listens any more
    with pytest.raises(ValueError, match="set_monitor_sampling_interval: interval must be an integer >= 1"):
        config.set_monitor_sampling_interval(0)


def test_events_with_missing_or_loose_fields_become_rows_with_the_documented_defaults(tmp_path):
    """The hot path keeps events as delivered; the writer converts them: absent or None numbers -> -1 (flops,
    bytes, size, wait_ns -> 0), absent strings -> "", a shape tuple -> "2x3", no stream_id -> the id of the
    stream's name, a memory event without device / source -> "device" / "pool", a step without loss -> NaN."""
    with Profiler(tmp_path / "run", flush_interval=3600) as prof:
        t0 = prof._writer.t0
        hooks.emit("step", {"phase": "begin", "step": 0, "epoch": 1, "t_ns": t0 + 10})
        hooks.emit("task", {"task_id": -2, "name": "TransferData", "op": "copy_h2d", "kind": "memcpy_h2d",
                            "stream": "aicpu", "start_ns": t0 + 20, "end_ns": t0 + 50, "step": 0,
                            "shape": (2, 3), "flops": None})
        hooks.emit("memory", {"t_ns": t0 + 30, "action": "alloc", "kind": "workspace", "tensor": "w",
                              "size": 64, "offset": None, "in_use": 64})
        hooks.emit("device_queue", {"t_ns": t0 + 40, "action": "push", "depth": 1, "capacity": 8, "step": 0})
        hooks.emit("step", {"phase": "end", "step": 0, "epoch": 1, "t_ns": t0 + 60, "loss": None})
    run = open_run(tmp_path / "run")
    task = run.table("tasks").iloc[0]
    assert (task["stream"], task["stream_id"], task["shape"], task["dtype"], task["flops"], task["bytes"]) == \
        ("aicpu", 2, "2x3", "", 0, 0)
    assert (task["start_ns"], task["end_ns"], task["dur_ns"], task["graph"]) == (20, 50, 30, "")
    mem = run.table("memory").iloc[0]
    assert (mem["device"], mem["source"], mem["offset"], mem["step"], mem["t_ns"]) == ("device", "pool", -1, -1, 30)
    q = run.table("device_queue").iloc[0]
    assert (q["wait_ns"], q["depth"], q["action"]) == (0, 1, "push")
    step = run.table("steps").iloc[0]
    assert np.isnan(step["loss"]) and (step["begin_ns"], step["end_ns"], step["fp_start_ns"]) == (10, 60, -1)
    assert not step["sink"]
