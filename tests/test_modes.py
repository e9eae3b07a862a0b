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
