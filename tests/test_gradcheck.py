"""Finite-difference gradient checks (float64) for every differentiable primitive and for whole Cells.

For each case the scalar ``L = sum(out * R)`` (R fixed, random) is differentiated three ways:
IR autodiff in a compiled graph (GRAPH_MODE), IR autodiff on a PYNATIVE tape, and central
differences. See ``tests/gradcheck_util.py``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401  (registers the primitives)
from runtime import nn  # noqa: E402
from runtime.core import Tensor  # noqa: E402
from runtime.ops import api as F  # noqa: E402
from runtime.ops.registry import all_primitives, get_primitive  # noqa: E402

from gradcheck_util import check_gradients, eager_grads, graph_grads, param  # noqa: E402

F64 = np.float64


# ----------------------------------------------------------------------------------------------
# input generators (deterministic per case)
# ----------------------------------------------------------------------------------------------
def _rng(key: str) -> np.random.Generator:
    import zlib
    return np.random.default_rng(zlib.crc32(key.encode()))


def randn(rng, shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def positive(rng, shape, lo=0.5, hi=2.0):
    return rng.uniform(lo, hi, shape)


def away_from_zero(rng, shape, lo=0.1, hi=1.5):
    """Random sign, magnitude in [lo, hi]: no input sits near a kink at 0."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(lo, hi, shape)


def distinct(rng, shape, gap=0.05):
    """Values whose pairwise gaps are >= ``gap`` (no ties for max / argmax / max_pool)."""
    n = int(np.prod(shape, dtype=np.int64))
    vals = (np.arange(n) - n / 2) * gap * 2 + rng.uniform(-gap / 2, gap / 2, n)
    return rng.permutation(vals).reshape(shape)


def separated_pair(rng, sa, sb, gap=0.1):
    """(a, b) with |a - b| >= gap everywhere after broadcasting (no ties for maximum/minimum)."""
    for _ in range(1000):
        a, b = randn(rng, sa, 2.0), randn(rng, sb, 2.0)
        if np.abs(np.asarray(a) - np.asarray(b)).min() >= gap:
            return a, b
    raise AssertionError("could not draw a separated pair")


# ----------------------------------------------------------------------------------------------
# the primitive table
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    prim: str
    id: str
    build: Callable  # rng -> (fn, params); fn() -> float64 Tensor computed from the params
    marks: tuple = field(default_factory=tuple)


CASES: list[Case] = []


def case(prim, id_, marks=()):
    def deco(build):
        CASES.append(Case(prim, f"{prim}-{id_}", build, tuple(marks)))
        return build
    return deco


def unary_case(prim, id_, op, gen, shape=(3, 4), marks=()):
    def build(rng):
        x = param(gen(rng, shape))
        return (lambda: op(x)), [x]
    CASES.append(Case(prim, f"{prim}-{id_}", build, tuple(marks)))


# -- elementwise unary ---------------------------------------------------------------------------
unary_case("neg", "3x4", F.neg, randn)
unary_case("exp", "3x4", F.exp, randn)
unary_case("log", "positive", F.log, positive)
unary_case("sqrt", "positive", F.sqrt, positive)
unary_case("rsqrt", "positive", F.rsqrt, positive)
unary_case("tanh", "3x4", F.tanh, lambda r, s: randn(r, s, 1.5))
unary_case("sigmoid", "both_signs", F.sigmoid, lambda r, s: randn(r, s, 3.0))
unary_case("relu", "away_from_0", F.relu, away_from_zero)
unary_case("relu", "3d", F.relu, away_from_zero, shape=(2, 3, 4))
unary_case("gelu", "3x4", F.gelu, lambda r, s: randn(r, s, 2.0))
unary_case("abs", "away_from_0", F.abs, away_from_zero)
unary_case("sign", "away_from_0_zero_grad", lambda x: F.mul(F.sign(x), x), away_from_zero)
unary_case("square", "3x4", F.square, randn)
unary_case("reciprocal", "away_from_0", F.reciprocal, lambda r, s: away_from_zero(r, s, 0.5, 2.0))
unary_case("leaky_relu", "alpha0.2", lambda x: F.leaky_relu(x, 0.2), away_from_zero)
unary_case("leaky_relu", "alpha0.01", lambda x: F.leaky_relu(x, 0.01), away_from_zero)
unary_case("elu", "alpha1", lambda x: F.elu(x, 1.0), away_from_zero)
unary_case("elu", "alpha0.5", lambda x: F.elu(x, 0.5), away_from_zero)
unary_case("cast", "f64_to_f64", lambda x: F.cast(x, F64), randn)


