"""Definitions of every primitive: inference, kernel, backward rule, fusion category, cost."""
from __future__ import annotations

import numpy as np

from runtime.core import bind
from runtime.ops import api as F
from runtime.ops.registry import Primitive, ShapeError, broadcast_shapes, normalize_axes, register
from runtime.threads import blas

try:
    from runtime import _kernels as K
except ImportError as e:  # pragma: no cover - a build problem, reported clearly
    raise ImportError(
        "runtime._kernels (the Cython kernels) is not built. Install the project with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`) first.") from e

FLOAT_KINDS = "f"


def _is_float(dt) -> bool:
    return np.dtype(dt).kind == "f"


# ----------------------------------------------------------------------------------------------
# inference helpers
# ----------------------------------------------------------------------------------------------
def _same_float(name):
    def infer(shapes, dtypes, attrs):
        if not _is_float(dtypes[0]):
            raise ShapeError(f"{name}: expects a floating-point tensor, got {np.dtype(dtypes[0])}")
        return shapes[0], dtypes[0]
    return infer


def _binary_infer(name, out_dtype=None, need_float=False):
    def infer(shapes, dtypes, attrs):
        if np.dtype(dtypes[0]) != np.dtype(dtypes[1]):
            raise ShapeError(f"{name}: dtypes differ ({np.dtype(dtypes[0])} vs {np.dtype(dtypes[1])}); "
                             f"cast one of the inputs")
        if need_float and not _is_float(dtypes[0]):
            raise ShapeError(f"{name}: expects floating-point inputs, got {np.dtype(dtypes[0])}")
        shape = broadcast_shapes(shapes[0], shapes[1], name)
        return shape, (out_dtype or dtypes[0])
    return infer


def _pair_infer(name):
    """Two same-shaped float inputs (x, g) -> x's shape (the *_grad elementwise ops)."""
    def infer(shapes, dtypes, attrs):
        if tuple(shapes[0]) != tuple(shapes[1]):
            raise ShapeError(f"{name}: shapes {tuple(shapes[0])} and {tuple(shapes[1])} differ")
        return shapes[0], dtypes[0]
    return infer


def _reduce_infer(name, keep_dtype=True):
    def infer(shapes, dtypes, attrs):
        shape = tuple(shapes[0])
        axes = normalize_axes(attrs.get("axis"), len(shape), name)
        if attrs.get("keepdims"):
            out = tuple(1 if i in axes else s for i, s in enumerate(shape))
        else:
            out = tuple(s for i, s in enumerate(shape) if i not in axes)
        return out, dtypes[0]
    return infer


def _kept_shape(x_shape, attrs, name):
    axes = normalize_axes(attrs.get("axis"), len(x_shape), name)
    return tuple(1 if i in axes else s for i, s in enumerate(x_shape)), axes


# ----------------------------------------------------------------------------------------------
# elementwise unary
# ----------------------------------------------------------------------------------------------
def _unary(name, kernel, grad, flops=1.0, need_float=True):
    infer = _same_float(name) if need_float else (lambda s, d, a: (s[0], d[0]))
    register(Primitive(name, "elementwise", infer, kernel, grad, flops_per_element=flops))


_unary("neg", lambda x: np.negative(x), lambda g, y, x: [F.neg(g)], need_float=False)
_unary("exp", lambda x: np.exp(x), lambda g, y, x: [F.mul(g, y)], 4)
_unary("log", lambda x: np.log(x), lambda g, y, x: [F.div(g, x)], 4)
_unary("sqrt", lambda x: np.sqrt(x), lambda g, y, x: [F.div(g, F.mul(y, 2.0))], 4)
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x),
       lambda g, y, x: [F.mul(g, F.mul(F.mul(y, F.mul(y, y)), -0.5))], 5)
_unary("tanh", lambda x: np.tanh(x), lambda g, y, x: [F.mul(g, F.sub(1.0, F.mul(y, y)))], 6)


def _sigmoid(x):
    # split by sign for stability without overflow warnings
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


_unary("sigmoid", _sigmoid, lambda g, y, x: [F.mul(g, F.mul(y, F.sub(1.0, y)))], 6)
_unary("relu", lambda x: np.maximum(x, 0), lambda g, y, x: [F.relu_grad(x, g)], need_float=False)
_unary("gelu", lambda x: K.gelu_fwd(np.ascontiguousarray(x)), lambda g, y, x: [F.gelu_grad(x, g)], 10)
_unary("abs", lambda x: np.abs(x), lambda g, y, x: [F.mul(g, F.sign(x))], need_float=False)
_unary("sign", lambda x: np.sign(x), lambda g, y, x: [None], need_float=False)
_unary("square", lambda x: np.square(x), lambda g, y, x: [F.mul(g, F.mul(x, 2.0))])
_unary("reciprocal", lambda x: np.reciprocal(x), lambda g, y, x: [F.neg(F.mul(g, F.mul(y, y)))])


def _leaky(x, alpha):
    return np.where(x > 0, x, x * np.asarray(alpha, dtype=x.dtype))


def _elu(x, alpha):
    return np.where(x > 0, x, np.asarray(alpha, dtype=x.dtype) * np.expm1(np.minimum(x, 0)))


register(Primitive("leaky_relu", "elementwise", _same_float("leaky_relu"), _leaky,
                   lambda g, y, x, alpha: [F.leaky_relu_grad(x, g, alpha)], 2))
register(Primitive("elu", "elementwise", _same_float("elu"), _elu,
                   lambda g, y, x, alpha: [F.elu_grad(x, g, alpha)], 5))

# the *_grad elementwise helpers (no backward of their own)
register(Primitive("relu_grad", "elementwise", _pair_infer("relu_grad"),
                   lambda x, g: np.multiply(g, x > 0)))  # 4-9x faster than np.where here
register(Primitive("gelu_grad", "elementwise", _pair_infer("gelu_grad"),
                   lambda x, g: K.gelu_bwd(np.ascontiguousarray(x), np.ascontiguousarray(g)),
                   flops_per_element=16))
