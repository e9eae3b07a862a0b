#!/usr/bin/env python
"""Time ONE training step (forward + loss + backward + SGD-momentum update) of our runtime against
PyTorch CPU eager, on the same two models, the same batches and the same initial weights.

    cd /work/main && PYTHONPATH=. python benchmarks/bench_vs_torch.py [--rounds 30] [--steps-per-round 20]
                                                                     [--json out.json] [--profile]
                                                                     [--summary PATH]

Contestants, per model:
  * ours GRAPH     -- ``Model.train_step`` in GRAPH_MODE (one traced+compiled graph, executed per step);
  * ours PYNATIVE  -- ``Model.train_step`` in PYNATIVE_MODE (eager ops + tape + eager backward);
  * torch eager    -- ``zero_grad; loss = crit(model(x), y); loss.backward(); opt.step(); loss.item()``.

Models (float32, batch 64, SGD momentum 0.9 lr 0.05 in both frameworks):
  * mlp: 64 -> 256 -> ReLU -> 256 -> ReLU -> 10 on the flattened sklearn digits (images / 16);
  * cnn: Conv(1,16,3,same,no bias)-BN-ReLU-MaxPool(2) -> Conv(16,32,3,same,no bias)-BN-ReLU-MaxPool(2)
         -> Flatten -> Dense(128,64) -> ReLU -> Dense(64,10) on the (N,1,8,8) digits images.
  Loss: SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean') vs torch.nn.CrossEntropyLoss().

Method: the weights of our freshly initialised network are copied into torch; one step is run in
both and the losses (and the updated weights) are compared before anything is timed. Then, after a
warm-up round, every round runs K steps of each contestant, alternating ours / torch
(ours GRAPH, torch, ours PYNATIVE, torch) for each model, and records the mean ms/step of that
block. The table reports the median over rounds; ``ratio`` is median(ours) / median(torch) (target
<= 1.0) and ``paired`` is the median of the per-round ratios against the torch block that ran right
after it (more robust when the machine is shared and the load drifts). The two torch blocks of a round use
two torch copies, each trained in lock-step with one of ours, so the final losses are comparable.

Shared machines: a round during which OTHER processes used more than ``--max-foreign-load`` of all
CPUs (from /proc/stat) is redone, up to ``--max-retries`` times; the share seen in the kept rounds
is printed under the table. Both frameworks run 2 threads, so on a 2-core box any other busy
process distorts the numbers -- read the ``min`` column as the uncontended cost.

Extras: ``--profile`` (cProfile + per-kernel / per-layer breakdown of our GRAPH_MODE step from the
runtime's own task events; ``--profile-mode pynative|both``), ``--no-bench`` (profile only), and the
experiment knobs ``--ours-blas-threads N`` / ``--ours-omp-threads N`` (threadpoolctl caps applied
around OUR blocks only; the default run leaves every thread pool as the runtime configures it).

torch is a benchmark-only dependency; the runtime itself never imports it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

# `python benchmarks/bench_vs_torch.py` from anywhere: this checkout's runtime, and benchmarks._summary
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._summary import row as summary_row, write as write_summary  # noqa: E402
from runtime import Model, context, hooks, nn  # noqa: E402

BATCH = 64
LR = 0.05
MOMENTUM = 0.9
SEED = 1
TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def load_batches(seed: int = 0):
    """Digits as fixed (shuffled once) batches of 64: flat (64, 64) for the MLP, (64, 1, 8, 8) for the CNN."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    nb = len(y) // BATCH
    flat, img = [], []
    for b in range(nb):
        xs, ys = x[b * BATCH:(b + 1) * BATCH], np.ascontiguousarray(y[b * BATCH:(b + 1) * BATCH])
        flat.append((np.ascontiguousarray(xs.reshape(BATCH, 64)), ys))
        img.append((np.ascontiguousarray(xs.reshape(BATCH, 1, 8, 8)), ys))
    return {"mlp": flat, "cnn": img}


# ------------------------------------------------------------------------------------------------
# models: ours
# ------------------------------------------------------------------------------------------------
class OursMLP(nn.Cell):
    def __init__(self):
        super().__init__()
        self.layers = nn.SequentialCell(nn.Dense(64, 256), nn.ReLU(), nn.Dense(256, 256), nn.ReLU(),
                                        nn.Dense(256, 10))

    def construct(self, x):
        return self.layers(x)