# -- elementwise binary (broadcasting) --------------------------------------------------------------
BCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), (3, 1)), ((3, 1), (3, 4)), ((4,), (3, 4)), ((1, 4), (3, 1)),
         ((2, 1, 4), (3, 1)), ((3, 4), ())]


def _sid(s):
    return "x".join(map(str, s)) or "scalar"


def binary_cases(prim, op, gen_a, gen_b, shapes=BCAST, pair=None):
    for sa, sb in shapes:
        def build(rng, sa=sa, sb=sb):
            if pair is not None:
                a, b = pair(rng, sa, sb)
            else:
                a, b = gen_a(rng, sa), gen_b(rng, sb)
            pa, pb = param(a), param(b)
            return (lambda: op(pa, pb)), [pa, pb]
        CASES.append(Case(prim, f"{prim}-{_sid(sa)}_{_sid(sb)}", build))


binary_cases("add", F.add, randn, randn)
binary_cases("sub", F.sub, randn, randn)
binary_cases("mul", F.mul, randn, randn)
binary_cases("div", F.div, randn, lambda r, s: away_from_zero(r, s, 0.5, 2.0))
binary_cases("pow", F.pow, positive, lambda r, s: randn(r, s, 1.5))
binary_cases("maximum", F.maximum, None, None, pair=separated_pair)
binary_cases("minimum", F.minimum, None, None, pair=separated_pair)


@case("mul", "same_tensor_twice")
def _(rng):
    x = param(randn(rng, (3, 4)))
    return (lambda: F.mul(x, x)), [x]


@case("pow", "negative_base_const_exponent")
def _(rng):
    x = param(away_from_zero(rng, (3, 4)))
    return (lambda: F.add(F.pow(x, 2.0), F.pow(x, 3.0))), [x]


@case("add", "python_scalar")
def _(rng):
    x = param(randn(rng, (3, 4)))
    return (lambda: F.add(F.mul(x, 3.0), 1.5)), [x]


@case("sub", "scalar_minus_tensor")
def _(rng):
    x = param(randn(rng, (3, 4)))
    return (lambda: F.sub(2.0, x)), [x]


@case("div", "scalar_over_tensor")
def _(rng):
    x = param(away_from_zero(rng, (3, 4), 0.5, 2.0))
    return (lambda: F.div(1.0, x)), [x]


# comparisons: bool outputs, no gradient. Exercised through select(cmp(a, b), a, b) (the
# comparison is a constant mask for autodiff); the rules themselves are checked below.
COMPARISONS = {"equal": F.equal, "not_equal": F.not_equal, "less": F.less, "less_equal": F.less_equal,
               "greater": F.greater, "greater_equal": F.greater_equal}
for _name, _cmp in COMPARISONS.items():
    for _sa, _sb in [((3, 4), (3, 4)), ((3, 4), (4,))]:
        def _build(rng, cmp=_cmp, sa=_sa, sb=_sb):
            a, b = separated_pair(rng, sa, sb)
            pa, pb = param(a), param(b)
            return (lambda: F.select(cmp(pa, pb), F.mul(pa, 2.0), F.mul(pb, -3.0))), [pa, pb]
        CASES.append(Case(_name, f"{_name}-select_{_sid(_sa)}_{_sid(_sb)}", _build))


@case("select", "same_shape")
def _(rng):
    c = Tensor(rng.random((3, 4)) < 0.5)
    a, b = param(randn(rng, (3, 4))), param(randn(rng, (3, 4)))
    return (lambda: F.select(c, a, b)), [a, b]


@case("select", "bcast_cond3x4_a4_b3x1")
def _(rng):
    c = Tensor(rng.random((3, 4)) < 0.5)
    a, b = param(randn(rng, (4,))), param(randn(rng, (3, 1)))
    return (lambda: F.select(c, a, b)), [a, b]


@case("select", "bcast_cond3x1_a3x4_b_scalar")
def _(rng):
    c = Tensor(np.array([[True], [False], [True]]))
    a, b = param(randn(rng, (3, 4))), param(randn(rng, ()))
    return (lambda: F.select(c, a, b)), [a, b]


# -- reductions --------------------------------------------------------------------------------------
REDUCE_AXES = [None, 0, 1, -1, (0, 2), (1, 2), (0, 1, 2)]
for _name, _op, _gen in (("reduce_sum", F.reduce_sum, randn), ("reduce_mean", F.reduce_mean, randn),
                         ("reduce_max", F.reduce_max, distinct)):
    for _ax in REDUCE_AXES:
        for _kd in (False, True):
            def _build(rng, op=_op, gen=_gen, ax=_ax, kd=_kd):
                x = param(gen(rng, (2, 3, 4)))
                return (lambda: op(x, ax, keepdims=kd)), [x]
            _axid = "all" if _ax is None else (str(_ax) if isinstance(_ax, int) else "_".join(map(str, _ax)))
            CASES.append(Case(_name, f"{_name}-axis{_axid}-keepdims{int(_kd)}", _build))