register(Primitive("leaky_relu_grad", "elementwise", _pair_infer("leaky_relu_grad"),
                   lambda x, g, alpha: np.where(x > 0, g, g * np.asarray(alpha, g.dtype))))
register(Primitive("elu_grad", "elementwise", _pair_infer("elu_grad"),
                   lambda x, g, alpha: np.where(x > 0, g, g * np.asarray(alpha, g.dtype) *
                                                np.exp(np.minimum(x, 0)))))


def _cast_infer(shapes, dtypes, attrs):
    return shapes[0], np.dtype(attrs["dtype"])


register(Primitive("cast", "elementwise", _cast_infer,
                   lambda x, dtype: x.astype(dtype),
                   lambda g, y, x, dtype: [F.cast(g, x.dtype) if _is_float(x.dtype) else None]))


# ----------------------------------------------------------------------------------------------
# elementwise binary (broadcasting)
# ----------------------------------------------------------------------------------------------
def _bin(name, kernel, grad, out_dtype=None, need_float=False, flops=1.0):
    register(Primitive(name, "broadcast", _binary_infer(name, out_dtype, need_float), kernel, grad,
                       flops_per_element=flops))


_bin("add", np.add, lambda g, y, a, b: [F.sum_to(g, a.shape), F.sum_to(g, b.shape)])
_bin("sub", np.subtract, lambda g, y, a, b: [F.sum_to(g, a.shape), F.sum_to(F.neg(g), b.shape)])
_bin("mul", np.multiply, lambda g, y, a, b: [F.sum_to(F.mul(g, b), a.shape), F.sum_to(F.mul(g, a), b.shape)])
_bin("div", np.divide,
     lambda g, y, a, b: [F.sum_to(F.div(g, b), a.shape), F.sum_to(F.neg(F.div(F.mul(g, y), b)), b.shape)],
     need_float=True)
_bin("pow", np.power,
     lambda g, y, a, b: [F.sum_to(F.mul(g, F.mul(b, F.pow(a, F.sub(b, 1.0)))), a.shape),
                         F.sum_to(F.mul(g, F.mul(y, F.log(a))), b.shape)],
     need_float=True, flops=10)


def _minmax_grad(pick_a_op):
    def grad(g, y, a, b):
        mask = pick_a_op(a, b)
        zero = F.zeros_like(g)
        return [F.sum_to(F.select(mask, g, zero), a.shape), F.sum_to(F.select(mask, zero, g), b.shape)]
    return grad


_bin("maximum", np.maximum, _minmax_grad(F.greater_equal))
_bin("minimum", np.minimum, _minmax_grad(F.less_equal))

_no_grad2 = lambda g, y, a, b: [None, None]  # noqa: E731
for _name, _fn in (("equal", np.equal), ("not_equal", np.not_equal), ("less", np.less),
                   ("less_equal", np.less_equal), ("greater", np.greater),
                   ("greater_equal", np.greater_equal)):
    _bin(_name, _fn, _no_grad2, out_dtype=np.dtype(np.bool_))


def _select_infer(shapes, dtypes, attrs):
    if np.dtype(dtypes[0]) != np.bool_:
        raise ShapeError(f"select: the condition must be bool, got {np.dtype(dtypes[0])}")
    if np.dtype(dtypes[1]) != np.dtype(dtypes[2]):
        raise ShapeError(f"select: branch dtypes differ ({np.dtype(dtypes[1])} vs {np.dtype(dtypes[2])})")
    s = broadcast_shapes(broadcast_shapes(shapes[0], shapes[1], "select"), shapes[2], "select")
    return s, dtypes[1]


def _select_grad(g, y, c, a, b):
    zero = F.zeros_like(g)
    return [None, F.sum_to(F.select(c, g, zero), a.shape), F.sum_to(F.select(c, zero, g), b.shape)]


register(Primitive("select", "broadcast", _select_infer, np.where, _select_grad))


# ----------------------------------------------------------------------------------------------
# reductions
# ----------------------------------------------------------------------------------------------
def _reduce_kernel(fn):
    def kernel(x, axis, keepdims):
        ax = tuple(range(x.ndim)) if axis is None else tuple(a % x.ndim for a in axis)
        return np.asarray(fn(x, axis=ax, keepdims=keepdims))
    return kernel


def _grad_broadcast_back(g, x_shape, attrs):
    kept, _ = _kept_shape(x_shape, attrs, "reduce")
    if g.shape != kept:
        g = F.reshape(g, kept)
    return F.broadcast_to(g, x_shape)


def _sum_grad(g, y, x, axis, keepdims):
    return [_grad_broadcast_back(g, x.shape, {"axis": axis, "keepdims": keepdims})]


def _mean_grad(g, y, x, axis, keepdims):
    _, axes = _kept_shape(x.shape, {"axis": axis}, "reduce_mean")
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64)) or 1
    return [F.div(_grad_broadcast_back(g, x.shape, {"axis": axis, "keepdims": keepdims}), float(count))]


def _max_grad(g, y, x, axis, keepdims):
    attrs = {"axis": axis, "keepdims": keepdims}
    yb = _grad_broadcast_back(y, x.shape, attrs)
    mask = F.cast(F.equal(x, yb), x.dtype)
    count = _grad_broadcast_back(F.reduce_sum(mask, axis, keepdims), x.shape, attrs)
    return [F.div(F.mul(mask, _grad_broadcast_back(g, x.shape, attrs)), count)]


register(Primitive("reduce_sum", "reduce", _reduce_infer("reduce_sum"), _reduce_kernel(np.sum), _sum_grad))
register(Primitive("reduce_mean", "reduce", _reduce_infer("reduce_mean"), _reduce_kernel(np.mean), _mean_grad))
register(Primitive("reduce_max", "reduce", _reduce_infer("reduce_max"), _reduce_kernel(np.max), _max_grad))


def _argmax_infer(shapes, dtypes, attrs):
    shape = tuple(shapes[0])
    (ax,) = normalize_axes(attrs["axis"], len(shape), "argmax")
    return tuple(s for i, s in enumerate(shape) if i != ax), np.dtype(np.int64)


