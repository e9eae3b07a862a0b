"""Host/device heterogeneous Wide&Deep: EmbeddingLookup's sparse path, the fused sparse optimizers, the
host-table engine (deferred update + prefetch, exact), the Criteo reader and the synthetic generator."""
import os
import resource
import warnings

import numpy as np
import pytest

import insight
from insight.trace import as_run, read, task_columns
from runtime import _kernels_embedding as KE
from runtime import context, nn
from runtime.core import Tensor, bind
from runtime.dataset import GeneratorDataset
from runtime.dataset.criteo import CriteoFormatError, CriteoVocab, criteo_dataset
from runtime.dataset.criteo_synthetic import CriteoSynthetic, model_batches
from runtime.device import DeviceOutOfMemoryError
from runtime.models.wide_deep import WideDeepConfig, auc, build_model, pack_batch, predict_scores
from runtime.nn.embedding import flush_host_tables
from runtime.ops import api as F
from runtime.ops.registry import get_primitive
from runtime.train import Model
from runtime.train.callback import Callback
from tests.gradcheck_util import check_gradients, param

GEN = dict(zipf=1.3, wide_std=0.35, interaction_std=0.8, rank=2)
SMALL = dict(emb_dim=8, deep_layers=(64, 32), adam_lr=5e-3, ftrl_lr=0.05, ftrl_initial_accum=1e-4)


@pytest.fixture(autouse=True)
def _graph_mode():
    context.set_context(mode=context.GRAPH_MODE, seed=1, device_memory="8GB")
    yield
    flush_host_tables()
    context.set_context(device_memory="8GB")


class Losses(Callback):
    def __init__(self):
        self.values = []

    def step_end(self, run_context):
        self.values.append(float(run_context.original_args()["net_outputs"]))


