"""Optimizers against straightforward NumPy references; sparse optimizers touch only the used rows."""
import numpy as np
import pytest

from runtime import Model, Parameter, Tensor, context, nn
from runtime.nn.optim import SparseGrad


def _run(opt_cls, kwargs, grads_seq, p0):
    context.set_context(mode=context.PYNATIVE_MODE)
    p = Parameter(p0.copy(), name="w")
    opt = opt_cls([p], **kwargs)
    for k, g in enumerate(grads_seq):
        opt.step_begin(k)
        opt([Tensor(g)])
    return p.data


@pytest.fixture
def problem(rng):
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    return p0, grads


def test_sgd_plain_and_weight_decay(problem):
    p0, grads = problem
    ref = p0.astype(np.float64)
    for g in grads:
        ref = ref - 0.1 * (g + 0.01 * ref)
    np.testing.assert_allclose(_run(nn.SGD, dict(learning_rate=0.1, weight_decay=0.01), grads, p0), ref, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_pytorch_semantics(problem, nesterov):
    p0, grads = problem
    ref, v = p0.astype(np.float64), None
    for g in grads:
        v = g if v is None else 0.9 * v + g
        step = g + 0.9 * v if nesterov else v
        ref = ref - 0.1 * step
    out = _run(nn.SGD, dict(learning_rate=0.1, momentum=0.9, nesterov=nesterov), grads, p0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_mindspore_apply_momentum(problem, nesterov):
    p0, grads = problem
    ref, acc = p0.astype(np.float64), np.zeros_like(p0, dtype=np.float64)
    for g in grads:
        acc = 0.9 * acc + g
        ref = ref - 0.1 * ((g + 0.9 * acc) if nesterov else acc)
    out = _run(nn.Momentum, dict(learning_rate=0.1, momentum=0.9, use_nesterov=nesterov), grads, p0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def _adam_ref(p0, grads, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64) + (0 if decoupled else wd * p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = p - lr_t * m / (np.sqrt(v) + eps) - (lr * wd * p if decoupled else 0)
    return p


def test_adam(problem):
    p0, grads = problem
    out = _run(nn.Adam, dict(learning_rate=0.01, weight_decay=0.1), grads, p0)
    np.testing.assert_allclose(out, _adam_ref(p0, grads, wd=0.1), rtol=1e-5, atol=1e-6)


def test_adamw_decouples_weight_decay(problem):
    p0, grads = problem
    out = _run(nn.AdamW, dict(learning_rate=0.01, weight_decay=0.1), grads, p0)
    np.testing.assert_allclose(out, _adam_ref(p0, grads, wd=0.1, decoupled=True), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, _adam_ref(p0, grads, wd=0.1, decoupled=False), rtol=1e-5)


def test_learning_rate_schedule(problem):
    p0, grads = problem
    lrs = [0.1, 0.05, 0.02, 0.01]
    ref = p0.astype(np.float64)
    for lr, g in zip(lrs, grads):
        ref = ref - lr * g
    np.testing.assert_allclose(_run(nn.SGD, dict(learning_rate=lrs), grads, p0), ref, rtol=1e-5)


def _sparse_case(rng):
    table0 = rng.normal(size=(10, 4)).astype(np.float32)
    steps = [np.array([1, 3, 3, 7], np.int64), np.array([3, 0, 0, 0], np.int64), np.array([9, 1, 9, 1], np.int64)]
    rows = [rng.normal(size=(4, 4)).astype(np.float32) for _ in steps]
    return table0, steps, rows


def test_lazy_adam_updates_only_touched_rows(rng):
    context.set_context(mode=context.PYNATIVE_MODE)
    table0, steps, rows = _sparse_case(rng)
    p = Parameter(table0.copy(), name="table")
    opt = nn.LazyAdam([p], learning_rate=0.01)
    # reference: per-row Adam where a row's moments advance only when touched, lr_t uses the global step
    ref, m, v = table0.astype(np.float64), np.zeros((10, 4)), np.zeros((10, 4))
    for t, (ids, r) in enumerate(zip(steps, rows), 1):
        opt([SparseGrad(Tensor(ids), Tensor(r), (10, 4))])
        g = np.zeros((10, 4))
        np.add.at(g, ids, r)
        u = np.unique(ids)
        m[u] = 0.9 * m[u] + 0.1 * g[u]
        v[u] = 0.999 * v[u] + 0.001 * g[u] ** 2
        lr_t = 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        ref[u] -= lr_t * m[u] / (np.sqrt(v[u]) + 1e-8)
    np.testing.assert_allclose(p.data, ref, rtol=1e-5, atol=1e-6)
    untouched = [2, 4, 5, 6, 8]
    np.testing.assert_array_equal(p.data[untouched], table0[untouched])
    np.testing.assert_array_equal(opt.moment1[0].data[untouched], 0)


def test_ftrl_sparse_matches_dense_reference(rng):
    context.set_context(mode=context.PYNATIVE_MODE)
    table0, steps, rows = _sparse_case(rng)
    p = Parameter(table0.copy(), name="wide")
    opt = nn.FTRL([p], learning_rate=0.1, l1=0.01, l2=0.001, initial_accum=0.1)
    w, acc, lin = table0.astype(np.float64), np.full((10, 4), 0.1), np.zeros((10, 4))
    for ids, r in zip(steps, rows):
        opt([SparseGrad(Tensor(ids), Tensor(r), (10, 4))])
        g = np.zeros((10, 4))
        np.add.at(g, ids, r)
        u = np.unique(ids)
        acc_new = acc[u] + g[u] ** 2
        sigma = (np.sqrt(acc_new) - np.sqrt(acc[u])) / 0.1
        lin[u] = lin[u] + g[u] - sigma * w[u]
        quad = np.sqrt(acc_new) / 0.1 + 2 * 0.001
        w[u] = np.where(np.abs(lin[u]) > 0.01, (np.sign(lin[u]) * 0.01 - lin[u]) / quad, 0.0)
        acc[u] = acc_new
    np.testing.assert_allclose(p.data, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p.data[[2, 4, 5, 6, 8]], table0[[2, 4, 5, 6, 8]])


class _EmbedNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, embedding_table="normal")
        self.fc = nn.Dense(8 * 3, 2)

    def construct(self, ids):
        e = self.emb(ids)
        return self.fc(e.reshape(ids.shape[0], -1))


@pytest.mark.parametrize("mode", [context.GRAPH_MODE, context.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_lazy_adam_in_a_model_leaves_untouched_rows(rng, mode):
    context.set_context(mode=mode, seed=2)
    net = _EmbedNet()
    table0 = net.emb.embedding_table.data.copy()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.LazyAdam(net.trainable_params(), 0.01), progress=False)
    ids = rng.integers(0, 25, size=(16, 3)).astype(np.int32)  # rows 25..49 never used
    labels = rng.integers(0, 2, 16).astype(np.int32)
    for _ in range(3):
        model.train_step(ids, labels)
    after = net.emb.embedding_table.data
    np.testing.assert_array_equal(after[25:], table0[25:])
    used = np.unique(ids)
    assert np.all(np.abs(after[used] - table0[used]).max(axis=1) > 0)
    if mode == context.GRAPH_MODE:
        ops = list(model._train_graphs.values())[0].graph.op_counts()
        assert "gather_grad" not in ops  # the table's gradient stays sparse: no dense (50, 8) scatter
        assert ops["scatter_add_rows"] == 3


def test_optimizer_rejects_mismatched_gradients():
    p = Parameter(np.zeros((3, 2), np.float32), name="w")
    opt = nn.SGD([p], 0.1)
    with pytest.raises(ValueError, match=r"gradient of shape \(2, 3\) for parameter 'w' of shape \(3, 2\)"):
        opt([Tensor(np.zeros((2, 3), np.float32))])
    with pytest.raises(ValueError, match="empty parameter list"):
        nn.SGD([], 0.1)