register(Primitive("argmax", "reduce", _argmax_infer,
                   lambda x, axis: np.argmax(x, axis=axis).astype(np.int64), lambda g, y, x, axis: [None]))


# ----------------------------------------------------------------------------------------------
# injective (shape) ops
# ----------------------------------------------------------------------------------------------
def _reshape_infer(shapes, dtypes, attrs):
    src, dst = tuple(shapes[0]), tuple(attrs["shape"])
    if int(np.prod(src, dtype=np.int64)) != int(np.prod(dst, dtype=np.int64)):
        raise ShapeError(f"reshape: cannot reshape {src} ({int(np.prod(src))} elements) into {dst}")
    return dst, dtypes[0]


register(Primitive("reshape", "injective", _reshape_infer, lambda x, shape: np.reshape(x, shape),
                   lambda g, y, x, shape: [F.reshape(g, x.shape)]))


def _transpose_infer(shapes, dtypes, attrs):
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(len(shapes[0]))):
        raise ShapeError(f"transpose: perm {perm} is not a permutation of the axes of {tuple(shapes[0])}")
    return tuple(shapes[0][p] for p in perm), dtypes[0]


register(Primitive("transpose", "injective", _transpose_infer, lambda x, perm: np.transpose(x, perm),
                   lambda g, y, x, perm: [F.transpose(g, tuple(np.argsort(perm)))]))


def _broadcast_to_infer(shapes, dtypes, attrs):
    target = tuple(attrs["shape"])
    if broadcast_shapes(shapes[0], target, "broadcast_to") != target:
        raise ShapeError(f"broadcast_to: cannot broadcast {tuple(shapes[0])} to {target}")
    return target, dtypes[0]


register(Primitive("broadcast_to", "broadcast", _broadcast_to_infer,
                   lambda x, shape: np.broadcast_to(x, shape),
                   lambda g, y, x, shape: [F.sum_to(g, x.shape)]))


def _expand_infer(shapes, dtypes, attrs):
    s = list(shapes[0])
    ax = attrs["axis"]
    if not -len(s) - 1 <= ax <= len(s):
        raise ShapeError(f"expand_dims: axis {ax} out of range for {tuple(s)}")
    s.insert(ax % (len(s) + 1), 1)
    return tuple(s), dtypes[0]


register(Primitive("expand_dims", "injective", _expand_infer, lambda x, axis: np.expand_dims(x, axis),
                   lambda g, y, x, axis: [F.reshape(g, x.shape)]))


def _squeeze_infer(shapes, dtypes, attrs):
    s = tuple(shapes[0])
    axes = normalize_axes(attrs["axis"], len(s), "squeeze")
    for a in axes:
        if s[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of {s} has size {s[a]}, not 1")
    return tuple(d for i, d in enumerate(s) if i not in axes), dtypes[0]


register(Primitive("squeeze", "injective", _squeeze_infer,
                   lambda x, axis: np.squeeze(x, axis=tuple(a % x.ndim for a in axis)),
                   lambda g, y, x, axis: [F.reshape(g, x.shape)]))


def _slice_infer(shapes, dtypes, attrs):
    s = tuple(shapes[0])
    b, e = attrs["begin"], attrs["end"]
    if len(b) != len(s) or len(e) != len(s):
        raise ShapeError(f"slice: begin {b} / end {e} must have one entry per axis of {s}")
    for i, (lo, hi, n) in enumerate(zip(b, e, s)):
        if not 0 <= lo <= hi <= n:
            raise ShapeError(f"slice: axis {i}: [{lo}:{hi}] is outside 0..{n} for a tensor of shape {s}")
    return tuple(hi - lo for lo, hi in zip(b, e)), dtypes[0]


def _slice_kernel(x, begin, end):
    return x[tuple(np.s_[lo:hi] for lo, hi in zip(begin, end))]


def _slice_grad(g, y, x, begin, end):
    return [F.pad(g, tuple((lo, n - hi) for lo, hi, n in zip(begin, end, x.shape)))]


register(Primitive("slice", "injective", _slice_infer, _slice_kernel, _slice_grad))


def _pad_infer(shapes, dtypes, attrs):
    s = tuple(shapes[0])
    pads = attrs["pads"]
    if len(pads) != len(s) or any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ShapeError(f"pad: pads {pads} must be one non-negative (lo, hi) pair per axis of {s}")
    return tuple(n + lo + hi for n, (lo, hi) in zip(s, pads)), dtypes[0]


def _pad_grad(g, y, x, pads):
    begin = tuple(lo for lo, _ in pads)
    end = tuple(lo + n for (lo, _), n in zip(pads, x.shape))
    return [F.slice(g, begin, end)]


register(Primitive("pad", "injective", _pad_infer, lambda x, pads: np.pad(x, pads), _pad_grad))


def _concat_infer(shapes, dtypes, attrs):
    if not shapes:
        raise ShapeError("concat: needs at least one tensor")
    nd = len(shapes[0])
    ax = attrs["axis"]
    if not -nd <= ax < nd:
        raise ShapeError(f"concat: axis {ax} out of range for {nd}-d tensors")
    ax %= nd
    for s, d in zip(shapes, dtypes):
        if len(s) != nd or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != ax):
            raise ShapeError(f"concat: shapes {[tuple(x) for x in shapes]} differ outside axis {ax}")
        if np.dtype(d) != np.dtype(dtypes[0]):
            raise ShapeError(f"concat: dtypes differ ({[np.dtype(x).name for x in dtypes]})")
    out = list(shapes[0])
    out[ax] = sum(s[ax] for s in shapes)
    return tuple(out), dtypes[0]


def _concat_grad(g, y, *xs, axis):
    ax = axis % len(y.shape)
    grads, off = [], 0
    for x in xs:
        begin = [0] * len(y.shape)
        end = list(y.shape)
        begin[ax], end[ax] = off, off + x.shape[ax]
        grads.append(F.slice(g, begin, end))
        off += x.shape[ax]
    return grads


register(Primitive("concat", "injective", _concat_infer, lambda *xs, axis: np.concatenate(xs, axis=axis),
                   _concat_grad))


