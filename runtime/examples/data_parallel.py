"""Data-parallel training over MPI: LeNet on the 8x8 digits, one process per rank.

    mpirun -n 2 python -m runtime.examples.data_parallel                   # as a normal user
    mpirun --allow-run-as-root --oversubscribe -n 2 python -m runtime.examples.data_parallel   # as root / few cores

Every rank builds the same network; ``init()`` joins the MPI group, the parameters are broadcast from rank 0
at the first step, each rank reads its own shard of the shuffled data (``global_batch / ranks`` rows per
step), and the gradients are AllReduced (averaged) in buckets on the ``comm`` stream while the backward
goes on. The loss printed is the global batch's, the same on every rank.

Options: ``--steps 200 --global-batch 64 --fusion 2,5`` (AllReduce split indices; none: one AllReduce per
parameter), ``--stand-alone`` (no communication at all: the single-process reference), ``--delay-rank R
--delay-ms 20`` (rank R's data pipeline sleeps that long per batch: a straggler, best seen with ``--prefetch 2``), ``--out DIR`` (each rank
writes its parameters and losses to ``DIR/rank_<r>.npz``). OpenMP threads per rank: ``mpirun -x
OMP_NUM_THREADS=1 ...``.

The network is MindSpore's LeNet5 shape without BatchNorm: batch statistics are per rank in data-parallel
training (as in MindSpore without SyncBatchNorm), so a BatchNorm network is not the same function of the
global batch as in one process, and the two runs could not be compared exactly.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from runtime import Model, communication, context, nn
from runtime.dataset import NumpySlicesDataset, config
from runtime.dataset.digits import load_digits_split
from runtime.train.callback import Callback


class LeNet5(nn.Cell):
    """MindSpore's LeNet5 layout, sized for 8x8 digits: conv-ReLU-pool x 2, then three Dense layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, pad_mode="same", has_bias=False)
        self.conv2 = nn.Conv2d(6, 16, 3, pad_mode="same", has_bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Dense(16 * 2 * 2, 120)
        self.fc2 = nn.Dense(120, 84)
        self.fc3 = nn.Dense(84, num_classes)

    def construct(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(self.flatten(x))))))


class _Record(Callback):
    """Keeps every step's loss and stops after ``steps`` steps."""

    def __init__(self, steps: int):
        self.steps, self.losses = steps, []

    def step_end(self, run_context):
        self.losses.append(float(run_context.original_args()["net_outputs"]))
        if len(self.losses) >= self.steps:
            run_context.request_stop()


class _Delay:
    """A map function that sleeps (the injected data-pipeline delay of one rank)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.__name__ = f"delay_{seconds * 1e3:g}ms"

    def __call__(self, image):
        time.sleep(self.seconds)
        return image


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.examples.data_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--fusion", default="", help="AllReduce split indices, e.g. 2,5 (none: one AllReduce per parameter)")
    p.add_argument("--stand-alone", action="store_true", help="no MPI, no AllReduce: the single-process reference")
    p.add_argument("--delay-rank", type=int, default=-1)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--sink", type=int, default=1, help="1: data sink mode (GetNext from the device queue)")
    p.add_argument("--prefetch", type=int, default=0, help="queue sizes of the data pipeline and the device queue "
                   "(0: the defaults); small values stop prefetching from hiding a slow pipeline")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="", help="write DIR/rank_<r>.npz (parameters and losses)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.fusion = [int(v) for v in args.fusion.split(",") if v.strip()]
    except ValueError:
        p.error(f"--fusion: expected comma-separated integers, got {args.fusion!r}")
    if args.steps < 1 or args.global_batch < 1:
        p.error("--steps and --global-batch must be >= 1")
    return args


def setup(args) -> tuple[int, int]:
    """Join the group (unless stand-alone) and set the contexts; returns (rank, size)."""
    context.set_context(mode=context.GRAPH_MODE, seed=args.seed)
    if args.stand_alone:
        context.set_auto_parallel_context(parallel_mode=context.STAND_ALONE)
        return 0, 1
    communication.init()
    context.set_auto_parallel_context(parallel_mode=context.DATA_PARALLEL, gradients_mean=True,
                                      all_reduce_fusion_config=args.fusion)
    return communication.get_rank(), communication.get_group_size()


def build(args, rank: int, size: int):
    """(model, network, dataset, steps per epoch) for this rank."""
    if args.global_batch % size:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {size} ranks")
    xtr, ytr, _, _ = load_digits_split(seed=0)
    ds = NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=args.seed)  # sharded by rank
    ds = ds.batch(args.global_batch // size, drop_remainder=True)
    if rank == args.delay_rank and args.delay_ms > 0:
        ds = ds.map(_Delay(args.delay_ms / 1e3), input_columns="image")  # per batch
    net = LeNet5()
    opt = nn.Momentum(net.trainable_params(), args.lr, 0.9)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)
    return model, net, ds, ds.get_dataset_size()


def train(args, callbacks=()) -> dict:
    """Run the training of ``args`` in this process; returns rank, size, losses, parameters, wall time."""
    rank, size = setup(args)
    model, net, ds, per_epoch = build(args, rank, size)
    rec = _Record(args.steps)
    epochs = -(-args.steps // per_epoch)
    t0 = time.perf_counter()
    if args.prefetch:
        config.set_prefetch_size(args.prefetch)
    model.train(epochs, ds, callbacks=[rec, *callbacks], dataset_sink_mode=bool(args.sink),
                sink_queue_size=args.prefetch or 8)
    wall = time.perf_counter() - t0
    params = {p.name: p.data.copy() for p in net.trainable_params()}
    return {"rank": rank, "size": size, "losses": np.array(rec.losses), "params": params, "wall_s": wall,
            "steps": len(rec.losses), "samples": len(rec.losses) * args.global_batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    res = train(args)
    rank, size, losses = res["rank"], res["size"], res["losses"]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"rank_{rank}.npz", losses=losses, wall_s=res["wall_s"],
                 **{f"param/{k}": v for k, v in res["params"].items()})
    if not args.quiet:
        every = max(1, len(losses) // 5)
        shown = ", ".join(f"{k + 1}: {v:.4f}" for k, v in enumerate(losses) if k % every == 0 or k == len(losses) - 1)
        print(f"rank {rank}/{size}: {res['steps']} steps, global batch {args.global_batch}, "
              f"{res['samples'] / res['wall_s']:.0f} samples/s; loss by step {shown}", flush=True)
    communication.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
