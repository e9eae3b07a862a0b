"""Primitives produced by graph-kernel fusion (``runtime/passes/graph_kernel``), run with ``runtime.codegen``.

* ``fused``        -- one generated kernel for a group of elementwise / broadcast / reduce ops.
                      attrs: ``_subgraph`` (the group, a ``runtime.codegen.SubGraph``), ``_program`` (its
                      kernel, attached by the ``build_kernels`` pass; built lazily otherwise), ``kernel`` (the
                      kernel's name, shown in dumps) and optionally ``_prologue``: per kernel input,
                      None or ``(matmul op, transpose_a, transpose_b)`` -- that input is a GEMM of the
                      next two node inputs, computed first (library call into a recycled buffer). With
                      one output the node *is* that output; with several it returns a tuple and
                      ``fused_get`` nodes pick the outputs. On the ``numpy`` backend the group is
                      evaluated op by op with the primitives' own kernels.
* ``fused_get``    -- output ``index`` of a multi-output ``fused`` node (no computation).
* ``fused_assign`` -- an in-place group output: computes the group's value elementwise straight into the
                      variable ``inputs[0]`` (an effect, like ``assign``; returns the variable).
* ``fused_gemm``   -- a ``matmul`` / ``batch_matmul`` the fusion pass could not give an epilogue: the same
                      library GEMM, written into the kernel runtime's recycled output buffers (attrs: ``op``,
                      ``transpose_a``, ``transpose_b``).
* ``uniform``      -- the random draw inside ``dropout_mask`` (``_rng.random(shape, float32)``), split out
                      by the expand pass so that ``u < keep_prob ? 1/keep_prob : 0`` fuses into the
                      consumers of the mask (the same generator call, so the same masks).
"""
from __future__ import annotations

import numpy as np

from runtime.codegen import aligned_empty, program_for
from runtime.ops.registry import Primitive, ShapeError, get_primitive, register
from runtime.threads import blas


def _check_inputs(name, shapes, dtypes, sg):
    if len(shapes) != len(sg.in_shapes):
        raise ShapeError(f"{name}: expects {len(sg.in_shapes)} inputs, got {len(shapes)}")
    for k, (s, d, es, ed) in enumerate(zip(shapes, dtypes, sg.in_shapes, sg.in_dtypes)):
        if tuple(s) != tuple(es) or np.dtype(d) != np.dtype(ed):
            raise ShapeError(f"{name}: input {k} is {tuple(s)} {np.dtype(d)}, the kernel was built for "
                             f"{tuple(es)} {np.dtype(ed)}")


def _prologue_shapes(shapes, dtypes, prologue):
    """Input shapes of the kernel once its GEMM prologue has run."""
    out_s, out_d, k = [], [], 0
    for spec in prologue:
        if spec is None:
            out_s.append(shapes[k])
            out_d.append(dtypes[k])
            k += 1
            continue
        op, ta, tb = spec
        s, d = get_primitive(op).infer(shapes[k:k + 2], dtypes[k:k + 2], {"transpose_a": ta, "transpose_b": tb})
        out_s.append(s)
        out_d.append(d)
        k += 2
    if k != len(shapes):
        raise ShapeError(f"fused: {len(shapes)} inputs do not match the GEMM prologue")
    return out_s, out_d


def _fused_infer(shapes, dtypes, attrs):
    sg = attrs["_subgraph"]
    if attrs.get("_prologue"):
        shapes, dtypes = _prologue_shapes(shapes, dtypes, attrs["_prologue"])
    _check_inputs("fused", shapes, dtypes, sg)
    if len(sg.outputs) == 1:
        r = sg.outputs[0]
        return sg.ref_shape(r), sg.ref_dtype(r)
    return (len(sg.outputs),), np.dtype(np.uint8)   # a tuple carrier; fused_get unpacks it


def _fused_kernel(*arrays, _subgraph, _program=None, kernel=None, _prologue=None, **_):
    prog = _program if _program is not None else program_for(_subgraph)
    if _prologue:
        arrays = _run_prologue(arrays, _prologue)
    if prog.backend() == "numpy":
        return _op_by_op(_subgraph, arrays)
    return prog(*arrays)


def _op_by_op(sg, arrays):
    """The group evaluated with the primitives' own kernels (no compiler, no Cython helper): the values of
    running it unfused."""
    env: list = [None] * len(sg.ops)

    def get(r):
        return env[r] if r >= 0 else np.asarray(arrays[-1 - r])
    for j, o in enumerate(sg.ops):
        if o.op == "const":
            env[j] = np.asarray(o.attrs["value"], o.dtype).reshape(o.shape)
            continue
        env[j] = np.asarray(get_primitive(o.op).kernel(*[get(a) for a in o.args], **o.attrs))
    outs = [np.ascontiguousarray(get(r)).astype(sg.ref_dtype(r), copy=False).reshape(sg.ref_shape(r))
            for r in sg.outputs]
    if sg.inplace:
        np.copyto(arrays[0], outs[0])
        return arrays[0]
    return outs[0] if len(outs) == 1 else tuple(outs)