# ----------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------
def _mm_dims(sa, sb, ta, tb, name):
    m, k = (sa[-1], sa[-2]) if ta else (sa[-2], sa[-1])
    k2, n = (sb[-1], sb[-2]) if tb else (sb[-2], sb[-1])
    if k != k2:
        raise ShapeError(f"{name}: cannot multiply {tuple(sa)}{'^T' if ta else ''} by "
                         f"{tuple(sb)}{'^T' if tb else ''}: inner dimensions {k} and {k2} differ")
    return m, k, n


def _matmul_infer(shapes, dtypes, attrs):
    sa, sb = shapes
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeError(f"matmul: expects 2-d inputs, got {tuple(sa)} and {tuple(sb)}")
    if np.dtype(dtypes[0]) != np.dtype(dtypes[1]) or not _is_float(dtypes[0]):
        raise ShapeError(f"matmul: inputs must share a float dtype, got {np.dtype(dtypes[0])}, "
                         f"{np.dtype(dtypes[1])}")
    m, _, n = _mm_dims(sa, sb, attrs["transpose_a"], attrs["transpose_b"], "matmul")
    return (m, n), dtypes[0]


def _mm_kernel(a, b, transpose_a, transpose_b):
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    return blas.matmul(a, b)


def _mm_grad(mm):
    def grad(g, y, a, b, transpose_a, transpose_b):
        if not transpose_a and not transpose_b:
            return [mm(g, b, False, True), mm(a, g, True, False)]
        if transpose_a and not transpose_b:
            return [mm(b, g, False, True), mm(a, g, False, False)]
        if not transpose_a and transpose_b:
            return [mm(g, b, False, False), mm(g, a, True, False)]
        return [mm(b, g, True, True), mm(g, a, True, True)]
    return grad


def _mm_cost(node):
    a, b = node.inputs
    _, k, _ = _mm_dims(a.shape, b.shape, node.attrs["transpose_a"], node.attrs["transpose_b"], node.op)
    return 2 * node.size * k, node.nbytes + a.nbytes + b.nbytes


register(Primitive("matmul", "opaque", _matmul_infer, _mm_kernel, _mm_grad(F.matmul), cost_fn=_mm_cost))


def _bmm_infer(shapes, dtypes, attrs):
    sa, sb = tuple(shapes[0]), tuple(shapes[1])
    if len(sa) < 3 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
        raise ShapeError(f"batch_matmul: expects inputs with equal batch dimensions, got {sa} and {sb}")
    if np.dtype(dtypes[0]) != np.dtype(dtypes[1]) or not _is_float(dtypes[0]):
        raise ShapeError("batch_matmul: inputs must share a float dtype")
    m, _, n = _mm_dims(sa, sb, attrs["transpose_a"], attrs["transpose_b"], "batch_matmul")
    return sa[:-2] + (m, n), dtypes[0]


register(Primitive("batch_matmul", "opaque", _bmm_infer, _mm_kernel, _mm_grad(F.batch_matmul),
                   cost_fn=_mm_cost))


# ----------------------------------------------------------------------------------------------
# convolution and pooling (NCHW)
# ----------------------------------------------------------------------------------------------
def _out_hw(h, w, k, s, p):
    return (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1


def _conv_infer(shapes, dtypes, attrs):
    xs, ws = tuple(shapes[0]), tuple(shapes[1])
    if len(xs) != 4 or len(ws) != 4:
        raise ShapeError(f"conv2d: expects x (N, C, H, W) and weight (O, C, kh, kw), got {xs} and {ws}")
    if xs[1] != ws[1]:
        raise ShapeError(f"conv2d: input has {xs[1]} channels but the weight expects {ws[1]} "
                         f"(x {xs}, weight {ws})")
    if np.dtype(dtypes[0]) != np.dtype(dtypes[1]) or not _is_float(dtypes[0]):
        raise ShapeError("conv2d: x and weight must share a float dtype")
    oh, ow = _out_hw(xs[2], xs[3], ws[2:], attrs["stride"], attrs["padding"])
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"conv2d: a {ws[2]}x{ws[3]} kernel does not fit a {xs[2]}x{xs[3]} input "
                         f"with padding {attrs['padding']}")
    return (xs[0], ws[0], oh, ow), dtypes[0]


# The whole batch is one GEMM each way: im2col in the (C*kh*kw, N*OH*OW) layout ("batch columns"), the
# output / output gradient as (O, N*OH*OW) -- one transposing copy to or from NCHW -- instead of N small
# per-sample GEMMs (and, for the filter gradient, N partial products summed afterwards).
def _to_batch_cols(g):
    """(N, O, OH, OW) -> (O, N*OH*OW)."""
    n, o = g.shape[:2]
    return np.ascontiguousarray(g.reshape(n, o, -1).transpose(1, 0, 2)).reshape(o, -1)


def _conv_kernel(x, w, stride, padding):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = _out_hw(h, wd, (kh, kw), stride, padding)
    cols = K.im2col(x, kh, kw, stride[0], stride[1], padding[0], padding[1], True)  # (C*kh*kw, N*L)
    y = blas.matmul(w.reshape(o, -1), cols)  # (O, N*L)
    return np.ascontiguousarray(y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3))


def _conv_grad(g, y, x, w, stride, padding):
    return [F.conv2d_grad_input(g, w, x.shape, stride, padding),
            F.conv2d_grad_filter(g, x, w.shape, stride, padding)]


def _conv_cost(node):
    x, w = node.inputs
    return 2 * node.size * int(np.prod(w.shape[1:])), node.nbytes + x.nbytes + w.nbytes


register(Primitive("conv2d", "opaque", _conv_infer, _conv_kernel, _conv_grad, cost_fn=_conv_cost))


def _conv_gi_infer(shapes, dtypes, attrs):
    return tuple(attrs["x_shape"]), dtypes[0]


def _conv_gi_kernel(g, w, x_shape, stride, padding):
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    gt = _to_batch_cols(g)
    dcols = blas.matmul(w.reshape(o, -1).T, gt)  # (C*kh*kw, N*L)
    return K.col2im(dcols, n, c, h, wd, kh, kw, stride[0], stride[1], padding[0], padding[1], True)


