"""The simulated device: memory pool and plan, streams and events, placement, data sink mode."""
import gc
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import batches
from runtime import Model, _exec, context, hooks, nn
from runtime.core import GraphBuilder, building
from runtime.dataset import NumpySlicesDataset
from runtime.device.memory import ALIGN, DeviceOutOfMemoryError, LiveTensor, MemoryPool, get_device, parse_size
from runtime.device.plan import Buffer, plan_memory
from runtime.executor import CompiledGraph, evaluate
from runtime.ir.graph import Graph
from runtime.models import LeNetDigits
from runtime.nn.parameter import Parameter
from runtime.ops import api as F
from runtime.train import LossMonitor

# -- memory pool ------------------------------------------------------------------------------------


def test_pool_best_fit_reuse_alignment_and_peak():
    pool = MemoryPool("64KB")
    t = lambda n: LiveTensor(n, 0)  # noqa: E731
    a = pool.alloc(1000, t("a"))
    b = pool.alloc(5000, t("b"))
    c = pool.alloc(1000, t("c"))
    assert a.size == 1024 and a.offset % ALIGN == 0 and b.offset == 1024
    pool.free(b)
    d = pool.alloc(4000, t("d"))  # best fit: the 5120-byte hole b left
    assert d.offset == 1024
    assert pool.peak == 1024 + 5120 + 1024
    pool.free(a), pool.free(c), pool.free(d)
    assert pool.in_use == 0 and pool.largest_free_block() == pool.capacity  # holes coalesced


def test_pool_out_of_memory_message_and_recovery():
    pool = MemoryPool("10KB")
    pool.alloc(6000, LiveTensor("fc1.weight", 6000, "parameter", (1500,), "float32"))
    with pytest.raises(DeviceOutOfMemoryError) as e:
        pool.alloc(6000, LiveTensor("x", 6000))
    msg = str(e.value)
    assert "capacity 10.0 KB" in msg and "in use 6.0 KB" in msg and "requested 6.0 KB" in msg
    assert "'fc1.weight' produced by parameter" in msg
    assert pool.alloc(3000, LiveTensor("small", 3000)).size == 3072  # still usable


def test_a_replaced_device_drains_silently_into_a_running_profile():
    """Parameters of a model built before device_memory changed die while a listener records: the old
    pool must neither announce its live blocks nor report their frees (they are not the device's memory)."""
    context.set_context(device_memory="3MB")
    old = get_device()
    params = [Parameter(np.ones(1000, np.float32), name=f"old.w{i}") for i in range(3)]
    old.make_resident(params)
    context.set_context(device_memory="4MB")
    new = get_device()
    assert new is not old
    seen = []
    listener = lambda kind, ev: seen.append((kind, ev)) if kind == "memory" else None
    hooks.subscribe(listener)
    try:
        del params
        gc.collect()
        new.pool.alloc(100, LiveTensor("fresh", 100, "parameter", (25,), "float32"))
    finally:
        hooks.unsubscribe(listener)
        context.set_context(device_memory=None)
    names = [ev["tensor"] for _, ev in seen]
    assert names == ["fresh"], names
    assert old.pool.in_use == 0  # the old blocks were still freed


def test_parse_size():
    assert parse_size("512MB") == 512 << 20 and parse_size("2GB") == 2 << 30 and parse_size(4096) == 4096
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="device_memory"):
        context.set_context(device_memory="12 parsecs")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50_000), st.integers(0, 60), st.integers(0, 20),
                          st.sampled_from(["aicore0", "aicore1", "*"])), min_size=1, max_size=60))