@case("argmax", "one_hot_mask")
def _(rng):
    x = param(distinct(rng, (3, 5)))
    return (lambda: F.mul(F.one_hot(F.argmax(x, -1), 5, F64), x)), [x]


@case("argmax", "axis0")
def _(rng):
    x = param(distinct(rng, (4, 3)))
    return (lambda: F.mul(F.one_hot(F.argmax(x, 0), 4, F64), F.transpose(x))), [x]


@case("one_hot", "int64_ids_2d")
def _(rng):
    ids = Tensor(np.array([[0, 3, 3], [1, 0, 2]], dtype=np.int64))
    x = param(randn(rng, (2, 3, 4)))
    return (lambda: F.mul(F.one_hot(ids, 4, F64), x)), [x]


@case("one_hot", "int32_ids")
def _(rng):
    ids = Tensor(np.array([2, 0, 2, 1], dtype=np.int32))
    x = param(randn(rng, (4, 3)))
    return (lambda: F.mul(F.one_hot(ids, 3, F64), F.exp(x))), [x]


# -- shape ops ------------------------------------------------------------------------------------------
@case("reshape", "3x4_to_2x6")
def _(rng):
    x = param(randn(rng, (3, 4)))
    return (lambda: F.reshape(x, (2, 6))), [x]


@case("reshape", "2x3x4_to_minus1_x2")
def _(rng):
    x = param(randn(rng, (2, 3, 4)))
    return (lambda: F.mul(F.reshape(x, (-1, 2)), F.reshape(x, (12, 2)))), [x]


for _shape, _perm in (((3, 4), None), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (0, 2, 1)), ((2, 3, 4, 5), (3, 1, 0, 2))):
    def _build(rng, shape=_shape, perm=_perm):
        x = param(randn(rng, shape))
        return (lambda: F.transpose(x, perm)), [x]
    CASES.append(Case("transpose", f"transpose-{_sid(_shape)}-perm{'rev' if _perm is None else ''.join(map(str, _perm))}",
                      _build))

for _src, _dst in (((4,), (3, 4)), ((3, 1), (3, 4)), ((3, 1), (2, 3, 4)), ((1, 4), (2, 3, 4)), ((), (2, 3))):
    def _build(rng, src=_src, dst=_dst):
        x = param(randn(rng, src))
        return (lambda: F.broadcast_to(x, dst)), [x]
    CASES.append(Case("broadcast_to", f"broadcast_to-{_sid(_src)}_to_{_sid(_dst)}", _build))

for _ax in (0, 1, -1, 2):
    def _build(rng, ax=_ax):
        x = param(randn(rng, (3, 4)))
        return (lambda: F.expand_dims(x, ax)), [x]
    CASES.append(Case("expand_dims", f"expand_dims-axis{_ax}", _build))

for _ax in ((1,), (1, 3), -1, 0):
    def _build(rng, ax=_ax):
        shape = (1, 3, 4) if ax == 0 else (3, 1, 4, 1)
        x = param(randn(rng, shape))
        return (lambda: F.squeeze(x, ax)), [x]
    CASES.append(Case("squeeze", f"squeeze-axis{_ax if isinstance(_ax, int) else '_'.join(map(str, _ax))}", _build))


@case("slice", "2d")
def _(rng):
    x = param(randn(rng, (4, 5)))
    return (lambda: F.slice(x, (1, 0), (3, 4))), [x]


@case("slice", "3d_full_and_empty_margins")
def _(rng):
    x = param(randn(rng, (3, 4, 5)))
    return (lambda: F.slice(x, (0, 1, 2), (3, 4, 4))), [x]


@case("slice", "overlapping_slices")
def _(rng):
    x = param(randn(rng, (6, 3)))
    return (lambda: F.mul(F.slice(x, (0, 0), (4, 3)), F.slice(x, (2, 0), (6, 3)))), [x]


@case("pad", "2d")
def _(rng):
    x = param(randn(rng, (3, 4)))
    return (lambda: F.pad(x, ((1, 2), (0, 1)))), [x]


@case("pad", "4d_spatial")
def _(rng):
    x = param(randn(rng, (2, 2, 3, 3)))
    return (lambda: F.pad(x, ((0, 0), (0, 0), (1, 1), (2, 0)))), [x]