def _conv_gi_cost(node):
    g, w = node.inputs
    return 2 * g.size * int(np.prod(w.shape[1:])), node.nbytes + g.nbytes + w.nbytes


register(Primitive("conv2d_grad_input", "opaque", _conv_gi_infer, _conv_gi_kernel, cost_fn=_conv_gi_cost))


def _conv_gf_infer(shapes, dtypes, attrs):
    return tuple(attrs["w_shape"]), dtypes[0]


def _conv_gf_kernel(g, x, w_shape, stride, padding):
    o, c, kh, kw = w_shape
    cols = K.im2col(x, kh, kw, stride[0], stride[1], padding[0], padding[1], True)  # (C*kh*kw, N*L)
    return blas.matmul(_to_batch_cols(g), cols.T).reshape(w_shape)  # one GEMM over the batch


def _conv_gf_cost(node):
    g, x = node.inputs
    return 2 * g.size * int(np.prod(node.shape[1:])), node.nbytes + g.nbytes + x.nbytes


register(Primitive("conv2d_grad_filter", "opaque", _conv_gf_infer, _conv_gf_kernel, cost_fn=_conv_gf_cost))


def _pool_infer(name):
    def infer(shapes, dtypes, attrs):
        xs = tuple(shapes[0])
        if len(xs) != 4:
            raise ShapeError(f"{name}: expects an (N, C, H, W) input, got {xs}")
        k, s, p = attrs["kernel"], attrs["stride"], attrs["padding"]
        oh, ow = _out_hw(xs[2], xs[3], k, s, p)
        if oh <= 0 or ow <= 0:
            raise ShapeError(f"{name}: a {k[0]}x{k[1]} window does not fit a {xs[2]}x{xs[3]} input")
        return (xs[0], xs[1], oh, ow), dtypes[0]
    return infer


def _pool_args(kernel, stride, padding):
    return kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]


register(Primitive("max_pool", "opaque", _pool_infer("max_pool"),
                   lambda x, kernel, stride, padding: K.maxpool2d_fwd(np.ascontiguousarray(x),
                                                                      *_pool_args(kernel, stride, padding)),
                   lambda g, y, x, kernel, stride, padding: [F.max_pool_grad(x, g, kernel, stride, padding)],
                   cost_fn=lambda n: (n.inputs[0].size, n.nbytes + n.inputs[0].nbytes)))
register(Primitive("max_pool_grad", "opaque", lambda s, d, a: (s[0], d[0]),
                   lambda x, g, kernel, stride, padding: K.maxpool2d_bwd(
                       np.ascontiguousarray(x), np.ascontiguousarray(g), *_pool_args(kernel, stride, padding))))
register(Primitive("avg_pool", "opaque", _pool_infer("avg_pool"),
                   lambda x, kernel, stride, padding: K.avgpool2d_fwd(np.ascontiguousarray(x),
                                                                      *_pool_args(kernel, stride, padding)),
                   lambda g, y, x, kernel, stride, padding: [F.avg_pool_grad(g, x.shape, kernel, stride, padding)],
                   cost_fn=lambda n: (n.inputs[0].size, n.nbytes + n.inputs[0].nbytes)))
register(Primitive("avg_pool_grad", "opaque", lambda s, d, a: (tuple(a["x_shape"]), d[0]),
                   lambda g, x_shape, kernel, stride, padding: K.avgpool2d_bwd(
                       np.ascontiguousarray(g), *x_shape, *_pool_args(kernel, stride, padding))))


# ----------------------------------------------------------------------------------------------
# softmax family, cross entropy, layer norm
# ----------------------------------------------------------------------------------------------
def _last_axis_2d(fn):
    """Apply a (N, C) last-axis kernel to any tensor along ``axis`` (moved last, then restored)."""
    def kernel(*arrays, axis):
        x0 = arrays[0]
        ax = axis % x0.ndim
        moved = [np.moveaxis(a, ax, -1) for a in arrays]
        shp = moved[0].shape
        flat = [np.ascontiguousarray(m.reshape(-1, shp[-1])) for m in moved]
        out = fn(*flat).reshape(shp)
        return np.moveaxis(out, -1, ax) if ax != x0.ndim - 1 else out
    return kernel


def _axis_infer(name):
    def infer(shapes, dtypes, attrs):
        normalize_axes(attrs["axis"], len(shapes[0]), name)
        if not _is_float(dtypes[0]):
            raise ShapeError(f"{name}: expects a float tensor")
        if len(shapes) > 1 and tuple(shapes[1]) != tuple(shapes[0]):
            raise ShapeError(f"{name}: shapes {tuple(shapes[0])} and {tuple(shapes[1])} differ")
        return shapes[0], dtypes[0]
    return infer


register(Primitive("softmax", "opaque", _axis_infer("softmax"), _last_axis_2d(K.softmax_fwd),
                   lambda g, y, x, axis: [F.softmax_grad(y, g, axis)], flops_per_element=5))
register(Primitive("softmax_grad", "opaque", _axis_infer("softmax_grad"), _last_axis_2d(K.softmax_bwd),
                   flops_per_element=4))
register(Primitive("log_softmax", "opaque", _axis_infer("log_softmax"), _last_axis_2d(K.log_softmax_fwd),
                   lambda g, y, x, axis: [F.log_softmax_grad(y, g, axis)], flops_per_element=5))
register(Primitive("log_softmax_grad", "opaque", _axis_infer("log_softmax_grad"),
                   _last_axis_2d(K.log_softmax_bwd), flops_per_element=4))


