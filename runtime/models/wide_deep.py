"""Wide&Deep (Cheng et al. 2016) as MindSpore's model zoo defines it for Criteo.

    wide  = sum_f EmbeddingLookup(vocab, 1)[id_f] * w_f + bias
    deep  = MLP(concat_f EmbeddingLookup(vocab, dim)[id_f] * w_f) -> 1
    logit = wide + deep,  loss = sigmoid cross-entropy

``w_f`` is the field's value: the (log-transformed) number for the 13 integer fields, 1 for the 26
categorical ones (``runtime.dataset.criteo`` prepares both). The wide part is trained by FTRL, the
deep part by LazyAdam -- two optimizers in one step, as the zoo's TrainStepWrap. With ``host=True``
both tables, their lookups and their sparse optimizers run on the host (MindSpore's host-device mode,
``primitive_target="CPU"``); the MLP stays on the device.

Input: one int32 batch ``(B, 2, fields)``: row 0 the ids, row 1 the float32 bit patterns of the values
(``pack_batch``) -- the runtime's Model feeds one data tensor per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from runtime import Model, nn
from runtime.core import bind
from runtime.nn.cell import Cell
from runtime.ops import api as F


@dataclass(frozen=True)
class WideDeepConfig:
    field_size: int = 39
    vocab_size: int = 184_965
    emb_dim: int = 80
    deep_layers: tuple = (1024, 512, 256, 128)
    batch_size: int = 16_000
    ftrl_lr: float = 5e-2
    ftrl_l1: float = 1e-8
    ftrl_l2: float = 1e-8
    ftrl_initial_accum: float = 1.0
    adam_lr: float = 3.5e-4
    adam_eps: float = 1e-8
    extra: dict = field(default_factory=dict)

    @classmethod
    def zoo(cls, **kw) -> "WideDeepConfig":
        """The model zoo's Criteo configuration (dim 80, deep 1024-512-256-128, batch 16000)."""
        return replace(cls(), **kw)

    @classmethod
    def small(cls, **kw) -> "WideDeepConfig":
        """A 2-core default: the zoo's structure with dim 16, deep 256-128, batch 1000."""
        return replace(cls(emb_dim=16, deep_layers=(256, 128), batch_size=1000, adam_lr=1e-3), **kw)


def pack_batch(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(B, F) int ids + (B, F) float values -> the (B, 2, F) int32 model input."""
    ids = np.asarray(ids)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if ids.shape != values.shape or ids.ndim != 2:
        raise ValueError(f"pack_batch: ids {ids.shape} and values {values.shape} must be the same (B, F) shape")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError("pack_batch: ids must lie in [0, 2^31)")
    out = np.empty((ids.shape[0], 2, ids.shape[1]), np.int32)
    out[:, 0] = ids
    out[:, 1] = values.view(np.int32)
    return out


def unpack_batch(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = np.ascontiguousarray(data)
    return data[:, 0], np.ascontiguousarray(data[:, 1]).view(np.float32)


class SigmoidCrossEntropyWithLogits(Cell):
    """mean(max(x, 0) - x*y + log(1 + exp(-|x|))): stable binary cross-entropy on logits."""

    def construct(self, logits, labels):
        self.check(tuple(logits.shape) == tuple(labels.shape),
                   f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have the same shape")
        y = F.cast(labels, logits.dtype) if labels.dtype != logits.dtype else labels
        soft = F.log(F.add(F.exp(F.neg(F.abs(logits))), 1.0))
        return F.reduce_mean(F.add(F.sub(F.relu(logits), F.mul(logits, y)), soft))


class WideDeep(Cell):
    def __init__(self, config: WideDeepConfig, host: bool = False, overlap: bool = True):
        super().__init__()
        c = self.config = config
        target = "CPU" if host else "DEVICE"
        self.wide_embedding = nn.EmbeddingLookup(c.vocab_size, 1, target=target, embedding_table="zeros",
                                                 overlap=overlap)
        self.wide_bias = nn.Parameter(np.zeros((1,), np.float32), name="wide_bias")
        self.deep_embedding = nn.EmbeddingLookup(c.vocab_size, c.emb_dim, target=target, overlap=overlap)
        dims = (c.field_size * c.emb_dim,) + tuple(c.deep_layers)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Dense(a, b, weight_init="xavier_uniform"), nn.ReLU()]
        layers.append(nn.Dense(dims[-1], 1, weight_init="xavier_uniform"))
        self.deep = nn.SequentialCell(layers)

    def construct(self, data):
        c = self.config
        self.check(tuple(data.shape[1:]) == (2, c.field_size) and data.dtype == np.int32,
                   f"expects a packed int32 batch (B, 2, {c.field_size}) (see pack_batch) but got "
                   f"{tuple(data.shape)} {data.dtype}")
        b = data.shape[0]
        ids = F.reshape(F.slice(data, (0, 0, 0), (b, 1, c.field_size)), (b, c.field_size))
        vals = bind("bitcast_f32", [F.reshape(F.slice(data, (0, 1, 0), (b, 2, c.field_size)), (b, c.field_size))])
        wide = F.reshape(self.wide_embedding(ids), (b, c.field_size))
        wide = F.add(F.reduce_sum(F.mul(wide, vals), axis=1, keepdims=True), self.wide_bias)
        emb = F.mul(self.deep_embedding(ids), F.reshape(vals, (b, c.field_size, 1)))
        deep = self.deep(F.reshape(emb, (b, c.field_size * c.emb_dim)))
        return F.add(wide, deep)

    def wide_params(self):
        return [self.wide_embedding.embedding_table, self.wide_bias]

    def deep_params(self):
        wide = {id(p) for p in self.wide_params()}
        return [p for p in self.trainable_params() if id(p) not in wide]


def build_model(config: WideDeepConfig, host: bool = False, overlap: bool = True, progress: bool = False):
    """(network, Model) with FTRL on the wide part and LazyAdam on the deep part."""
    net = WideDeep(config, host=host, overlap=overlap)
    net.trainable_params()  # names the parameters by their path
    ftrl = nn.FTRL(net.wide_params(), learning_rate=config.ftrl_lr, l1=config.ftrl_l1, l2=config.ftrl_l2,
                   initial_accum=config.ftrl_initial_accum)
    adam = nn.LazyAdam(net.deep_params(), learning_rate=config.adam_lr, eps=config.adam_eps)
    if host:
        ftrl.target = "CPU"  # the zoo's host-device mode: the wide part's optimizer on the host
    return net, Model(net, SigmoidCrossEntropyWithLogits(), [ftrl, adam], progress=progress)


def auc(labels, scores) -> float:
    """Area under the ROC curve (rank statistic, ties counted half)."""
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, np.float64).ravel()
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        raise ValueError("auc: needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    ranks = np.empty(len(s), np.float64)
    # average ranks of tied groups
    bounds = np.flatnonzero(np.diff(ss)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def predict_scores(model: Model, data_batches) -> np.ndarray:
    """Logits for every batch of packed data (one compiled eval graph per batch shape)."""
    return np.concatenate([np.asarray(model.predict(d)).ravel() for d in data_batches])
