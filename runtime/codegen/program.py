"""A fused group's executable kernel: ``program_for(SubGraph) -> Program`` (schedule, C source, interpreter
encoding), shared by identical groups, and the backend that runs it.

Backends (``set_backend`` / ``backend(name)`` / env ``INSIGHT_FUSION_BACKEND``):
``auto`` -- compiled C, falling back to the interpreter if no compiler works (warned once);
``c`` -- compiled C only; ``interp`` -- the Cython tile interpreter (bit-identical to ``c``);
``numpy`` -- the ``fused`` primitive evaluates the group op by op with the primitives' own kernels (a last
resort when the Cython extension is not built; same values as running unfused).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from runtime.codegen import c_source, interpreter, kernel_cache
from runtime.codegen.buffers import aligned_empty
from runtime.codegen.schedule import analyze
from runtime.codegen.subgraph import SubGraph

_state = {"backend": os.environ.get("INSIGHT_FUSION_BACKEND", "auto"),
          "threads": int(os.environ.get("INSIGHT_FUSION_THREADS", "0")) or (os.cpu_count() or 1)}
_programs: dict = {}


def set_backend(name: str) -> None:
    if name not in ("auto", "c", "interp", "numpy"):
        raise ValueError(f"graph-kernel backend must be auto, c, interp or numpy; got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


def backend(name: str):
    """Use backend ``name`` inside the block."""
    return _temporarily("backend", name, set_backend)


def set_threads(n: int) -> None:
    """Threads per kernel (default: the CPU count; results do not depend on it)."""
    _state["threads"] = max(1, int(n))


def threads(n: int):
    """Run kernels on ``n`` threads inside the block (e.g. 1 to measure one thread's CPU time)."""
    return _temporarily("threads", n, set_threads)


@contextlib.contextmanager
def _temporarily(key: str, value, setter):
    old = _state[key]
    setter(value)
    try:
        yield
    finally:
        _state[key] = old


class Program:
    """One compiled (or interpreted) kernel for a fused SubGraph with fixed shapes."""

    def __init__(self, sg: SubGraph):
        self.sg = sg
        self.plan = analyze(sg)
        self.name, self.csrc = c_source.generate(self.plan)
        self.code = interpreter.encode(self.plan) if interpreter.AVAILABLE else None
        self.dims = np.asarray(self.plan.dims, np.int64)
        self.out_shapes = [tuple(sg.ref_shape(r)) for r in sg.outputs]
        self.out_dtypes = [sg.ref_dtype(r) for r in sg.outputs]
        p = self.plan
        self._res_sizes = [p.mask_size(r.kmask) for r in p.reds]
        self._acc_sizes = [p.acc_size(r) for r in p.reds]
        self._res_specs = [(r.out, n) for r, n in zip(p.reds, self._res_sizes)]
        self._in_checks = list(enumerate(np.dtype(d) for d in sg.in_dtypes))
        self._out_specs = [(shape, np.dtype(dt), int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize)
                           for shape, dt in zip(self.out_shapes, self.out_dtypes)]
        self.flops = p.flops

    # -- which path runs it ----------------------------------------------------------------------------
    def backend(self) -> str:
        """"c", "interp" or "numpy" (the caller then evaluates ``self.sg`` op by op)."""
        b = _state["backend"]
        if b == "numpy" or not interpreter.AVAILABLE:
            return "numpy"
        if b == "interp":
            return "interp"
        if kernel_cache.address(self.name) is None and not kernel_cache.failed(self.name) \
                and not kernel_cache.compiler_broken():
            kernel_cache.ensure_compiled([(self.name, self.csrc)])
        if kernel_cache.address(self.name) is not None:
            return "c"
        if b == "c":
            raise RuntimeError(f"graph kernel {self.name} is not compiled and the backend is 'c'")
        return "interp"

    def __call__(self, *arrays):
        how = self.backend()
        if how == "numpy":
            raise RuntimeError(f"graph kernel {self.name}: no kernel runs on the 'numpy' backend (selected, or "
                               f"runtime._fusion not built); the fused primitive evaluates the group op by op")
        plan = self.plan
        ins = list(arrays)
        for k, dt in self._in_checks:
            a = ins[k]
            if type(a) is not np.ndarray or a.dtype != dt or not a.flags.c_contiguous:
                ins[k] = np.ascontiguousarray(a, dtype=dt)
        outs = [np.empty(shape, dt) if nb < (1 << 20) else aligned_empty(shape, dt, nb)
                for shape, dt, nb in self._out_specs]
        inplace_tmp = None
        if plan.inplace:
            var = arrays[0]
            if type(var) is np.ndarray and var.flags.c_contiguous and var.dtype == self.out_dtypes[0]:
                outs[0] = ins[0] = var
            else:  # pragma: no cover - parameters are contiguous float32
                inplace_tmp = outs[0]
        P = ins + outs
        for r, n in self._res_specs:
            P.append(outs[r] if r >= 0 else np.empty(n, np.float32))
        for n in self._acc_sizes:
            P.append(np.empty(n, np.float64) if n else None)
        if how == "c":
            interpreter.call(kernel_cache.address(self.name), P, self.dims, plan.c0, plan.nchunks, _state["threads"])
        else:
            interpreter.interpret(self.code, P, self.dims, plan.c0, plan.nchunks, _state["threads"])
        if plan.inplace:
            if inplace_tmp is not None:  # pragma: no cover
                np.copyto(arrays[0], inplace_tmp)
            return arrays[0]
        return outs[0] if len(outs) == 1 else tuple(outs)


def program_for(sg: SubGraph) -> Program:
    """Programs are shared between identical groups (e.g. every encoder layer's layer norm)."""
    key = sg.key()
    p = _programs.get(key)
    if p is None:
        p = _programs[key] = Program(sg)
    return p


def prepare(programs) -> None:
    """Compile (or load from the disk cache) the kernels of ``programs`` up front, two gcc processes at a
    time, when the backend runs compiled code."""
    if _state["backend"] in ("auto", "c") and interpreter.AVAILABLE:
        kernel_cache.ensure_compiled([(p.name, p.csrc) for p in programs])