def _dataset(xs, ys):
    return GeneratorDataset(lambda: iter(zip(xs, ys)), ["data", "label"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- kernels -------------------------------------------------------------------------------------------
def test_unique_inverse_matches_numpy_and_pads_with_the_first_id():
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.2, 5000) % 700
    uid, inv, count = KE.unique_inverse(ids, 700)
    assert count == len(np.unique(ids))
    assert np.array_equal(uid[inv], ids)                     # inverse maps back
    assert len(set(uid[:count].tolist())) == count           # distinct
    assert (uid[count:] == uid[0]).all() and KE.unique_count(uid) == count
    assert uid[0] == ids[0]                                  # first-occurrence order
    with pytest.raises(IndexError, match="id 700 is outside the table of 700 rows"):
        KE.unique_inverse(np.array([3, 700]), 700)
    big = KE.unique_inverse(ids * 100_003, 700 * 100_003)  # the hash path (a vocabulary too big for a map)
    assert big[2] == count and np.array_equal(big[1], inv) and np.array_equal(big[0], uid * 100_003)
    a, b = rng.integers(0, 900, 400), rng.integers(0, 900, 300)
    np.testing.assert_array_equal(KE.member_mask(a, b), np.isin(a, b))


def _one_step(opt_cls, embedding_cls, ids, **kw):
    """One training step of a tiny model on one table; returns the table afterwards."""
    init = np.random.default_rng(3).normal(0, 0.1, (50, 4)).astype(np.float32)
    emb = embedding_cls(50, 4, embedding_table=init)
    loss_t = None

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def construct(self, x):
            return F.reduce_sum(self.emb(x), axis=(1, 2))

    class Sq(nn.Cell):
        def construct(self, y, t):
            return F.reduce_mean(F.square(F.sub(y, t)))

    net = Net()
    model = Model(net, Sq(), opt_cls(net.trainable_params(), **kw), progress=False)
    before = emb.embedding_table.data.copy()
    for _ in range(3):
        loss_t = model.train_step(ids, np.linspace(-1, 1, ids.shape[0]).astype(np.float32))
    flush_host_tables()
    return before, emb.embedding_table.data.copy(), loss_t


@pytest.mark.parametrize("opt,kw", [(nn.LazyAdam, {"learning_rate": 0.05}),
                                    (nn.FTRL, {"learning_rate": 0.5, "l1": 1e-3, "l2": 1e-3})])
def test_fused_sparse_optimizers_match_the_generic_sparse_path(opt, kw):
    ids = np.array([[1, 7, 7], [3, 1, 9], [7, 7, 7], [42, 3, 1]], np.int32)
    before_g, generic, loss_g = _one_step(opt, nn.Embedding, ids, **kw)          # gather + dedup + scatter
    before_f, fused, loss_f = _one_step(opt, nn.EmbeddingLookup, ids, **kw)
    np.testing.assert_array_equal(before_g, before_f)
    np.testing.assert_allclose(fused, generic, rtol=2e-5, atol=1e-6)
    assert loss_f == pytest.approx(loss_g, rel=1e-5)
    untouched = np.setdiff1d(np.arange(50), ids)
    np.testing.assert_array_equal(fused[untouched], before_f[untouched])  # only the looked-up rows change
    assert not np.array_equal(fused[[1, 3, 7, 9, 42]], before_f[[1, 3, 7, 9, 42]])


def test_emb_lookup_gradient_float64():
    rng = np.random.default_rng(5)
    table = param(rng.standard_normal((6, 3)))
    ids = Tensor(np.array([4, 1, 4, 0, 1], np.int64))

    uid = Tensor(np.array([4, 1, 0], np.int64))  # the distinct ids (emb_unique is graph-only)

    def fn():
        rows = bind("emb_lookup", [table, ids, uid])
        return bind("emb_expand", [rows, bind("emb_inverse", [ids], {"num_rows": 6})])
    check_gradients(fn, [table], ["emb_lookup.table"])


def test_emb_expand_gradient_float64():
    rng = np.random.default_rng(6)
    rows = param(rng.standard_normal((4, 3)))
    inv = Tensor(np.array([3, 0, 0, 2, 1, 3, 3], np.int32))
    check_gradients(lambda: bind("emb_expand", [rows, inv]), [rows], ["emb_expand.rows"])


def test_only_the_distinct_rows_are_computed_and_copied():
    """Capacity in the IR, the distinct rows at run time: rows and their gradient have `count` rows."""
    ids = np.array([5, 3, 5, 5, 9, 3], np.int64)
    uid = get_primitive("emb_unique").kernel(ids, num_rows=10)
    np.testing.assert_array_equal(uid, [5, 3, 9])
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    rows = bind("emb_lookup", [Tensor(table), Tensor(ids), Tensor(uid)]).asnumpy()
    assert rows.shape == (3, 2)
    g = bind("emb_rows_grad", [Tensor(KE.unique_inverse(ids)[1]), Tensor(np.ones((6, 2), np.float32)),
                               Tensor(rows)]).asnumpy()
    np.testing.assert_array_equal(g[:, 0], [3, 2, 1])  # id 5 read 3 times, 3 twice, 9 once


# -- out of device memory, then on the host -------------------------------------------------------------
def test_tables_exceeding_the_device_fail_at_compile_and_train_on_the_host():
    vocab, dim, batch = 1_000_000, 32, 256
    cfg = WideDeepConfig.small(vocab_size=vocab, emb_dim=dim, deep_layers=(32,), batch_size=batch)
    table_bytes = vocab * (3 * dim + 3) * 4  # deep table + 2 Adam moments, wide table + FTRL accum/linear
    assert table_bytes > 256 * 2**20
    context.set_context(device_memory="256MB")
    rng = np.random.default_rng(0)
    xs = [pack_batch(rng.integers(0, vocab, (batch, 39)), np.ones((batch, 39), np.float32)) for _ in range(4)]
    ys = [(rng.random((batch, 1)) < 0.3).astype(np.float32) for _ in range(4)]

    net, model = build_model(cfg, host=False)
    with pytest.raises(DeviceOutOfMemoryError) as ei:
        model.train_graph(xs[0], ys[0])
    msg = str(ei.value)
    assert "while compiling" in msg and "deep_embedding.embedding_table" in msg, msg
    del net, model, ei

    rss0 = _rss_mb()
    net, model = build_model(cfg, host=True)
    rss1 = _rss_mb()
    losses = [model.train_step(x, y) for x, y in zip(xs, ys)]
    flush_host_tables()
    rss2 = _rss_mb()
    mem = model.train_graph(xs[0], ys[0]).memory_summary()
    print(f"\nhost tables {table_bytes / 2**20:.0f} MB: RSS +{rss1 - rss0:.0f} MB at build, +{rss2 - rss1:.0f} MB "
          f"after {len(losses)} steps; device parameters {mem['parameters'] / 2**20:.2f} MB, activations "
          f"{mem['planned_peak'] / 2**20:.2f} MB; losses {np.round(losses, 4)}")
    assert np.isfinite(losses).all()
    assert mem["host_parameters"] >= table_bytes - 2**20 and mem["parameters"] < 8 * 2**20
    assert rss1 - rss0 <= table_bytes / 2**20 * 1.05 + 64     # the tables, nothing copied in float64
    assert rss2 - rss1 <= 96                                   # O(batch) while training, not O(vocab)


# -- learning: synthetic data with a known optimum ----------------------------------------------------
def test_one_epoch_reaches_the_bayes_optimal_auc_on_synthetic_data():
    gen = CriteoSynthetic(vocab_scale=5e-5, seed=0, **GEN)
    xs, ys, vocab = model_batches(gen, gen.sample(150_000, seed=1), 1000)
    test = gen.sample(20_000, seed=2)
    xt, yt, _ = model_batches(gen, test, 1000)
    cfg = WideDeepConfig.small(vocab_size=vocab, batch_size=1000, **dict(SMALL, adam_lr=8e-3))
    net, model = build_model(cfg, host=True)
    model.train(1, _dataset(xs, ys), dataset_sink_mode=True)
    got = auc(np.concatenate(yt), predict_scores(model, xt))
    bayes = test.bayes_auc
    print(f"\nAUC after one epoch {got:.4f}, Bayes-optimal {bayes:.4f} (gap {bayes - got:.4f})")
    assert got >= bayes - 0.01


def test_host_and_device_modes_give_identical_losses_and_auc():
    gen = CriteoSynthetic(vocab_scale=5e-5, seed=4, **GEN)
    xs, ys, vocab = model_batches(gen, gen.sample(12_000, seed=1), 500)
    xt, yt, _ = model_batches(gen, gen.sample(5_000, seed=2), 500)
    cfg = WideDeepConfig.small(vocab_size=vocab, batch_size=500, **SMALL)
    out = {}
    for host in (False, True):
        context.set_context(seed=11)
        net, model = build_model(cfg, host=host)
        rec = Losses()
        model.train(1, _dataset(xs, ys), callbacks=[rec], dataset_sink_mode=True)
        out[host] = (rec.values, auc(np.concatenate(yt), predict_scores(model, xt)),
                     net.deep_embedding.embedding_table.data.copy())
        if host:
            eng = net.deep_embedding.engine
            assert eng.prefetch_hits >= len(xs) - 2 and eng.rest_rows > 0  # the overlap really happened
        else:  # on the device, the lookup and the sparse optimizers are AI CPU kernels, as in MindSpore
            tasks = next(iter(model._train_graphs.values())).tl.tasks
            sparse = [t for t in tasks if t.op.startswith(("emb_", "sparse_"))]
            assert {t.op for t in sparse} >= {"emb_unique", "emb_lookup", "sparse_ftrl", "sparse_lazy_adam"}
            assert {t.stream for t in sparse} == {"aicpu"}
    (ld, ad, td), (lh, ah, th) = out[False], out[True]
    print(f"\nfirst losses device {np.round(ld[:3], 6)} host {np.round(lh[:3], 6)}; AUC device {ad:.5f} host {ah:.5f}")
    assert len(ld) == len(xs) >= 20
    assert lh[:20] == ld[:20]
    assert abs(ah - ad) <= 0.002
    np.testing.assert_array_equal(th, td)


# -- profile: the host stream overlaps device compute -------------------------------------------------
def test_profiled_host_run_overlaps_host_work_with_device_compute(tmp_path):
    gen = CriteoSynthetic(vocab_scale=2e-3, seed=2, **GEN)
    xs, ys, vocab = model_batches(gen, gen.sample(12_000, seed=1), 1000)
    cfg = WideDeepConfig.small(vocab_size=vocab, batch_size=1000, **dict(SMALL, emb_dim=32))
    net, model = build_model(cfg, host=True)
    model.train_step(xs[0], ys[0])  # compile outside the profile
    with insight.Profiler(output_path=str(tmp_path / "wd")):
        model.train(1, _dataset(xs, ys), dataset_sink_mode=True)
    t = read(as_run(tmp_path / "wd"), "tasks", task_columns("step", "name", "op", "kind", "stream", "start_ns",
                                                              "end_ns", "bytes"))
    host = t[t.stream == "host"]
    device = t[(t.stream.str.startswith("aicore")) & (t.kind == "kernel")]
    background = host[host.name.str.contains(r"prefetch|other rows")]
    assert len(background) >= len(xs) - 2, background[["step", "name"]].to_string()
    dev = device.sort_values("start_ns")
    ds, de = dev.start_ns.to_numpy(), dev.end_ns.to_numpy()
    win = device.groupby("step").agg(start=("start_ns", "min"), end=("end_ns", "max"))

    def overlap(r):  # time this host task shares with device kernels
        i = np.searchsorted(ds, r.end_ns)
        return float(np.clip(np.minimum(de[:i], r.end_ns) - np.maximum(ds[:i], r.start_ns), 0, None).sum())

    def in_window(r):  # in flight while the device computes some step
        return bool(((win.start < r.end_ns) & (win.end > r.start_ns)).any())
    ov = background.apply(overlap, axis=1)
    inside = background.apply(in_window, axis=1)
    busy = (background.end_ns - background.start_ns).sum()
    print(f"\n{len(background)} background host tasks, {int(inside.sum())} in flight during a device step, "
          f"{ov.sum() / 1e6:.1f} ms of their {busy / 1e6:.1f} ms overlap device kernels, {int((ov > 0).sum())} tasks")
    # Run one after the other (on the step's own thread), host tasks and kernels would share no time at all;
    # how much they share when concurrent is up to the OS scheduler and the GIL: 11-55 % of the host tasks'
    # time alone, 7.7 % once under the whole suite's load. So: clearly more than none.
    assert inside.mean() >= 0.8 and ov.sum() > 0.02 * busy, (inside.mean(), ov.sum(), busy)
    copies = t[t.kind.isin(["memcpy_h2d", "memcpy_d2h"]) & (t.stream == "host")]
    names = set(copies.kind)
    assert names == {"memcpy_h2d", "memcpy_d2h"} and (copies.bytes > 0).all(), copies[["name", "bytes"]]
    lookups = host[host.op == "emb_lookup"]
    assert len(lookups) and set(host.op) >= {"emb_unique", "emb_lookup", "sparse_lazy_adam", "sparse_ftrl"}, \
        sorted(set(host.op))


# -- the Criteo reader ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory):
    gen = CriteoSynthetic(vocab_scale=1e-4, seed=7, **GEN)
    path = tmp_path_factory.mktemp("criteo") / "train.txt"
    gen.write_text(path, 1200, seed=3)
    return gen, path


def test_reader_parses_the_criteo_text_format(criteo_file):
    gen, path = criteo_file
    sample = gen.sample(1200, seed=3 * 1_000_003)
    vocab = CriteoVocab.build(path, min_count=1)
    ds, reader = criteo_dataset(path, vocab, 200, num_parallel_workers=2)
    batches = list(ds)
    assert len(batches) == 6 and reader.bad_lines == 0
    data = np.concatenate([b[0] for b in batches])
    label = np.concatenate([b[1] for b in batches])
    assert data.shape == (1200, 2, 39) and data.dtype == np.int32 and label.shape == (1200, 1)
    np.testing.assert_array_equal(label.ravel(), sample.label)
    vals = np.ascontiguousarray(data[:, 1]).view(np.float32)
    np.testing.assert_allclose(vals[:, :13], np.log1p(np.nan_to_num(sample.dense, nan=0.0)), rtol=1e-6)
    assert (vals[:, 13:] == 1).all() and (data[:, 0, :13] == np.arange(13)).all()
    ids = data[:, 0, 13:]
    for f in (2, 9, 23):  # the same raw id <-> the same model id; missing -> the field's id 0
        raw = sample.cat[:, f]
        got = ids[:, f] - vocab.offsets[f]
        assert ((got == 0) == (raw < 0)).all()
        pairs = set(zip(raw[raw >= 0].tolist(), got[raw >= 0].tolist()))
        assert len(pairs) == len(set(raw[raw >= 0].tolist())) == len({g for _, g in pairs})
    # hashing into a fixed vocabulary: no pass over the data, ids within each field's buckets
    hv = CriteoVocab.hashed(64)
    hd = np.concatenate([b[0] for b in criteo_dataset(path, hv, 200)[0]])
    local = hd[:, 0, 13:] - np.array(hv.offsets)
    assert hv.vocab_size == 13 + 26 * 64 and local.min() >= 0 and local.max() < 64


def test_bad_criteo_lines_name_file_and_line_or_are_counted(criteo_file, tmp_path):
    _, path = criteo_file
    lines = path.read_text().splitlines()
    lines[4] = lines[4] + "\textra"                        # 41 fields
    parts = lines[9].split("\t")
    parts[20] = "xyz!"                                     # a categorical value that is not hex
    lines[9] = "\t".join(parts)
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    vocab = CriteoVocab.hashed(100)
    with pytest.raises(Exception) as ei:
        list(criteo_dataset(bad, vocab, 100)[0])
    msg = str(ei.value)
    assert f"{bad}:5: expected 40 tab-separated fields" in msg and "\n" not in msg.strip(), msg
    lines[4] = lines[5]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"bad.txt:10: categorical field C7 is 'xyz!', not a hex id"):
        list(criteo_dataset(bad, vocab, 100)[0])
    with pytest.raises(CriteoFormatError, match="bad.txt:10"):
        CriteoVocab.build(bad)
    ds, reader = criteo_dataset(bad, vocab, 100, skip_bad_lines=True, drop_remainder=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rows = sum(len(b[1]) for b in ds)
    assert reader.bad_lines == 1 and rows == len(lines) - 1
    assert any("skipped 1 bad line" in str(x.message) and "bad.txt:10" in str(x.message) for x in w)


def test_synthetic_generator_is_criteo_like_and_reproducible():
    gen = CriteoSynthetic(vocab_scale=1.0, seed=1)
    assert gen.cardinalities[2] == 10_131_227 and gen.vocab_size == 33_762_577
    s = gen.sample(20_000, seed=5)
    assert (s.cat < np.array(gen.cardinalities)).all() and (s.cat >= -1).all()
    big = s.cat[:, 2][s.cat[:, 2] >= 0]
    _, counts = np.unique(big, return_counts=True)
    assert counts.max() > 50 * np.median(counts)            # power-law: a heavy head, a long tail
    again = gen.sample(20_000, seed=5)
    np.testing.assert_array_equal(s.logit, again.logit)
    assert 0.7 < s.bayes_auc < 0.99 and 0.1 < s.label.mean() < 0.9


@pytest.mark.parametrize("host", [False, True])
def test_an_id_outside_the_table_is_one_clear_error(host):
    cfg = WideDeepConfig.small(vocab_size=3000, batch_size=8, emb_dim=4, deep_layers=(16,))
    net, model = build_model(cfg, host=host)
    ids = np.zeros((8, 39), np.int64)
    ids[3, 20] = 3000
    with pytest.raises(IndexError, match=r"^EmbeddingLookup: id 3000 is outside the table of 3000 rows$"):
        model.train_step(pack_batch(ids, np.ones((8, 39), np.float32)), np.zeros((8, 1), np.float32))
    with pytest.raises(ValueError, match=r"expects a packed int32 batch \(B, 2, 39\)"):
        model.train_step(ids.astype(np.int32), np.zeros((8, 1), np.float32))