for _ax in (0, 1, -1):
    def _build(rng, ax=_ax):
        shapes = [(2, 3), (2, 3), (2, 3)]
        shapes = [tuple(k + 1 if i == ax % 2 else s for i, s in enumerate(sh)) for k, sh in enumerate(shapes)]
        xs = [param(randn(rng, s)) for s in shapes]
        return (lambda: F.concat(xs, ax)), xs
    CASES.append(Case("concat", f"concat-3_inputs-axis{_ax}", _build))


@case("concat", "same_tensor_twice")
def _(rng):
    x, y = param(randn(rng, (2, 3))), param(randn(rng, (1, 3)))
    return (lambda: F.concat([x, y, x], 0)), [x, y]


# -- matmul -------------------------------------------------------------------------------------------
for _ta in (False, True):
    for _tb in (False, True):
        def _build(rng, ta=_ta, tb=_tb):
            m, k, n = 3, 4, 5
            a = param(randn(rng, (k, m) if ta else (m, k)))
            b = param(randn(rng, (n, k) if tb else (k, n)))
            return (lambda: F.matmul(a, b, ta, tb)), [a, b]
        CASES.append(Case("matmul", f"matmul-ta{int(_ta)}_tb{int(_tb)}", _build))

        def _build_b(rng, ta=_ta, tb=_tb):
            m, k, n = 3, 4, 2
            a = param(randn(rng, (2, k, m) if ta else (2, m, k)))
            b = param(randn(rng, (2, n, k) if tb else (2, k, n)))
            return (lambda: F.batch_matmul(a, b, ta, tb)), [a, b]
        CASES.append(Case("batch_matmul", f"batch_matmul-ta{int(_ta)}_tb{int(_tb)}", _build_b))


@case("batch_matmul", "4d_batch")
def _(rng):
    a, b = param(randn(rng, (2, 2, 3, 4))), param(randn(rng, (2, 2, 4, 2)))
    return (lambda: F.matmul(a, b)), [a, b]


@case("matmul", "same_tensor_both_operands")
def _(rng):
    a = param(randn(rng, (3, 4)))
    return (lambda: F.matmul(a, a, False, True)), [a]


# -- convolution & pooling ------------------------------------------------------------------------------
CONV = [  # (x shape, w shape, stride, padding)
    ((2, 3, 5, 5), (4, 3, 3, 3), 2, 1),
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 0),
    ((1, 2, 6, 5), (3, 2, 3, 3), 1, 1),
    ((2, 2, 5, 6), (3, 2, 2, 3), (1, 2), (0, 1)),
    ((1, 2, 4, 4), (2, 2, 1, 1), 1, 0),
    ((1, 2, 3, 3), (2, 2, 1, 1), 1, 1),   # padding wider than the kernel: pure-padding border
    ((1, 2, 7, 7), (2, 2, 2, 2), 3, 0),   # stride > kernel: some inputs are never read
    ((1, 2, 6, 6), (2, 2, 3, 3), 2, 1),   # leftover rows/cols that no window reaches
]
for _xs, _ws, _s, _p in CONV:
    def _build(rng, xs=_xs, ws=_ws, s=_s, p=_p):
        x, w = param(randn(rng, xs)), param(randn(rng, ws, 0.5))
        return (lambda: F.conv2d(x, w, s, p)), [x, w]
    CASES.append(Case("conv2d", f"conv2d-x{_sid(_xs)}-w{_sid(_ws)}-s{_s}-p{_p}".replace(" ", ""), _build))

POOL = [  # (x shape, kernel, stride, padding)
    ((2, 2, 4, 4), 2, 2, 0),
    ((2, 2, 5, 5), 3, 2, 1),
    ((1, 2, 5, 6), (2, 3), (1, 2), (1, 1)),
    ((1, 1, 5, 5), 3, 1, 1),
    ((1, 2, 7, 7), 2, 3, 0),   # stride > kernel
    ((1, 1, 6, 6), 3, 2, 1),   # leftover rows/cols
]
for _name, _op in (("max_pool", F.max_pool), ("avg_pool", F.avg_pool)):
    for _xs, _k, _s, _p in POOL:
        def _build(rng, op=_op, xs=_xs, k=_k, s=_s, p=_p, name=_name):
            gen = distinct if name == "max_pool" else randn  # distinct: no ties inside a window
            x = param(gen(rng, xs))
            return (lambda: op(x, k, s, p)), [x]
        CASES.append(Case(_name, f"{_name}-x{_sid(_xs)}-k{_k}-s{_s}-p{_p}".replace(" ", ""), _build))


