"""GNNs: the Planetoid loader (split, restricted unpickler), the sparse kernels (vs numpy, float32 and
float16), float64 finite-difference checks of every sparse primitive and of GCNConv / GATConv, mixed
precision (loss scaling, overflow skip), a reduced accuracy check and a profiled run."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime  # noqa: E402,F401  (registers the primitives)
from runtime import context, nn  # noqa: E402
from runtime.models import gnn  # noqa: E402
from runtime.core import Tensor  # noqa: E402
from runtime.dataset.planetoid import PlanetoidFormatError, load_planetoid, restricted_load  # noqa: E402
from runtime.nn.gnn import GraphStructure, SparseFeatures  # noqa: E402
from runtime.ops import amp as A  # noqa: E402
from runtime.ops import api as F  # noqa: E402
from runtime.ops import sparse as S  # noqa: E402
from runtime.ops.registry import all_primitives  # noqa: E402
from runtime.train import amp  # noqa: E402

from gradcheck_util import check_gradients, param  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"


@pytest.fixture
def _planetoid_files():
    """The shared data sets are part of the test set-up (../shared beside the project): missing, they fail."""
    if not (DATA / "ind.cora.x").is_file():
        pytest.fail(f"the Planetoid files are not at {DATA} (the suite expects shared/ beside the project root)")


needs_data = pytest.mark.usefixtures("_planetoid_files")


@pytest.fixture(autouse=True)
def _graph_mode():
    context.set_context(mode=context.GRAPH_MODE)
    yield


# ----------------------------------------------------------------------------------------------
# small random graphs and their dense references
# ----------------------------------------------------------------------------------------------
def random_csr(rng, m, n, density=0.35):
    dense = rng.random((m, n)) < density
    dense[0, :] = False  # an empty row
    dense[1, 0] = True
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int64)
    return S.CSRStructure(indptr, cols, (m, n)), rows, cols


def ref_spmm(rows, cols, vals, x, m, transpose=False):
    vals = vals.astype(np.float64)
    x = x.astype(np.float64)
    v = vals if vals.ndim == 2 else vals[:, None]
    x3 = x if x.ndim == 3 else x[:, None, :]
    dst, src = (cols, rows) if transpose else (rows, cols)
    out = np.zeros((m,) + x3.shape[1:])
    np.add.at(out, dst, v[:, :, None] * x3[src])
    return out if x.ndim == 3 else out[:, 0, :]


def ref_edge_softmax(rows, s, m):
    s = s.astype(np.float64)
    out = np.zeros_like(s)
    for i in range(m):
        sel = rows == i
        if sel.any():
            z = np.exp(s[sel] - s[sel].max(0))
            out[sel] = z / z.sum(0)
    return out


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 3e-3)])
def test_kernels_match_numpy(dtype, tol):
    rng = np.random.default_rng(0)
    m, n, h, d = 23, 17, 3, 5
    st, rows, cols = random_csr(rng, m, n)
    e = st.nnz
    vals = rng.standard_normal((e, h)).astype(dtype)
    x = rng.standard_normal((n, h, d)).astype(dtype)
    xt = rng.standard_normal((m, h, d)).astype(dtype)

    def close(got, want, what):
        got = got.asnumpy()
        assert got.dtype == dtype, f"{what}: {got.dtype}"
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got.astype(np.float64), want, atol=tol * scale * 4, rtol=tol * 4, err_msg=what)

    close(S.spmm(st, vals, x), ref_spmm(rows, cols, vals, x, m), "spmm heads")
    close(S.spmm(st, vals, xt, transpose=True), ref_spmm(rows, cols, vals, xt, n, transpose=True), "spmm^T")
    close(S.spmm(st, vals[:, 0].copy(), x[:, 0].copy()), ref_spmm(rows, cols, vals[:, 0], x[:, 0], m), "spmm 2d")
    close(S.sddmm(st, xt, x), np.einsum("ehd,ehd->eh", xt[rows].astype(np.float64), x[cols].astype(np.float64)),
          "sddmm")
    a_dst, a_src = xt[:, :, 0].copy(), x[:, :, 0].copy()
    close(S.edge_gather(st, a_dst, "dst"), a_dst[rows].astype(np.float64), "edge_gather dst")
    close(S.edge_gather(st, a_src, "src"), a_src[cols].astype(np.float64), "edge_gather src")
    g = vals.astype(np.float64)
    want_dst = np.zeros((m, h))
    np.add.at(want_dst, rows, g)
    want_src = np.zeros((n, h))
    np.add.at(want_src, cols, g)
    close(S.edge_reduce(st, vals, "dst"), want_dst, "edge_reduce dst")
    close(S.edge_reduce(st, vals, "src"), want_src, "edge_reduce src")
    y = S.edge_softmax(st, vals)
    close(y, ref_edge_softmax(rows, vals, m), "edge_softmax")
    gy = rng.standard_normal((e, h)).astype(dtype)
    yy = y.asnumpy().astype(np.float64)
    dot = np.zeros((m, h))
    np.add.at(dot, rows, gy.astype(np.float64) * yy)
    close(S.edge_softmax_grad(st, y, gy), yy * (gy.astype(np.float64) - dot[rows]), "edge_softmax_grad")


def test_float16_rounding_matches_numpy():
    """The kernels' float32 -> float16 store rounds like numpy: to nearest even, overflow to inf,
    subnormals, signed zeros, NaN stays NaN; and float16 -> float32 loads are exact (edge_gather copies)."""
    from runtime import _kernels_sparse as KS

    rng = np.random.default_rng(3)
    n = 20000
    a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 6, n)).astype(np.float32)
    a = np.concatenate([a, np.float32([65504, 65520, 65519.99, -70000, 6e-8, 3e-8, 2.98e-8, 0.0, -0.0, np.inf,
                                       -np.inf, np.nan])])
    got = np.empty(a.size, np.uint16)
    KS.f32_to_f16(a, got)
    with np.errstate(over="ignore"):
        want = a.astype(np.float16).view(np.uint16)
    nan = np.isnan(a)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
    every = np.arange(65536, dtype=np.uint16).view(np.float16)  # every half, through a per-edge copy
    k = every.size
    st = S.CSRStructure(np.arange(k + 1), np.arange(k), (k, k))
    out = S.edge_gather(st, every.reshape(k, 1), "src").asnumpy().ravel()
    same = ~np.isnan(every)
    np.testing.assert_array_equal(out.view(np.uint16)[same], every.view(np.uint16)[same])


def test_shape_errors_name_the_op():
    rng = np.random.default_rng(0)
    st, _, _ = random_csr(rng, 5, 4)
    with pytest.raises(runtime.ops.ShapeError, match=r"spmm: a 5x4 sparse matrix"):
        S.spmm(st, np.ones(st.nnz, np.float32), np.ones((5, 3), np.float32))
    with pytest.raises(runtime.ops.ShapeError, match="edge_softmax"):
        S.edge_softmax(st, np.ones(st.nnz + 1, np.float32))
    with pytest.raises(ValueError, match="column index"):
        S.CSRStructure([0, 1], [9], (1, 4))


# ----------------------------------------------------------------------------------------------
# float64 finite-difference checks of every sparse primitive
# ----------------------------------------------------------------------------------------------
def _p(rng, shape, scale=1.0):
    return param(rng.standard_normal(shape) * scale)


def _cases():
    def spmm_heads(rng):
        st, _, _ = random_csr(rng, 6, 5)
        v, x = _p(rng, (st.nnz, 2)), _p(rng, (5, 2, 3))
        return (lambda: S.spmm(st, v, x)), [v, x]

    def spmm_2d_transpose(rng):
        st, _, _ = random_csr(rng, 6, 5)
        v, x = _p(rng, (st.nnz,)), _p(rng, (6, 3))
        return (lambda: S.spmm(st, v, x, transpose=True)), [v, x]

    def sddmm_heads(rng):
        st, _, _ = random_csr(rng, 6, 5)
        a, b = _p(rng, (6, 2, 3)), _p(rng, (5, 2, 3))
        return (lambda: S.sddmm(st, a, b)), [a, b]

    def sddmm_2d(rng):
        st, _, _ = random_csr(rng, 4, 7)
        a, b = _p(rng, (4, 3)), _p(rng, (7, 3))
        return (lambda: S.sddmm(st, a, b)), [a, b]

    def gather(side):
        def build(rng):
            st, _, _ = random_csr(rng, 6, 5)
            a = _p(rng, ((6 if side == "dst" else 5), 2))
            return (lambda: S.edge_gather(st, a, side)), [a]
        return build

    def reduce(side):
        def build(rng):
            st, _, _ = random_csr(rng, 6, 5)
            g = _p(rng, (st.nnz, 2))
            return (lambda: S.edge_reduce(st, g, side)), [g]
        return build

    def softmax(heads):
        def build(rng):
            st, _, _ = random_csr(rng, 6, 5)
            s = _p(rng, (st.nnz, heads) if heads else (st.nnz,))
            return (lambda: S.edge_softmax(st, s)), [s]
        return build

    def scale_grad(rng):
        # by design the backward is scale x the true derivative, so central differences can only agree
        # at scale 1; the scaling itself is checked by test_scale_gradient_scales_only_the_backward
        x = _p(rng, (3, 2))
        scale = Tensor(np.asarray(1.0))
        return (lambda: F.mul(A.scale_gradient(x, scale), 1.0)), [x]

    return {
        ("spmm", "heads"): spmm_heads, ("spmm", "2d_transpose"): spmm_2d_transpose,
        ("sddmm", "heads"): sddmm_heads, ("sddmm", "2d"): sddmm_2d,
        ("edge_gather", "dst"): gather("dst"), ("edge_gather", "src"): gather("src"),
        ("edge_reduce", "dst"): reduce("dst"), ("edge_reduce", "src"): reduce("src"),
        ("edge_softmax", "1d"): softmax(0), ("edge_softmax", "heads"): softmax(3),
        ("scale_gradient", "identity"): scale_grad,
    }


CASES = _cases()


@pytest.mark.parametrize("key", list(CASES), ids=[f"{p}-{c}" for p, c in CASES])
def test_primitive_gradient(key):
    fn, params = CASES[key](np.random.default_rng(abs(hash(key)) % 2**32))
    check_gradients(fn, params)


def test_scale_gradient_scales_only_the_backward():
    from gradcheck_util import graph_grads
    x = param(np.arange(6.0).reshape(3, 2))
    r = np.ones((3, 2))
    loss, (g,) = graph_grads(lambda: A.scale_gradient(x, Tensor(np.asarray(8.0))), [x], r)
    assert loss == pytest.approx(15.0)
    np.testing.assert_allclose(g, 8.0)


def test_every_gnn_primitive_with_a_backward_is_checked_here():
    ours = {n for n, p in all_primitives().items() if p.extra.get("gradcheck") == "tests/test_gnn.py"}
    assert ours == {p for p, _ in CASES}
    assert all(all_primitives()[n].grad is not None for n in ours)


# ----------------------------------------------------------------------------------------------
# the Cells
# ----------------------------------------------------------------------------------------------
def small_graph(rng, n=7):
    a = np.triu(rng.random((n, n)) < 0.4, 1)
    a = a | a.T
    rows, cols = np.nonzero(a)
    indptr = np.concatenate([[0], np.cumsum(a.sum(1))])
    return GraphStructure(indptr, cols, n)


def test_gcn_weights_are_symmetric_normalisation():
    g = small_graph(np.random.default_rng(1))
    st = g.structure(True)
    w = g.gcn_weights(True).asnumpy()
    a = np.zeros((g.num_nodes, g.num_nodes))
    a[st.rows, st.tensors[1].asnumpy()] = w
    dense = np.zeros_like(a)
    dense[np.repeat(np.arange(g.num_nodes), np.diff(g.indptr)), g.indices] = 1
    dense += np.eye(g.num_nodes)
    dinv = 1 / np.sqrt(dense.sum(1))
    np.testing.assert_allclose(a, dinv[:, None] * dense * dinv[None, :], rtol=1e-6)


@pytest.mark.parametrize("sparse_input", [False, True], ids=["dense_x", "sparse_x"])
def test_gcnconv_gradient(sparse_input):
    rng = np.random.default_rng(2)
    g = small_graph(rng)
    conv = nn.GCNConv(4, 3, dtype=np.float64)
    conv.bias.set_data(rng.standard_normal(3))
    conv.set_train(False)
    if sparse_input:
        st, _, _ = random_csr(rng, g.num_nodes, 4, 0.6)
        vals = _p(rng, (st.nnz,))
        fn = lambda: conv(SparseFeatures(st, vals), g)  # noqa: E731
        params = [vals, conv.weight, conv.bias]
    else:
        x = _p(rng, (g.num_nodes, 4))
        fn = lambda: conv(x, g)  # noqa: E731
        params = [x, conv.weight, conv.bias]
    check_gradients(fn, params)


@pytest.mark.parametrize("concat", [True, False], ids=["concat", "mean"])
def test_gatconv_gradient(concat):
    rng = np.random.default_rng(3)
    g = small_graph(rng)
    conv = nn.GATConv(4, 3, heads=2, concat=concat, attn_dropout=0.5, dtype=np.float64)
    conv.bias.set_data(rng.standard_normal(conv.bias.shape))
    conv.set_train(False)  # attention dropout off: finite differences need a deterministic function
    x = _p(rng, (g.num_nodes, 4))
    check_gradients(lambda: conv(x, g), [x, conv.weight, conv.att_src, conv.att_dst, conv.bias])


def test_gatconv_attention_is_a_softmax_over_neighbours():
    rng = np.random.default_rng(4)
    g = small_graph(rng)
    conv = nn.GATConv(4, 2, heads=3, dtype=np.float64)
    x = rng.standard_normal((g.num_nodes, 4))
    out = conv(Tensor(x), g).asnumpy()
    st = g.structure(True)
    cols = st.tensors[1].asnumpy()
    h = (x @ conv.weight.data).reshape(g.num_nodes, 3, 2)
    a_s, a_d = (h * conv.att_src.data).sum(-1), (h * conv.att_dst.data).sum(-1)
    e = a_d[st.rows] + a_s[cols]
    e = np.where(e > 0, e, 0.2 * e)
    alpha = ref_edge_softmax(st.rows, e, g.num_nodes)
    want = np.zeros((g.num_nodes, 3, 2))
    np.add.at(want, st.rows, alpha[:, :, None] * h[cols])
    np.testing.assert_allclose(out, want.reshape(g.num_nodes, 6), rtol=1e-10)


def test_cells_name_themselves_on_bad_input():
    g = small_graph(np.random.default_rng(0))
    conv = nn.GCNConv(4, 3)
    with pytest.raises(runtime.ops.ShapeError, match=r"GCNConv\(in_channels=4.*expects node features of shape"):
        conv(Tensor(np.ones((g.num_nodes, 5), np.float32)), g)
    with pytest.raises(runtime.ops.ShapeError, match="got features for 3 nodes"):
        conv(Tensor(np.ones((3, 4), np.float32)), g)


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("name,nodes,feats,classes,train,edges,isolated", [
    ("cora", 2708, 1433, 7, 140, 5278, 0), ("citeseer", 3327, 3703, 6, 120, 4552, 15)])
def test_loader_split_and_features(name, nodes, feats, classes, train, edges, isolated):
    d = load_planetoid(name, DATA)
    assert (d.num_nodes, d.num_features, d.num_classes) == (nodes, feats, classes)
    assert (d.train_mask.sum(), d.val_mask.sum(), d.test_mask.sum()) == (train, 500, 1000)
    assert not (d.train_mask & d.val_mask).any() and not (d.val_mask & d.test_mask).any()
    assert np.all(d.train_mask[:train]) and np.all(d.val_mask[train:train + 500])
    assert d.adjacency.nnz == 2 * edges  # symmetric, no self loops
    assert (d.labels < 0).sum() == isolated
    rows_sum = np.bincount(np.repeat(np.arange(nodes), np.diff(d.features.indptr)), d.features.data, nodes)
    empty = np.diff(d.features.indptr) == 0
    assert empty.sum() == isolated
    np.testing.assert_allclose(rows_sum[~empty], 1.0, rtol=1e-5)
    if name == "cora":
        assert list(np.bincount(d.labels)) == [351, 217, 418, 818, 426, 298, 180]


def test_loader_reports_a_missing_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("INSIGHT_PLANETOID_DIR", raising=False)
    with pytest.raises(PlanetoidFormatError, match="INSIGHT_PLANETOID_DIR"):
        load_planetoid("cora")
    with pytest.raises(PlanetoidFormatError, match="missing file .*ind.cora.x"):
        load_planetoid("cora", tmp_path)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payload(target, marker):
    if target == "os.system":
        return pickle.dumps({"x": _Evil(os.system, f"touch {marker}")}, protocol=2)
    return pickle.dumps({"x": _Evil(eval, f"open({str(marker)!r}, 'w').write('x')")}, protocol=2)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, target):
    marker = tmp_path / "pwned"
    bad = tmp_path / "ind.cora.x"
    bad.write_bytes(_payload(target, marker))
    name = r"posix\.system" if target == "os.system" else r"(__builtin__|builtins)\.eval"
    with pytest.raises(PlanetoidFormatError, match=f"refusing to load the class {name}"):
        restricted_load(bad)
    # the whole loader, with the other files genuine
    if (DATA / "ind.cora.y").is_file():
        for f in DATA.glob("ind.cora.*"):
            if f.name != "ind.cora.x":
                (tmp_path / f.name).symlink_to(f)
        with pytest.raises(PlanetoidFormatError, match=f"ind.cora.x: refusing to load the class {name}"):
            load_planetoid("cora", tmp_path)
    assert not marker.exists(), "the payload ran"
    # the payload is live: a plain unpickler runs it (writing a second marker in tmp_path)
    live = tmp_path / "live"
    pickle.loads(_payload(target, live))
    assert live.exists()


def test_object_arrays_are_refused(tmp_path):
    bad = tmp_path / "obj.pkl"
    bad.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    with pytest.raises(PlanetoidFormatError, match="Python objects"):
        restricted_load(bad)


# ----------------------------------------------------------------------------------------------
# mixed precision
# ----------------------------------------------------------------------------------------------
def _tiny_task(seed=0):
    rng = np.random.default_rng(seed)
    g = small_graph(rng, 12)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.GCNConv(5, 8)
            self.conv2 = nn.GATConv(8, 2, heads=2, concat=False)

        def construct(self, v):
            return self.conv2(F.relu(self.conv1(v, g)), g)

    return Net(), x, y


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_dynamic_loss_scale_skips_overflowing_steps_and_recovers(mode):
    context.set_context(mode=context.GRAPH_MODE if mode == "graph" else context.PYNATIVE_MODE)
    net, x, y = _tiny_task()
    opt = nn.Adam(net.trainable_params(), learning_rate=0.01)
    mgr = amp.DynamicLossScaleManager(init_loss_scale=2.0 ** 24, scale_factor=2, scale_window=1000)
    tnet, loss, opt_w = amp.build_train_network(net, gnn.MaskedSoftmaxCrossEntropy(), opt, "O2", mgr)
    model = runtime.Model(tnet, loss, opt_w, progress=False)
    before = [p.data.copy() for p in net.trainable_params()]
    model.train_step(x, y)  # 2^24 * grad overflows float16 -> skipped, scale halved
    assert mgr.overflows == 1 and mgr.get_loss_scale() == 2.0 ** 23
    for p, b in zip(net.trainable_params(), before):
        np.testing.assert_array_equal(p.data, b, err_msg=f"{p.name} changed on an overflowing step")
    assert float(opt.beta1_power.data) == 1.0, "the optimizer state advanced on a skipped step"
    losses = [model.train_step(x, y) for _ in range(20)]
    assert mgr.get_loss_scale() < 2.0 ** 23 and mgr.overflows >= 2
    assert any(not np.array_equal(p.data, b) for p, b in zip(net.trainable_params(), before))
    assert all(np.isfinite(losses)) and all(p.dtype == np.float32 for p in net.trainable_params())


def test_fixed_loss_scale_matches_float32_training_closely():
    results = []
    for mixed in (False, True):
        net, x, y = _tiny_task(1)
        opt = nn.Adam(net.trainable_params(), learning_rate=0.01)
        loss = gnn.MaskedSoftmaxCrossEntropy()
        if mixed:
            net_t, loss, opt = amp.build_train_network(net, loss, opt, "O2", amp.FixedLossScaleManager(128.0))
            assert net.conv1.compute_dtype == np.float16
        else:
            net_t = net
        model = runtime.Model(net_t, loss, opt, progress=False)
        results.append([model.train_step(x, y) for _ in range(30)])
    f32, f16 = np.array(results[0]), np.array(results[1])
    assert f16[-1] < f16[0] * 0.8, "mixed precision did not train"
    np.testing.assert_allclose(f16, f32, atol=0.02)


def test_amp_level_checks():
    with pytest.raises(ValueError, match="unknown level"):
        amp.auto_mixed_precision(nn.GCNConv(2, 2), "O9")
    with pytest.raises(ValueError, match="no Cell with a float16 path"):
        amp.auto_mixed_precision(nn.Dense(2, 2), "O2")


# ----------------------------------------------------------------------------------------------
# accuracy (reduced CI check) and a profiled run
# ----------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("model,goal", [("gcn", 80.5), ("gat", 81.5)])
def test_cora_accuracy_three_seeds(model, goal):
    d = load_planetoid("cora", DATA)
    accs = [gnn.train(model, d, seed=s).test_acc for s in range(3)]
    print(f"{model} cora test accuracy over 3 seeds: {accs} mean {np.mean(accs):.2f}")
    assert np.mean(accs) >= goal, f"{model} Cora mean test accuracy {np.mean(accs):.2f} < {goal}: {accs}"


@needs_data
def test_profiled_gcn_run_lists_the_sparse_kernels(tmp_path):
    import insight
    from insight.analysis import op_stats

    d = load_planetoid("cora", DATA)
    with insight.Profiler(output_path=tmp_path / "run"):
        r = gnn.train("gcn", d, seed=0, epochs=5)
    assert r.epochs == 5
    ops = op_stats(tmp_path / "run")
    assert "spmm" in set(ops["op"])
    spmm = ops[ops["op"] == "spmm"]
    assert len(spmm) >= 4 and (spmm["calls"] > 0).all() and (spmm["flops"] > 0).all()
    assert any("conv1" in s for s in spmm["scope"]) and any("Gradients" in s for s in spmm["scope"])
    gat = op_stats_for_gat(tmp_path / "gat", d)
    assert {"edge_softmax", "edge_softmax_grad", "sddmm", "edge_gather", "edge_reduce"} <= set(gat["op"])
    # the dashboard's operators page of both runs lists them
    from dashboard.app import create_app
    from dashboard.data import set_store, store

    app = create_app(tmp_path, reload_interval=0)
    app.run_store = store()
    set_store(app.run_store)
    client = app.server.test_client()
    client.get("/")
    for run, kernels in (("run", ("spmm",)), ("gat", ("spmm", "edge_softmax", "edge_softmax_grad"))):
        r = client.post("/_dash-update-component", json={
            "output": ".._pages_content.children..._pages_store.data..",
            "outputs": [{"id": "_pages_content", "property": "children"},
                        {"id": "_pages_store", "property": "data"}],
            "inputs": [{"id": "_pages_location", "property": "pathname", "value": f"/run/{run}/operators"},
                       {"id": "_pages_location", "property": "search", "value": ""}],
            "changedPropIds": ["_pages_location.pathname"], "state": []})
        assert r.status_code == 200
        page = r.get_data(as_text=True)
        for k in kernels:
            assert f'"{k}"' in page, f"the operators page of {run} does not list {k}"


def op_stats_for_gat(path, d):
    import insight
    from insight.analysis import op_stats

    with insight.Profiler(output_path=path):
        gnn.train("gat", d, seed=0, epochs=2)
    return op_stats(path)
