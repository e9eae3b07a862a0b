"""The ``insight`` command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import numpy as np

    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.dataset.digits import load_digits_split
    from runtime.models import LeNetDigits
    from runtime.train import LossMonitor, TimeMonitor

    context.set_context(mode=context.GRAPH_MODE, seed=args.seed)
    xtr, ytr, xte, yte = load_digits_split(seed=args.seed)
    train = NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=args.seed).batch(
        32, drop_remainder=True)
    test = NumpySlicesDataset((xte, yte), ["image", "label"]).batch(128)
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), learning_rate=0.05, momentum=0.9),
                  metrics=["accuracy"])
    print(f"training LeNet on the scikit-learn digits ({len(xtr)} train / {len(xte)} test images), "
          f"{args.epochs} epochs, graph mode")
    cbs = [TimeMonitor()] + ([LossMonitor(per_print_times=45)] if args.verbose else [])
    model.train(args.epochs, train, callbacks=cbs)
    acc = model.eval(test)["accuracy"]
    print(f"test accuracy: {acc * 100:.2f}%")
    return 0 if np.isfinite(acc) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="insight", description="Insight: a profiler and dashboard for the "
                                     "Insight training runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train the digits CNN (LeNet) in graph mode")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="print the loss during training")
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