def test_memory_plan_never_overlaps_live_buffers(spec):
    bufs = [Buffer(k, size, start, start + length, stream=s) for k, (size, start, length, s) in enumerate(spec)]
    plan = plan_memory(bufs)
    for i, a in enumerate(bufs):
        assert a.offset >= 0 and a.offset % ALIGN == 0 and a.offset + a.size <= plan.peak
        for b in bufs[i + 1:]:
            live_together = a.start <= b.end and b.start <= a.end
            if live_together:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    # the plan is never worse than giving every buffer its own space, and never better than the live maximum
    most_live = max(sum(b.size for b in bufs if b.start <= p <= b.end) for p in range(0, 81))
    assert most_live <= plan.peak <= plan.total_naive()
    # with several streams, a buffer only takes memory freed on its own stream (whose order is guaranteed)
    for a in bufs:
        for b in bufs:
            if b.start > a.end and a.stream != b.stream:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)


# -- streams ------------------------------------------------------------------------------------------

_OPS = ["add", "mul", "sub", "tanh", "sigmoid", "matmul", "exp_neg", "reduce"]


def _random_dag(seed, n_nodes=40, width=16):
    rng = np.random.default_rng(seed)
    g = Graph(f"dag{seed}")
    b = GraphBuilder(g)
    vals = []
    with building(b):
        for k in range(3):
            vals.append(b.input(f"x{k}", (width, width), np.float32))
        for _ in range(n_nodes):
            op = _OPS[rng.integers(len(_OPS))]
            a, c = vals[rng.integers(len(vals))], vals[rng.integers(len(vals))]
            if op == "add":
                v = F.add(a, c)
            elif op == "mul":
                v = F.mul(F.tanh(a), c)
            elif op == "sub":
                v = F.sub(a, c)
            elif op == "tanh":
                v = F.tanh(a)
            elif op == "sigmoid":
                v = F.sigmoid(a)
            elif op == "matmul":
                v = F.mul(F.matmul(a, c), 1.0 / width)
            elif op == "exp_neg":
                v = F.exp(F.neg(F.abs(a)))
            else:
                v = F.broadcast_to(F.reduce_mean(a, 1, keepdims=True), (width, width))
            vals.append(v)
        outs = vals[-4:]
    for k, o in enumerate(outs):
        g.outputs[f"y{k}"] = o.node
    streams = ["aicore0", "aicore1", "aicpu", "host"]
    for n in g.nodes:
        n.ann["placement"] = "device"
        if n.op not in ("input", "param", "const"):
            n.ann["stream"] = streams[rng.integers(len(streams))]
    feeds = {f"x{k}": rng.normal(size=(width, width)).astype(np.float32) for k in range(3)}
    return g, feeds


@pytest.mark.parametrize("seed", range(12))
def test_random_dags_on_four_streams_match_serial_and_respect_events(seed):
    g, feeds = _random_dag(seed)
    values = {n.id: feeds[n.attrs["name"]] for n in g.nodes if n.op == "input"}
    serial = evaluate(g.nodes, values, list(g.outputs.values()))
    exe = CompiledGraph(g)
    assert len(exe.other_streams) >= 2  # really concurrent
    events = []
    listener = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        for _ in range(3):
            out = exe(feeds, step=0)
            for name, node in g.outputs.items():
                np.testing.assert_array_equal(out[name], serial[node.id])
    finally:
        hooks.unsubscribe(listener)
    table = next(ev for k, ev in events if k == "task_table")["columns"]
    for _, run in [(k, ev) for k, ev in events if k == "step_tasks"]:
        start = dict(zip(run["task_id"].tolist(), run["start_ns"].tolist()))
        end = dict(zip(run["task_id"].tolist(), run["end_ns"].tolist()))
        assert sorted(start) == table["task_id"]
        by_node = {t.node.id: t.task_id for t in exe.tl.tasks if t.node is not None}
        for t in exe.tl.tasks:  # every data dependency finished before its consumer started
            if t.node is None:
                continue
            for i in t.node.inputs:
                if i.id in by_node:
                    assert end[by_node[i.id]] <= start[t.task_id]
        # a wait never ends before the record it waits for
        rec = {t.event: t.task_id for t in exe.tl.tasks if t.kind == "event_record"}
        for t in exe.tl.tasks:
            if t.kind == "event_wait":
                assert end[t.task_id] >= start[rec[t.event]]


