"""GRAPH_MODE and PYNATIVE_MODE run the same Cells and give the same numbers."""
import numpy as np
import pytest

from conftest import batches
from runtime import Model, Tensor, context, nn
from runtime.models import MLP, LeNetDigits


def _loss_curve(mode, make_net, make_opt, data, steps):
    context.set_context(mode=mode, seed=3)
    net = make_net()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  make_opt(net.trainable_params()), progress=False)
    losses = [model.train_step(x, y) for x, y in data[:steps]]
    return np.array(losses), {p.name: p.data.copy() for p in net.get_parameters()}


@pytest.mark.parametrize("make_opt", [
    lambda p: nn.Momentum(p, 0.05, 0.9),
    lambda p: nn.Adam(p, 1e-3, weight_decay=1e-4),
], ids=["momentum", "adam"])
def test_small_cnn_same_loss_curve_in_both_modes(digits, make_opt):
    xtr, ytr, _, _ = digits
    data = batches(xtr, ytr, 32)
    g_loss, g_params = _loss_curve(context.GRAPH_MODE, lambda: LeNetDigits(channels=(8, 16), hidden=32),
                                   make_opt, data, 25)
    p_loss, p_params = _loss_curve(context.PYNATIVE_MODE, lambda: LeNetDigits(channels=(8, 16), hidden=32),
                                   make_opt, data, 25)
    assert g_loss[-1] < g_loss[0]  # it trains
    np.testing.assert_allclose(g_loss, p_loss, rtol=0, atol=1e-5)
    for name in g_params:  # BN moving statistics included
        np.testing.assert_allclose(g_params[name], p_params[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_mlp_with_dropout_same_in_both_modes(digits):
    xtr, ytr, _, _ = digits
    data = batches(xtr.reshape(-1, 64), ytr, 64)
    make = lambda: MLP((64, 32, 10), dropout=0.2)  # noqa: E731
    g_loss, _ = _loss_curve(context.GRAPH_MODE, make, lambda p: nn.SGD(p, 0.1), data, 10)
    p_loss, _ = _loss_curve(context.PYNATIVE_MODE, make, lambda p: nn.SGD(p, 0.1), data, 10)
    np.testing.assert_allclose(g_loss, p_loss, rtol=0, atol=1e-5)


def test_eval_and_predict_agree_across_modes(digits):
    _, _, xte, yte = digits
    context.set_context(seed=5)
    net = LeNetDigits(channels=(4, 8), hidden=16)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), progress=False)
    graph_logits = model.predict(xte[:16])
    context.set_context(mode=context.PYNATIVE_MODE)
    eager_logits = model.predict(xte[:16])
    direct = net.set_train(False)(Tensor(xte[:16])).asnumpy()
    np.testing.assert_allclose(graph_logits, eager_logits, atol=1e-6)
    np.testing.assert_allclose(graph_logits, direct, atol=1e-6)


def _pynative_curve(data, steps, retrace_every_step):
    from runtime import autodiff
    context.set_context(mode=context.PYNATIVE_MODE, seed=4)
    net = LeNetDigits(channels=(4, 8), hidden=16)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    autodiff._programs.clear()  # a program cached by an earlier test (same shapes, reused ids) must not count
    losses, traced = [], 0
    for x, y in data[:steps]:
        if retrace_every_step:
            autodiff._programs.clear()
        before = len(autodiff._programs)
        losses.append(model.train_step(x, y))
        traced += len(autodiff._programs) - before
    return np.array(losses), {p.name: p.data.copy() for p in net.get_parameters()}, traced


def test_pynative_backward_is_traced_once_per_signature_and_replayed_identically(digits):
    """The cached backward runs the kernels the freshly traced one runs: bit-identical losses and weights."""
    xtr, ytr, _, _ = digits
    data = batches(xtr, ytr, 32)[:5] + batches(xtr, ytr, 16)[:3]   # a second input signature
    loss_c, params_c, traced_c = _pynative_curve(data, 8, retrace_every_step=False)
    loss_t, params_t, traced_t = _pynative_curve(data, 8, retrace_every_step=True)
    assert traced_c == 2 and traced_t == 8
    np.testing.assert_array_equal(loss_c, loss_t)
    for name in params_c:
        np.testing.assert_array_equal(params_c[name], params_t[name], err_msg=name)


def test_grad_eager_releases_the_forward_values():
    from runtime import core
    from runtime.autodiff import grad_eager
    from runtime.ops import api as F

    w = nn.Parameter(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")

    def run(retain):
        tape = core.Tape()
        with core.recording(tape):
            loss = F.reduce_sum(F.mul(F.tanh(w), F.tanh(w)))
        return tape, loss, grad_eager(tape, loss, [w], retain_values=retain)

    tape, loss, (g,) = run(False)
    np.testing.assert_allclose(g.asnumpy(), 2 * np.tanh(w.data) * (1 - np.tanh(w.data) ** 2), rtol=1e-6)
    assert tape.values is None  # the tape gave its forward values to the backward, which released them
    with pytest.raises(ValueError, match="retain_values=True"):
        grad_eager(tape, loss, [w])
    tape, loss, (g1,) = run(True)
    (g2,) = grad_eager(tape, loss, [w])
    np.testing.assert_array_equal(g1.asnumpy(), g2.asnumpy())


@pytest.mark.parametrize("make_opt", [
    lambda p: nn.Adam(p, 1e-2, weight_decay=1e-3),
    lambda p: nn.SGD(p, 0.1, momentum=0.9, nesterov=True),
], ids=["adam", "sgd_nesterov"])
def test_pynative_update_replay_equals_running_the_optimizer_op_by_op(make_opt):
    """apply_update_eager (traced once, replayed) gives the optimizer's op-by-op results bit for bit, and
    reports the same `op` events as eager dispatch."""
    from runtime import autodiff, hooks

    context.set_context(mode=context.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4,)).astype(np.float32)]
    grads = [[Tensor(rng.standard_normal(a.shape).astype(np.float32)) for a in init] for _ in range(4)]
    results, events = [], []
    for replay in (False, True):
        params = [nn.Parameter(a.copy(), name=f"p{k}") for k, a in enumerate(init)]
        opt = make_opt(params)
        seen = []
        listener = lambda kind, ev: seen.append(ev["op"]) if kind == "op" else None  # noqa: E731
        hooks.subscribe(listener)
        try:
            for gs in grads:
                autodiff.apply_update_eager(opt, gs) if replay else opt(gs)
        finally:
            hooks.unsubscribe(listener)
        results.append([p.data.copy() for p in params])
        events.append(seen)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert events[0] == events[1] and "assign" in events[0]


def test_pynative_caches_do_not_keep_a_discarded_model_alive(digits):
    import gc
    import weakref

    xtr, ytr, _, _ = digits
    context.set_context(mode=context.PYNATIVE_MODE, seed=1)
    net = LeNetDigits(channels=(4, 8), hidden=16)
    opt = nn.Momentum(net.trainable_params(), 0.05, 0.9)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)
    for x, y in batches(xtr, ytr, 16)[:2]:
        model.train_step(x, y)
    refs = [weakref.ref(net), weakref.ref(opt), weakref.ref(net.trainable_params()[0])]
    del net, opt, model
    gc.collect()
    assert all(r() is None for r in refs)
