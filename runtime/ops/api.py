"""The functional ops API: every function here goes through ``core.bind``.

Cells, losses, optimizers and every backward rule are written with these functions, so
the same code traces a graph (GRAPH_MODE) or runs eagerly (PYNATIVE_MODE).
"""
from __future__ import annotations

import numpy as np

from runtime.core import Tensor, as_tensor, bind
from runtime.ops.registry import ShapeError


def _t(x, like=None) -> Tensor:
    return x if isinstance(x, Tensor) else as_tensor(x, like)


def _binary(name, a, b):
    if not isinstance(a, Tensor):
        a = as_tensor(a, b if isinstance(b, Tensor) else None)
    if not isinstance(b, Tensor):
        b = as_tensor(b, a)
    return bind(name, [a, b])


def _unary(name, x, **attrs):
    return bind(name, [_t(x)], attrs)


# -- elementwise / broadcast ----------------------------------------------------------------
def add(a, b): return _binary("add", a, b)
def sub(a, b): return _binary("sub", a, b)
def mul(a, b): return _binary("mul", a, b)
def div(a, b): return _binary("div", a, b)
def pow(a, b): return _binary("pow", a, b)  # noqa: A001
def maximum(a, b): return _binary("maximum", a, b)
def minimum(a, b): return _binary("minimum", a, b)
def equal(a, b): return _binary("equal", a, b)
def not_equal(a, b): return _binary("not_equal", a, b)
def less(a, b): return _binary("less", a, b)
def less_equal(a, b): return _binary("less_equal", a, b)
def greater(a, b): return _binary("greater", a, b)
def greater_equal(a, b): return _binary("greater_equal", a, b)


def neg(x): return _unary("neg", x)
def exp(x): return _unary("exp", x)
def log(x): return _unary("log", x)
def sqrt(x): return _unary("sqrt", x)
def rsqrt(x): return _unary("rsqrt", x)
def tanh(x): return _unary("tanh", x)
def sigmoid(x): return _unary("sigmoid", x)
def relu(x): return _unary("relu", x)
def gelu(x): return _unary("gelu", x)
def abs(x): return _unary("abs", x)  # noqa: A001
def sign(x): return _unary("sign", x)
def square(x): return _unary("square", x)
def reciprocal(x): return _unary("reciprocal", x)
def leaky_relu(x, alpha=0.2): return _unary("leaky_relu", x, alpha=float(alpha))
def elu(x, alpha=1.0): return _unary("elu", x, alpha=float(alpha))
def relu_grad(x, g): return bind("relu_grad", [_t(x), _t(g)])
def gelu_grad(x, g): return bind("gelu_grad", [_t(x), _t(g)])
def leaky_relu_grad(x, g, alpha): return bind("leaky_relu_grad", [_t(x), _t(g)], {"alpha": float(alpha)})
def elu_grad(x, g, alpha): return bind("elu_grad", [_t(x), _t(g)], {"alpha": float(alpha)})


def cast(x, dtype):
    return _unary("cast", x, dtype=np.dtype(dtype).name)


def select(cond, a, b):
    """Elementwise ``cond ? a : b`` with broadcasting (a.k.a. where)."""
    cond = _t(cond)
    if not isinstance(a, Tensor):
        a = as_tensor(a, b if isinstance(b, Tensor) else None)
    if not isinstance(b, Tensor):
        b = as_tensor(b, a)
    return bind("select", [cond, a, b])


where = select


# -- reductions -------------------------------------------------------------------------------
def _axes(axis):
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    return tuple(int(a) for a in axis)


def reduce_sum(x, axis=None, keepdims=False):
    return _unary("reduce_sum", x, axis=_axes(axis), keepdims=bool(keepdims))


def reduce_mean(x, axis=None, keepdims=False):
    return _unary("reduce_mean", x, axis=_axes(axis), keepdims=bool(keepdims))


def reduce_max(x, axis=None, keepdims=False):
    return _unary("reduce_max", x, axis=_axes(axis), keepdims=bool(keepdims))


def argmax(x, axis=-1):
    return _unary("argmax", x, axis=int(axis))