def test_a_failing_kernel_on_a_worker_stream_raises_in_the_caller():
    g, feeds = _random_dag(3)
    exe = CompiledGraph(g)
    victim = next(t for t in exe.tl.tasks if t.kind == "kernel" and t.stream != exe.main_stream)

    def boom(*a, **k):
        raise FloatingPointError("injected failure")

    victim.kernel = boom
    with pytest.raises(FloatingPointError, match="injected failure"):
        exe(feeds)


# -- whole training ------------------------------------------------------------------------------------


def _digits_losses(digits, sink, streams, epochs=2):
    xtr, ytr, _, _ = digits
    context.set_context(mode=context.GRAPH_MODE, seed=4, compute_streams=streams)
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    lm = LossMonitor(10**9)
    ds = NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=5).batch(32, drop_remainder=True)
    model.train(epochs, ds, callbacks=[lm], dataset_sink_mode=sink)
    return np.array(lm.losses), model


def test_digits_same_losses_with_sink_mode_and_two_compute_streams(digits):
    base, m1 = _digits_losses(digits, False, 1)
    assert len(base) == 2 * (1438 // 32) and base[-1] < base[0]
    for sink, streams in [(True, 1), (False, 2), (True, 2)]:
        losses, model = _digits_losses(digits, sink, streams)
        np.testing.assert_allclose(losses, base, rtol=0, atol=1e-6, err_msg=f"sink={sink} streams={streams}")
    exe = list(model._train_graphs.values())[0]
    assert {"aicore0", "aicore1"} <= set(s for s, ts in exe.tl.streams.items() if ts)
    assert exe.tl.n_events > 0


def test_sink_mode_records_queue_and_get_next(digits):
    xtr, ytr, _, _ = digits
    context.set_context(mode=context.GRAPH_MODE, seed=4)
    net = nn.SequentialCell(nn.Flatten(), nn.Dense(64, 10))
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.SGD(net.trainable_params(), 0.1), progress=False)
    ds = NumpySlicesDataset((xtr[:320], ytr[:320]), ["image", "label"]).batch(32)
    events = []
    listener = hooks.subscribe(lambda k, e: events.append((k, e)))
    try:
        model.train(2, ds, dataset_sink_mode=True, sink_queue_size=4)
    finally:
        hooks.unsubscribe(listener)
    q = [e for k, e in events if k == "device_queue"]
    assert sum(e["action"] == "push" for e in q) == 20 and sum(e["action"] == "pop" for e in q) == 20
    assert all(0 <= e["depth"] <= 4 and e["capacity"] == 4 for e in q)
    gets = [e for k, e in events if k == "task" and e["kind"] == "get_next"]
    assert len(gets) == 20 and [g["step"] for g in gets] == list(range(20))
    copies = [e for k, e in events if k == "task" and e["name"] == "TransferData"]
    assert len(copies) == 20 and all(c["bytes"] == 32 * 64 * 4 + 32 * 4 for c in copies)
    with pytest.raises(ValueError, match="needs GRAPH_MODE"):
        context.set_context(mode=context.PYNATIVE_MODE)
        model.train(1, ds, dataset_sink_mode=True)


def test_sink_mode_surfaces_dataset_errors(digits):
    def bad_batches():
        yield digits[0][:8], digits[1][:8]
        raise OSError("disk read failed")

    class DS:
        def get_dataset_size(self):
            return 2

        def __iter__(self):
            return bad_batches()

    net = nn.SequentialCell(nn.Flatten(), nn.Dense(64, 10))
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.SGD(net.trainable_params(), 0.1), progress=False)
    with pytest.raises(OSError, match="disk read failed"):
        model.train(1, DS(), dataset_sink_mode=True)
    assert model.step == 1


# -- out of memory and host placement --------------------------------------------------------------------


