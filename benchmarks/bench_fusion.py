"""Graph-kernel fusion: the same training step with ``enable_graph_kernel`` off and on, interleaved in
one run (median of rounds), plus the memory bandwidth of fused elementwise kernels.

    python benchmarks/bench_fusion.py [--rounds 7] [--steps 3] [--quick] [--small] [--part all|bert|work|bandwidth]
                                      [--summary PATH]

1. BERT-small encoder training step (4 layers, hidden 256, 4 heads, sequence 128, batch 16, Adam):
   step time unfused vs fused and the speed-up. Goal: >= 1.6x, with the losses of the two (run in lockstep,
   the same steps on the same batch) equal to 1e-5. Also fused without the attention kernels
   (``INSIGHT_ATTENTION_FUSION=0``), paired with fused: what the flash-style attention kernels add; and the
   step's dense-layer GEMMs alone (the same BLAS calls on preallocated outputs, interleaved with the steps):
   fusion cannot touch them, so unfused step / their time bounds the speed-up (Amdahl). Both steps get their
   memory the same way (the fused kernels' outputs from ``codegen.buffers``, every other array from the
   host-memory cache of ``runtime/host_memory.py``); the script prints each step's page faults to show it.
   Without that cache (``INSIGHT_HOST_CACHE_MB=0``) the unfused step paid ~30,000 page faults per step and the
   speed-up looked 0.2-0.3 larger than fusion makes it.
   Each variant runs one untimed step per round before its timed ones: the first step after another graph ran
   was 50-150 ms slower (its weights, optimizer state and buffers out of cache), a cost of the interleaving that
   a training run does not pay and that inflated the speed-up.
   ``--part work``: the same three steps, the GEMMs and the step's dropout draws on ONE thread in a child
   process, timed by thread CPU time -- the work each does, a figure the machine's load barely moves.
2. An elementwise-heavy chain: gelu backward (expanded: ~25 primitives, an exp and a division per
   element) on 16M floats, fused into one kernel, against ``np.copyto`` of the same number of bytes
   (read 2 x 64 MB, write 64 MB) measured in the same run. Goal: >= 60% of the copy bandwidth.
3. A chain of only cheap ops (mul / add / select, same traffic). Goal: >= 80% of the copy bandwidth.

The training graphs are compiled through the regular pass pipeline (``enable_graph_kernel`` switches fusion
on); the elementwise chains are one ``graph_kernel`` call each. The kernels use every core
(``INSIGHT_FUSION_THREADS``); figures on a shared machine vary with its load. ``--quick`` (what
``benchmarks/run_all.py`` runs) keeps the goal's BERT and 3 rounds; ``--summary PATH`` writes the goal rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's runtime, whatever is installed

from benchmarks._summary import row, write  # noqa: E402
from runtime import Model, _kernels, codegen, context, nn  # noqa: E402
from runtime.compiler import compile as compile_graph  # noqa: E402
from runtime.core import GraphBuilder, building  # noqa: E402
from runtime.ir.graph import Graph  # noqa: E402
from runtime.nn.transformer import BertSmall, bert_batch  # noqa: E402
from runtime.ops import api as F  # noqa: E402
from runtime.passes.graph_kernel import graph_kernel  # noqa: E402
from runtime.threads import blas  # noqa: E402


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


def chain_graph(name: str, n: int, fn) -> Graph:
    """``fn(x, dy)`` on n floats as a graph (inputs x, dy; output dx)."""
    g = Graph(name)
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (n,), np.float32)
        dy = b.input("dy", (n,), np.float32)
        g.outputs = {"dx": fn(x, dy).node}
    return g


def executor_chain(name: str, n: int, fn, fuse: bool):
    """The same graph compiled with or without fusion and run by the executor, as a training step runs it
    (inputs copied in, outputs from the runtime's allocators). Unfused, every op is one kernel (a composite
    op such as gelu_grad is ONE primitive, a Cython kernel). Returns a call ``(x, dy) -> dx`` and the number
    of kernels."""
    context.set_context(enable_graph_kernel=fuse)
    try:
        exe = compile_graph(chain_graph(name, n, fn))
    finally:
        context.set_context(enable_graph_kernel=False)
    return (lambda x, dy: exe({"x": x, "dy": dy})["dx"]), sum(t.kind == "kernel" for t in exe.tl.tasks)


def fused_chain(name: str, n: int, fn):
    """``fn(x, dy)`` on n floats as a graph, fused into one kernel; returns the kernel's program."""
    fused = graph_kernel(chain_graph(name, n, fn))
    (node,) = [m for m in fused.nodes if m.op not in ("input", "const")]
    assert node.op == "fused", fused.dump()
    print(f"  fused into 1 kernel: {node.name} ({len(node.ann['fused_ops'])} primitives: "
          f"{','.join(dict.fromkeys(node.ann['fused_ops']))})")
    return node.attrs["_program"]


