"""Executor overhead: the compiled digits-CNN training step run by the device executor versus the same
kernels called in a plain Python loop (no tasks, no streams, no feed checks), interleaved in one run.

    python benchmarks/bench_executor.py [--rounds 30] [--steps 50] [--summary PATH]

Goal: the executor adds <= 10% to the step time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's runtime, and benchmarks._summary

from benchmarks._summary import row, write  # noqa: E402
from runtime import Model, context, nn  # noqa: E402
from runtime.dataset.digits import load_digits_split  # noqa: E402
from runtime.models import LeNetDigits  # noqa: E402


def plain_loop(exe):
    """The reference: the graph's kernels in order, values in a dict freed after their last use."""
    nodes = exe.nodes
    from runtime.ops.registry import get_primitive

    last_use = {}
    for k, n in enumerate(nodes):
        for i in n.inputs:
            last_use[i.id] = k
    roots = {n.id for n in exe.graph.roots()}
    prog = []
    for k, n in enumerate(nodes):
        if n.op in ("input", "param", "const"):
            continue
        dead = [i.id for i in set(n.inputs) if last_use[i.id] == k and i.id not in roots
                and i.op not in ("param", "const")]
        prog.append((n.id, get_primitive(n.op).kernel, [i.id for i in n.inputs], n.attrs, dead))
    leaves = {n.id: (n.attrs["_var"].data if n.op == "param" else n.attrs["value"])
              for n in nodes if n.op in ("param", "const")}
    inputs = {n.attrs["name"]: n.id for n in nodes if n.op == "input"}
    loss_id = exe.graph.outputs["loss"].id

    def run(feeds):
        env = dict(leaves)
        for name, nid in inputs.items():
            env[nid] = feeds[name]
        for nid, kernel, ins, attrs, dead in prog:
            env[nid] = kernel(*[env[i] for i in ins], **attrs)
            for d in dead:  # release intermediates after their last use, as any careful loop would
                del env[d]
        return env[loss_id]
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--summary", metavar="PATH", help="also write the summary rows for benchmarks/run_all.py")
    args = ap.parse_args()
    context.set_context(mode=context.GRAPH_MODE, seed=0)
    xtr, ytr, _, _ = load_digits_split()
    x, y = xtr[:args.batch], ytr[:args.batch]
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.01, 0.9), progress=False)
    exe = model.train_graph(x, y)
    loop = plain_loop(exe)
    feeds = {"data": x, "label": y}
    for _ in range(20):
        exe(feeds)
        loop(feeds)
    ours, ref = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            exe(feeds)
        t1 = time.perf_counter()
        for _ in range(args.steps):
            loop(feeds)
        t2 = time.perf_counter()
        ours.append((t1 - t0) / args.steps * 1e3)
        ref.append((t2 - t1) / args.steps * 1e3)
    a, b = statistics.median(ours), statistics.median(ref)
    kernels = sum(t.kind == "kernel" for t in exe.tl.tasks)
    print(f"digits CNN training step, batch {args.batch}, {kernels} kernels, {args.rounds} rounds x {args.steps} steps")
    print(f"  executor     {a:8.3f} ms/step")
    print(f"  plain loop   {b:8.3f} ms/step")
    print(f"  overhead     {(a / b - 1) * 100:+7.2f} %   (goal <= +10%)")
    write(args.summary, "bench_executor", [
        row(f"digits CNN step (batch {args.batch}): executor / plain kernel loop", a, b, unit="ms/step",
            goal="<= 1.1")])


if __name__ == "__main__":
    main()
