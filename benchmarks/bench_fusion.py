"""Graph-kernel fusion: the same training step with ``enable_graph_kernel`` off and on, interleaved in
one run (median of rounds), plus the memory bandwidth of one fused elementwise kernel.

    python benchmarks/bench_fusion.py [--rounds 7] [--steps 3] [--quick]

1. BERT-small encoder training step (4 layers, hidden 256, 4 heads, sequence 128, batch 16, Adam):
   step time unfused vs fused and the speed-up. Goal: >= 1.3x.
2. An elementwise-heavy chain: gelu backward (expanded: ~25 primitives) on 16M floats, fused into one
   kernel, against ``np.copyto`` of the same number of bytes (read 2 x 64 MB, write 64 MB) measured in
   the same run. Goal: >= 60% of the copy bandwidth.

The training graphs are compiled through the regular pass pipeline (``enable_graph_kernel`` switches fusion
on); the gelu chain is one ``graph_kernel`` call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's runtime, whatever is installed

from runtime import Model, context, nn
from runtime.core import GraphBuilder, building
from runtime.ir.graph import Graph
from runtime.nn.transformer import BertSmall, bert_batch
from runtime.ops import api as F
from runtime.passes.graph_kernel import graph_kernel


def bert_step(fuse: bool, batch: int, seq: int, layers: int, hidden: int, heads: int):
    context.set_context(seed=0, enable_graph_kernel=fuse)
    net = BertSmall(vocab_size=1000, hidden_size=hidden, num_layers=layers, num_heads=heads, max_position=seq)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Adam(net.trainable_params(), 1e-4), progress=False)
    ids, labels = bert_batch(batch, seq)
    t0 = time.perf_counter()
    exe = model.train_graph(ids, labels)
    build = time.perf_counter() - t0
    feeds = {"data": ids, "label": labels}
    exe(feeds)
    context.set_context(enable_graph_kernel=False)
    return exe, feeds, build


def gelu_chain(n: int):
    """gelu_grad(x, g) on n floats as a graph, fused into one kernel; returns (fused kernel, graph)."""
    g = Graph("gelu_backward")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (n,), np.float32)
        dy = b.input("dy", (n,), np.float32)
        g.outputs = {"dx": F.gelu_grad(x, dy).node}
    fused = graph_kernel(g)
    node = next(m for m in fused.nodes if m.op == "fused")
    print(f"  fused into 1 kernel: {node.name} ({len(node.ann['fused_ops'])} primitives: "
          f"{','.join(dict.fromkeys(node.ann['fused_ops']))})")
    return node.attrs["_program"], fused


def timeit(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smaller BERT (for a smoke run)")
    args = ap.parse_args()
    cfg = dict(batch=16, seq=128, layers=4, hidden=256, heads=4)
    if args.quick:
        cfg = dict(batch=4, seq=64, layers=2, hidden=128, heads=4)
    print(f"BERT-small training step: {cfg}, Adam")
    off, feeds, b_off = bert_step(False, **cfg)
    on, _, b_on = bert_step(True, **cfg)
    k_off = sum(t.kind == "kernel" for t in off.tl.tasks)
    k_on = sum(t.kind == "kernel" for t in on.tl.tasks)
    print(f"  kernel launches per step: {k_off} unfused -> {k_on} fused "
          f"({sum(t.node.op in ('fused', 'fused_assign') for t in on.tl.tasks if t.node is not None)} generated "
          f"kernels); graph build + compile {b_off:.1f}s / {b_on:.1f}s")
    t_off, t_on = [], []
    for r in range(args.rounds):      # interleaved, alternating which one goes first
        order = [(off, t_off), (on, t_on)] if r % 2 == 0 else [(on, t_on), (off, t_off)]
        for exe, acc in order:
            acc.append(timeit(lambda: exe(feeds), args.steps))
    m_off, m_on = statistics.median(t_off), statistics.median(t_on)
    print(f"  step time (median of {args.rounds} rounds x {args.steps} steps)  unfused {m_off * 1e3:7.1f} ms   "
          f"fused {m_on * 1e3:7.1f} ms   speed-up {m_off / m_on:.2f}x  (goal >= 1.30x)")
    print(f"  best round                                      unfused {min(t_off) * 1e3:7.1f} ms   "
          f"fused {min(t_on) * 1e3:7.1f} ms   speed-up {min(t_off) / min(t_on):.2f}x")

    n = 16 * 1024 * 1024
    print(f"gelu backward, {n} float32 elements (read 2 x {n * 4 >> 20} MB, write {n * 4 >> 20} MB)")
    kernel, graph = gelu_chain(n)
    from runtime import _kernels
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal(n, dtype=np.float32)
    src = np.empty(3 * n // 2, np.float32)
    src[:] = 1.0
    dst = np.empty_like(src)            # copy 2 x (3n/2 x 4) bytes = the kernel's 3 x n x 4 bytes of traffic
    ref = _kernels.gelu_bwd(x, dy)
    out = kernel(x, dy)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-6)
    del out
    np.copyto(dst, src)
    t_copy, t_fused, t_unf = [], [], []
    for _ in range(args.rounds):
        t_copy.append(timeit(lambda: np.copyto(dst, src), 3))
        t_fused.append(timeit(lambda: kernel(x, dy), 3))      # the kernel call, output buffer included
        t_unf.append(timeit(lambda: _kernels.gelu_bwd(x, dy), 3))
        t_copy.append(timeit(lambda: np.copyto(dst, src), 3))
    bytes_moved = 3 * n * 4
    bw_copy = bytes_moved / statistics.median(t_copy) / 1e9
    bw_fused = bytes_moved / statistics.median(t_fused) / 1e9
    bw_unf = bytes_moved / statistics.median(t_unf) / 1e9
    best = bytes_moved / min(t_fused) / 1e9 / (bytes_moved / min(t_copy) / 1e9)
    print(f"  np.copyto            {statistics.median(t_copy) * 1e3:7.2f} ms  {bw_copy:6.1f} GB/s")
    print(f"  fused gelu_grad      {statistics.median(t_fused) * 1e3:7.2f} ms  {bw_fused:6.1f} GB/s  "
          f"= {100 * bw_fused / bw_copy:.0f}% of copy bandwidth (goal >= 60%; best round {100 * best:.0f}%)")
    print(f"  Cython gelu_bwd op   {statistics.median(t_unf) * 1e3:7.2f} ms  {bw_unf:6.1f} GB/s  (the unfused primitive)")


if __name__ == "__main__":
    main()