def cheap_chain(x, dy):
    """mul / add / select only: dy * 0.5 + x where x > 0, else dy * 0.25 - 1."""
    return F.select(F.greater(x, 0.0), F.add(F.mul(dy, 0.5), x), F.sub(F.mul(dy, 0.25), 1.0))


def timeit(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def dense_gemms(exe):
    """The unfused step's dense-layer GEMMs (``matmul`` nodes: every one of them is in the fused step too, as a
    library call fusion cannot change) as closures over random inputs of their shapes and layouts, writing into
    preallocated outputs: the GEMM time alone, without allocation or anything else of the step."""
    rng = np.random.default_rng(2)
    calls = []
    for n in exe.graph.nodes:
        if n.op != "matmul" or n.dtype != np.float32:
            continue
        a, b = (rng.standard_normal(i.shape, dtype=np.float32) for i in n.inputs)
        a = a.T if n.attrs["transpose_a"] else a
        b = b.T if n.attrs["transpose_b"] else b
        out = np.empty(n.shape, np.float32)

        def call(a=a, b=b, out=out):
            blas.matmul(a, b, out=out)    # as the runtime runs its GEMMs (runtime/threads.py)
        calls.append(call)
    flops = sum(2 * int(np.prod(n.shape)) * (n.inputs[0].shape[0 if n.attrs["transpose_a"] else 1])
                for n in exe.graph.nodes if n.op == "matmul" and n.dtype == np.float32)
    return calls, flops


def bert(args):
    cfg = dict(batch=16, seq=128, layers=4, hidden=256, heads=4)
    if args.small:
        cfg = dict(batch=4, seq=64, layers=2, hidden=128, heads=4)
    print(f"BERT-small training step: {cfg}, Adam")
    off, feeds, b_off = bert_step(False, **cfg)
    on, _, b_on = bert_step(True, **cfg)
    os.environ["INSIGHT_ATTENTION_FUSION"] = "0"         # the same fusion without the attention kernels
    try:
        no_att, _, _ = bert_step(True, **cfg)
    finally:
        del os.environ["INSIGHT_ATTENTION_FUSION"]
    k_off = sum(t.kind == "kernel" for t in off.tl.tasks)
    k_on = sum(t.kind == "kernel" for t in on.tl.tasks)
    print(f"  kernel launches per step: {k_off} unfused -> {k_on} fused "
          f"({sum(t.node.op in ('fused', 'fused_assign') for t in on.tl.tasks if t.node is not None)} generated "
          f"kernels); graph build + compile {b_off:.1f}s / {b_on:.1f}s")
    gemms, gemm_flops = dense_gemms(off)
    for g in gemms:
        g()
    losses = {"off": [], "on": [], "no_att": []}
    t_off, t_on, t_na, t_gemm = [], [], [], []

    def step(exe, key):
        def run():
            losses[key].append(float(exe(feeds)["loss"]))
        return run

    def all_gemms():
        for g in gemms:
            g()
    for r in range(args.rounds):      # interleaved, alternating which one goes first
        order = [(step(off, "off"), t_off), (step(on, "on"), t_on), (step(no_att, "no_att"), t_na),
                 (all_gemms, t_gemm)]
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            fn()       # untimed: the first step after another graph ran finds its memory out of cache
            acc.append(timeit(fn, args.steps))
    m_off, m_on, m_gemm = statistics.median(t_off), statistics.median(t_on), statistics.median(t_gemm)
    speedup = m_off / m_on
    print(f"  step time (median of {args.rounds} rounds x {args.steps} steps after one untimed)  unfused {m_off * 1e3:7.1f} ms   "
          f"fused {m_on * 1e3:7.1f} ms   speed-up {speedup:.2f}x  (goal >= 1.6x)")
    print(f"  best round                                      unfused {min(t_off) * 1e3:7.1f} ms   "
          f"fused {min(t_on) * 1e3:7.1f} ms   speed-up {min(t_off) / min(t_on):.2f}x")
    paired = statistics.median(a / b for a, b in zip(t_na, t_on))
    print(f"  attention kernels (fused_attention_fwd / _grad): fused without them {statistics.median(t_na) * 1e3:7.1f} ms"
          f" -> with them {m_on * 1e3:7.1f} ms; paired median ratio {paired:.2f}x")
    share = statistics.median(g / a for g, a in zip(t_gemm, t_off))
    bound = statistics.median(a / g for g, a in zip(t_gemm, t_off))
    print(f"  dense-layer GEMMs alone ({len(gemms)} BLAS calls, {gemm_flops / 1e9:.1f} GFLOP, preallocated outputs): "
          f"{m_gemm * 1e3:7.1f} ms = {gemm_flops / m_gemm / 1e9:.0f} GFLOP/s, {100 * share:.0f}% of the unfused step "
          f"(paired)\n  -> Amdahl bound on the speed-up with those GEMMs untouched: {bound:.2f}x; fused step minus "
          f"them: {(m_on - m_gemm) * 1e3:.1f} ms (unfused: {(m_off - m_gemm) * 1e3:.1f} ms)")
    faults = {}
    for key, exe in (("off", off), ("on", on)):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(exe, key)()
        faults[key] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(f"  minor page faults in one more step: unfused {faults['off']}, fused {faults['on']} (the step's arrays reuse "
          f"cached memory: runtime/host_memory.py; INSIGHT_HOST_CACHE_MB=0 turns that off)")
    n = min(len(v) for v in losses.values())
    diff = max(abs(a - b) for a, b in zip(losses["off"][:n], losses["on"][:n]))
    diff_na = max(abs(a - b) for a, b in zip(losses["off"][:n], losses["no_att"][:n]))
    print(f"  loss over {n} steps in lockstep: unfused {losses['off'][0]:.6f} -> {losses['off'][n - 1]:.6f}; "
          f"max |fused - unfused| {diff:.2e} (without the attention kernels {diff_na:.2e}; goal <= 1e-5)")
    return [
        row("BERT-small step fused (ratio = unfused / fused speed-up)", m_on * 1e3, m_off * 1e3, ratio=speedup,
            unit="ms/step", goal=">= 1.6"),
        row("BERT-small step fused with / without the attention kernels (ratio = paired speed-up)", m_on * 1e3,
            statistics.median(t_na) * 1e3, ratio=paired, unit="ms/step"),
        row("BERT-small Amdahl bound: unfused step / its dense GEMMs alone (ratio = max speed-up)", m_gemm * 1e3,
            m_off * 1e3, ratio=bound, unit="ms/step"),
        row("BERT-small max |loss fused - loss unfused| over the run's steps", diff, unit="abs", goal="<= 1e-5"),
    ]


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "INSIGHT_BLAS_THREADS": "1",
              "INSIGHT_FUSION_THREADS": "1"}


