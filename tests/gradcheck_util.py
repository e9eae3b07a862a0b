"""Finite-difference gradient checking for the runtime (float64).

A check is described by ``fn`` (a zero-argument callable that computes a Tensor from some
Parameters it closes over) and ``params`` (the Parameters to differentiate with respect to).
The scalar that is differentiated is ``L = sum(fn() * R)`` for a fixed random ``R``.

* ``graph_grads``  -- trace ``L`` with a GraphBuilder, append the IR backward with
  ``autodiff.grad``, compile with ``CompiledGraph`` and run it (GRAPH_MODE path);
* ``eager_grads``  -- run ``fn`` eagerly while a ``Tape`` records, then ``grad_eager``
  (PYNATIVE_MODE path);
* ``numeric_grads`` -- central differences, perturbing each Parameter's storage in place.
"""
from __future__ import annotations

import numpy as np

from runtime import core
from runtime.autodiff import grad, grad_eager
from runtime.core import GraphBuilder, Tensor, building
from runtime.compiler import compile as compile_graph
from runtime.ir.graph import Graph
from runtime.nn.parameter import Parameter
from runtime.ops import api as F

EPS = 1e-6
RTOL = 1e-5
ATOL = 1e-7


def param(x, name=None) -> Parameter:
    """A float64 (or other dtype, if ``x`` already is an ndarray) Parameter leaf."""
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
    p = Parameter(arr, name=name)
    assert p.dtype == arr.dtype
    return p


def _scalar(out: Tensor, r: np.ndarray) -> Tensor:
    if out.dtype != np.float64:
        raise AssertionError(f"gradcheck expects a float64 output, got {out.dtype}")
    if tuple(out.shape) != r.shape:
        raise AssertionError(f"output shape {out.shape} does not match R {r.shape}")
    return F.reduce_sum(F.mul(out, Tensor(r)))


def weights_for(fn, seed=1234) -> np.ndarray:
    """The fixed random cotangent R, shaped like fn()'s output (computed once, eagerly)."""
    out = fn()
    rng = np.random.default_rng(seed)
    return rng.standard_normal(out.shape).astype(np.float64)


def graph_grads(fn, params, r) -> tuple[float, list[np.ndarray]]:
    graph = Graph("gradcheck")
    builder = GraphBuilder(graph)
    with building(builder):
        loss = _scalar(fn(), r)
        gs = grad(loss, list(params))
    graph.outputs["loss"] = loss.node
    const = {}
    for k, g in enumerate(gs):
        if g.is_symbolic:
            graph.outputs[f"g{k}"] = g.node
        else:  # an unused parameter: autodiff returns concrete zeros
            const[k] = g.asnumpy()
    graph.verify()
    res = compile_graph(graph)({})
    grads = [const[k] if k in const else np.asarray(res[f"g{k}"]) for k in range(len(gs))]
    return float(res["loss"]), grads


def eager_grads(fn, params, r) -> tuple[float, list[np.ndarray]]:
    tape = core.Tape()
    with core.recording(tape):
        loss = _scalar(fn(), r)
    gs = grad_eager(tape, loss, list(params))
    return float(loss.asnumpy()), [g.asnumpy() for g in gs]


def eager_loss(fn, r) -> float:
    return float(np.sum(fn().asnumpy() * r))


def numeric_grads(fn, params, r, eps=EPS) -> list[np.ndarray]:
    out = []
    for p in params:
        data = p.data
        g = np.zeros(data.shape, dtype=np.float64)
        flat = data.reshape(-1)  # a view: Parameters are contiguous
        assert np.shares_memory(flat, data)
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            fp = eager_loss(fn, r)
            flat[i] = orig - eps
            fm = eager_loss(fn, r)
            flat[i] = orig
            g.reshape(-1)[i] = (fp - fm) / (2 * eps)
        out.append(g)
    return out


def check_gradients(fn, params, names=None, *, rtol=RTOL, atol=ATOL, eps=EPS, seed=1234):
    """Assert GRAPH == PYNATIVE gradients and both == central differences. Returns the grads."""
    params = list(params)
    names = names or [getattr(p, "name", f"p{k}") for k, p in enumerate(params)]
    for p in params:
        assert p.dtype == np.float64, f"{p!r}: gradcheck needs float64 parameters"
    r = weights_for(fn, seed)
    before = [p.data.copy() for p in params]
    loss_g, g_graph = graph_grads(fn, params, r)
    loss_e, g_eager = eager_grads(fn, params, r)
    g_num = numeric_grads(fn, params, r, eps)
    for p, b in zip(params, before):  # the checks must not disturb the parameters
        np.testing.assert_array_equal(p.data, b)
    np.testing.assert_allclose(loss_g, loss_e, rtol=1e-12, atol=1e-12, err_msg="GRAPH vs PYNATIVE loss")
    for name, p, gg, ge, gn in zip(names, params, g_graph, g_eager, g_num):
        assert gg.shape == p.shape, f"{name}: GRAPH grad shape {gg.shape} != {p.shape}"
        assert ge.shape == p.shape, f"{name}: PYNATIVE grad shape {ge.shape} != {p.shape}"
        assert gg.dtype == np.float64 and ge.dtype == np.float64, f"{name}: grad dtype {gg.dtype}/{ge.dtype}"
        np.testing.assert_allclose(gg, ge, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name}: GRAPH and PYNATIVE gradients differ")
        np.testing.assert_allclose(gg, gn, rtol=rtol, atol=atol,
                                   err_msg=f"{name}: analytic (IR autodiff) vs central differences")
    return g_graph