class WideDeepish(nn.Cell):
    """A big embedding table feeding a small MLP: the table dominates memory."""

    def __init__(self, vocab, dim=32, fields=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, embedding_table="normal")
        self.fields = fields
        self.mlp = nn.SequentialCell(nn.Dense(fields * dim, 32), nn.ReLU(), nn.Dense(32, 2))

    def construct(self, ids):
        e = self.embedding(ids)
        return self.mlp(e.reshape(ids.shape[0], -1))


def _ids_task(rng, n, vocab, fields=4):
    ids = rng.integers(0, vocab, size=(n, fields)).astype(np.int32)
    labels = ((ids % 7).sum(axis=1) % 2).astype(np.int32)  # learnable from the ids
    return ids, labels


def test_out_of_memory_then_host_placement_trains(rng):
    vocab = 150_000  # 150k x 32 float32 = 19.2 MB table, and LazyAdam keeps two more of that size
    context.set_context(mode=context.GRAPH_MODE, seed=0, device_memory="32MB")
    ids, labels = _ids_task(rng, 512, vocab)
    data = batches(ids, labels, 64)

    net = WideDeepish(vocab)
    opt = nn.LazyAdam(net.trainable_params(), 0.01)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)
    with pytest.raises(DeviceOutOfMemoryError) as e:
        model.train_step(*data[0])
    msg = str(e.value)
    assert "capacity 32.0 MB" in msg and "embedding.embedding_table" in msg and "requested" in msg
    assert "primitive_target='CPU'" in msg
    del model, opt, net

    # the same process recovers: place the table and its optimizer on the host
    net = WideDeepish(vocab)
    net.embedding.set_attr("primitive_target", "CPU")
    opt = nn.LazyAdam(net.trainable_params(), 0.01)
    opt.target = "CPU"
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)
    losses = [model.train_step(x, y) for _ in range(15) for x, y in data]
    exe = list(model._train_graphs.values())[0]
    assert exe.tl.host_params and any(p.name == "embedding.embedding_table" for p in exe.tl.host_params)
    ops = exe.graph.op_counts()
    assert ops.get("copy_h2d", 0) >= 1 and ops.get("copy_d2h", 0) >= 1
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])  # converges
    assert exe.device.pool.peak <= exe.device.pool.capacity


def test_primitive_target_on_an_op(rng):
    from runtime.ops import operations as P

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.table = Parameter(rng.normal(size=(100, 8)).astype(np.float32), name="table")
            self.gather = P.Gather().add_prim_attr("primitive_target", "CPU")
            self.fc = nn.Dense(8, 2)

        def construct(self, ids):
            return self.fc(self.gather(self.table, ids))

    net = Net()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.SGD(net.trainable_params(), 0.1), progress=False)
    ids = rng.integers(0, 100, 16).astype(np.int32)
    model.train_step(ids, (ids % 2).astype(np.int32))
    g = list(model._train_graphs.values())[0].graph
    gather = next(n for n in g.nodes if n.op == "gather")
    assert gather.ann["placement"] == "host" and gather.ann["stream"] == "host"
    assert any(n.op == "copy_h2d" and n.inputs[0] is gather for n in g.nodes)
    assert "[placement=host, stream=host]" in g.dump()
    with pytest.raises(ValueError, match="primitive_target must be 'CPU' or 'Ascend'"):
        P.Gather().add_prim_attr("primitive_target", "GPU")