def bert_work(args):
    """The same comparison on ONE thread, timed by the thread's CPU time (``time.thread_time``): the work each
    step does, which the machine's load barely moves (a preempted thread's waiting is not counted). Runs in a
    child process started with every thread pool at 1 (the pools are sized at import)."""
    cmd = [sys.executable, __file__, "--part", "work-child", "--rounds", str(args.rounds)] + \
        (["--small"] if args.small else [])
    res = subprocess.run(cmd, env=dict(os.environ, **ONE_THREAD), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"bench_fusion: the one-thread child failed: {res.stderr.strip().splitlines()[-1:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"BERT-small step on ONE thread, thread CPU time (best of {args.rounds}): unfused {m['off']:.1f} ms, fused "
          f"{m['on']:.1f} ms ({m['off'] / m['on']:.2f}x), fused without the attention kernels {m['no_att']:.1f} ms; "
          f"dense GEMMs alone {m['gemm']:.1f} ms, dropout draws alone {m['rng']:.1f} ms\n  -> one-thread Amdahl bound "
          f"with the GEMMs and the draws untouched: {m['off'] / (m['gemm'] + m['rng']):.2f}x")
    return [row("BERT-small step fused, ONE thread, thread CPU time (ratio = unfused / fused)", m["on"], m["off"],
                ratio=m["off"] / m["on"], unit="ms/step"),
            row("BERT-small ONE-thread Amdahl bound: unfused / (dense GEMMs + dropout draws) (ratio = max speed-up)",
                m["gemm"] + m["rng"], m["off"], ratio=m["off"] / (m["gemm"] + m["rng"]), unit="ms/step")]