# -- softmax family, cross entropy, layer norm -------------------------------------------------------------
for _name, _op in (("softmax", F.softmax), ("log_softmax", F.log_softmax)):
    for _shape, _ax in (((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), 0), ((2, 3, 4), -1)):
        def _build(rng, op=_op, shape=_shape, ax=_ax):
            x = param(randn(rng, shape, 2.0))
            return (lambda: op(x, ax)), [x]
        CASES.append(Case(_name, f"{_name}-{_sid(_shape)}-axis{_ax}", _build))


@case("softmax_cross_entropy", "sparse_int64")
def _(rng):
    logits = param(randn(rng, (4, 5), 2.0))
    labels = Tensor(np.array([0, 4, 2, 2], dtype=np.int64))
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=True)), [logits]


@case("softmax_cross_entropy", "sparse_int32")
def _(rng):
    logits = param(randn(rng, (3, 4), 2.0))
    labels = Tensor(np.array([3, 0, 1], dtype=np.int32))
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=True)), [logits]


@case("softmax_cross_entropy", "dense_one_hot")
def _(rng):
    logits = param(randn(rng, (4, 5), 2.0))
    labels = Tensor(np.eye(5)[[1, 1, 3, 0]])
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=False)), [logits]


@case("softmax_cross_entropy", "dense_soft_labels")
def _(rng):
    logits = param(randn(rng, (3, 4), 2.0))
    p = rng.random((3, 4))
    labels = Tensor(p / p.sum(1, keepdims=True))
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=False)), [logits]


@case("softmax_cross_entropy", "dense_wrt_logits_and_labels")
def _(rng):
    logits = param(randn(rng, (3, 4), 2.0))
    p = rng.random((3, 4))
    labels = param(p / p.sum(1, keepdims=True))
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=False)), [logits, labels]


@case("softmax_cross_entropy", "dense_unnormalized_labels")
def _(rng):
    logits = param(randn(rng, (3, 4), 2.0))
    labels = Tensor(rng.random((3, 4)) * 2.0)  # rows do not sum to 1 (multi-label / unnormalized targets)
    return (lambda: F.softmax_cross_entropy(logits, labels, sparse=False)), [logits]


@case("layer_norm", "2d")
def _(rng):
    x, g, b = param(randn(rng, (3, 5), 2.0)), param(randn(rng, (5,))), param(randn(rng, (5,)))
    return (lambda: F.layer_norm(x, g, b, 1e-5)), [x, g, b]


@case("layer_norm", "1d")
def _(rng):
    x, g, b = param(randn(rng, (6,), 2.0)), param(randn(rng, (6,))), param(randn(rng, (6,)))
    return (lambda: F.layer_norm(x, g, b, 1e-5)), [x, g, b]


@case("layer_norm", "3d_eps1e-2")
def _(rng):
    x, g, b = param(randn(rng, (2, 3, 4))), param(randn(rng, (4,))), param(randn(rng, (4,)))
    return (lambda: F.layer_norm(x, g, b, 1e-2)), [x, g, b]


# -- batch norm (training mode, batch statistics inside the primitive) -----------------------------------------
def _bn_case(cid, x_shape, eps, shift=0.0):
    @case("batch_norm", cid)
    def _(rng):
        from runtime.ops import prims as P
        c = x_shape[1]
        x = param(randn(rng, x_shape, 2.0) + shift)
        g, b = param(randn(rng, (c,))), param(randn(rng, (c,)))
        return (lambda: P.batch_norm(x, g, b, eps)), [x, g, b]


_bn_case("nchw", (3, 2, 3, 2), 1e-5)
_bn_case("nc_batchnorm1d", (5, 3), 1e-5)
_bn_case("ncl_eps1e-1_offset", (2, 3, 4), 1e-1, shift=3.0)
_bn_case("one_sample_nchw", (1, 2, 2, 3), 1e-3)


# -- gather ---------------------------------------------------------------------------------------------------
@case("gather", "2d_table_dup_indices")
def _(rng):
    table = param(randn(rng, (5, 3)))
    ids = Tensor(np.array([[0, 2, 2], [4, 0, 2]], dtype=np.int64))
    return (lambda: F.gather(table, ids)), [table]


@case("gather", "2d_table_int32_1d_ids")
def _(rng):
    table = param(randn(rng, (4, 2)))
    ids = Tensor(np.array([3, 3, 1, 3], dtype=np.int32))
    return (lambda: F.gather(table, ids)), [table]