def _xent_check(shapes, dtypes, sparse, name):
    ls, ys = tuple(shapes[0]), tuple(shapes[1])
    if len(ls) != 2:
        raise ShapeError(f"{name}: logits must be (batch, classes), got {ls}")
    if not _is_float(dtypes[0]):
        raise ShapeError(f"{name}: logits must be float, got {np.dtype(dtypes[0])}")
    if sparse:
        if ys != (ls[0],) or np.dtype(dtypes[1]).kind not in "iu":
            raise ShapeError(f"{name}: sparse labels must be integer class ids of shape ({ls[0]},), "
                             f"got {ys} {np.dtype(dtypes[1])} for logits {ls}")
    elif ys != ls or np.dtype(dtypes[1]) != np.dtype(dtypes[0]):
        raise ShapeError(f"{name}: one-hot labels must match the logits {ls} {np.dtype(dtypes[0])}, "
                         f"got {ys} {np.dtype(dtypes[1])}")
    return ls


def _xent_infer(shapes, dtypes, attrs):
    ls = _xent_check(shapes, dtypes, attrs["sparse"], "softmax_cross_entropy")
    return (ls[0],), dtypes[0]


def _xent_kernel(logits, labels, sparse):
    logits = np.ascontiguousarray(logits)
    if sparse:
        return K.softmax_xent_sparse_fwd(logits, np.ascontiguousarray(labels))
    return K.softmax_xent_dense_fwd(logits, np.ascontiguousarray(labels))


def _xent_grad_infer(shapes, dtypes, attrs):
    ls = _xent_check(shapes, dtypes, attrs["sparse"], "softmax_cross_entropy_grad")
    return ls, dtypes[0]


def _xent_grad_kernel(logits, labels, g, sparse):
    logits, g = np.ascontiguousarray(logits), np.ascontiguousarray(g)
    if sparse:
        return K.softmax_xent_sparse_bwd(logits, np.ascontiguousarray(labels), g)
    return K.softmax_xent_dense_bwd(logits, np.ascontiguousarray(labels), g)


def _xent_grad(g, y, logits, labels, sparse):
    d_logits = F.softmax_cross_entropy_grad(logits, labels, g, sparse)
    if sparse:
        return [d_logits, None]
    # dense targets are differentiable: d/d labels of -sum(labels * log_softmax(logits)) per row
    return [d_logits, F.mul(F.neg(F.log_softmax(logits)), F.reshape(g, (g.shape[0], 1)))]


register(Primitive("softmax_cross_entropy", "opaque", _xent_infer, _xent_kernel, _xent_grad,
                   cost_fn=lambda n: (6 * n.inputs[0].size, n.nbytes + n.inputs[0].nbytes + n.inputs[1].nbytes)))
register(Primitive("softmax_cross_entropy_grad", "opaque", _xent_grad_infer, _xent_grad_kernel,
                   cost_fn=lambda n: (6 * n.size, 2 * n.nbytes + n.inputs[1].nbytes)))


def _ln_infer(shapes, dtypes, attrs):
    xs = tuple(shapes[0])
    d = xs[-1] if xs else None
    for what, s in (("gamma", shapes[1]), ("beta", shapes[2])):
        if len(xs) < 1 or tuple(s) != (d,):
            raise ShapeError(f"layer_norm: {what} must have shape ({d},) for input {xs}, got {tuple(s)}")
    return xs, dtypes[0]


def _ln_kernel(x, gamma, beta, eps):
    d = x.shape[-1]
    y = K.layernorm_fwd(np.ascontiguousarray(x.reshape(-1, d)), np.ascontiguousarray(gamma),
                        np.ascontiguousarray(beta), eps)
    return y.reshape(x.shape)


def _ln_grad(g, y, x, gamma, beta, eps):
    gp = F.layer_norm_grad_params(x, g, eps)
    d = x.shape[-1]
    return [F.layer_norm_grad(x, gamma, g, eps),
            F.reshape(F.slice(gp, (0, 0), (1, d)), (d,)),
            F.reshape(F.slice(gp, (1, 0), (2, d)), (d,))]


def _ln_grad_infer(shapes, dtypes, attrs):
    xs = tuple(shapes[0])
    if tuple(shapes[1]) != (xs[-1],) or tuple(shapes[2]) != xs:
        raise ShapeError(f"layer_norm_grad: expects x {xs}, gamma ({xs[-1]},) and dy {xs}")
    return xs, dtypes[0]


def _ln_grad_kernel(x, gamma, g, eps):
    d = x.shape[-1]
    return K.layernorm_bwd(np.ascontiguousarray(x.reshape(-1, d)), np.ascontiguousarray(gamma),
                           np.ascontiguousarray(g.reshape(-1, d)), eps).reshape(x.shape)


def _ln_gp_infer(shapes, dtypes, attrs):
    xs = tuple(shapes[0])
    if tuple(shapes[1]) != xs:
        raise ShapeError(f"layer_norm_grad_params: x {xs} and dy {tuple(shapes[1])} differ")
    return (2, xs[-1]), dtypes[0]


def _ln_gp_kernel(x, g, eps):
    d = x.shape[-1]
    return K.layernorm_bwd_params(np.ascontiguousarray(x.reshape(-1, d)),
                                  np.ascontiguousarray(g.reshape(-1, d)), eps)


register(Primitive("layer_norm", "opaque", _ln_infer, _ln_kernel, _ln_grad, flops_per_element=8))
register(Primitive("layer_norm_grad", "opaque", _ln_grad_infer, _ln_grad_kernel, flops_per_element=12))
register(Primitive("layer_norm_grad_params", "opaque", _ln_gp_infer, _ln_gp_kernel,
                   cost_fn=lambda n: (4 * n.inputs[0].size, n.inputs[0].nbytes * 2 + n.nbytes)))


# ----------------------------------------------------------------------------------------------
# batch norm (training mode: statistics of the batch over every axis but 1, computed in the kernel)
# ----------------------------------------------------------------------------------------------
def _bn_x_check(name, xs, dt):
    if len(xs) < 2:
        raise ShapeError(f"{name}: expects an (N, C, ...) input, got {xs}")
    if not _is_float(dt):
        raise ShapeError(f"{name}: expects a float input, got {np.dtype(dt)}")
    return xs[1]


def _bn_infer(shapes, dtypes, attrs):
    xs = tuple(shapes[0])
    c = _bn_x_check("batch_norm", xs, dtypes[0])
    for what, s in (("gamma", shapes[1]), ("beta", shapes[2])):
        if tuple(s) != (c,):
            raise ShapeError(f"batch_norm: {what} must have shape ({c},) for input {xs}, got {tuple(s)}")
    return xs, dtypes[0]