def bert_work_child(args):
    cfg = dict(batch=4, seq=64, layers=2, hidden=128, heads=4) if args.small else \
        dict(batch=16, seq=128, layers=4, hidden=256, heads=4)
    off, feeds, _ = bert_step(False, **cfg)
    on, _, _ = bert_step(True, **cfg)
    os.environ["INSIGHT_ATTENTION_FUSION"] = "0"
    no_att, _, _ = bert_step(True, **cfg)
    gemms, _ = dense_gemms(off)
    draws = [n.shape for n in on.graph.nodes if n.op == "uniform"]
    rng = np.random.default_rng(3)
    outs = [np.empty(s, np.float32) for s in draws]

    def all_gemms():
        for g in gemms:
            g()

    def all_draws():             # the step's dropout draws (the same generator calls in both graphs)
        for o in outs:
            rng.random(o.shape, dtype=np.float32, out=o)
    best = {"off": 1e9, "on": 1e9, "no_att": 1e9, "gemm": 1e9, "rng": 1e9}
    fns = {"off": lambda: off(feeds), "on": lambda: on(feeds), "no_att": lambda: no_att(feeds), "gemm": all_gemms,
           "rng": all_draws}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            fn()
            t0 = time.thread_time()
            fn()
            best[key] = min(best[key], (time.thread_time() - t0) * 1e3)
    print(json.dumps(best))