@case("gather", "3d_table_dup_indices")
def _(rng):
    table = param(randn(rng, (5, 2, 3)))
    ids = Tensor(np.array([1, 4, 1, 1], dtype=np.int64))
    return (lambda: F.gather(table, ids)), [table]


@case("gather", "1d_table")
def _(rng):
    table = param(randn(rng, (5,)))
    ids = Tensor(np.array([[1, 1], [0, 4]], dtype=np.int64))
    return (lambda: F.gather(table, ids)), [table]


# ----------------------------------------------------------------------------------------------
# primitive tests
# ----------------------------------------------------------------------------------------------
def _params(cases):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicate case ids: {dup}"


def _checked_elsewhere() -> set:
    """Primitives whose float64 check lives in a feature's own test file: ``extra["gradcheck"]`` names
    the file, which must exist and mention the primitive."""
    root = Path(__file__).resolve().parents[1]
    out = set()
    for name, p in all_primitives().items():
        f = p.extra.get("gradcheck")
        if f and (root / f).is_file() and name in (root / f).read_text():
            out.add(name)
    return out


def test_every_primitive_with_a_backward_rule_is_checked():
    with_grad = {name for name, p in all_primitives().items() if p.grad is not None}
    covered = {c.prim for c in CASES} | _checked_elsewhere()
    missing = sorted(with_grad - covered)
    extra = sorted(covered - with_grad)
    assert not missing, f"primitives with a backward rule but no gradient check: {missing}"
    assert not extra, f"gradient checks for primitives without a backward rule: {extra}"
    assert with_grad == covered


def test_every_case_uses_its_primitive():
    """Each case's forward actually contains the primitive it is filed under."""
    from runtime.core import GraphBuilder, building
    from runtime.ir.graph import Graph

    for c in CASES:
        fn, _ = c.build(_rng(c.id))
        g = Graph(c.id)
        with building(GraphBuilder(g)):
            fn()
        assert c.prim in g.op_counts(), f"{c.id}: the forward graph has no {c.prim!r} node: {g.op_counts()}"


@pytest.mark.parametrize("c", _params(CASES))
def test_primitive_gradient(c: Case):
    fn, params = c.build(_rng(c.id))
    check_gradients(fn, params, [f"{c.id}[{k}]" for k in range(len(params))])


NO_GRAD_PRIMS = sorted(set(COMPARISONS) | {"argmax", "one_hot", "sign"})


@pytest.mark.parametrize("name", NO_GRAD_PRIMS, ids=[f"{n}-rule_returns_None" for n in NO_GRAD_PRIMS])
def test_non_differentiable_rules_return_none(name):
    """Rules of ops with bool/int outputs (or zero derivative) give None for every input."""
    from runtime.core import GraphBuilder, building
    from runtime.ir.graph import Graph

    rng = _rng(name)
    with building(GraphBuilder(Graph(name))):
        if name in COMPARISONS:
            a, b = Tensor(randn(rng, (3, 4))), Tensor(randn(rng, (4,)))
            y = COMPARISONS[name](a, b)
            ins, attrs = [a, b], {}
        elif name == "argmax":
            a = Tensor(randn(rng, (3, 4)))
            y, ins, attrs = F.argmax(a, -1), [a], {"axis": -1}
        elif name == "one_hot":
            a = Tensor(np.array([0, 2, 1], dtype=np.int64))
            y, ins, attrs = F.one_hot(a, 3, F64), [a], {"depth": 3, "dtype": "float64"}
        else:
            a = Tensor(randn(rng, (3, 4)))
            y, ins, attrs = F.sign(a), [a], {}
        g = Tensor(np.ones(y.shape, F64))
        out = get_primitive(name).grad(g, y, *ins, **attrs)
    assert len(out) == len(ins) and all(o is None for o in out), out