class OursCNN(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, pad_mode="same", has_bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 32, 3, pad_mode="same", has_bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Dense(128, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Dense(64, 10)

    def construct(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


OURS_NETS = {"mlp": OursMLP, "cnn": OursCNN}


def build_ours(kind: str) -> Model:
    context.set_context(seed=SEED)  # same seed -> same initial weights for every instance
    net = OURS_NETS[kind]()
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.SGD(net.trainable_params(), learning_rate=LR, momentum=MOMENTUM)
    return Model(net, loss, opt, progress=False)


def ours_layers(model: Model):
    return [c for _, c in model.network.cells_and_names() if isinstance(c, (nn.Dense, nn.Conv2d, nn.BatchNorm2d))]


# ------------------------------------------------------------------------------------------------
# models: torch (imported lazily so --help works without it)
# ------------------------------------------------------------------------------------------------
def build_torch(kind: str, torch):
    tnn = torch.nn
    if kind == "mlp":
        net = tnn.Sequential(tnn.Linear(64, 256), tnn.ReLU(), tnn.Linear(256, 256), tnn.ReLU(), tnn.Linear(256, 10))
    else:
        net = tnn.Sequential(
            tnn.Conv2d(1, 16, 3, padding=1, bias=False), tnn.BatchNorm2d(16, eps=1e-5, momentum=0.1), tnn.ReLU(),
            tnn.MaxPool2d(2, 2),
            tnn.Conv2d(16, 32, 3, padding=1, bias=False), tnn.BatchNorm2d(32, eps=1e-5, momentum=0.1), tnn.ReLU(),
            tnn.MaxPool2d(2, 2),
            tnn.Flatten(), tnn.Linear(128, 64), tnn.ReLU(), tnn.Linear(64, 10))
    net.train()
    return net


def _pairs(model: Model, tnet, torch):
    """(name, our array, torch tensor) for every weight, bias and BN buffer, matched layer by layer."""
    tnn = torch.nn
    ours = ours_layers(model)
    theirs = [m for m in tnet.modules() if isinstance(m, (tnn.Linear, tnn.Conv2d, tnn.BatchNorm2d))]
    kinds = {nn.Dense: tnn.Linear, nn.Conv2d: tnn.Conv2d, nn.BatchNorm2d: tnn.BatchNorm2d}
    if len(ours) != len(theirs):
        raise AssertionError(f"layer count differs: ours {len(ours)}, torch {len(theirs)}")
    out = []
    for k, (o, t) in enumerate(zip(ours, theirs)):
        if kinds[type(o)] is not type(t):
            raise AssertionError(f"layer {k}: {type(o).__name__} vs {type(t).__name__}")
        if isinstance(o, nn.BatchNorm2d):
            items = [("gamma", o.gamma, t.weight), ("beta", o.beta, t.bias),
                     ("moving_mean", o.moving_mean, t.running_mean),
                     ("moving_variance", o.moving_variance, t.running_var)]
        else:
            items = [("weight", o.weight, t.weight)]
            if o.has_bias:
                items.append(("bias", o.bias, t.bias))
            elif t.bias is not None:
                raise AssertionError(f"layer {k}: torch has a bias, ours does not")
        for name, p, tt in items:
            if tuple(p.shape) != tuple(tt.shape):
                raise AssertionError(f"layer {k} {name}: shape {p.shape} vs {tuple(tt.shape)}")
            out.append((f"{k}.{type(o).__name__}.{name}", p, tt))
    return out


def copy_weights(model: Model, tnet, torch) -> None:
    with torch.no_grad():
        for _, p, t in _pairs(model, tnet, torch):
            t.copy_(torch.from_numpy(np.array(p.data, copy=True)))


def max_weight_diff(model: Model, tnet, torch):
    worst = (0.0, "")
    for name, p, t in _pairs(model, tnet, torch):
        d = float(np.max(np.abs(p.data - t.detach().numpy())))
        worst = max(worst, (d, name))
    return worst


class TorchStep:
    def __init__(self, tnet, torch):
        self.net = tnet
        self.crit = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(tnet.parameters(), lr=LR, momentum=MOMENTUM)

    def __call__(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.crit(self.net(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()


# ------------------------------------------------------------------------------------------------
# environment header
# ------------------------------------------------------------------------------------------------
def _git_state() -> str | None:
    """Commit of the checkout being measured, plus whether runtime/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "runtime"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (runtime/ has uncommitted changes)' if dirty else ''}" if head else None


def environment(torch) -> dict:
    info = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                           "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git": _git_state(),
    }
    try:
        from threadpoolctl import threadpool_info
        pools = threadpool_info()
        info["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                                      "architecture", "threading_layer")}
                               | {"lib": os.path.basename(p.get("filepath", ""))} for p in pools]
    except ImportError:
        info["threadpools"] = None
        buf = io.StringIO()
        try:
            from contextlib import redirect_stdout
            with redirect_stdout(buf):
                np.show_config()
        except Exception:  # noqa: BLE001
            pass
        info["numpy_config"] = buf.getvalue()
    return info


def print_header(info: dict, args) -> None:
    print("=" * 96)
    print("bench_vs_torch: one training step (fwd + loss + bwd + SGD momentum), ours vs PyTorch CPU eager")
    print(f"python {info['python']}  |  {info['platform']}  |  cpus {info['cpu_count']} (affinity {info['affinity']})")
    print(f"numpy {info['numpy']}  |  torch {info['torch']} (threads {info['torch_threads']}, "
          f"mkldnn {info['torch_mkldnn']})  |  checkout {info.get('git') or 'n/a'}")
    if info.get("threadpools") is not None:
        for p in info["threadpools"]:
            print(f"  threadpool: {p['user_api']:<6} {p['internal_api']:<9} {str(p.get('version') or ''):<14} "
                  f"threads={p['num_threads']} arch={p.get('architecture') or '-'} "
                  f"layer={p.get('threading_layer') or '-'}  {p['lib']}")
    else:
        print("  threadpoolctl not installed; numpy.show_config():")
        print("    " + info.get("numpy_config", "").replace("\n", "\n    "))
    print(f"env: {info['env'] or '(no BLAS/OpenMP thread or core-type variables set)'}")
    la = info["loadavg_start"]
    print(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}" if la else "load average: n/a")
    print(f"config: batch {BATCH}, float32, SGD lr {LR} momentum {MOMENTUM}, rounds {args.rounds}, "
          f"steps/round {args.steps_per_round}, warm-up rounds {args.warmup_rounds}")
    if args.ours_blas_threads or args.ours_omp_threads:
        print(f"EXPERIMENT: our steps run with OpenBLAS threads capped at {args.ours_blas_threads or '-'} and "
              f"OpenMP threads capped at {args.ours_omp_threads or '-'} (threadpoolctl); torch untouched")
    print("=" * 96)


# ------------------------------------------------------------------------------------------------
# numerics check
# ------------------------------------------------------------------------------------------------
def check_numerics(kind, mode, batches, torch) -> dict:
    """Fresh ours + torch with copied weights: 2 steps each; losses and updated weights must agree."""
    context.set_context(mode=mode)
    model = build_ours(kind)
    tnet = build_torch(kind, torch)
    copy_weights(model, tnet, torch)
    tstep = TorchStep(tnet, torch)
    res = {"losses": []}
    for s in range(2):
        x, y = batches[s]
        t0 = time.perf_counter()
        lo = model.train_step(x, y)
        t1 = time.perf_counter()
        lt = tstep(torch.from_numpy(x), torch.from_numpy(y))
        if s == 0:
            res["first_step_ms"] = (t1 - t0) * 1e3  # GRAPH_MODE: includes trace + passes + compile
        res["losses"].append((lo, lt, abs(lo - lt)))
    wd, wname = max_weight_diff(model, tnet, torch)
    res["max_weight_diff"], res["max_weight_diff_at"] = wd, wname
    mname = "GRAPH" if mode == context.GRAPH_MODE else "PYNATIVE"
    (l1o, l1t, d1), (l2o, l2t, d2) = res["losses"]
    print(f"numerics {kind:<3} {mname:<8}: step1 loss ours {l1o:.6f} torch {l1t:.6f} |diff| {d1:.2e}; "
          f"step2 |diff| {d2:.2e}; max |w diff| after 2 steps {wd:.2e} ({wname})")
    if not d1 <= TOL:
        raise AssertionError(f"{kind} {mname}: step-1 losses differ by {d1:.3e} > {TOL}")
    if not d2 <= TOL:
        raise AssertionError(f"{kind} {mname}: step-2 losses differ by {d2:.3e} > {TOL} (backward/update)")
    if not wd <= 10 * TOL:
        raise AssertionError(f"{kind} {mname}: weights differ by {wd:.3e} after 2 steps ({wname})")
    return res


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _block(fn, batches, start, k) -> float:
    nb = len(batches)
    t0 = time.perf_counter()
    for i in range(k):
        x, y = batches[(start + i) % nb]
        fn(x, y)
    return (time.perf_counter() - t0) * 1e3 / k


def _cpu_sample():
    """(busy ticks of all CPUs, total ticks, this process's CPU seconds) from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    t = os.times()
    return sum(v[:8]) - idle, sum(v[:8]), t.user + t.system


def _foreign_load(a, b):
    """Share of all CPUs' time (0..1) used by OTHER processes between two samples."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, total, own = b[0] - a[0], b[1] - a[1], (b[2] - a[2]) * hz
    return min(1.0, max(0.0, (busy - own) / total))


def _ours_limits(blas, omp):
    """A context manager capping the thread pools while our steps run (an experiment knob; torch's
    blocks are outside it). No caps given: a no-op."""
    from contextlib import ExitStack

    stack = ExitStack()
    if blas or omp:
        from threadpoolctl import threadpool_limits
        if blas:
            stack.enter_context(threadpool_limits(blas, user_api="blas"))
        if omp:
            stack.enter_context(threadpool_limits(omp, user_api="openmp"))
    return stack


def run_benchmark(kinds, data, torch, rounds, k, warmup_rounds, max_foreign, max_retries, ours_blas=None,
                  ours_omp=None):
    setups = {}
    for kind in kinds:
        ours_g = build_ours(kind)
        ours_p = build_ours(kind)
        # one torch instance per ours contestant, so each pair trains in lock-step (same steps, same
        # batches) and the final losses are comparable; their timings are pooled as "torch eager"
        tsteps = []
        for _ in range(2):
            tnet = build_torch(kind, torch)
            copy_weights(ours_g, tnet, torch)
            tsteps.append(TorchStep(tnet, torch))
        tb = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data[kind]]

        def graph_fn(x, y, m=ours_g):
            return m.train_step(x, y)

        def py_fn(x, y, m=ours_p):
            return m.train_step(x, y)

        # (label, mode or None for torch, fn, batches)
        setups[kind] = [("ours GRAPH", context.GRAPH_MODE, graph_fn, data[kind]),
                        ("torch eager", None, tsteps[0], tb),
                        ("ours PYNATIVE", context.PYNATIVE_MODE, py_fn, data[kind]),
                        ("torch eager", None, tsteps[1], tb)]
    samples = {kind: defaultdict(list) for kind in kinds}
    paired = {kind: defaultdict(list) for kind in kinds}
    last = {}
    load = {"kept": [], "discarded": []}
    t_start = time.perf_counter()
    r, retries = -warmup_rounds, 0
    while r < rounds:
        c0 = _cpu_sample()
        times = {}
        for kind in kinds:
            times[kind] = []
            for label, mode, fn, batches in setups[kind]:
                if mode is None:
                    times[kind].append(_block(fn, batches, max(r, 0) * k, k))
                    continue
                context.set_context(mode=mode)
                with _ours_limits(ours_blas, ours_omp):
                    times[kind].append(_block(fn, batches, max(r, 0) * k, k))
        fl = _foreign_load(c0, _cpu_sample())
        if r < 0:
            r += 1
            continue
        if fl is not None and max_foreign < 1.0 and fl > max_foreign and retries < max_retries:
            retries += 1  # another process took a real share of the CPUs during this round: redo it
            load["discarded"].append(fl)
            time.sleep(0.2)
            continue
        load["kept"].append(fl)
        retries = 0
        for kind in kinds:
            g, t1, p, t2 = times[kind]
            samples[kind]["ours GRAPH"].append(g)
            samples[kind]["ours PYNATIVE"].append(p)
            samples[kind]["torch eager"] += [t1, t2]
            paired[kind]["ours GRAPH"].append(g / t1)
            paired[kind]["ours PYNATIVE"].append(p / t2)
        r += 1
        if r % max(1, rounds // 5) == 0:
            el = time.perf_counter() - t_start
            print(f"  round {r}/{rounds} ({el:.0f}s, {len(load['discarded'])} rounds redone so far)", flush=True)
    # final losses, to show nothing diverged during the timed steps
    for kind in kinds:
        for label, mode, fn, batches in setups[kind][:3]:
            if mode is not None:
                context.set_context(mode=mode)
            bx, by = batches[0]
            last[(kind, label)] = float(fn(bx, by))
    return samples, paired, last, load


def summarize(samples, paired, last, kinds, idx=None):
    """Table rows; ``idx``: only these rounds (e.g. the ones where the machine was quiet)."""
    def pick(label, xs):
        if idx is None:
            return xs
        if label == "torch eager":  # two torch blocks per round
            return [xs[2 * i + j] for i in idx for j in (0, 1)]
        return [xs[i] for i in idx]

    rows = []
    for kind in kinds:
        tmed = statistics.median(pick("torch eager", samples[kind]["torch eager"]))
        for label in ("ours GRAPH", "ours PYNATIVE", "torch eager"):
            xs = pick(label, samples[kind][label])
            q = np.percentile(xs, [25, 75])
            row = {"model": kind, "impl": label, "median_ms": statistics.median(xs), "p25_ms": float(q[0]),
                   "p75_ms": float(q[1]), "min_ms": min(xs), "n": len(xs), "final_loss": last.get((kind, label))}
            if label != "torch eager":
                row["ratio"] = row["median_ms"] / tmed
                row["paired_ratio"] = statistics.median(pick(label, paired[kind][label]))
            rows.append(row)
    return rows


def print_table(rows):
    print()
    hdr = (f"{'model':<5} {'impl':<14} {'ms/step':>9} {'p25':>8} {'p75':>8} {'min':>8} "
           f"{'ours/torch':>10} {'paired':>7}  {'target<=1':<9} {'final loss':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = f"{r['ratio']:10.2f}" if "ratio" in r else f"{'':>10}"
        pr = f"{r['paired_ratio']:7.2f}" if "paired_ratio" in r else f"{'':>7}"
        ok = ("ok" if r["ratio"] <= 1.0 else "MISS") if "ratio" in r else ""
        fl = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else ""
        print(f"{r['model']:<5} {r['impl']:<14} {r['median_ms']:9.3f} {r['p25_ms']:8.3f} {r['p75_ms']:8.3f} "
              f"{r['min_ms']:8.3f} {ratio} {pr}  {ok:<9} {fl:>10}")
    print()


# ------------------------------------------------------------------------------------------------
# profiling of our step (GRAPH_MODE by default)
# ------------------------------------------------------------------------------------------------
class _GradScopes:
    """Profiling aid (benchmark-side only, nothing in runtime/ is edited): while a graph is traced,
    backward nodes are emitted outside any Cell scope, so the op hook cannot tell whose backward
    they are. This temporarily wraps each primitive's backward rule, as ``runtime.autodiff`` looks
    it up, so the nodes it emits carry the scope ``grad/<forward node's scope>``. Optimizer nodes
    keep the empty scope."""

    def __enter__(self):
        import dataclasses

        from runtime import autodiff, core

        self._mod, self._orig = autodiff, getattr(autodiff, "get_primitive", None)
        orig = self._orig
        if orig is None:  # autodiff changed shape: no attribution, nothing patched
            return self

        def get_primitive(name):
            prim = orig(name)
            if prim.grad is None:
                return prim
            rule = prim.grad

            def grad(g, out, *inputs, **attrs):
                fwd = out.node.scope if out.node is not None else ""
                with core.cell_scope("grad/" + (fwd or "?"), None):
                    return rule(g, out, *inputs, **attrs)

            try:
                return dataclasses.replace(prim, grad=grad)
            except TypeError:  # Primitive is no longer a dataclass: trace without attribution
                return prim

        autodiff.get_primitive = get_primitive
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            self._mod.get_primitive = self._orig
        return False


def _phase(scope: str) -> str:
    """Group a node scope: 'OursCNN/bn1' -> 'fwd bn1', 'grad/OursCNN/bn1' -> 'bwd bn1', '' -> 'optimizer'."""
    if not scope:
        return "optimizer / other"
    kind = "bwd" if scope.startswith("grad/") else "fwd"
    parts = scope.split("/")[1:] if kind == "bwd" else scope.split("/")
    parts = [q for q in parts if q not in ("OursMLP", "OursCNN", "layers")]
    return f"{kind} {parts[0] if parts else '?'}"


def profile_ours(kind, data, mode, steps, top):
    """cProfile of Model.train_step, then a per-kernel breakdown from the runtime's op hook.

    Per node, the median (and min) kernel time over the profiled steps is used, so a step that
    was preempted by another process does not dominate; sums are per step."""
    mname = "GRAPH" if mode == context.GRAPH_MODE else "PYNATIVE"
    context.set_context(mode=mode)
    model = build_ours(kind)
    batches = data[kind]
    with _GradScopes():  # GRAPH_MODE traces (and attributes) the step once, here
        model.train_step(*batches[0])
    for i in range(1, 6):
        model.train_step(*batches[i % len(batches)])
    print(f"\n##### profile: {kind} {mname}, {steps} steps")
    ts = []
    for i in range(steps):
        t0 = time.perf_counter()
        model.train_step(*batches[i % len(batches)])
        ts.append((time.perf_counter() - t0) * 1e3)
    wall, wall_min = statistics.median(ts), min(ts)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(steps):
        model.train_step(*batches[i % len(batches)])
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.strip_dirs().sort_stats("tottime").print_stats(top)
    print(f"un-profiled wall: median {wall:.3f} ms/step, min {wall_min:.3f} ms/step")
    print("cProfile, sorted by tottime:")
    print("\n".join(s.getvalue().splitlines()[4:]))

    # kernel time per node from the runtime's own events (docs/events.md): GRAPH_MODE sends a
    # `task_table` (static columns) and one `step_tasks` (task ids + start/end arrays) per step;
    # single `task` events for work outside the graph; PYNATIVE sends one `op` event per eager op.
    per_node = defaultdict(list)
    meta = {}
    tables = {}
    pyn = mode != context.GRAPH_MODE
    skip_kinds = ("event_record", "event_wait")

    def listen(kindname, ev):
        if kindname == "task_table":
            c = ev["columns"]
            tables[ev.get("graph_id", ev.get("graph"))] = {
                tid: (c["op"][i], c["scope"][i], c["shape"][i], c["kind"][i]) for i, tid in enumerate(c["task_id"])}
        elif kindname == "step_tasks":
            tab = tables.get(ev.get("graph_id", ev.get("graph")), {})
            for tid, t0, t1 in zip(ev["task_id"].tolist(), ev["start_ns"].tolist(), ev["end_ns"].tolist()):
                op, scope, shape, kind = tab.get(tid, ("?", "", "", "kernel"))
                if kind in skip_kinds:
                    continue
                per_node[("t", tid)].append(t1 - t0)
                meta.setdefault(("t", tid), (op, scope, shape))
        elif kindname in ("task", "op"):
            if ev.get("kind") in skip_kinds:
                return
            key = (ev["op"], ev.get("scope", "")) if pyn else ("n", ev.get("name", ev["op"]))
            per_node[key].append(ev["end_ns"] - ev["start_ns"])
            meta.setdefault(key, (ev["op"], ev.get("scope", ""), ev.get("shape", "")))

    hooks.subscribe(listen)
    try:
        t0 = time.perf_counter()
        for i in range(steps):
            model.train_step(*batches[i % len(batches)])
        traced_wall = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        hooks.unsubscribe(listen)
    if not per_node:
        print("op hook: no per-op events received (event format changed?); skipping the kernel breakdown")
        return {"wall_median_ms": wall, "wall_min_ms": wall_min, "traced_wall_ms": traced_wall}
    per_op = defaultdict(lambda: [0.0, 0.0, 0])
    per_phase = defaultdict(lambda: [0.0, 0.0, 0])
    rows = []
    for key, dts in per_node.items():
        op, scope, shape = meta[key]
        calls = len(dts) / steps  # PYNATIVE: several nodes can share a key
        med = statistics.median(dts) * calls / 1e6
        mn = min(dts) * calls / 1e6
        a = per_op[op]
        a[0] += med
        a[1] += mn
        a[2] += calls
        b = per_phase[_phase(scope)]
        b[0] += med
        b[1] += mn
        b[2] += calls
        rows.append((med, op, shape, scope))
    tot_med = sum(v[0] for v in per_op.values())
    tot_min = sum(v[1] for v in per_op.values())
    nops = sum(v[2] for v in per_op.values())
    if pyn:
        print("note: PYNATIVE covers the ops that emit `op` events (eager forward + the replayed optimizer "
              "update); the replayed backward (autodiff.grad_eager) emits none")
    print(f"op hook ({nops:.0f} kernels/step): sum of per-node median kernel times {tot_med:.3f} ms/step "
          f"(sum of mins {tot_min:.3f}); traced wall {traced_wall:.3f} ms/step; "
          f"untraced wall median {wall:.3f} / min {wall_min:.3f}")
    print(f"  {'op':<28} {'ms/step':>8} {'min':>7} {'calls/step':>10} {'us/call':>8}")
    for op, (med, mn, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {op:<28} {med:8.3f} {mn:7.3f} {n:10.1f} {med * 1e3 / n:8.1f}")
    print(f"  by phase (fwd/bwd of a layer; optimizer = the update ops): ms/step (median, min)")
    for ph, (med, mn, n) in sorted(per_phase.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ph:<34} {med:8.3f} {mn:7.3f} {n:6.0f} kernels")
    print("  top nodes:")
    for med, op, shape, scope in sorted(rows, key=lambda r: -r[0])[:15]:
        shp = "x".join(map(str, shape)) if isinstance(shape, (tuple, list)) else str(shape)
        print(f"  {med:8.3f} ms  {op:<26} {shp:<14} {scope}")
    return {"wall_median_ms": wall, "wall_min_ms": wall_min, "traced_wall_ms": traced_wall,
            "kernel_ms_sum_of_medians": tot_med, "kernel_ms_sum_of_mins": tot_min, "kernels_per_step": nops,
            "per_op_ms": {op: v[0] for op, v in per_op.items()},
            "per_phase_ms": {ph: v[0] for ph, v in per_phase.items()},
            "per_phase_min_ms": {ph: v[1] for ph, v in per_phase.items()}}


# ------------------------------------------------------------------------------------------------
# issue 16's goals, ours / torch eager (the paired ratio: robust when the machine's load drifts)
GOALS = {("mlp", "ours GRAPH"): "<= 1.0", ("mlp", "ours PYNATIVE"): "<= 1.0",
         ("cnn", "ours GRAPH"): "<= 1.0", ("cnn", "ours PYNATIVE"): "<= 1.5"}


def summary_rows(result) -> list[dict]:
    """The rows for benchmarks/run_all.py: per model and mode, median ms/step of ours and of torch, judged on
    the paired ratio; then the largest loss difference against torch over the numerics checks."""
    out = []
    for r in result.get("rows", []):
        if r["impl"] == "torch eager":
            continue
        torch_ms = next(t["median_ms"] for t in result["rows"]
                        if t["model"] == r["model"] and t["impl"] == "torch eager")
        out.append(summary_row(f"{r['model']} {r['impl'].split()[1]} step / torch eager (paired ratio)",
                               r["median_ms"], torch_ms, ratio=r["paired_ratio"], unit="ms/step",
                               goal=GOALS.get((r["model"], r["impl"]), "")))
    diffs = [d for res in result["numerics"].values() for (_, _, d) in res["losses"]]
    if diffs:
        out.append(summary_row("max |loss ours - loss torch| over 2 steps, every model and mode", max(diffs),
                               goal=f"<= {TOL}"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (median over rounds); default 30")
    ap.add_argument("--steps-per-round", type=int, default=20, help="steps per contestant per round; default 20")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first; default 1")
    ap.add_argument("--models", default="mlp,cnn", help="comma list of mlp,cnn; default both")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--summary", metavar="PATH", help="also write the summary rows for benchmarks/run_all.py")
    ap.add_argument("--max-foreign-load", type=float, default=0.25, metavar="F",
                    help="redo a round when other processes used more than this share (0..1) of all CPUs "
                         "during it (Linux /proc/stat); 1 disables; default 0.25")
    ap.add_argument("--max-retries", type=int, default=2, help="redos per round before accepting it; default 2")
    ap.add_argument("--ours-blas-threads", type=int, metavar="N",
                    help="experiment: cap OpenBLAS threads (threadpoolctl) while OUR steps run; default: untouched")
    ap.add_argument("--ours-omp-threads", type=int, metavar="N",
                    help="experiment: cap OpenMP threads (threadpoolctl) while OUR steps run; default: untouched")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, cProfile + per-op breakdown of our train_step (GRAPH_MODE)")
    ap.add_argument("--profile-mode", choices=("graph", "pynative", "both"), default="graph")
    ap.add_argument("--profile-steps", type=int, default=100)
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--no-bench", action="store_true", help="skip the timed comparison (with --profile)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps_per_round < 1:
        ap.error("--rounds and --steps-per-round must be >= 1")
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in kinds:
        if k not in OURS_NETS:
            ap.error(f"unknown model {k!r}; use mlp and/or cnn")

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    info = environment(torch)
    print_header(info, args)
    data = load_batches()
    result = {"env": info, "config": {"batch": BATCH, "lr": LR, "momentum": MOMENTUM, "rounds": args.rounds,
                                      "steps_per_round": args.steps_per_round,
                                      "warmup_rounds": args.warmup_rounds, "models": kinds,
                                      "ours_blas_threads": args.ours_blas_threads,
                                      "ours_omp_threads": args.ours_omp_threads}}

    numerics = {}
    for kind in kinds:
        for mode, mname in ((context.GRAPH_MODE, "GRAPH"), (context.PYNATIVE_MODE, "PYNATIVE")):
            numerics[f"{kind}/{mname}"] = check_numerics(kind, mode, data[kind], torch)
    result["numerics"] = numerics
    for kind in kinds:
        print(f"first GRAPH_MODE step of {kind} (trace + passes + compile + run): "
              f"{numerics[kind + '/GRAPH']['first_step_ms']:.1f} ms")

    if not args.no_bench:
        print(f"\ntiming {args.rounds} rounds x {args.steps_per_round} steps, interleaved "
              f"(ours GRAPH, torch, ours PYNATIVE, torch) ...", flush=True)
        samples, paired, last, load = run_benchmark(kinds, data, torch, args.rounds, args.steps_per_round,
                                                    args.warmup_rounds, args.max_foreign_load, args.max_retries,
                                                    args.ours_blas_threads, args.ours_omp_threads)
        rows = summarize(samples, paired, last, kinds)
        la = os.getloadavg() if hasattr(os, "getloadavg") else None
        info["loadavg_end"] = la
        print_table(rows)
        if la:
            print(f"load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
                  + ("   (> cpu count: the machine was shared, expect noisy numbers)"
                     if max(info["loadavg_start"][0], la[0]) > (os.cpu_count() or 1) else ""))
        kept = [x for x in load["kept"] if x is not None]
        if kept:
            print(f"CPU used by other processes during the kept rounds: median {statistics.median(kept):.0%}, "
                  f"max {max(kept):.0%} of the machine; {len(load['discarded'])} rounds were redone "
                  f"(threshold {args.max_foreign_load:.0%}, at most {args.max_retries} retries per round)")
        result["rows"] = rows
        result["foreign_load"] = load
        quiet = [i for i, x in enumerate(load["kept"]) if x is not None and x <= args.max_foreign_load]
        if kept and 0 < len(quiet) < len(kept):
            qrows = summarize(samples, paired, {}, kinds, quiet)
            print(f"\nthe same, over the {len(quiet)} of {len(kept)} rounds in which other processes used <= "
                  f"{args.max_foreign_load:.0%} of the CPUs (closer to an idle machine; few rounds = rough):")
            print_table(qrows)
            result["rows_quiet_rounds"] = qrows
        result["samples_ms"] = {k: dict(v) for k, v in samples.items()}

    if args.profile:
        modes = {"graph": [context.GRAPH_MODE], "pynative": [context.PYNATIVE_MODE],
                 "both": [context.GRAPH_MODE, context.PYNATIVE_MODE]}[args.profile_mode]
        result["profile"] = {}
        for kind in kinds:
            for mode in modes:
                p = profile_ours(kind, data, mode, args.profile_steps, args.profile_top)
                result["profile"][f"{kind}/{'GRAPH' if mode == context.GRAPH_MODE else 'PYNATIVE'}"] = p

    write_summary(args.summary, "bench_vs_torch", summary_rows(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