def batch_norm(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm: per channel (axis 1), (x - mean) / sqrt(var + eps) * gamma + beta with the
    batch's mean and biased variance."""
    return bind("batch_norm", [F._t(x), F._t(gamma), F._t(beta)], {"eps": float(eps)})


def batch_norm_grad(x, gamma, g, eps):
    return bind("batch_norm_grad", [F._t(x), F._t(gamma), F._t(g)], {"eps": float(eps)})


def batch_norm_grad_params(x, g, eps):
    return bind("batch_norm_grad_params", [F._t(x), F._t(g)], {"eps": float(eps)})


def batch_norm_stats(x):
    """(2, C): the batch mean and the unbiased batch variance per channel (for the moving statistics)."""
    return bind("batch_norm_stats", [F._t(x)])


def batch_norm_moving(moving, stats, row, momentum):
    """moving * momentum + stats[row] * (1 - momentum) (MindSpore's convention for ``momentum``)."""
    return bind("batch_norm_moving", [F._t(moving), F._t(stats)], {"row": int(row), "momentum": float(momentum)})


def _bn_grad(g, y, x, gamma, beta, eps):
    gp = batch_norm_grad_params(x, g, eps)
    c = x.shape[1]
    return [batch_norm_grad(x, gamma, g, eps),
            F.reshape(F.slice(gp, (0, 0), (1, c)), (c,)),
            F.reshape(F.slice(gp, (1, 0), (2, c)), (c,))]


def _bn_grad_infer(shapes, dtypes, attrs):
    xs = tuple(shapes[0])
    c = _bn_x_check("batch_norm_grad", xs, dtypes[0])
    if tuple(shapes[1]) != (c,) or tuple(shapes[2]) != xs:
        raise ShapeError(f"batch_norm_grad: expects x {xs}, gamma ({c},) and dy {xs}, "
                         f"got gamma {tuple(shapes[1])} and dy {tuple(shapes[2])}")
    return xs, dtypes[0]


def _bn_stats_shape(name, n_dy):
    def infer(shapes, dtypes, attrs):
        xs = tuple(shapes[0])
        c = _bn_x_check(name, xs, dtypes[0])
        if n_dy and tuple(shapes[1]) != xs:
            raise ShapeError(f"{name}: x {xs} and dy {tuple(shapes[1])} differ")
        return (2, c), dtypes[0]
    return infer


def _bn_moving_infer(shapes, dtypes, attrs):
    ms, ss = tuple(shapes[0]), tuple(shapes[1])
    if len(ms) != 1 or ss != (2, ms[0]) or np.dtype(dtypes[0]) != np.dtype(dtypes[1]):
        raise ShapeError(f"batch_norm_moving: expects a moving statistic (C,) and stats (2, C) of one dtype, "
                         f"got {ms} {np.dtype(dtypes[0])} and {ss} {np.dtype(dtypes[1])}")
    if attrs["row"] not in (0, 1):
        raise ShapeError(f"batch_norm_moving: row must be 0 (mean) or 1 (variance), got {attrs['row']}")
    return ms, dtypes[0]


def _bn_moving_kernel(moving, stats, row, momentum):
    m = np.asarray(momentum, dtype=moving.dtype)
    return moving * m + stats[row] * np.asarray(1.0 - momentum, dtype=moving.dtype)


_bn_bytes = lambda n: n.nbytes + sum(i.nbytes for i in n.inputs)  # noqa: E731
register(Primitive("batch_norm", "opaque", _bn_infer,
                   lambda x, gamma, beta, eps: K.batchnorm_fwd(x, gamma, beta, eps), _bn_grad,
                   cost_fn=lambda n: (8 * n.size, _bn_bytes(n) + n.inputs[0].nbytes)))  # stats pass re-reads x
register(Primitive("batch_norm_grad", "opaque", _bn_grad_infer,
                   lambda x, gamma, g, eps: K.batchnorm_bwd(x, gamma, g, eps),
                   cost_fn=lambda n: (12 * n.size, _bn_bytes(n) + n.inputs[0].nbytes)))
register(Primitive("batch_norm_grad_params", "opaque", _bn_stats_shape("batch_norm_grad_params", True),
                   lambda x, g, eps: K.batchnorm_bwd_params(x, g, eps),
                   cost_fn=lambda n: (6 * n.inputs[0].size, _bn_bytes(n) + n.inputs[0].nbytes)))
register(Primitive("batch_norm_stats", "opaque", _bn_stats_shape("batch_norm_stats", False),
                   lambda x: K.batchnorm_stats(x),
                   cost_fn=lambda n: (3 * n.inputs[0].size, _bn_bytes(n) + n.inputs[0].nbytes)))
register(Primitive("batch_norm_moving", "opaque", _bn_moving_infer, _bn_moving_kernel, flops_per_element=3))


# ----------------------------------------------------------------------------------------------
# one-hot, gather (embedding), dropout
# ----------------------------------------------------------------------------------------------
def _one_hot_infer(shapes, dtypes, attrs):
    if np.dtype(dtypes[0]).kind not in "iu":
        raise ShapeError(f"one_hot: indices must be integers, got {np.dtype(dtypes[0])}")
    return tuple(shapes[0]) + (attrs["depth"],), np.dtype(attrs["dtype"])


def _one_hot_kernel(idx, depth, dtype):
    if idx.size and (idx.min() < 0 or idx.max() >= depth):
        bad = idx[(idx < 0) | (idx >= depth)].ravel()[0]
        raise IndexError(f"one_hot: index {bad} is outside [0, {depth})")
    return np.eye(depth, dtype=dtype)[idx]


register(Primitive("one_hot", "injective", _one_hot_infer, _one_hot_kernel,
                   lambda g, y, idx, depth, dtype: [None]))


def _gather_infer(shapes, dtypes, attrs):
    ts, ix = tuple(shapes[0]), tuple(shapes[1])
    if len(ts) < 1:
        raise ShapeError("gather: the table must have at least one axis")
    if np.dtype(dtypes[1]).kind not in "iu":
        raise ShapeError(f"gather: indices must be integers, got {np.dtype(dtypes[1])}")
    return ix + ts[1:], dtypes[0]


def _gather_kernel(table, idx):
    if table.ndim == 2 and _is_float(table.dtype):
        out = K.embedding_gather(np.ascontiguousarray(table), np.ascontiguousarray(idx.ravel()))
        return out.reshape(idx.shape + table.shape[1:])
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
        bad = idx[(idx < 0) | (idx >= table.shape[0])].ravel()[0]
        raise IndexError(f"gather: index {bad} is outside a table of {table.shape[0]} rows")
    return table[idx]


def _gather_grad(g, y, table, idx):
    return [F.gather_grad(idx, g, table.shape[0]), None]


register(Primitive("gather", "opaque", _gather_infer, _gather_kernel, _gather_grad,
                   cost_fn=lambda n: (0, 2 * n.nbytes + n.inputs[1].nbytes)))


def _gather_grad_infer(shapes, dtypes, attrs):
    ix, gs = tuple(shapes[0]), tuple(shapes[1])
    if gs[:len(ix)] != ix:
        raise ShapeError(f"gather_grad: gradient {gs} does not start with the indices' shape {ix}")
    return (attrs["num_rows"],) + gs[len(ix):], dtypes[1]


def _gather_grad_kernel(idx, g, num_rows):
    flat_idx = np.ascontiguousarray(idx.ravel())
    rows = np.ascontiguousarray(g.reshape(flat_idx.size, -1))
    out = K.embedding_scatter_add(flat_idx, rows, num_rows)
    return out.reshape((num_rows,) + g.shape[idx.ndim:])


register(Primitive("gather_grad", "opaque", _gather_grad_infer, _gather_grad_kernel,
                   cost_fn=lambda n: (n.inputs[1].size, n.nbytes + n.inputs[1].nbytes)))


def _dropout_mask_kernel(shape, keep_prob, dtype, _rng):
    keep = _rng.random(shape, dtype=np.float32) < keep_prob
    return keep.astype(dtype) * np.asarray(1.0 / keep_prob, dtype=dtype)


register(Primitive("dropout_mask", "source", lambda s, d, a: (tuple(a["shape"]), np.dtype(a["dtype"])),
                   _dropout_mask_kernel))


# ----------------------------------------------------------------------------------------------
# side effects (in-place updates of variables)
# ----------------------------------------------------------------------------------------------
def _assign_infer(shapes, dtypes, attrs):
    if tuple(shapes[0]) != tuple(shapes[1]) or np.dtype(dtypes[0]) != np.dtype(dtypes[1]):
        raise ShapeError(f"assign: value {tuple(shapes[1])} {np.dtype(dtypes[1])} does not match the variable "
                         f"{tuple(shapes[0])} {np.dtype(dtypes[0])}")
    return shapes[0], dtypes[0]


def _assign_kernel(var, value):
    np.copyto(var, value)
    return var


register(Primitive("assign", "effect", _assign_infer, _assign_kernel))


def _scatter_infer(shapes, dtypes, attrs):
    vs, ix, rs = tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2])
    if len(ix) != 1 or rs != ix + vs[1:]:
        raise ShapeError(f"scatter_add_rows: rows {rs} must be (len(indices),) + {vs[1:]} for indices {ix}")
    return vs, dtypes[0]