def _run_prologue(arrays, prologue):
    out, k = [], 0
    for spec in prologue:
        if spec is None:
            out.append(arrays[k])
            k += 1
            continue
        _, ta, tb = spec
        a, b = arrays[k], arrays[k + 1]
        k += 2
        if ta:
            a = np.swapaxes(a, -1, -2)
        if tb:
            b = np.swapaxes(b, -1, -2)
        shape = a.shape[:-2] + (a.shape[-2], b.shape[-1])
        c = aligned_empty(shape, np.float32, int(np.prod(shape, dtype=np.int64)) * 4)
        out.append(blas.matmul(a, b, out=c))       # as the unfused GEMMs run
    return out


def _out_bytes(sg):
    return sum(int(np.prod(sg.ref_shape(r), dtype=np.int64)) * sg.ref_dtype(r).itemsize for r in sg.outputs)


def _fused_cost(node):
    sg = node.attrs["_subgraph"]
    prog = node.attrs.get("_program")
    flops = prog.flops if prog is not None else sum(
        int(np.prod(o.shape, dtype=np.int64)) for o in sg.ops if o.op not in ("reshape", "const"))
    nbytes = sum(i.nbytes for i in node.inputs) + _out_bytes(sg)
    k = 0
    for spec in node.attrs.get("_prologue") or ():
        if spec is None:
            k += 1
            continue
        a, b = node.inputs[k], node.inputs[k + 1]
        kdim = a.shape[-2] if spec[1] else a.shape[-1]
        m = a.shape[-1] if spec[1] else a.shape[-2]
        n = b.shape[-2] if spec[2] else b.shape[-1]
        batch = int(np.prod(a.shape[:-2], dtype=np.int64))
        flops += 2 * batch * m * n * kdim
        k += 2
    return int(flops), int(nbytes)


register(Primitive("fused", "opaque", _fused_infer, _fused_kernel, cost_fn=_fused_cost,
                   attrs_doc="_subgraph, _program, kernel"))


def _get_infer(shapes, dtypes, attrs):
    return tuple(attrs["shape"]), np.dtype(attrs["dtype"])


def _get_kernel(packed, index, shape, dtype):
    return packed[index]


register(Primitive("fused_get", "opaque", _get_infer, _get_kernel, cost_fn=lambda n: (0, 0),
                   attrs_doc="index, shape, dtype"))


def _assign_infer(shapes, dtypes, attrs):
    sg = attrs["_subgraph"]
    _check_inputs("fused_assign", shapes, dtypes, sg)
    r = sg.outputs[0]
    if tuple(sg.ref_shape(r)) != tuple(shapes[0]) or sg.ref_dtype(r) != np.dtype(dtypes[0]):
        raise ShapeError(f"fused_assign: the value {sg.ref_shape(r)} does not match the variable {tuple(shapes[0])}")
    return shapes[0], dtypes[0]


def _assign_cost(node):
    flops, nbytes = _fused_cost(node)
    return flops, nbytes


register(Primitive("fused_assign", "effect", _assign_infer, _fused_kernel, cost_fn=_assign_cost,
                   attrs_doc="_subgraph, _program, kernel"))


def _uniform_kernel(shape, _rng):
    shape = tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    if nbytes < (1 << 20):
        return _rng.random(shape, dtype=np.float32)
    out = aligned_empty(shape, np.float32, nbytes)      # recycled memory: no page faults
    return _rng.random(shape, dtype=np.float32, out=out)


register(Primitive("uniform", "source", lambda s, d, a: (tuple(a["shape"]), np.dtype(np.float32)), _uniform_kernel,
                   attrs_doc="shape, _rng"))


def _gemm_infer(shapes, dtypes, attrs):
    return get_primitive(attrs["op"]).infer(shapes, dtypes, attrs)


def _gemm_kernel(a, b, op, transpose_a, transpose_b):
    return _run_prologue([a, b], [(op, transpose_a, transpose_b)])[0]


def _gemm_cost(node):
    return get_primitive(node.attrs["op"]).cost(node)


register(Primitive("fused_gemm", "opaque", _gemm_infer, _gemm_kernel, cost_fn=_gemm_cost,
                   attrs_doc="op, transpose_a, transpose_b"))