def test_activation_oom_names_largest_tensors_then_smaller_model_trains(rng):
    context.set_context(mode=context.GRAPH_MODE, seed=0, device_memory="4MB")
    x = rng.normal(size=(2048, 256)).astype(np.float32)
    y = rng.integers(0, 10, 2048).astype(np.int32)
    net = nn.SequentialCell(nn.Dense(256, 512), nn.ReLU(), nn.Dense(512, 10))
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.SGD(net.trainable_params(), 0.1), progress=False)
    with pytest.raises(DeviceOutOfMemoryError) as e:
        model.train_step(x, y)
    msg = str(e.value)
    assert "activations need" in msg and "float32[2048x512]" in msg and "matmul" in msg
    from runtime.device import get_device
    in_use_after = get_device().pool.in_use
    small = nn.SequentialCell(nn.Dense(256, 32), nn.ReLU(), nn.Dense(32, 10))
    m2 = Model(small, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
               nn.SGD(small.trainable_params(), 0.1), progress=False)
    losses = [m2.train_step(x[:128], y[:128]) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert get_device().pool.in_use > in_use_after  # the small model's memory is really accounted


def test_the_executor_loop_reads_the_clock_of_perf_counter_ns():
    """Task stamps from the compiled loop line up with every other event's time.perf_counter_ns()."""
    for _ in range(100):
        a = time.perf_counter_ns()
        b = _exec.now_ns()
        c = time.perf_counter_ns()
        assert a <= b <= c


def _sleeper(ms):
    def kernel(x):
        time.sleep(ms / 1e3)
        return x
    return kernel


@pytest.fixture(params=["clock_gettime", "tsc"])
def stamp_clock(request):
    """The executor loops' stamping clock for one test, then the machine's default again (as at import)."""
    tsc = request.param == "tsc"
    if tsc and not _exec.use_tsc(None):
        pytest.skip("this machine's kernel does not keep its clock on the TSC")
    _exec.use_tsc(tsc)
    yield request.param
    _exec.use_tsc(None)


def test_task_stamps_are_perf_counter_times_with_either_clock(stamp_clock):
    """Stamped with clock_gettime or with the TSC mapped to it, every task's stamps fall inside the
    perf_counter_ns() readings around the step, in order, and a task that sleeps 3 ms lasts 3 ms."""
    sleeps = [0.0, 3.0, 0.0, 1.0, 0.0, 0.2]
    flat = [(0, _sleeper(ms), (0,), {}, ()) for ms in sleeps]
    for _ in range(5):
        starts, ends = np.empty(len(flat), np.int64), np.empty(len(flat), np.int64)
        a = time.perf_counter_ns()
        _exec.run_flat(flat, [np.zeros(1)], starts, ends)
        c = time.perf_counter_ns()
        stamps = np.stack([starts, ends], 1).ravel()
        assert a <= stamps[0] and stamps[-1] <= c and (np.diff(stamps) >= 0).all(), (a, stamps, c)
        durations = (ends - starts) / 1e6
        for ms, d in zip(sleeps, durations):
            assert ms <= d + 0.05 and (ms == 0 or d < ms + 200), (sleeps, durations)


def test_stream_stamps_with_either_clock_include_the_wait_for_another_stream(stamp_clock):
    """run_stream: a wait on an event another thread sets 5 ms later is stamped as ending after that thread's
    perf_counter_ns() just before it set the event (how long it blocked depends on when the stream got there:
    under load, late)."""
    import threading
    from types import SimpleNamespace as Task
    tasks = [Task(ins=(0,), out=0, kernel=_sleeper(0.0), attrs={}, frees=()), Task(event=0),
             Task(ins=(0,), out=0, kernel=_sleeper(1.0), attrs={}, frees=())]
    codes = np.array([_exec.KERNEL, _exec.EVENT_WAIT, _exec.KERNEL], np.int8)
    events = [threading.Event()]
    starts, ends = np.empty(3, np.int64), np.empty(3, np.int64)
    fired = []

    def fire():
        fired.append(time.perf_counter_ns())
        events[0].set()
    setter = threading.Timer(0.005, fire)
    a = time.perf_counter_ns()
    setter.start()
    done = _exec.run_stream(tasks, codes, [np.zeros(1)], events, [], starts, ends)
    c = time.perf_counter_ns()
    assert done == 3
    stamps = np.stack([starts, ends], 1).ravel()
    assert a <= stamps[0] and stamps[-1] <= c and (np.diff(stamps) >= 0).all(), (a, stamps, c)
    assert ends[1] >= fired[0] and (ends[2] - starts[2]) / 1e6 >= 0.95, (starts, ends, fired)