def _scatter_kernel(var, idx, rows):
    K.scatter_add_rows_inplace(var, np.ascontiguousarray(idx), np.ascontiguousarray(rows))
    return var


register(Primitive("scatter_add_rows", "effect", _scatter_infer, _scatter_kernel))


# ----------------------------------------------------------------------------------------------
# sparse-gradient helpers (static shapes: padded to the number of occurrences)
# ----------------------------------------------------------------------------------------------
def _ids_check(name):
    def infer(shapes, dtypes, attrs):
        if len(shapes[0]) != 1 or np.dtype(dtypes[0]).kind not in "iu":
            raise ShapeError(f"{name}: expects 1-d integer ids, got {tuple(shapes[0])} {np.dtype(dtypes[0])}")
        if name == "unique_rows_sum":
            if tuple(shapes[1])[:1] != tuple(shapes[0]):
                raise ShapeError(f"{name}: rows {tuple(shapes[1])} do not match ids {tuple(shapes[0])}")
            return shapes[1], dtypes[1]
        return shapes[0], (np.dtype(np.int64) if name == "unique_ids" else np.dtype(np.bool_))
    return infer


def _unique_ids(ids):
    u = np.unique(ids).astype(np.int64)
    out = np.zeros(ids.shape[0], np.int64)
    out[: u.size] = u
    return out


def _unique_rows_sum(ids, rows):
    flat = np.ascontiguousarray(rows.reshape(rows.shape[0], -1))
    _, summed = K.segment_sum_rows(np.ascontiguousarray(ids), flat)
    out = np.zeros_like(flat)
    out[: summed.shape[0]] = summed
    return out.reshape(rows.shape)


def _unique_mask(ids):
    out = np.zeros(ids.shape[0], np.bool_)
    out[: np.unique(ids).size] = True
    return out


register(Primitive("unique_ids", "opaque", _ids_check("unique_ids"), _unique_ids))
register(Primitive("unique_rows_sum", "opaque", _ids_check("unique_rows_sum"), _unique_rows_sum))
register(Primitive("unique_mask", "opaque", _ids_check("unique_mask"), _unique_mask))


# ----------------------------------------------------------------------------------------------
# host <-> device copies (inserted by the placement pass; a real memcpy)
# ----------------------------------------------------------------------------------------------
def _copy(x):
    return np.array(x, copy=True, order="C")


register(Primitive("copy_h2d", "copy", lambda s, d, a: (s[0], d[0]), _copy,
                   cost_fn=lambda n: (0, 2 * n.nbytes)))
register(Primitive("copy_d2h", "copy", lambda s, d, a: (s[0], d[0]), _copy,
                   cost_fn=lambda n: (0, 2 * n.nbytes)))
