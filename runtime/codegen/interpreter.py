"""The bridge to ``runtime._fusion`` (Cython + OpenMP): the tile interpreter and the fast kernel caller.

* ``encode(plan)`` -- a ``schedule.Plan`` as the flat int64 / float32 arrays ``runtime._fusion.interpret``
  executes: the same loop order, element functions (``element_ops.h``) and accumulation order as the
  generated C, so both give bit-identical results (the fallback when no compiler works);
* ``interpret(code, P, dims, c0, nch, threads)`` -- runs an encoded plan on the kernel's buffers ``P``;
* ``call(address, P, dims, c0, nch, threads)`` -- calls a compiled kernel (a ctypes function pointer) with
  the GIL released; cheaper than a ctypes call.

``AVAILABLE`` is False when the extension is not built; fused groups then run op by op (see ``program``).
"""
from __future__ import annotations

import numpy as np

from runtime.codegen.schedule import Plan
from runtime.codegen.subgraph import OPCODES

try:  # the Cython helper (interpreter + fast caller); optional
    from runtime import _fusion
except ImportError:  # pragma: no cover - extension not built
    _fusion = None

AVAILABLE = _fusion is not None


def encode(plan: Plan) -> dict:
    """The plan as flat arrays for ``runtime._fusion.interpret``."""
    K, vals, reds, outs = plan.K, plan.vals, plan.reds, plan.outs
    nv = len(vals)
    vk = np.full((nv, 6), -1, np.int64)
    vc = np.zeros(nv, np.float32)
    vstr = np.zeros((nv, K), np.int64)
    for i, v in enumerate(vals):
        if v.kind == "in":
            vk[i, :3] = (0, v.a, int(plan.in_u8[v.a]))
            vstr[i] = plan.strides(v.mask)
        elif v.kind == "const":
            vk[i, :3] = (1, 0, 0)
            vc[i] = v.c
        elif v.kind == "red":
            vk[i, :3] = (2, v.a, 0)
            vstr[i] = plan.strides(v.mask)
        else:
            vk[i, 0] = OPCODES[v.op]
            vk[i, 1:3] = 0
            vk[i, 3:3 + len(v.args)] = v.args
    rk = np.zeros((len(reds), 8), np.int64)
    rstr = np.zeros((len(reds), K), np.int64)
    accper = np.zeros(max(len(reds), 1), np.int64)
    for r, rd in enumerate(reds):
        rk[r] = (rd.src, 0 if rd.kind == "sum" else 1, rd.phase, 1 if rd.cls == "S1" else 2, rd.sfx, rd.lanes,
                 int(rd.cross), plan.mask_size(rd.kmask))
        rstr[r] = plan.strides(rd.kmask)
        accper[r] = plan.mask_size(rd.kmask) * rd.lanes if rd.cls == "S2" else 1
    ok = np.zeros((len(outs), 4), np.int64)
    ostr = np.zeros((len(outs), K), np.int64)
    for k, o in enumerate(outs):
        ok[k] = (o.val, int(o.u8), o.phase, o.red)
        ostr[k] = plan.strides(o.mask)
    pv, pvo = [], [0]
    for vs in plan.phase_vals:
        pv.extend(vs)
        pvo.append(len(pv))
    epi = np.zeros(max(len(outs), 1), np.int64)
    epin = np.zeros(max(len(outs), 1), np.int64)
    for k, vs in enumerate(plan.epi_vals):
        epi[k], epin[k] = len(pv), len(vs)
        pv.extend(vs)
    return {"vk": vk.ravel(), "vc": vc, "vstr": vstr.ravel(), "rk": rk.ravel(), "rstr": rstr.ravel(),
            "ok": ok.ravel(), "ostr": ostr.ravel(), "fstr": np.asarray(plan.strides((1 << K) - 1), np.int64),
            "pv": np.asarray(pv or [0], np.int64), "pvo": np.asarray(pvo, np.int64), "accper": accper,
            "epi": epi, "epin": epin, "nphases": plan.nphases, "local": plan.mode == "local",
            "nred": len(reds), "nv": nv, "nin": len(plan.in_masks), "nout": len(outs)}


def interpret(code: dict, buffers: list, dims, c0: int, nchunks: int, threads: int) -> None:
    _fusion.interpret(code, buffers, dims, c0, nchunks, threads)


def call(address: int, buffers: list, dims, c0: int, nchunks: int, threads: int) -> None:
    _fusion.call(address, buffers, dims, c0, nchunks, threads)


def opcodes() -> dict:
    """The interpreter's opcode table (must equal ``subgraph.OPCODES``)."""
    return _fusion.opcodes()