def test_cast_f64_to_f32_roundtrip_gradient():
    """cast's gradient goes back to the input dtype: d sum(cast(cast(x, f32), f64) * R) / dx = R."""
    x = param(np.random.default_rng(0).standard_normal((3, 4)))
    r = np.random.default_rng(1).standard_normal((3, 4))
    fn = lambda: F.cast(F.cast(x, np.float32), F64)  # noqa: E731
    for path in (graph_grads, eager_grads):
        _, (gx,) = path(fn, [x], r)
        assert gx.dtype == np.float64
        np.testing.assert_allclose(gx, r.astype(np.float32).astype(np.float64), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# whole-Cell checks
# ----------------------------------------------------------------------------------------------
def _randomize(cell, rng, scale=0.5):
    """Give every parameter deterministic, non-trivial float64 values (init order independent)."""
    for p in cell.get_parameters():
        assert p.dtype == F64, f"{p.name} is {p.dtype}"
        if p.requires_grad:
            p.set_data(rng.standard_normal(p.shape) * scale + (1.0 if p.name.endswith("gamma") else 0.0))
    return cell


@dataclass
class CellCase:
    id: str
    build: Callable  # rng -> (fn, cell, inputs)


CELL_CASES: list[CellCase] = []


def cell_case(id_):
    def deco(build):
        CELL_CASES.append(CellCase(id_, build))
        return build
    return deco


@cell_case("Dense-bias-2d")
def _(rng):
    net = _randomize(nn.Dense(4, 3, dtype=F64), rng)
    x = param(randn(rng, (5, 4)))
    return (lambda: net(x)), net, [x]


@cell_case("Dense-nobias-3d")
def _(rng):
    net = _randomize(nn.Dense(4, 3, has_bias=False, dtype=F64), rng)
    x = param(randn(rng, (2, 3, 4)))
    return (lambda: net(x)), net, [x]


@cell_case("Dense-bias-3d-tanh")
def _(rng):
    net = _randomize(nn.Dense(4, 3, activation="tanh", dtype=F64), rng)
    x = param(randn(rng, (2, 3, 4)))
    return (lambda: net(x)), net, [x]


@cell_case("Conv2d-same-bias")
def _(rng):
    net = _randomize(nn.Conv2d(2, 3, 3, pad_mode="same", has_bias=True, dtype=F64), rng)
    x = param(randn(rng, (2, 2, 4, 4)))
    return (lambda: net(x)), net, [x]


@cell_case("Conv2d-valid-bias")
def _(rng):
    net = _randomize(nn.Conv2d(2, 3, 3, pad_mode="valid", has_bias=True, dtype=F64), rng)
    x = param(randn(rng, (2, 2, 5, 4)))
    return (lambda: net(x)), net, [x]


@cell_case("Conv2d-pad1-stride2-bias")
def _(rng):
    net = _randomize(nn.Conv2d(2, 3, 3, stride=2, pad_mode="pad", padding=1, has_bias=True, dtype=F64), rng)
    x = param(randn(rng, (2, 2, 5, 5)))
    return (lambda: net(x)), net, [x]


@cell_case("Conv2d-pad-nobias")
def _(rng):
    net = _randomize(nn.Conv2d(2, 3, (2, 3), pad_mode="pad", padding=(1, 0), dtype=F64), rng)
    x = param(randn(rng, (1, 2, 4, 5)))
    return (lambda: net(x)), net, [x]


@cell_case("BatchNorm1d-train")
def _(rng):
    net = _randomize(nn.BatchNorm1d(4, dtype=F64), rng).set_train(True)
    x = param(randn(rng, (6, 4), 2.0) + 1.0)
    return (lambda: net(x)), net, [x]


@cell_case("BatchNorm2d-train")
def _(rng):
    net = _randomize(nn.BatchNorm2d(3, dtype=F64), rng).set_train(True)
    x = param(randn(rng, (3, 3, 2, 3), 2.0) - 0.5)
    return (lambda: net(x)), net, [x]


@cell_case("BatchNorm2d-eval")
def _(rng):
    net = _randomize(nn.BatchNorm2d(3, dtype=F64), rng).set_train(False)
    net.moving_mean.set_data(randn(rng, (3,)))
    net.moving_variance.set_data(positive(rng, (3,)))
    x = param(randn(rng, (2, 3, 2, 2)))
    return (lambda: net(x)), net, [x]


@cell_case("LayerNorm-last_axis")
def _(rng):
    net = _randomize(nn.LayerNorm((5,), dtype=F64), rng)
    x = param(randn(rng, (2, 3, 5), 2.0))
    return (lambda: net(x)), net, [x]


@cell_case("LayerNorm-two_axes")
def _(rng):
    net = _randomize(nn.LayerNorm((3, 4), dtype=F64), rng)
    x = param(randn(rng, (2, 3, 4), 2.0))
    return (lambda: net(x)), net, [x]


@cell_case("Embedding-dup_ids")
def _(rng):
    net = _randomize(nn.Embedding(6, 3, dtype=F64), rng)
    ids = Tensor(np.array([[0, 5, 5, 2], [2, 2, 1, 0]], dtype=np.int64))
    return (lambda: net(ids)), net, []


class MLP(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Dense(6, 8, activation="relu", dtype=F64)
        self.fc2 = nn.Dense(8, 8, activation="gelu", dtype=F64)
        self.fc3 = nn.Dense(8, 4, dtype=F64)

    def construct(self, x):
        return self.fc3(self.fc2(self.fc1(x)))


class CNN(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, pad_mode="same", has_bias=True, dtype=F64)
        self.bn = nn.BatchNorm2d(3, dtype=F64)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(3, 4, 3, pad_mode="pad", padding=1, stride=2, dtype=F64)
        self.avg = nn.AvgPool2d(2, 1)
        self.flat = nn.Flatten()
        self.fc = nn.Dense(4, 3, dtype=F64)

    def construct(self, x):
        x = self.pool(self.relu(self.bn(self.conv1(x))))
        x = self.avg(F.tanh(self.conv2(x)))
        return self.fc(self.flat(x))


def _with_loss(net_cls, loss, x_shape, labels):
    def build(rng):
        net = _randomize(net_cls(), rng).set_train(True)
        x = param(randn(rng, x_shape))
        y = labels(rng) if callable(labels) else labels
        return (lambda: loss(net(x), y)), net, [x]
    return build


_sparse = Tensor(np.array([0, 3, 3, 1, 2], dtype=np.int64))
_one_hot = Tensor(np.eye(4)[[0, 3, 3, 1, 2]])
CELL_CASES += [
    CellCase("MLP-xent_sparse_mean",
             _with_loss(MLP, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), (5, 6), _sparse)),
    CellCase("MLP-xent_onehot_sum",
             _with_loss(MLP, nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="sum"), (5, 6), _one_hot)),
    CellCase("MLP-xent_onehot_none",
             _with_loss(MLP, nn.SoftmaxCrossEntropyWithLogits(sparse=False), (5, 6), _one_hot)),
    CellCase("MLP-mse_mean",
             _with_loss(MLP, nn.MSELoss(), (5, 6), lambda rng: Tensor(randn(rng, (5, 4))))),
    CellCase("CNN-xent_sparse_mean",
             _with_loss(CNN, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), (2, 2, 6, 6),
                        Tensor(np.array([2, 0], dtype=np.int64)))),
    CellCase("CNN-xent_onehot_mean",
             _with_loss(CNN, nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="mean"), (2, 2, 6, 6),
                        Tensor(np.eye(3)[[1, 1]]))),
    CellCase("CNN-mse_sum",
             _with_loss(CNN, nn.MSELoss(reduction="sum"), (2, 2, 6, 6),
                        lambda rng: Tensor(randn(rng, (2, 3))))),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id) for c in CELL_CASES])
