#!/usr/bin/env python
"""GCN and GAT training epochs on Cora: ours (GRAPH_MODE, Cython sparse kernels) against PyTorch Geometric on
the CPU, plus the dense-GEMM bar, in one interleaved run.

    cd /work/main && python benchmarks/bench_gnn.py [--dataset cora] [--threads 2] [--rounds 7] [--epochs 20]
                                                    [--quick] [--data-dir ../shared/data/planetoid]
                                                    [--summary PATH]

Contestants (the same data -- our loader's arrays --, the same model, the same threads):
  * ours  -- ``Model.train_step`` of ``runtime.models.gnn``, compiled with graph-kernel fusion as ``gnn.train`` does
             (``--no-fuse``: without) (GCN: 2 GCNConv, 16 hidden, dropout 0.5, Adam 0.01, L2 5e-4
             on layer 1; GAT: 8x8 heads + 1 output head, dropout 0.6 on inputs, values and attention, Adam 0.005);
             features are the stored values of the sparse feature matrix. Differences that follow the papers'
             reference code: our GCN has no bias (tkipf/gcn), PyG's example has; our GAT also drops the projected
             features before aggregation (PetarV-/GAT), PyG's does not -- both are a few cheap elementwise ops;
  * PyG   -- ``torch_geometric.nn.GCNConv`` / ``GATConv`` with the hyperparameters of PyG's examples/gcn.py and
             gat.py on the dense row-normalised features (``zero_grad; loss.backward(); step``).
An epoch is one full-batch training step (forward, masked loss, backward, Adam). Each round times ``--epochs``
epochs of each contestant back to back (ours, PyG, ours, PyG per model); the tables give the median ms/epoch
over rounds and the ratio ours / PyG (goals: GCN <= 0.5x, GAT <= 1.0x).

The GEMM bar: the dense part of a training epoch if the features were used densely -- X (N x F) @ W (F x H)
forward and X^T @ G for the weight gradient -- timed with numpy (BLAS, the runtime's matmul) and torch in the
same rounds; the bar is the faster of the two. Goals: GCN epoch <= 3x the bar, GAT epoch <= 5x (H = 16 / 64).

Also: wall time of 200 epochs, each followed by the validation forward pass (what training with early stopping
does), for both. Machine load (1-minute average) is printed before and after: on a shared 2-core machine any
other busy process distorts the numbers, so the ``min`` column is printed too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cora", choices=["cora", "citeseer"])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--epochs", type=int, default=20, help="epochs per contestant per round")
    p.add_argument("--wall-epochs", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 epochs, 50-epoch wall time")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="ours without graph-kernel fusion")
    p.add_argument("--summary", metavar="PATH", help="also write the summary rows for benchmarks/run_all.py")
    return p.parse_args()


ARGS = _args()
if ARGS.quick:
    ARGS.rounds, ARGS.epochs, ARGS.wall_epochs = 3, 5, 50
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy, torch and the runtime start their pools

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from torch_geometric.nn import GATConv as PygGAT  # noqa: E402
from torch_geometric.nn import GCNConv as PygGCN  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._summary import row, write  # noqa: E402
from runtime import context  # noqa: E402
from runtime.models import gnn  # noqa: E402
from runtime.dataset.planetoid import load_planetoid  # noqa: E402

torch.set_num_threads(ARGS.threads)
clock = time.perf_counter


def load1() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------
# PyG models (examples/gcn.py and examples/gat.py)
# ----------------------------------------------------------------------------------------------
class PygGCNNet(torch.nn.Module):
    def __init__(self, f, c):
        super().__init__()
        self.conv1 = PygGCN(f, 16, cached=True)
        self.conv2 = PygGCN(16, c, cached=True)

    def forward(self, x, ei):
        x = TF.dropout(x, p=0.5, training=self.training)
        x = TF.relu(self.conv1(x, ei))
        x = TF.dropout(x, p=0.5, training=self.training)
        return self.conv2(x, ei)


class PygGATNet(torch.nn.Module):
    def __init__(self, f, c):
        super().__init__()
        self.conv1 = PygGAT(f, 8, heads=8, dropout=0.6)
        self.conv2 = PygGAT(64, c, heads=1, concat=False, dropout=0.6)

    def forward(self, x, ei):
        x = TF.dropout(x, p=0.6, training=self.training)
        x = TF.elu(self.conv1(x, ei))
        x = TF.dropout(x, p=0.6, training=self.training)
        return self.conv2(x, ei)


def pyg_contestant(name, data):
    torch.manual_seed(0)
    x = torch.from_numpy(data.features.toarray())
    rows = np.repeat(np.arange(data.num_nodes), np.diff(data.adjacency.indptr))
    ei = torch.from_numpy(np.stack([data.adjacency.indices.astype(np.int64), rows]))  # source -> target
    y = torch.from_numpy(np.maximum(data.labels, 0).astype(np.int64))
    train = torch.from_numpy(data.train_mask)
    val = torch.from_numpy(data.val_mask)
    if name == "gcn":
        net = PygGCNNet(data.num_features, data.num_classes)
        opt = torch.optim.Adam([dict(params=net.conv1.parameters(), weight_decay=5e-4),
                                dict(params=net.conv2.parameters(), weight_decay=0)], lr=0.01)
    else:
        net = PygGATNet(data.num_features, data.num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=0.005, weight_decay=5e-4)

    def epoch():
        net.train()
        opt.zero_grad()
        loss = TF.cross_entropy(net(x, ei)[train], y[train])
        loss.backward()
        opt.step()
        return loss.item()

    def validate():
        net.eval()
        with torch.no_grad():
            return float(TF.cross_entropy(net(x, ei)[val], y[val]))

    return epoch, validate


def ours_contestant(name, data):
    model, net, _ = gnn.build(name, data, seed=0)
    x = np.ascontiguousarray(data.features.data, np.float32)
    y = data.masked_labels(data.train_mask)
    with gnn.graph_kernel(ARGS.fuse):  # compile the step graphs (fused, as gnn.train does by default)
        model.train_step(x, y)
        model.predict(x)

    def epoch():
        return model.train_step(x, y)

    def validate():
        return model.predict(x)

    return epoch, validate


def gemm_contestants(data, hidden):
    rng = np.random.default_rng(0)
    xd = data.features.toarray()
    w = rng.standard_normal((data.num_features, hidden)).astype(np.float32)
    g = rng.standard_normal((data.num_nodes, hidden)).astype(np.float32)
    tx, tw, tg = torch.from_numpy(xd), torch.from_numpy(w), torch.from_numpy(g)

    def numpy_gemm():
        return (xd @ w, xd.T @ g)

    def torch_gemm():
        with torch.no_grad():
            return (tx @ tw, tx.T @ tg)

    return numpy_gemm, torch_gemm


def time_block(fn, n) -> float:
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n * 1e3


def wall(epoch, validate, n) -> float:
    t0 = clock()
    for _ in range(n):
        epoch()
        validate()
    return clock() - t0


def main():
    context.set_context(mode=context.GRAPH_MODE)
    data = load_planetoid(ARGS.dataset, ARGS.data_dir)
    print(f"bench_gnn: {ARGS.dataset}, {ARGS.threads} threads (OMP/BLAS/torch), {ARGS.rounds} rounds x "
          f"{ARGS.epochs} epochs, ours {'with' if ARGS.fuse else 'without'} graph-kernel fusion, "
          f"torch {torch.__version__}; load (1 min) before: {load1():.2f}")
    contestants = {}
    for name, hidden in (("gcn", 16), ("gat", 64)):
        contestants[(name, "ours")] = ours_contestant(name, data)
        contestants[(name, "pyg")] = pyg_contestant(name, data)
        np_g, t_g = gemm_contestants(data, hidden)
        contestants[(name, "gemm_numpy")] = (np_g, None)
        contestants[(name, "gemm_torch")] = (t_g, None)
    for fn, _ in contestants.values():  # warm-up (tracing, compilation, caches)
        for _ in range(3):
            fn()
    times = {k: [] for k in contestants}
    for _ in range(ARGS.rounds):
        for name in ("gcn", "gat"):
            for who in ("ours", "pyg", "gemm_numpy", "gemm_torch", "ours", "pyg"):
                times[(name, who)].append(time_block(contestants[(name, who)][0], ARGS.epochs))
    walls = {}
    for name in ("gcn", "gat"):
        for who in ("ours", "pyg"):
            walls[(name, who)] = wall(*contestants[(name, who)], ARGS.wall_epochs)

    med = {k: statistics.median(v) for k, v in times.items()}
    mn = {k: min(v) for k, v in times.items()}
    print(f"\n{'model':5} {'contestant':12} {'median ms':>10} {'min ms':>8}")
    for (name, who), v in med.items():
        print(f"{name:5} {who:12} {v:10.2f} {mn[(name, who)]:8.2f}")
    print()
    goals = {"gcn": (0.5, 3.0), "gat": (1.0, 5.0)}
    rows = []
    for name in ("gcn", "gat"):
        bar = min(med[(name, "gemm_numpy")], med[(name, "gemm_torch")])
        r_pyg = med[(name, "ours")] / med[(name, "pyg")]
        r_gemm = med[(name, "ours")] / bar
        g1, g2 = goals[name]
        print(f"{name.upper()}: ours {med[(name, 'ours')]:.2f} ms/epoch, PyG {med[(name, 'pyg')]:.2f} -> "
              f"{r_pyg:.2f}x PyG (goal <= {g1}x: {'met' if r_pyg <= g1 else 'NOT met'}); dense GEMM bar "
              f"{bar:.2f} ms -> {r_gemm:.2f}x the bar (goal <= {g2}x: {'met' if r_gemm <= g2 else 'NOT met'})")
        print(f"     {ARGS.wall_epochs} epochs + validation, wall: ours {walls[(name, 'ours')]:.2f} s, "
              f"PyG {walls[(name, 'pyg')]:.2f} s")
        rows += [row(f"{name.upper()} epoch ({ARGS.dataset}) / PyG", med[(name, "ours")], med[(name, "pyg")],
                     unit="ms/epoch", goal=f"<= {g1}"),
                 row(f"{name.upper()} epoch / dense GEMM bar", med[(name, "ours")], bar, unit="ms/epoch",
                     goal=f"<= {g2}"),
                 row(f"{name.upper()} {ARGS.wall_epochs} epochs + validation, wall / PyG", walls[(name, "ours")],
                     walls[(name, "pyg")], unit="s")]
    write(ARGS.summary, "bench_gnn", rows)
    print(f"\nload (1 min) after: {load1():.2f}")


if __name__ == "__main__":
    main()
