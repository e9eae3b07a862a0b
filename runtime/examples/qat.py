"""Quantization-aware training end to end on the 8x8 digits.

    python -m runtime.examples.qat --epochs 10 [--qat-epochs 3] [--profile runs/qat] [--output runs/qat-models]

1. trains LeNet-with-BN (built from the fused ``nn.Conv2dBnAct`` / ``nn.DenseBnAct`` cells) in fp32;
2. ``convert_quant_network``: BN folded into the conv weights, fake quantization of weights (int8, per
   channel, symmetric) and activations (int8, per tensor, EMA ranges), and fine-tunes it (QAT);
3. ``convert_to_int8``: an integer-only model (int8 weights, int32 accumulation, fixed-point requantization);
4. prints fp32 / QAT / int8 test accuracy, the fp32 and int8 model file sizes and the inference times
   (measured: batch 256, median of repeated runs).

With ``--profile DIR`` the QAT fine-tuning and one int8 inference pass are recorded by Insight's profiler
(``insight start --summary-base-dir DIR/..`` shows the fake-quant and int8 kernels in the op table).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from runtime import Model, context, nn
from runtime.dataset import NumpySlicesDataset
from runtime.dataset.digits import load_digits_split
from runtime.train.quant import convert_quant_network, convert_to_int8
from runtime.train.serialization import save_checkpoint


class LeNetBN(nn.Cell):
    """LeNet with BatchNorm for 8x8 digits, from fused cells: (conv-BN-ReLU, pool) x 2, two dense layers."""

    def __init__(self, num_classes: int = 10, channels=(16, 32), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2dBnAct(1, c1, 3, pad_mode="same", has_bn=True, activation="relu")
        self.conv2 = nn.Conv2dBnAct(c1, c2, 3, pad_mode="same", has_bn=True, activation="relu")
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.DenseBnAct(c2 * 2 * 2, hidden, activation="relu")
        self.fc2 = nn.DenseBnAct(hidden, num_classes)

    def construct(self, x):
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        return self.fc2(self.fc1(self.flatten(x)))


class MLPBN(nn.Cell):
    """A multi-layer perceptron from DenseBnAct cells (flattened 64-pixel digits)."""

    def __init__(self, sizes=(64, 128, 10)):
        super().__init__()
        layers = [nn.DenseBnAct(a, b, activation="relu" if i < len(sizes) - 2 else None)
                  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
        self.layers = nn.SequentialCell(layers)

    def construct(self, x):
        return self.layers(x)


def loss_fn():
    return nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")


def train(net, x, y, epochs, lr, batch=32, seed=7, callbacks=None):
    """Momentum SGD over shuffled batches; returns the Model."""
    model = Model(net, loss_fn(), nn.Momentum(net.trainable_params(), lr, 0.9), metrics=["accuracy"],
                  progress=False)
    ds = NumpySlicesDataset((x, y), ["image", "label"], shuffle=True, seed=seed).batch(batch, drop_remainder=True)
    model.train(epochs, ds, callbacks=callbacks)
    return model


def accuracy(predict, x, y, batch=256) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((np.argmax(predict(x[i:i + batch]), -1) == y[i:i + batch]).sum())
    return correct / len(x)


def median_time(fn, repeat=15, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _profiler(path):
    import insight  # examples may use the profiler; the runtime proper never imports it
    return insight.Profiler(output_path=path, overwrite=True)


def run(epochs=10, qat_epochs=3, lr=0.05, qat_lr=0.005, freeze_bn_epochs=None, seed=1, profile=None,
        output=None, net_factory=LeNetBN, flatten=False, progress_print=print):
    """The whole pipeline; returns a dict of the measured figures and the three models."""
    context.set_context(mode=context.GRAPH_MODE, seed=seed)
    xtr, ytr, xte, yte = load_digits_split(seed=0)
    if flatten:
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    net = net_factory()
    fp32 = train(net, xtr, ytr, epochs, lr)
    res = {"fp32_acc": accuracy(fp32.predict, xte, yte)}
    out_dir = output or os.path.join("runs", "qat-models")
    os.makedirs(out_dir, exist_ok=True)
    res["fp32_path"] = save_checkpoint(net, os.path.join(out_dir, "lenet_fp32.ckpt"))
    res["fp32_bytes"] = os.path.getsize(res["fp32_path"])
    xb = np.ascontiguousarray(np.resize(xte, (256,) + xte.shape[1:]))
    res["fp32_ms"] = 1e3 * median_time(lambda: fp32.predict(xb))

    steps_per_epoch = len(xtr) // 32
    freeze = (freeze_bn_epochs if freeze_bn_epochs is not None else max(qat_epochs - 1, 0)) * steps_per_epoch
    qnet = convert_quant_network(net, bn_fold=True, freeze_bn=freeze, quant_delay=(0, 0))
    if profile:
        with _profiler(profile):
            qat = train(qnet, xtr, ytr, qat_epochs, qat_lr)
    else:
        qat = train(qnet, xtr, ytr, qat_epochs, qat_lr)
    res["qat_acc"] = accuracy(qat.predict, xte, yte)
    res["qat_ms"] = 1e3 * median_time(lambda: qat.predict(xb))

    int8 = convert_to_int8(qnet, xte.shape[1:])
    res["int8_path"] = int8.save(os.path.join(out_dir, "lenet_int8.bin"))
    res["int8_bytes"] = os.path.getsize(res["int8_path"])
    res["int8_acc"] = accuracy(int8.predict, xte, yte)
    res["int8_ms"] = 1e3 * median_time(lambda: int8.predict(xb))
    if profile:
        with _profiler(profile.rstrip("/") + "-int8"):
            for _ in range(3):
                int8.predict(xb)
    res.update(fp32_model=fp32, qat_model=qat, qat_net=qnet, int8_model=int8, test=(xte, yte))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="fp32 training epochs")
    ap.add_argument("--qat-epochs", type=int, default=3, help="quantization-aware fine-tuning epochs")
    ap.add_argument("--profile", default=None, help="record the QAT run (and an int8 inference run, DIR-int8)")
    ap.add_argument("--output", default=os.path.join("runs", "qat-models"), help="where the model files go")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    r = run(a.epochs, a.qat_epochs, seed=a.seed, profile=a.profile, output=a.output)
    print(f"accuracy   fp32 {100 * r['fp32_acc']:.2f}%   QAT {100 * r['qat_acc']:.2f}%   "
          f"int8 {100 * r['int8_acc']:.2f}%   ({len(r['test'][1])} test images)")
    print(f"model size fp32 {r['fp32_bytes']} B ({r['fp32_path']})   int8 {r['int8_bytes']} B ({r['int8_path']}), "
          f"{100 * r['int8_bytes'] / r['fp32_bytes']:.1f}% of fp32")
    print(f"inference  batch 256, median: fp32 {r['fp32_ms']:.2f} ms   QAT (fake quant) {r['qat_ms']:.2f} ms   "
          f"int8 {r['int8_ms']:.2f} ms ({r['fp32_ms'] / r['int8_ms']:.2f}x fp32)")
    if a.profile:
        print(f"profiles: {a.profile} (QAT training), {a.profile.rstrip('/')}-int8 (int8 inference)")


if __name__ == "__main__":
    main()