# -- shape (injective) -------------------------------------------------------------------------
def reshape(x, shape):
    x = _t(x)
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        total = x.size
        if known == 0 or total % known or shape.count(-1) > 1:
            raise ShapeError(f"reshape: cannot reshape {x.shape} into {shape}")
        shape = tuple(total // known if s == -1 else s for s in shape)
    return bind("reshape", [x], {"shape": shape})


def transpose(x, perm=None):
    x = _t(x)
    if perm is None:
        perm = tuple(reversed(range(x.ndim)))
    return bind("transpose", [x], {"perm": tuple(int(p) for p in perm)})


def broadcast_to(x, shape):
    return _unary("broadcast_to", x, shape=tuple(int(s) for s in shape))


def expand_dims(x, axis):
    return _unary("expand_dims", x, axis=int(axis))


def squeeze(x, axis):
    return _unary("squeeze", x, axis=_axes(axis))


def slice(x, begin, end):  # noqa: A001
    """x[begin[0]:end[0], begin[1]:end[1], ...] (unit step)."""
    return _unary("slice", x, begin=tuple(int(b) for b in begin), end=tuple(int(e) for e in end))


def pad(x, pads):
    """Zero-pad: pads is ((lo, hi), ...) per axis."""
    return _unary("pad", x, pads=tuple((int(a), int(b)) for a, b in pads))


def concat(tensors, axis=0):
    ts = [_t(t) for t in tensors]
    return bind("concat", ts, {"axis": int(axis)})


def sum_to(g, shape):
    """Sum a broadcast gradient back down to ``shape`` (the adjoint of broadcasting)."""
    g = _t(g)
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = list(range(lead))
    for i, s in enumerate(shape):
        if s == 1 and g.shape[lead + i] != 1:
            axes.append(lead + i)
    out = reduce_sum(g, tuple(axes), keepdims=False) if axes else g
    if out.shape != shape:
        out = reshape(out, shape)
    return out


# -- opaque (library kernels) --------------------------------------------------------------------
def matmul(a, b, transpose_a=False, transpose_b=False):
    a, b = _t(a), _t(b)
    name = "matmul" if a.ndim == 2 and b.ndim == 2 else "batch_matmul"
    return bind(name, [a, b], {"transpose_a": bool(transpose_a), "transpose_b": bool(transpose_b)})


def batch_matmul(a, b, transpose_a=False, transpose_b=False):
    return bind("batch_matmul", [_t(a), _t(b)],
                {"transpose_a": bool(transpose_a), "transpose_b": bool(transpose_b)})


def _pair(v):
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def conv2d(x, w, stride=1, padding=0):
    return bind("conv2d", [_t(x), _t(w)], {"stride": _pair(stride), "padding": _pair(padding)})


def conv2d_grad_input(g, w, x_shape, stride, padding):
    return bind("conv2d_grad_input", [_t(g), _t(w)],
                {"x_shape": tuple(x_shape), "stride": _pair(stride), "padding": _pair(padding)})


def conv2d_grad_filter(g, x, w_shape, stride, padding):
    return bind("conv2d_grad_filter", [_t(g), _t(x)],
                {"w_shape": tuple(w_shape), "stride": _pair(stride), "padding": _pair(padding)})


def max_pool(x, kernel_size, stride=None, padding=0):
    stride = kernel_size if stride is None else stride
    return _unary("max_pool", x, kernel=_pair(kernel_size), stride=_pair(stride), padding=_pair(padding))


def max_pool_grad(x, g, kernel, stride, padding):
    return bind("max_pool_grad", [_t(x), _t(g)], {"kernel": kernel, "stride": stride, "padding": padding})


def avg_pool(x, kernel_size, stride=None, padding=0):
    stride = kernel_size if stride is None else stride
    return _unary("avg_pool", x, kernel=_pair(kernel_size), stride=_pair(stride), padding=_pair(padding))


def avg_pool_grad(g, x_shape, kernel, stride, padding):
    return bind("avg_pool_grad", [_t(g)], {"x_shape": tuple(x_shape), "kernel": kernel, "stride": stride,
                                           "padding": padding})


def softmax(x, axis=-1): return _unary("softmax", x, axis=int(axis))
def log_softmax(x, axis=-1): return _unary("log_softmax", x, axis=int(axis))
def softmax_grad(y, g, axis=-1): return bind("softmax_grad", [_t(y), _t(g)], {"axis": int(axis)})
def log_softmax_grad(y, g, axis=-1): return bind("log_softmax_grad", [_t(y), _t(g)], {"axis": int(axis)})


def softmax_cross_entropy(logits, labels, sparse=True):
    """Per-row cross entropy of softmax(logits); labels are class ids (sparse) or distributions."""
    return bind("softmax_cross_entropy", [_t(logits), _t(labels)], {"sparse": bool(sparse)})


def softmax_cross_entropy_grad(logits, labels, g, sparse=True):
    return bind("softmax_cross_entropy_grad", [_t(logits), _t(labels), _t(g)], {"sparse": bool(sparse)})


def layer_norm(x, gamma, beta, eps=1e-5):
    return bind("layer_norm", [_t(x), _t(gamma), _t(beta)], {"eps": float(eps)})


def layer_norm_grad(x, gamma, g, eps):
    return bind("layer_norm_grad", [_t(x), _t(gamma), _t(g)], {"eps": float(eps)})


def layer_norm_grad_params(x, g, eps):
    return bind("layer_norm_grad_params", [_t(x), _t(g)], {"eps": float(eps)})


def one_hot(indices, depth, dtype=np.float32):
    return _unary("one_hot", indices, depth=int(depth), dtype=np.dtype(dtype).name)


def gather(table, indices):
    """Rows of ``table`` (axis 0) at ``indices`` (any shape): an embedding lookup."""
    return bind("gather", [_t(table), _t(indices)])


def gather_grad(indices, g, num_rows):
    """Dense gradient of gather: scatter-add of ``g`` rows into a (num_rows, ...) zero table."""
    return bind("gather_grad", [_t(indices), _t(g)], {"num_rows": int(num_rows)})


def dropout_mask(shape, keep_prob, rng, dtype=np.float32):
    """A {0, 1/keep_prob} mask drawn from ``rng`` (advanced on every execution)."""
    return bind("dropout_mask", [], {"shape": tuple(int(s) for s in shape), "keep_prob": float(keep_prob),
                                     "dtype": np.dtype(dtype).name, "_rng": rng})


def dropout(x, keep_prob, rng):
    x = _t(x)
    if keep_prob >= 1.0:
        return x
    return mul(x, dropout_mask(x.shape, keep_prob, rng, x.dtype))


# -- side effects ----------------------------------------------------------------------------------
def assign(var, value):
    """Overwrite a Parameter's storage with ``value`` (in place); returns the variable."""
    return bind("assign", [_t(var), _t(value)])


def scatter_add_rows(var, indices, rows):
    """var[indices] += rows, in place (duplicates accumulate)."""
    return bind("scatter_add_rows", [_t(var), _t(indices), _t(rows)])


def ones_like(x):
    x = _t(x)
    return Tensor(np.ones(x.shape, dtype=x.dtype))


def zeros_like(x):
    x = _t(x)
    return Tensor(np.zeros(x.shape, dtype=x.dtype))