def test_cell_gradient(c: CellCase):
    fn, net, inputs = c.build(_rng(c.id))
    trainable = net.trainable_params()
    assert trainable, f"{c.id}: no trainable parameters"
    frozen = [p.data.copy() for p in net.untrainable_params()]
    wrt = trainable + inputs
    names = [p.name for p in trainable] + [f"input{k}" for k in range(len(inputs))]
    check_gradients(fn, wrt, names)
    if not net.training:  # eval mode never touches the moving statistics
        for p, before in zip(net.untrainable_params(), frozen):
            np.testing.assert_array_equal(p.data, before)


def test_batchnorm_trainable_params_are_gamma_beta():
    bn = nn.BatchNorm2d(3, dtype=F64)
    assert sorted(p.name for p in bn.trainable_params()) == ["beta", "gamma"]
    assert sorted(p.name for p in bn.untrainable_params()) == ["moving_mean", "moving_variance"]


def test_batch_norm_primitives_reject_bad_shapes_by_name():
    from runtime.core import GraphBuilder, building
    from runtime.ir.graph import Graph
    from runtime.ops import prims as P
    from runtime.ops.registry import ShapeError

    with building(GraphBuilder(Graph("bn"))):
        x = Tensor(np.zeros((4, 3, 2, 2), np.float32))
        with pytest.raises(ShapeError, match=r"batch_norm: gamma must have shape \(3,\) for input \(4, 3, 2, 2\)"):
            P.batch_norm(x, Tensor(np.ones(4, np.float32)), Tensor(np.zeros(3, np.float32)))
        with pytest.raises(ShapeError, match=r"batch_norm_stats: expects an \(N, C, \.\.\.\) input, got \(4,\)"):
            P.batch_norm_stats(Tensor(np.zeros(4, np.float32)))
        stats = P.batch_norm_stats(x)
        assert stats.shape == (2, 3)
        with pytest.raises(ShapeError, match="batch_norm_moving: expects a moving statistic"):
            P.batch_norm_moving(Tensor(np.zeros(4, np.float32)), stats, 0, 0.9)
        with pytest.raises(ShapeError, match="batch_norm_moving: row must be 0"):
            P.batch_norm_moving(Tensor(np.zeros(3, np.float32)), stats, 2, 0.9)
