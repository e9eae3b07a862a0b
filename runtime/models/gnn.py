"""GCN and GAT node classification on the Planetoid graphs, with the papers' hyperparameters.

* GCN (Kipf & Welling 2017): 2 GCNConv layers without bias, 16 hidden, ReLU, dropout 0.5, Adam lr 0.01, L2 5e-4 on
  the first layer's weights only, 200 epochs, stop once the validation loss exceeds the mean of the
  previous 10 epochs.
* GAT (Velickovic et al. 2018): 8 heads x 8 hidden (concatenated), ELU, one output head (averaged),
  LeakyReLU 0.2, dropout 0.6 on the inputs of both layers and on the attention, Adam lr 0.005, L2 5e-4,
  patience 100 on validation loss and accuracy; the test accuracy is that of the best model.

Training is full-batch through ``Model`` (GRAPH_MODE: one step graph per epoch, run by the executor).
The fed ``data`` are the stored values of the sparse feature matrix (nnz,) -- its structure and the
graph are constants of the network -- and ``label`` the class ids with -1 on nodes outside the mask,
which ``MaskedSoftmaxCrossEntropy`` ignores.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from runtime import context, nn
from runtime import random as _random
from runtime.core import Tensor
from runtime.nn.gnn import FeatureDropout, GATConv, GCNConv, GraphStructure, SparseFeatures
from runtime.ops import api as F
from runtime.ops.sparse import CSRStructure
from runtime.train import amp
from runtime.train.callback import Callback
from runtime.train.model import Model


class MaskedSoftmaxCrossEntropy(nn.Cell):
    """Mean cross entropy over the nodes whose label is >= 0 (labels of other nodes are -1)."""

    def construct(self, logits, labels):
        self.check(logits.ndim == 2 and tuple(labels.shape) == (logits.shape[0],),
                   f"expects logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
        mask = F.cast(F.greater_equal(labels, 0), logits.dtype)
        per_node = F.softmax_cross_entropy(logits, F.maximum(labels, 0), sparse=True)
        count = F.maximum(F.reduce_sum(mask), 1.0)
        return F.div(F.reduce_sum(F.mul(per_node, mask)), count)


class _PlanetoidNet(nn.Cell):
    def __init__(self, graph: GraphStructure, features: CSRStructure):
        super().__init__()
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "features", features)

    def _x(self, values):
        return SparseFeatures(self.features, values)


class GCN(_PlanetoidNet):
    def __init__(self, graph, features, num_classes, hidden=16, dropout=0.5, seed=None):
        super().__init__(graph, features)
        self.drop_in = FeatureDropout(1.0 - dropout, seed)
        # no bias, as in the authors' implementation (tkipf/gcn: GraphConvolution(bias=False))
        self.conv1 = GCNConv(features.shape[1], hidden, has_bias=False)
        self.drop_hidden = FeatureDropout(1.0 - dropout, seed)
        self.conv2 = GCNConv(hidden, num_classes, has_bias=False)

    def hidden(self, values):
        return F.relu(self.conv1(self.drop_in(self._x(values)), self.graph))

    def construct(self, values):
        return self.conv2(self.drop_hidden(self.hidden(values)), self.graph)


class GAT(_PlanetoidNet):
    def __init__(self, graph, features, num_classes, hidden=8, heads=8, out_heads=1, dropout=0.6, seed=None):
        super().__init__(graph, features)
        self.drop_in = FeatureDropout(1.0 - dropout, seed)
        self.conv1 = GATConv(features.shape[1], hidden, heads=heads, concat=True, attn_dropout=dropout, seed=seed,
                             value_dropout=dropout)
        self.drop_hidden = FeatureDropout(1.0 - dropout, seed)
        self.conv2 = GATConv(hidden * heads, num_classes, heads=out_heads, concat=False, attn_dropout=dropout,
                             seed=seed, value_dropout=dropout)

    def hidden(self, values):
        return F.elu(self.conv1(self.drop_in(self._x(values)), self.graph))

    def construct(self, values):
        return self.conv2(self.drop_hidden(self.hidden(values)), self.graph)


@dataclass
class Config:
    model: str
    lr: float
    weight_decay: float
    epochs: int
    patience: int
    hidden: int
    dropout: float
    heads: int = 1


CONFIGS = {
    "gcn": Config("gcn", lr=0.01, weight_decay=5e-4, epochs=200, patience=10, hidden=16, dropout=0.5),
    "gat": Config("gat", lr=0.005, weight_decay=5e-4, epochs=100000, patience=100, hidden=8, dropout=0.6, heads=8),
}


def _masked_eval(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    lg = logits[mask].astype(np.float64)
    y = labels[mask]
    lg = lg - lg.max(1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    acc = float((lg.argmax(1) == y).mean())
    return loss, acc


class EarlyStopping(Callback):
    """Evaluates the validation split after every epoch and stops as the paper does:
    ``rule="gcn"``: validation loss above the mean of the previous ``patience`` epochs;
    ``rule="gat"``: no improvement of validation loss or accuracy for ``patience`` epochs, keeping the
    parameters of the last epoch that improved both (restored at the end)."""

    def __init__(self, model: Model, data: np.ndarray, labels: np.ndarray, val_mask: np.ndarray,
                 rule: str, patience: int):
        self.model, self.data, self.labels, self.val_mask = model, data, labels, val_mask
        self.rule, self.patience = rule, int(patience)
        self.val_losses: list[float] = []
        self.val_accs: list[float] = []
        self.best = None
        self.best_epoch = 0
        self._acc_max, self._loss_min, self._bad = 0.0, np.inf, 0
        self.stopped_epoch = 0

    def epoch_end(self, run_context):
        params = run_context.original_args()
        epoch = params["cur_epoch_num"]
        logits = self.model.predict(self.data)
        loss, acc = _masked_eval(logits, self.labels, self.val_mask)
        self.val_losses.append(loss)
        self.val_accs.append(acc)
        if self.rule == "gcn":
            k = self.patience
            if len(self.val_losses) > k and loss > np.mean(self.val_losses[-(k + 1):-1]):
                self.stopped_epoch = epoch
                run_context.request_stop()
            return
        if acc >= self._acc_max or loss <= self._loss_min:
            if acc >= self._acc_max and loss <= self._loss_min:
                self.best = [p.data.copy() for p in self.model.network.get_parameters()]
                self.best_epoch = epoch
            self._acc_max, self._loss_min = max(acc, self._acc_max), min(loss, self._loss_min)
            self._bad = 0
        else:
            self._bad += 1
            if self._bad >= self.patience:
                self.stopped_epoch = epoch
                run_context.request_stop()

    def restore_best(self):
        if self.best is not None:
            for p, saved in zip(self.model.network.get_parameters(), self.best):
                np.copyto(p.data, saved)


@dataclass
class Result:
    model: str
    dataset: str
    seed: int
    mixed_precision: bool
    test_acc: float
    val_acc: float
    epochs: int
    train_seconds: float
    epoch_ms: float
    hidden: np.ndarray | None = field(default=None, repr=False)
    overflow_skips: int = 0


def build(model_name: str, data, seed: int = 0, mixed_precision: bool = False, loss_scale_manager=None):
    """(Model, the bare network, its Config) for ``model_name`` ("gcn" or "gat") on a Planetoid dataset, seeded;
    with ``mixed_precision`` the Model trains the O2 network with loss scaling (dynamic by default)."""
    if model_name not in CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(CONFIGS)}")
    cfg = CONFIGS[model_name]
    _random.set_seed(seed)
    graph = GraphStructure.from_csr(data.adjacency)
    feats = CSRStructure.from_csr(data.features)
    if model_name == "gcn":
        net = GCN(graph, feats, data.num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
        decay = [p is net.conv1.weight for p in net.trainable_params()]
    else:
        net = GAT(graph, feats, data.num_classes, hidden=cfg.hidden, heads=cfg.heads, dropout=cfg.dropout)
        decay = ["bias" not in p.name for p in net.trainable_params()]
    opt = nn.Adam(net.trainable_params(), learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    opt.decay_flags = decay
    loss = MaskedSoftmaxCrossEntropy()
    train_net = net
    if mixed_precision:
        train_net, loss, opt = amp.build_train_network(net, loss, opt, "O2", loss_scale_manager)
    return Model(train_net, loss, opt, progress=False), net, cfg


@contextmanager
def graph_kernel(enabled: bool):
    """Graph-kernel fusion on (or off) while the step graphs are compiled: the per-node and per-edge
    elementwise chains (dropout, LeakyReLU, ELU, Adam) become generated C kernels; the sparse
    kernels stay opaque. A compiled Model keeps its graphs after the block."""
    prev = context.get_context("enable_graph_kernel")
    context.set_context(enable_graph_kernel=bool(enabled))
    try:
        yield
    finally:
        context.set_context(enable_graph_kernel=prev)


def train(model_name: str, data, seed: int = 0, mixed_precision: bool = False, epochs: int | None = None,
          keep_hidden: bool = False, callbacks=None, loss_scale_manager=None, fuse: bool | None = None) -> Result:
    """Train one model on one dataset with one seed; returns test accuracy and timings. ``fuse``: compile
    with graph-kernel fusion (the numbers match unfused training to float rounding); by default on in
    float32 and off in mixed precision, whose float16 chains it does not make faster on this CPU."""
    if fuse is None:
        fuse = not mixed_precision
    model, net, cfg = build(model_name, data, seed, mixed_precision, loss_scale_manager)
    x = np.ascontiguousarray(data.features.data, np.float32)
    y_train = data.masked_labels(data.train_mask)
    stopper = EarlyStopping(model, x, data.labels, data.val_mask, model_name, cfg.patience)
    with graph_kernel(fuse):
        t0 = time.perf_counter()
        params = model.train(epochs or cfg.epochs, [(x, y_train)], callbacks=[stopper] + list(callbacks or []))
        seconds = time.perf_counter() - t0
        if model_name == "gat":
            stopper.restore_best()
        logits = model.predict(x)
    _, test_acc = _masked_eval(logits, data.labels, data.test_mask)
    _, val_acc = _masked_eval(logits, data.labels, data.val_mask)
    hidden = None
    if keep_hidden:
        net.set_train(False)
        hidden = net.hidden(Tensor(x)).asnumpy().astype(np.float32)
    mgr = getattr(model.optimizer, "manager", None)
    n_epochs = params["cur_epoch_num"]
    return Result(model_name, data.name, seed, mixed_precision, 100.0 * test_acc, 100.0 * val_acc, n_epochs,
                  seconds, 1e3 * seconds / max(n_epochs, 1), hidden, mgr.overflows if mgr else 0)
