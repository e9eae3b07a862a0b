"""The threaded dataset pipeline: order/content against plain numpy references, determinism across
worker counts, sizes, sources, error propagation, thread lifetime, statistics and the hook events."""
import gc
import threading
import time

import numpy as np
import pytest

from runtime import Model, context, hooks, nn
from runtime.dataset import DatasetError, GeneratorDataset, NumpySlicesDataset, config
from runtime.models import MLP


@pytest.fixture(autouse=True)
def _dataset_config_and_thread_check():
    """Fresh dataset config per test, and every test must leave no pipeline thread behind."""
    config.reset()
    before = _active_count()
    yield
    config.reset()
    _assert_threads_back(before)


def _dataset_threads():
    return [t for t in threading.enumerate() if t.name.startswith("dataset-")]


def _active_count():
    """threading.active_count(), not counting tqdm's monitor thread (started by Model's progress bar)."""
    return threading.active_count() - sum(t.name == "tqdm_monitor" for t in threading.enumerate())


def _assert_threads_back(before, timeout=2.0):
    gc.collect()
    deadline = time.monotonic() + timeout
    while (_dataset_threads() or _active_count() > before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _dataset_threads() == []
    assert _active_count() <= before


# -- plain numpy references -------------------------------------------------------------------------
def _data(n=23):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = (np.arange(n) * 7 % 10).astype(np.int32)
    return x, y


def _ref_perm(seed, pass_idx, n, iterator_index=0):
    return np.random.default_rng([seed, iterator_index, pass_idx]).permutation(n)


def _ref_buffer_shuffle(rows, size, rng):
    buf, out = [], []

    def pop():
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        out.append(buf.pop())

    for r in rows:
        buf.append(r)
        if len(buf) >= size:
            pop()
    while buf:
        pop()
    return out


def _ref_batch(rows, size, drop):
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        if len(chunk) < size and drop:
            break
        out.append(tuple(np.stack(c) for c in zip(*chunk)))
    return out


def _assert_same(items, ref):
    assert len(items) == len(ref)
    for a, b in zip(items, ref):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert isinstance(u, np.ndarray)
            np.testing.assert_array_equal(u, v)
            assert u.dtype == np.asarray(v).dtype


def _scale(x):
    return x * 2 + 1


# -- order and content ------------------------------------------------------------------------------
def test_plain_slices_in_order_as_numpy_arrays():
    x, y = _data()
    items = list(NumpySlicesDataset((x, y), ["x", "y"]))
    _assert_same(items, [(x[i], y[i]) for i in range(len(x))])


def test_global_shuffle_map_batch_repeat_matches_reference():
    x, y = _data(23)
    ds = (NumpySlicesDataset((x, y), ["x", "y"], shuffle=True, seed=3)
          .map(_scale, input_columns="x").batch(4).repeat(2))
    ref = []
    for p in range(2):  # repeat above batch: two passes, each with its own permutation and remainder batch
        rows = [(_scale(x[i]), y[i]) for i in _ref_perm(3, p, len(x))]
        ref += _ref_batch(rows, 4, drop=False)
    _assert_same(list(ds), ref)
    assert ds.get_dataset_size() == 2 * 6 == len(ref)


def test_repeat_buffer_shuffle_multi_column_map_batch_matches_reference():
    x, y = _data(23)

    def combine(a, b):
        return a.sum() + b, a[0]

    ds = (NumpySlicesDataset({"x": x, "y": y}).repeat(2).shuffle(7, seed=5)
          .map(combine, input_columns=["x", "y"], output_columns=["s", "first"])
          .batch(5, drop_remainder=True))
    assert ds.column_names == ["s", "first"]
    rows = [(x[i], y[i]) for i in range(len(x))] * 2
    rows = _ref_buffer_shuffle(rows, 7, np.random.default_rng([5, 0, 0]))
    rows = [tuple(np.asarray(v) for v in combine(a, b)) for a, b in rows]
    ref = _ref_batch(rows, 5, drop=True)
    _assert_same(list(ds), ref)
    assert ds.get_dataset_size() == 46 // 5 == len(ref)


def test_map_column_layout():
    x, y = _data(4)
    ds = NumpySlicesDataset((x, y, y), ["x", "y", "z"])
    two = ds.map(lambda a: (a[0], a[1]), input_columns="y", output_columns=["y0", "y1"])
    assert two.column_names == ["x", "y0", "y1", "z"]
    inplace = ds.map(lambda a, b: (b, a), input_columns=["x", "z"])
    assert inplace.column_names == ["x", "y", "z"]
    first = next(iter(inplace))
    np.testing.assert_array_equal(first[0], y[0])
    np.testing.assert_array_equal(first[2], x[0])
    with pytest.raises(ValueError, match="not in the dataset's columns"):
        ds.map(_scale, input_columns="nope")


def test_each_for_loop_is_an_epoch_and_reshuffles_reproducibly():
    x, y = _data(17)
    ds = NumpySlicesDataset((x, y), ["x", "y"], shuffle=True, seed=11).batch(4)
    e1, e2 = list(ds), list(ds)
    assert sorted(np.concatenate([b[1] for b in e1]).tolist()) == sorted(y.tolist())
    _assert_same(e1, _ref_batch([(x[i], y[i]) for i in _ref_perm(11, 0, 17, 0)], 4, False))
    _assert_same(e2, _ref_batch([(x[i], y[i]) for i in _ref_perm(11, 0, 17, 1)], 4, False))
    # an unshuffled dataset gives identical epochs
    plain = NumpySlicesDataset((x, y), ["x", "y"]).batch(4)
    _assert_same(list(plain), list(plain))


def test_one_iterator_many_epochs_and_dict_iterator():
    x, y = _data(10)
    ds = NumpySlicesDataset((x, y), ["x", "y"], shuffle=True, seed=2)
    it = ds.create_tuple_iterator(num_epochs=2)
    ep0, ep1 = list(it), list(it)
    assert list(it) == [] and it.closed
    _assert_same(ep0, [(x[i], y[i]) for i in _ref_perm(2, 0, 10)])
    _assert_same(ep1, [(x[i], y[i]) for i in _ref_perm(2, 1, 10)])
    d = list(NumpySlicesDataset((x, y), ["x", "y"]).create_dict_iterator(num_epochs=1))
    assert list(d[3]) == ["x", "y"] and int(d[3]["y"]) == int(y[3])


def test_derived_seed_follows_global_seed():
    x, y = _data(30)

    def order(seed):
        context.set_context(seed=seed)
        return [int(r[1]) for r in NumpySlicesDataset((x, np.arange(30)), ["x", "i"]).shuffle(8)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    config.set_seed(1)
    a = [int(r[1]) for r in NumpySlicesDataset((x, np.arange(30)), ["x", "i"]).shuffle(8)]
    context.set_context(seed=5)
    b = [int(r[1]) for r in NumpySlicesDataset((x, np.arange(30)), ["x", "i"]).shuffle(8)]
    assert a == b  # config.set_seed overrides the global seed


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_same_output_for_any_number_of_workers(workers):
    x, y = _data(40)
    jitter = np.random.default_rng(0).uniform(0, 4e-4, size=1000)

    def slow_square(a):
        time.sleep(jitter[int(a[0]) % 1000])  # perturb completion order across workers
        return a * a

    ds = (NumpySlicesDataset((x, y), ["x", "y"], shuffle=True, seed=9, num_parallel_workers=workers)
          .shuffle(5, seed=4).map(slow_square, "x", num_parallel_workers=workers)
          .batch(3, num_parallel_workers=workers))
    rows = [(x[i], y[i]) for i in _ref_perm(9, 0, 40)]
    rows = [(a * a, b) for a, b in _ref_buffer_shuffle(rows, 5, np.random.default_rng([4, 0, 0]))]
    _assert_same(list(ds), _ref_batch(rows, 3, drop=False))


def test_drop_remainder_sizes_and_batch_size():
    x, y = _data(23)
    base = NumpySlicesDataset((x, y), ["x", "y"])
    assert base.get_dataset_size() == 23 and base.get_batch_size() == 1
    for bs, drop, n in [(5, False, 5), (5, True, 4), (23, True, 1), (24, True, 0), (1, True, 23)]:
        ds = base.batch(bs, drop_remainder=drop)
        items = list(ds)
        assert len(items) == n == ds.get_dataset_size()
        assert ds.get_batch_size() == bs
        assert all(len(b[0]) == bs for b in items[:-1] if items)
    assert base.batch(4).repeat(3).get_dataset_size() == 18
    assert base.repeat(3).batch(4).get_dataset_size() == 18  # 69 rows
    assert len(list(base.repeat(3).batch(4))) == 18
    assert base.map(_scale, "x").shuffle(4).get_dataset_size() == 23


# -- GeneratorDataset ---------------------------------------------------------------------------------
def test_generator_function_source():
    def gen():
        for i in range(11):
            yield np.full((2,), i, np.float32), i * i

    ds = GeneratorDataset(gen, ["v", "sq"]).batch(4)
    assert ds.get_dataset_size() == 3
    ref = _ref_batch([(np.full((2,), i, np.float32), np.asarray(i * i)) for i in range(11)], 4, False)
    _assert_same(list(ds), ref)
    _assert_same(list(ds.repeat(2)), ref + ref)  # the function is called again for each pass


def test_random_access_source_shuffled_and_parallel():
    class Squares:
        def __len__(self):
            return 25

        def __getitem__(self, i):
            return np.array([i, i * i], np.int64), np.float32(i) / 2

    for workers in (1, 3):
        ds = GeneratorDataset(Squares(), ["pair", "half"], shuffle=True, seed=6, num_parallel_workers=workers)
        assert ds.get_dataset_size() == 25
        ref = [(np.array([i, i * i], np.int64), np.asarray(np.float32(i) / 2)) for i in _ref_perm(6, 0, 25)]
        _assert_same(list(ds), ref)
    one_col = GeneratorDataset([np.ones(2) * i for i in range(5)], "v")  # a list is random access too
    assert [float(r[0][0]) for r in one_col] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="random-accessible"):
        GeneratorDataset(lambda: iter([]), ["a"], shuffle=True)


# -- errors and thread lifetime ------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
def test_map_error_names_the_op_and_row_and_stops_threads(workers):
    before = _active_count()
    x, y = _data(40)

    def my_fn(a):
        if int(a[0]) == 17 * 3:  # row 17
            raise ValueError("bad pixel")
        return a

    ds = NumpySlicesDataset((x, y), ["x", "y"]).map(my_fn, "x", num_parallel_workers=workers)
    got = []
    with pytest.raises(DatasetError, match=r"^map op #0 \(operations=\[my_fn\]\) failed on row 17: "
                                           r"ValueError: bad pixel$") as ei:
        for item in ds:
            got.append(item)
    assert len(got) == 17  # every row before the failing one, in order, then the error
    assert isinstance(ei.value.__cause__, ValueError) and ei.value.op_id == 0 and ei.value.op_type == "map"
    _assert_threads_back(before)


def test_error_below_a_batch_and_in_a_generator():
    before = _active_count()
    x, y = _data(40)

    def my_fn(a):
        if int(a[0]) == 17 * 3:
            raise KeyError("k")
        return a

    ds = NumpySlicesDataset((x, y), ["x", "y"]).shuffle(4, seed=1).map(my_fn, "x").batch(8)
    with pytest.raises(DatasetError, match=r"map op #1 \(operations=\[my_fn\]\) failed on row \d+: KeyError"):
        list(ds)

    def broken():
        for i in range(10):
            if i == 6:
                raise ZeroDivisionError("gen died")
            yield (i,)

    with pytest.raises(DatasetError, match=r"generator op #1 \(source=broken\) failed on row 6: ZeroDivisionError"):
        list(GeneratorDataset(broken, ["i"]).batch(2))
    with pytest.raises(DatasetError, match=r"produced 2 values but there are 1 columns"):
        list(GeneratorDataset(lambda: iter([(1, 2)]), ["a"]))
    _assert_threads_back(before)


def test_batch_of_ragged_rows_names_column_and_shapes():
    rows = [(np.zeros((2, 2)), 0), (np.zeros((2, 2)), 1), (np.zeros((3, 2)), 2), (np.zeros((2, 2)), 3)]
    ds = GeneratorDataset(lambda: iter(rows), ["image", "label"]).batch(2)
    with pytest.raises(DatasetError, match=r"batch op #0 \(batch_size=2\) failed on batch 1 \(rows 2\.\.3\): "
                                           r"ValueError: cannot stack column 'image': rows have different "
                                           r"shapes \(3, 2\) \(row 2\) and \(2, 2\) \(row 3\)"):
        list(ds)


def test_early_break_and_garbage_collection_release_threads():
    before = _active_count()
    x, y = _data(200)
    ds = NumpySlicesDataset((x, y), ["x", "y"]).map(_scale, "x", num_parallel_workers=3).batch(2)
    for i, _ in enumerate(ds):
        assert len(_dataset_threads()) > 0
        if i == 3:
            break
    _assert_threads_back(before)
    it = ds.create_tuple_iterator()  # num_epochs=-1: would prefetch forever
    next(it)
    assert len(_dataset_threads()) == 1 + 3 + 1
    del it
    _assert_threads_back(before)
    with ds.create_tuple_iterator(num_epochs=3) as it:
        next(it)
    assert it.closed
    _assert_threads_back(before)
    infinite = NumpySlicesDataset((x, y), ["x", "y"]).repeat(-1)
    assert sum(1 for _, _ in zip(range(1000), infinite)) == 1000
    _assert_threads_back(before)


# -- statistics and events -------------------------------------------------------------------------
def test_stats_count_rows_and_batches_and_prefetch_size():
    config.set_prefetch_size(4)
    x, y = _data(23)
    it = NumpySlicesDataset((x, y), ["x", "y"]).map(_scale, "x", num_parallel_workers=2).batch(5)\
        .create_tuple_iterator(num_epochs=1)
    assert sum(1 for _ in it) == 5 and it.closed
    st = {s["op_type"]: s for s in it.stats()}
    assert [s["op_id"] for s in it.stats()] == [0, 1, 2]
    assert st["batch"]["parent_id"] == -1 and st["map"]["parent_id"] == 0 and st["numpy_slices"]["parent_id"] == 1
    assert st["batch"]["batches"] == 5 and st["batch"]["rows"] == 23
    assert st["map"]["rows"] == 23 and st["map"]["batches"] == 0 and st["map"]["num_workers"] == 2
    assert st["numpy_slices"]["rows"] == 23
    assert all(s["queue_capacity"] == 4 for s in st.values())
    assert all(s["samples"] == 0 and s["avg_queue_depth"] is None for s in st.values())
    assert all(s["busy_ns"] > 0 and s["wait_in_ns"] >= 0 and s["wait_out_ns"] >= 0 for s in st.values())
    with pytest.raises(ValueError):
        config.set_prefetch_size(0)


def test_slow_map_shows_full_input_queue_and_empty_output_queue():
    events = []

    def listener(kind, ev):
        if kind.startswith(("dataset", "queue")):
            events.append((kind, ev))

    def slow(a):
        time.sleep(0.002)
        return a

    x, y = _data(150)
    ds = NumpySlicesDataset((x, y), ["x", "y"]).map(slow, "x")
    hooks.subscribe(listener)
    try:
        it = ds.create_tuple_iterator(num_epochs=1)
        n = sum(1 for _ in it)
    finally:
        hooks.unsubscribe(listener)
    assert n == 150
    kinds = [k for k, _ in events]
    assert kinds.count("dataset_pipeline") == 1 and kinds[0] == "dataset_pipeline"
    pipe = events[0][1]
    assert [(o["op_id"], o["op_type"], o["parent_id"]) for o in pipe["ops"]] == [(0, "map", -1), (1, "numpy_slices", 0)]
    assert all(o["queue_capacity"] == 16 and o["num_workers"] == 1 for o in pipe["ops"])

    samples = [e for k, e in events if k == "queue_sample" and e["pipeline_id"] == it.pipeline_id]
    by_op = {op: [s["depth"] / s["capacity"] for s in samples if s["op_id"] == op] for op in (0, 1)}
    assert len(by_op[0]) >= 10 and len(by_op[1]) >= 10
    map_out, map_in = np.mean(by_op[0]), np.mean(by_op[1])  # op 1's output queue is the map's input queue
    assert map_in > 0.7, map_in
    assert map_out < 0.3, map_out

    ops = [e for k, e in events if k == "dataset_op"]
    assert {e["op_id"] for e in ops} == {0, 1} and len(ops) == 2  # end of the (only) epoch, closes with it
    m = next(e for e in ops if e["op_id"] == 0)
    src = next(e for e in ops if e["op_id"] == 1)
    assert m["rows"] == 150 and m["op_type"] == "map" and m["num_workers"] == 1 and m["batches"] == 0
    assert m["busy_ns"] > 150 * 2e6 * 0.8          # the sleeping map is the busy op ...
    assert src["wait_out_ns"] > 150 * 2e6 * 0.5    # ... its producer is blocked on a full queue
    assert all(isinstance(e[f], int) for e in ops for f in ("busy_ns", "wait_in_ns", "wait_out_ns"))
    assert not any(k == "queue_sample" for k, _ in events[kinds.index("dataset_op"):])


def test_nothing_sampled_without_a_listener():
    assert not hooks.listening
    x, y = _data(60)

    def slow(a):
        time.sleep(0.001)
        return a

    it = NumpySlicesDataset((x, y), ["x", "y"]).map(slow, "x").create_tuple_iterator(num_epochs=1)
    names = set()
    for _ in it:
        names |= {t.name for t in _dataset_threads()}
    assert names and not any("sampler" in n for n in names)
    assert all(s["samples"] == 0 for s in it.stats())


def test_listener_subscribing_mid_iteration_starts_and_stops_the_sampler():
    x, y = _data(80)

    def slow(a):
        time.sleep(0.001)
        return a

    events = []
    it = NumpySlicesDataset((x, y), ["x", "y"]).map(slow, "x").create_tuple_iterator(num_epochs=1)
    next(it)
    assert not any("sampler" in t.name for t in _dataset_threads())
    listener = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        for _ in range(30):
            next(it)
        assert any("sampler" in t.name for t in _dataset_threads())
    finally:
        hooks.unsubscribe(listener)
    deadline = time.monotonic() + 1
    while any("sampler" in t.name for t in _dataset_threads()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not any("sampler" in t.name for t in _dataset_threads())  # stops when nobody listens
    kinds = [k for k, _ in events]
    assert kinds[0] == "dataset_pipeline" and kinds.count("dataset_pipeline") == 1
    assert "queue_sample" in kinds
    st = it.stats()
    assert st[0]["samples"] > 0 and len(st[0]["depth_samples"]) == st[0]["samples"]
    it.close()


def test_close_mid_epoch_emits_final_op_stats():
    events = []
    listener = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        x, y = _data(100)
        it = NumpySlicesDataset((x, y), ["x", "y"]).batch(4).create_tuple_iterator()
        next(it)
        it.close()
    finally:
        hooks.unsubscribe(listener)
    ops = [e for k, e in events if k == "dataset_op"]
    assert len(ops) == 2 and all(e["final"] for e in ops)
    assert next(e for e in ops if e["op_type"] == "batch")["batches"] >= 1


# -- Model integration ---------------------------------------------------------------------------------
def test_model_trains_on_a_generator_pipeline(digits):
    xtr, ytr, _, _ = digits
    x, y = xtr[:256].reshape(-1, 64), ytr[:256]

    class Source:
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    context.set_context(seed=0)
    net = MLP((64, 32, 10))
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    ds = (GeneratorDataset(Source(), ["x", "y"], shuffle=True, seed=1, num_parallel_workers=2)
          .map(lambda a: a.astype(np.float32), "x", num_parallel_workers=2).batch(32, drop_remainder=True))
    params = model.train(3, ds)
    assert params["cur_step_num"] == 3 * 8
    assert np.isfinite(float(params["net_outputs"]))


def test_a_listener_that_subscribes_mid_iteration_gets_the_pipeline_structure():
    import numpy as np

    from runtime import hooks
    from runtime.dataset import NumpySlicesDataset

    ds = NumpySlicesDataset((np.arange(64, dtype=np.float32),), ["x"]).batch(4)
    it = ds.create_tuple_iterator(num_epochs=1)
    next(it)
    seen = []
    listener = hooks.subscribe(lambda kind, ev: seen.append(kind))
    try:
        next(it)
    finally:
        hooks.unsubscribe(listener)
        it.close()
    assert "dataset_pipeline" in seen
