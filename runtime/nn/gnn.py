"""Graph neural network Cells: GCNConv (Kipf & Welling 2017) and GATConv (Velickovic et al. 2018).

A graph is a ``GraphStructure`` (the adjacency in CSR form, row = destination node, its entries the
incoming edges). It caches what the layers derive from it once -- the structure with self loops and
the GCN weights D^-1/2 (A + I) D^-1/2 per dtype -- so tracing binds them as graph constants.

Node features are a dense Tensor (N, F) or a ``SparseFeatures`` (a CSRStructure of the N x F matrix
and its (nnz,) values Tensor): the first layer's X W is then an SpMM over the stored features
(Kipf's sparse input; dropout on the stored values is the same as dropout on the dense matrix).

Mixed precision: ``cell.to_float(np.float16)`` makes a layer compute in float16 (weights stay float32
masters and are cast in the graph); the attention logits' reductions and the edge softmax stay in
float32 (see ``runtime/train/amp.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime import random as _random
from runtime.core import Tensor
from runtime.nn.cell import Cell
from runtime.nn.init import initializer
from runtime.nn.layers import Dropout
from runtime.nn.parameter import Parameter
from runtime.ops import api as F
from runtime.ops import sparse as S
from runtime.ops.sparse import CSRStructure


class GraphStructure:
    """An N-node graph in CSR form (row i lists the sources of the edges into i), with cached
    self-loop structure and GCN normalisation."""

    def __init__(self, indptr, indices, num_nodes: int):
        self.num_nodes = int(num_nodes)
        self.indptr = np.ascontiguousarray(indptr, np.int64)
        self.indices = np.ascontiguousarray(indices, np.int32)
        self._structs: dict = {}
        self._weights: dict = {}

    @classmethod
    def from_csr(cls, csr) -> "GraphStructure":
        if csr.shape[0] != csr.shape[1]:
            raise ValueError(f"GraphStructure: an adjacency matrix must be square, got {csr.shape}")
        return cls(csr.indptr, csr.indices, csr.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.indices.shape[0])

    def _with_loops(self):
        n = self.num_nodes
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.indptr))
        keep = rows != self.indices  # existing self loops are replaced by exactly one
        r = np.concatenate([rows[keep], np.arange(n)])
        c = np.concatenate([self.indices[keep].astype(np.int64), np.arange(n)])
        order = np.lexsort((c, r))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
        return indptr, c[order].astype(np.int32)

    def structure(self, self_loops: bool = True) -> CSRStructure:
        s = self._structs.get(self_loops)
        if s is None:
            indptr, indices = self._with_loops() if self_loops else (self.indptr, self.indices)
            s = self._structs[self_loops] = CSRStructure(indptr, indices, (self.num_nodes, self.num_nodes))
        return s

    def gcn_weights(self, self_loops: bool = True, normalize: bool = True, dtype=np.float32) -> Tensor:
        """Edge weights 1/sqrt(deg_i deg_j) of D^-1/2 (A [+ I]) D^-1/2 (ones without ``normalize``)."""
        key = (self_loops, normalize, np.dtype(dtype).name)
        w = self._weights.get(key)
        if w is None:
            st = self.structure(self_loops)
            indptr = st.tensors[0].asnumpy()
            cols = st.tensors[1].asnumpy()
            if normalize:
                deg = np.diff(indptr).astype(np.float64)  # in-degree (symmetric graphs: the degree)
                inv = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
                vals = inv[st.rows] * inv[cols]
            else:
                vals = np.ones(st.nnz)
            w = self._weights[key] = Tensor(vals.astype(dtype))
        return w

    def __repr__(self):
        return f"GraphStructure(num_nodes={self.num_nodes}, num_edges={self.num_edges})"


@dataclass
class SparseFeatures:
    """An N x F feature matrix stored sparse: ``structure`` (CSR) and ``values`` (nnz,) Tensor."""
    structure: CSRStructure
    values: Tensor

    @property
    def shape(self) -> tuple:
        return self.structure.shape


def _check_graph(cell, graph):
    cell.check(isinstance(graph, GraphStructure),
               f"expects a GraphStructure as the graph, got {type(graph).__name__}")


class _GNNCell(Cell):
    compute_dtype = None

    def to_float(self, dtype) -> "_GNNCell":
        """Compute in ``dtype`` (e.g. float16); parameters stay in their own dtype (master weights)."""
        object.__setattr__(self, "compute_dtype", np.dtype(dtype))
        return self

    def _cd(self):
        return self.compute_dtype if self.compute_dtype is not None else self.weight.dtype

    def _as(self, t, dtype=None):
        dtype = np.dtype(dtype or self._cd())
        return t if t.dtype == dtype else F.cast(t, dtype)

    def _project(self, x):
        """x W for a dense (N, in) Tensor or SparseFeatures."""
        w = self._as(self.weight)
        if isinstance(x, SparseFeatures):
            self.check(x.shape[1] == self.in_channels,
                       f"expects {self.in_channels} input features but the sparse features are {x.shape}")
            return x.shape[0], S.spmm(x.structure, self._as(x.values), w)
        self.check(isinstance(x, Tensor) and x.ndim == 2 and x.shape[1] == self.in_channels,
                   f"expects node features of shape (N, {self.in_channels}) but got "
                   f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if self._cd() == np.float16:
            # the CPU device has no float16 GEMM (numpy's is a slow scalar loop): float32 GEMM,
            # float16 result -- the sparse kernels read float16 directly
            return x.shape[0], self._as(F.matmul(self._as(x, np.float32), self._as(self.weight, np.float32)))
        return x.shape[0], F.matmul(self._as(x), w)


class GCNConv(_GNNCell):
    """out = D^-1/2 (A + I) D^-1/2 X W + b. W is stored (in_channels, out_channels)."""

    def __init__(self, in_channels, out_channels, has_bias=True, add_self_loops=True, normalize=True,
                 weight_init="xavier_uniform", dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.add_self_loops, self.normalize = bool(add_self_loops), bool(normalize)
        # glorot over (in, out): the fans are symmetric, so the (out, in) convention does not matter
        self.weight = Parameter(initializer(weight_init, (out_channels, in_channels), dtype).T.copy())
        self.has_bias = bool(has_bias)
        if has_bias:
            self.bias = Parameter(np.zeros(out_channels, dtype))

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"

    def construct(self, x, graph):
        _check_graph(self, graph)
        n, h = self._project(x)
        self.check(n == graph.num_nodes, f"got features for {n} nodes but the graph has {graph.num_nodes}")
        st = graph.structure(self.add_self_loops)
        w = graph.gcn_weights(self.add_self_loops, self.normalize, self._cd())
        out = S.spmm(st, w, h)
        if self.has_bias:
            out = F.add(out, self._as(self.bias))
        return out


class GATConv(_GNNCell):
    """Graph attention: per head k, alpha_ij = softmax_j(LeakyReLU(a_dst . W x_i + a_src . W x_j)) over
    i's neighbours (and i itself with self loops), out_i = sum_j alpha_ij W x_j; heads concatenated
    (``concat=True``) or averaged. Attention dropout drops alpha entries in training; ``value_dropout``
    drops entries of W x_j in the aggregation only (as the authors' implementation does)."""

    def __init__(self, in_channels, out_channels, heads=1, concat=True, negative_slope=0.2, attn_dropout=0.0,
                 add_self_loops=True, has_bias=True, weight_init="xavier_uniform", dtype=np.float32, seed=None,
                 value_dropout=0.0):
        super().__init__()
        for what, p in (("attn_dropout", attn_dropout), ("value_dropout", value_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"GATConv: {what} must be in [0, 1), got {p}")
        self.value_dropout = float(value_dropout)
        self.in_channels, self.out_channels, self.heads = int(in_channels), int(out_channels), int(heads)
        self.concat, self.negative_slope = bool(concat), float(negative_slope)
        self.attn_dropout, self.add_self_loops = float(attn_dropout), bool(add_self_loops)
        hd = self.heads * self.out_channels
        self.weight = Parameter(initializer(weight_init, (hd, in_channels), dtype).T.copy())
        self.att_src = Parameter(initializer(weight_init, (self.heads, self.out_channels), dtype))
        self.att_dst = Parameter(initializer(weight_init, (self.heads, self.out_channels), dtype))
        self.has_bias = bool(has_bias)
        if has_bias:
            self.bias = Parameter(np.zeros(hd if concat else self.out_channels, dtype))
        self.rng = _random.generator(seed, "gat_attn_dropout")

    def extend_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, heads={self.heads}, "
                f"concat={self.concat}")

    def _attention_logits(self, h, dtype):
        """(a_src . h_k, a_dst . h_k) per node and head as ONE GEMM: h (N, H*D) times the block-diagonal
        (H*D, 2H) matrix holding att_src and att_dst -- instead of a broadcast multiply and a reduction
        over (N, H, D) and their backward."""
        hh, d = self.heads, self.out_channels
        block = Tensor(np.kron(np.eye(hh), np.ones((d, 1))).astype(dtype))  # (H*D, H): 1 where row // D == col
        cols = [F.mul(F.broadcast_to(F.reshape(self._as(a, dtype), (hh * d, 1)), (hh * d, hh)), block)
                for a in (self.att_src, self.att_dst)]
        both = F.matmul(h, F.concat(cols, axis=1))  # (N, 2H)
        n = h.shape[0]
        return F.slice(both, (0, 0), (n, hh)), F.slice(both, (0, hh), (n, 2 * hh))

    def construct(self, x, graph):
        _check_graph(self, graph)
        n, h2 = self._project(x)
        self.check(n == graph.num_nodes, f"got features for {n} nodes but the graph has {graph.num_nodes}")
        h = F.reshape(h2, (n, self.heads, self.out_channels))
        # attention logits: reductions in float32 (at least the parameters' precision)
        red = np.promote_types(self.weight.dtype, np.float32)
        a_src, a_dst = self._attention_logits(self._as(h2, red), red)  # (N, H) each
        st = graph.structure(self.add_self_loops)
        e = F.add(S.edge_gather(st, a_dst, "dst"), S.edge_gather(st, a_src, "src"))  # (E, H)
        alpha = S.edge_softmax(st, F.leaky_relu(e, self.negative_slope))
        if self.training and self.attn_dropout > 0:
            alpha = F.dropout(alpha, 1.0 - self.attn_dropout, self.rng)
        if self.training and self.value_dropout > 0:  # the original GAT drops the projected features too
            h = F.dropout(h, 1.0 - self.value_dropout, self.rng)
        out = S.spmm(st, self._as(alpha), h)  # (N, H, D)
        if self.concat:
            out = F.reshape(out, (n, self.heads * self.out_channels))
        else:
            out = F.reduce_mean(self._as(out, red), axis=1)
            out = self._as(out)
        if self.has_bias:
            out = F.add(out, self._as(self.bias))
        return out


class FeatureDropout(Dropout):
    """Dropout on node features, dense or sparse (drops stored values; the same as dense dropout)."""

    def construct(self, x):
        if isinstance(x, SparseFeatures):
            return SparseFeatures(x.structure, super().construct(x.values))
        return super().construct(x)