def bandwidth(args):
    n = 16 * 1024 * 1024
    print(f"elementwise chains, {n} float32 elements (read 2 x {n * 4 >> 20} MB, write {n * 4 >> 20} MB)")
    gelu = fused_chain("gelu_backward", n, F.gelu_grad)
    cheap = fused_chain("cheap_chain", n, cheap_chain)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal(n, dtype=np.float32)
    src = np.empty(3 * n // 2, np.float32)
    src[:] = 1.0
    dst = np.empty_like(src)            # copy 2 x (3n/2 x 4) bytes = the kernel's 3 x n x 4 bytes of traffic
    assert np.allclose(gelu(x, dy), _kernels.gelu_bwd(x, dy), rtol=1e-5, atol=1e-6)
    want = np.where(x > 0, dy * np.float32(0.5) + x, dy * np.float32(0.25) - np.float32(1.0))
    assert np.array_equal(cheap(x, dy), want)
    np.copyto(dst, src)
    chains = {}
    for key, fn in (("gelu", F.gelu_grad), ("cheap", cheap_chain)):
        for fuse in (False, True):
            chains[key, fuse] = executor_chain(f"{key}_chain_{'fused' if fuse else 'unfused'}", n, fn, fuse)
    assert np.array_equal(chains["cheap", False][0](x, dy), want)
    assert np.array_equal(chains["cheap", True][0](x, dy), want)
    runs = {"copy": [], "gelu": [], "cheap": [], "cython": [], "gelu_off": [], "cheap_off": [], "gelu_on": [],
            "cheap_on": []}
    for _ in range(args.rounds):      # interleaved: every figure sees the same machine load
        runs["copy"].append(timeit(lambda: np.copyto(dst, src), 3))
        runs["gelu"].append(timeit(lambda: gelu(x, dy), 3))      # the kernel call, output buffer included
        runs["cheap"].append(timeit(lambda: cheap(x, dy), 3))
        runs["cython"].append(timeit(lambda: _kernels.gelu_bwd(x, dy), 3))
        for key in ("gelu", "cheap"):
            for fuse in (False, True):
                runs[f"{key}_{'on' if fuse else 'off'}"].append(timeit(lambda f=chains[key, fuse][0]: f(x, dy), 3))
        runs["copy"].append(timeit(lambda: np.copyto(dst, src), 3))
    moved = 3 * n * 4
    rows = []
    med = {k: statistics.median(v) for k, v in runs.items()}
    bw = {k: moved / t / 1e9 for k, t in med.items()}
    print(f"  np.copyto            {med['copy'] * 1e3:7.2f} ms  {bw['copy']:6.1f} GB/s")
    for key, label, goal in (("gelu", "fused gelu_grad", 60), ("cheap", "fused mul/add/select", 80)):
        best = min(runs["copy"]) / min(runs[key])
        print(f"  {label:20s} {med[key] * 1e3:7.2f} ms  {bw[key]:6.1f} GB/s  = {100 * bw[key] / bw['copy']:.0f}% of "
              f"copy bandwidth (goal >= {goal}%; best round {100 * best:.0f}%)")
        rows.append(row(f"{label} bandwidth (ratio = share of np.copyto's in the same run)", bw[key], bw["copy"],
                        unit="GB/s", goal=f">= {goal / 100:.1f}"))
    print(f"  Cython gelu_bwd op   {med['cython'] * 1e3:7.2f} ms  {bw['cython']:6.1f} GB/s  (the unfused primitive)")
    print("  through the executor, as a step runs them (inputs copied in, outputs allocated):")
    for key, label in (("gelu", "gelu_grad"), ("cheap", "mul/add/select")):
        speed = statistics.median(a / b for a, b in zip(runs[f"{key}_off"], runs[f"{key}_on"]))
        k = chains[key, False][1]
        print(f"  {label:20s} unfused ({k} kernel{'s' if k > 1 else ''}) {med[key + '_off'] * 1e3:7.2f} ms -> fused "
              f"({chains[key, True][1]}) {med[key + '_on'] * 1e3:7.2f} ms: {speed:.2f}x (paired median)")
        rows.append(row(f"{label} on {n} floats through the executor, fused (ratio = unfused / fused, paired)",
                        med[key + "_on"] * 1e3, med[key + "_off"] * 1e3, ratio=speed, unit="ms"))
    if not args.quick:
        compute_cost()
    return rows


def compute_cost(n: int = 1 << 16, reps: int = 100, repeats: int = 7):
    """CPU time per element of each fused chain on ONE thread with its data in cache: what the kernel
    costs when memory is not the limit (best of ``repeats``). Thread CPU time does not count time the
    thread waits for a core, so this figure moves far less with the machine's load than wall times do.
    12 bytes per element / (ns per element / cores) is the bandwidth at which the kernel turns
    compute-bound."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal(n, dtype=np.float32)
    print(f"compute cost, one thread, {n} elements in cache (best of {repeats} x {reps} calls, thread CPU time):")
    chains = {label: fused_chain(label.replace(" ", "_").replace("/", "_"), n, fn)
              for label, fn in (("fused gelu_grad", F.gelu_grad), ("fused mul/add/select", cheap_chain))}
    best = {label: float("inf") for label in chains}
    with codegen.threads(1):
        for _ in range(repeats):          # interleaved
            for label, kernel in chains.items():
                kernel(x, dy)
                t0 = time.thread_time()
                for _ in range(reps):
                    kernel(x, dy)
                best[label] = min(best[label], (time.thread_time() - t0) / (reps * n) * 1e9)
    for label, ns in best.items():
        print(f"  {label:20s} {ns:6.3f} ns/element -> compute-bound at {12 / ns * (os.cpu_count() or 1):5.1f} GB/s "
              f"on {os.cpu_count()} cores")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="the goal figures only, in a few minutes: 3 rounds unless --rounds, no compute-cost part")
    ap.add_argument("--small", action="store_true", help="a smaller BERT (for a smoke run; not the goal's model)")
    ap.add_argument("--part", choices=("all", "bert", "work", "bandwidth", "work-child"), default="all")
    ap.add_argument("--summary", default="", help="write the goal rows as JSON (benchmarks/_summary.py)")
    args = ap.parse_args()
    if args.quick and args.rounds == ap.get_default("rounds"):
        args.rounds = 3
    if args.part == "work-child":
        bert_work_child(args)
        return
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = []
    if args.part in ("all", "bert"):
        rows += bert(args)
    if args.part in ("all", "work"):
        rows += bert_work(args)
    if args.part in ("all", "bandwidth"):
        rows += bandwidth(args)
    write(args.summary, "bench_fusion", rows)


if __name__ == "__main__":
    main()
