"""Acceptance: the digits CNN and MLP reach the target accuracy on a fixed, seeded 80/20 split."""
import time

import numpy as np

from runtime import Model, context, nn
from runtime.dataset import NumpySlicesDataset
from runtime.models import MLP, LeNetDigits


def _train_eval(net, opt, xtr, ytr, xte, yte, epochs, batch=32):
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt,
                  metrics=["accuracy"], progress=False)
    ds = NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=7).batch(batch, drop_remainder=True)
    t0 = time.perf_counter()
    model.train(epochs, ds)
    elapsed = time.perf_counter() - t0
    acc = model.eval(NumpySlicesDataset((xte, yte), ["image", "label"]).batch(100))["accuracy"]
    return acc, elapsed


def test_lenet_reaches_97_percent(digits):
    xtr, ytr, xte, yte = digits
    assert len(xtr) == 1438 and len(xte) == 359  # the fixed 80/20 split
    context.set_context(mode=context.GRAPH_MODE, seed=1)
    net = LeNetDigits()
    acc, elapsed = _train_eval(net, nn.Momentum(net.trainable_params(), 0.05, 0.9), xtr, ytr, xte, yte, 10)
    print(f"LeNet digits: {acc:.4f} in {elapsed:.1f}s of training")  # the time is reported, not asserted
    assert acc >= 0.97


def test_mlp_reaches_96_percent(digits):
    xtr, ytr, xte, yte = digits
    context.set_context(mode=context.GRAPH_MODE, seed=1)
    net = MLP((64, 128, 10))
    acc, _ = _train_eval(net, nn.Adam(net.trainable_params(), 2e-3), xtr.reshape(-1, 64), ytr,
                         xte.reshape(-1, 64), yte, 20)
    print(f"MLP digits: {acc:.4f}")
    assert acc >= 0.96


def test_untrained_network_is_at_chance(digits):
    """Guards the accuracy tests: the metric itself must not be trivially high."""
    _, _, xte, yte = digits
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), metrics=["accuracy"],
                  progress=False)
    acc = model.eval(NumpySlicesDataset((xte, yte), ["image", "label"]).batch(100))["accuracy"]
    assert acc < 0.3
    assert np.isfinite(acc)
