# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Graph-kernel fusion helpers (Cython + OpenMP).

* ``call(fn, ptrs, dims, c0, nch)`` -- calls a generated C kernel (a function pointer obtained with
  ctypes) with the GIL released; cheaper than a ctypes call.
* ``interpret(code, ptrs, dims, c0, nch)`` -- the tile interpreter: runs a kernel plan (encoded by
  ``runtime/codegen/interpreter.py``) without any compiler, evaluating each instruction
  over tiles of up to 256 elements of the innermost axis, with the same loop order, the same
  element functions (``codegen/element_ops.h``) and the same accumulation order as the generated C, so
  both paths give bit-identical results.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport INFINITY

cnp.import_array()

cdef extern from "codegen/element_ops.h" nogil:
    float fk_sel(int c, float a, float b)
    float fk_bool(int c)
    float fk_select(float c, float a, float b)
    float fk_abs(float x)
    float fk_sqrt(float x)
    float fk_rsqrt(float x)
    float fk_recip(float x)
    float fk_square(float x)
    float fk_max(float a, float b)
    float fk_min(float a, float b)
    float fk_relu(float x)
    float fk_sign(float x)
    float fk_leaky(float x, float alpha)
    float fk_relu_grad(float x, float g)
    float fk_exp(float x)
    float fk_log(float x)
    float fk_tanh(float x)
    float fk_sigmoid(float x)
    double fk_dmax(double a, double b)
    double fk_tree_sum(const double* a)
    double fk_tree_max(const double* a)

ctypedef void (*kernel_fn)(void **P, const int64_t *D, int64_t c0, int64_t nch, int nth) noexcept nogil

DEF T = 256          # tile length along the innermost axis (a multiple of the 8 lanes)
DEF MAXK = 16

# value kinds and opcodes (must match runtime/codegen/subgraph.py OPCODES)
DEF K_IN = 0
DEF K_CONST = 1
DEF K_RED = 2
DEF OP_NEG = 10
DEF OP_EXP = 11
DEF OP_LOG = 12
DEF OP_SQRT = 13
DEF OP_RSQRT = 14
DEF OP_TANH = 15
DEF OP_SIGMOID = 16
DEF OP_RELU = 17
DEF OP_ABS = 18
DEF OP_SIGN = 19
DEF OP_SQUARE = 20
DEF OP_RECIP = 21
DEF OP_TOBOOL = 22
DEF OP_ADD = 23
DEF OP_SUB = 24
DEF OP_MUL = 25
DEF OP_DIV = 26
DEF OP_MAX = 27
DEF OP_MIN = 28
DEF OP_EQ = 29
DEF OP_NE = 30
DEF OP_LT = 31
DEF OP_LE = 32
DEF OP_GT = 33
DEF OP_GE = 34
DEF OP_RELU_GRAD = 35
DEF OP_LEAKY = 36
DEF OP_SELECT = 37


def opcodes():
    """The opcode table compiled into this module (checked against plan.OPCODES by the tests)."""
    return {"neg": OP_NEG, "exp": OP_EXP, "log": OP_LOG, "sqrt": OP_SQRT, "rsqrt": OP_RSQRT, "tanh": OP_TANH,
            "sigmoid": OP_SIGMOID, "relu": OP_RELU, "abs": OP_ABS, "sign": OP_SIGN, "square": OP_SQUARE,
            "reciprocal": OP_RECIP, "tobool": OP_TOBOOL, "add": OP_ADD, "sub": OP_SUB, "mul": OP_MUL,
            "div": OP_DIV, "maximum": OP_MAX, "minimum": OP_MIN, "equal": OP_EQ, "not_equal": OP_NE,
            "less": OP_LT, "less_equal": OP_LE, "greater": OP_GT, "greater_equal": OP_GE,
            "relu_grad": OP_RELU_GRAD, "leaky_relu": OP_LEAKY, "select": OP_SELECT}


cdef inline void _ptrs(list arrays, void** P):
    cdef Py_ssize_t k
    cdef object a
    for k in range(len(arrays)):
        a = arrays[k]
        P[k] = NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


def call(size_t fn, list arrays, const int64_t[::1] dims, int64_t c0, int64_t nch, int nth=2):
    """Run the generated kernel at address ``fn`` on ``arrays`` (inputs, outputs, results, scratch)."""
    cdef Py_ssize_t n = len(arrays)
    cdef void** P = <void**>malloc(max(n, 1) * sizeof(void*))
    cdef kernel_fn f = <kernel_fn>fn
    _ptrs(arrays, P)
    try:
        with nogil:
            f(P, &dims[0], c0, nch, nth)
    finally:
        free(P)


# ------------------------------------------------------------------------------------------------
# the interpreter
# ------------------------------------------------------------------------------------------------
cdef struct Prog:
    int K
    int nv
    int nred
    int nout
    int nin
    const int64_t* D          # domain sizes
    const int64_t* vk         # (nv, 5): kind, a, opcode, arg0..arg2 -> vk[v*6 + ...]
    const float* vc           # constants
    const int64_t* vstr       # (nv, K) load strides (in / red values)
    const int64_t* rk         # (nred, 8): src, kind, phase, cls, sfx, lanes, cross, kept_size
    const int64_t* rstr       # (nred, K) kept strides
    const int64_t* ok         # (nout, 4): val, u8, phase, red
    const int64_t* ostr       # (nout, K) output strides
    const int64_t* fstr       # (K,) full strides
    const int64_t* pv         # phase value lists
    const int64_t* pvo        # (nphases + 1) offsets
    void** P


cdef inline void _load(const Prog* g, int v, float* d, int64_t o, int64_t n, bint inner) noexcept nogil:
    cdef int64_t kind = g.vk[v * 6], a = g.vk[v * 6 + 1], i
    cdef const float* src
    cdef const uint8_t* src8
    cdef float x
    if kind == K_CONST:
        x = g.vc[v]
        for i in range(n):
            d[i] = x
        return
    if kind == K_IN and g.vk[v * 6 + 2] == 1:        # a bool (uint8) input
        src8 = <const uint8_t*>g.P[a]
        if inner:
            for i in range(n):
                d[i] = <float>src8[o + i]
        else:
            x = <float>src8[o]
            for i in range(n):
                d[i] = x
        return
    if kind == K_IN:
        src = <const float*>g.P[a]
    else:
        src = <const float*>g.P[g.nin + g.nout + a]
    if inner:
        memcpy(d, src + o, n * sizeof(float))
    else:
        x = src[o]
        for i in range(n):
            d[i] = x


cdef inline void _apply(int op, float* d, const float* x, const float* y, const float* z,
                        int64_t n) noexcept nogil:
    cdef int64_t i
    if op == OP_NEG:
        for i in range(n): d[i] = -x[i]
    elif op == OP_EXP:
        for i in range(n): d[i] = fk_exp(x[i])
    elif op == OP_LOG:
        for i in range(n): d[i] = fk_log(x[i])
    elif op == OP_SQRT:
        for i in range(n): d[i] = fk_sqrt(x[i])
    elif op == OP_RSQRT:
        for i in range(n): d[i] = fk_rsqrt(x[i])
    elif op == OP_TANH:
        for i in range(n): d[i] = fk_tanh(x[i])
    elif op == OP_SIGMOID:
        for i in range(n): d[i] = fk_sigmoid(x[i])
    elif op == OP_RELU:
        for i in range(n): d[i] = fk_relu(x[i])
    elif op == OP_ABS:
        for i in range(n): d[i] = fk_abs(x[i])
    elif op == OP_SIGN:
        for i in range(n): d[i] = fk_sign(x[i])
    elif op == OP_SQUARE:
        for i in range(n): d[i] = fk_square(x[i])
    elif op == OP_RECIP:
        for i in range(n): d[i] = fk_recip(x[i])
    elif op == OP_TOBOOL:
        for i in range(n): d[i] = fk_bool(x[i] != 0.0)
    elif op == OP_ADD:
        for i in range(n): d[i] = x[i] + y[i]
    elif op == OP_SUB:
        for i in range(n): d[i] = x[i] - y[i]
    elif op == OP_MUL:
        for i in range(n): d[i] = x[i] * y[i]
    elif op == OP_DIV:
        for i in range(n): d[i] = x[i] / y[i]
    elif op == OP_MAX:
        for i in range(n): d[i] = fk_max(x[i], y[i])
    elif op == OP_MIN:
        for i in range(n): d[i] = fk_min(x[i], y[i])
    elif op == OP_EQ:
        for i in range(n): d[i] = fk_bool(x[i] == y[i])
    elif op == OP_NE:
        for i in range(n): d[i] = fk_bool(x[i] != y[i])
    elif op == OP_LT:
        for i in range(n): d[i] = fk_bool(x[i] < y[i])
    elif op == OP_LE:
        for i in range(n): d[i] = fk_bool(x[i] <= y[i])
    elif op == OP_GT:
        for i in range(n): d[i] = fk_bool(x[i] > y[i])
    elif op == OP_GE:
        for i in range(n): d[i] = fk_bool(x[i] >= y[i])
    elif op == OP_RELU_GRAD:
        for i in range(n): d[i] = fk_relu_grad(x[i], y[i])
    elif op == OP_LEAKY:
        for i in range(n): d[i] = fk_leaky(x[i], y[i])
    elif op == OP_SELECT:
        for i in range(n): d[i] = fk_select(x[i], y[i], z[i])


cdef inline void _eval(const Prog* g, const int64_t* need, int64_t nneed, float* regs,
                       const int64_t* idx, int64_t j, int64_t n) noexcept nogil:
    """Evaluate the listed values over innermost positions [j, j + n) of the row at ``idx``."""
    cdef int64_t t, v, kind, a, o
    cdef int K = g.K
    cdef const int64_t* st
    for t in range(nneed):
        v = need[t]
        kind = g.vk[v * 6]
        if kind == K_IN or kind == K_RED or kind == K_CONST:
            o = 0
            st = g.vstr + v * K
            for a in range(K - 1):
                o += idx[a] * st[a]
            o += j * st[K - 1]
            _load(g, <int>v, regs + v * T, o, n, st[K - 1] != 0)
        else:
            _apply(<int>kind, regs + v * T, regs + g.vk[v * 6 + 3] * T,
                   regs + (g.vk[v * 6 + 4] if g.vk[v * 6 + 4] >= 0 else 0) * T,
                   regs + (g.vk[v * 6 + 5] if g.vk[v * 6 + 5] >= 0 else 0) * T, n)


cdef inline double _lanes(const double* A, int64_t L, int kind) noexcept nogil:
    if L == 8:
        return fk_tree_sum(A) if kind == 0 else fk_tree_max(A)
    return A[0]


cdef void _phase(const Prog* g, int p, int64_t ch, int64_t a, int64_t b, float* regs, double* A,
                 double** acc, const int64_t* accper, bint local) noexcept nogil:
    """One phase over the chunk rows [a, b) of axis 0 (mirrors codegen.c_source._Emitter.phase_loops)."""
    cdef int K = g.K
    cdef int64_t idx[MAXK]
    cdef int64_t r, k, t, i, e, n, j, jrel, lo, hi, v, s, kind, lanes, rowk
    cdef bint first, last, inner_red
    cdef const int64_t* need = g.pv + g.pvo[p]
    cdef int64_t nneed = g.pvo[p + 1] - g.pvo[p]
    cdef double ident
    cdef double* ap
    cdef float* res
    cdef float* vals
    cdef float* o32
    cdef uint8_t* o8
    cdef int64_t jn, dl, o
    # S2 init (local mode: the chunk's rows / the chunk's partials) and S1 cross init
    for r in range(g.nred):
        if g.rk[r * 8 + 2] != p:
            continue
        kind = g.rk[r * 8 + 1]
        ident = 0.0 if kind == 0 else -INFINITY
        lanes = g.rk[r * 8 + 5]
        if g.rk[r * 8 + 3] == 1:
            if g.rk[r * 8 + 4] == 0:
                for i in range(8):
                    A[r * 8 + i] = ident
        elif local:
            if g.rk[r * 8 + 6]:
                ap = acc[r] + ch * accper[r]
                for e in range(accper[r]):
                    ap[e] = ident
            else:
                rowk = (g.rk[r * 8 + 7] // g.D[0]) * lanes
                for e in range(a * rowk, b * rowk):
                    acc[r][e] = ident
    if K == 1:
        lo = a
        hi = b
    else:
        lo = 0
        hi = g.D[K - 1]
    for i in range(K):
        idx[i] = 0
    idx[0] = a
    while True:
        if K > 1 and idx[0] >= b:
            break
        # S1 starts (sfx >= 1): first row of the reduced block
        for r in range(g.nred):
            if g.rk[r * 8 + 2] != p or g.rk[r * 8 + 3] != 1:
                continue
            s = g.rk[r * 8 + 4]
            if s == 0:
                continue
            first = True
            for t in range(s, K - 1):
                if idx[t] != 0:
                    first = False
            if first:
                ident = 0.0 if g.rk[r * 8 + 1] == 0 else -INFINITY
                for i in range(8):
                    A[r * 8 + i] = ident
        # the innermost axis in tiles
        j = lo
        while j < hi:
            n = hi - j
            if n > T:
                n = T
            _eval(g, need, nneed, regs, idx, j, n)
            jrel = j - lo
            # stores
            for k in range(g.nout):
                if g.ok[k * 4 + 2] != p:
                    continue
                o = j
                for t in range(K - 1):
                    o += idx[t] * g.fstr[t]
                vals = regs + g.ok[k * 4] * T
                if g.ok[k * 4 + 1]:
                    o8 = <uint8_t*>g.P[g.nin + k]
                    for i in range(n):
                        o8[o + i] = 1 if vals[i] != 0.0 else 0
                else:
                    o32 = <float*>g.P[g.nin + k]
                    memcpy(o32 + o, vals, n * sizeof(float))
            # accumulations
            for r in range(g.nred):
                if g.rk[r * 8 + 2] != p:
                    continue
                kind = g.rk[r * 8 + 1]
                lanes = g.rk[r * 8 + 5]
                vals = regs + g.rk[r * 8] * T
                if g.rk[r * 8 + 3] == 1:
                    ap = A + r * 8
                    if lanes == 8:
                        for i in range(n):
                            if kind == 0:
                                ap[(jrel + i) & 7] += <double>vals[i]
                            else:
                                ap[(jrel + i) & 7] = fk_dmax(ap[(jrel + i) & 7], <double>vals[i])
                    else:
                        for i in range(n):
                            if kind == 0:
                                ap[0] += <double>vals[i]
                            else:
                                ap[0] = fk_dmax(ap[0], <double>vals[i])
                else:
                    ap = acc[r]
                    if g.rk[r * 8 + 6]:
                        ap = ap + ch * accper[r]
                    o = 0
                    for t in range(K - 1):
                        o += idx[t] * g.rstr[r * K + t]
                    inner_red = g.rstr[r * K + K - 1] == 0
                    if lanes == 8:
                        for i in range(n):
                            e = o * 8 + ((jrel + i) & 7)
                            if kind == 0:
                                ap[e] += <double>vals[i]
                            else:
                                ap[e] = fk_dmax(ap[e], <double>vals[i])
                    elif inner_red:
                        for i in range(n):
                            if kind == 0:
                                ap[o] += <double>vals[i]
                            else:
                                ap[o] = fk_dmax(ap[o], <double>vals[i])
                    else:
                        for i in range(n):
                            if kind == 0:
                                ap[o + j + i] += <double>vals[i]
                            else:
                                ap[o + j + i] = fk_dmax(ap[o + j + i], <double>vals[i])
            j += n
        # S1 ends (sfx >= 1): last row of the reduced block
        for r in range(g.nred):
            if g.rk[r * 8 + 2] != p or g.rk[r * 8 + 3] != 1:
                continue
            s = g.rk[r * 8 + 4]
            if s == 0:
                continue
            last = True
            for t in range(s, K - 1):
                if idx[t] != g.D[t] - 1:
                    last = False
            if last:
                o = 0
                for t in range(s):
                    o += idx[t] * g.rstr[r * K + t]
                res = <float*>g.P[g.nin + g.nout + r]
                res[o] = <float>_lanes(A + r * 8, g.rk[r * 8 + 5], <int>g.rk[r * 8 + 1])
        if K == 1:
            break
        # next row (odometer over axes 0..K-2)
        t = K - 2
        while t >= 0:
            idx[t] += 1
            if t == 0 or idx[t] < g.D[t]:
                break
            idx[t] = 0
            t -= 1
    # S1 cross ends: the chunk's partial
    for r in range(g.nred):
        if g.rk[r * 8 + 2] == p and g.rk[r * 8 + 3] == 1 and g.rk[r * 8 + 4] == 0:
            acc[r][ch] = _lanes(A + r * 8, g.rk[r * 8 + 5], <int>g.rk[r * 8 + 1])
    # local mode: S2 reductions keeping axis 0 finish with the chunk's rows
    if local:
        for r in range(g.nred):
            if g.rk[r * 8 + 2] != p or g.rk[r * 8 + 3] != 2 or g.rk[r * 8 + 6]:
                continue
            rowk = g.rk[r * 8 + 7] // g.D[0]
            res = <float*>g.P[g.nin + g.nout + r]
            for e in range(a * rowk, b * rowk):
                res[e] = <float>_lanes(acc[r] + e * g.rk[r * 8 + 5], g.rk[r * 8 + 5], <int>g.rk[r * 8 + 1])


cdef void _combine(const Prog* g, int64_t r, double** acc, const int64_t* accper, int64_t nch) noexcept nogil:
    cdef int64_t kind = g.rk[r * 8 + 1], lanes = g.rk[r * 8 + 5], e, c
    cdef int64_t kept = g.rk[r * 8 + 7]
    cdef double t, x
    cdef float* res = <float*>g.P[g.nin + g.nout + r]
    if g.rk[r * 8 + 3] == 1:
        t = 0.0 if kind == 0 else -INFINITY
        for c in range(nch):
            t = t + acc[r][c] if kind == 0 else fk_dmax(t, acc[r][c])
        res[0] = <float>t
        return
    if g.rk[r * 8 + 6]:
        for e in range(kept):
            t = 0.0 if kind == 0 else -INFINITY
            for c in range(nch):
                x = _lanes(acc[r] + c * accper[r] + e * lanes, lanes, <int>kind)
                t = t + x if kind == 0 else fk_dmax(t, x)
            res[e] = <float>t
    else:
        for e in range(kept):
            res[e] = <float>_lanes(acc[r] + e * lanes, lanes, <int>kind)


def interpret(dict code, list arrays, const int64_t[::1] dims, int64_t c0, int64_t nch, int nth=2):
    """Run an encoded plan on ``arrays`` (same layout as the generated C function's ``P``)."""
    cdef Prog g
    cdef int K = dims.shape[0]
    cdef const int64_t[::1] vk = code["vk"]
    cdef const float[::1] vc = code["vc"]
    cdef const int64_t[::1] vstr = code["vstr"]
    cdef const int64_t[::1] rk = code["rk"]
    cdef const int64_t[::1] rstr = code["rstr"]
    cdef const int64_t[::1] ok = code["ok"]
    cdef const int64_t[::1] ostr = code["ostr"]
    cdef const int64_t[::1] fstr = code["fstr"]
    cdef const int64_t[::1] pv = code["pv"]
    cdef const int64_t[::1] pvo = code["pvo"]
    cdef const int64_t[::1] accper = code["accper"]
    cdef const int64_t[::1] epi = code["epi"]        # (nout,) offsets into pv of epilogue lists
    cdef const int64_t[::1] epin = code["epin"]
    cdef int nphases = code["nphases"]
    cdef bint local = code["local"]
    cdef int p, nt
    cdef int64_t ch, a, b, r, e, k, i, t
    cdef float* regs = NULL
    cdef double* A = NULL
    cdef Py_ssize_t n = len(arrays)
    cdef void** P = <void**>malloc(max(n, 1) * sizeof(void*))
    cdef double** acc
    cdef int64_t ntot = 1
    cdef int64_t nred = code["nred"]
    cdef int64_t nv = code["nv"]
    cdef int64_t edims[MAXK]
    if K > MAXK:
        raise ValueError("too many axes")
    for i in range(K):
        ntot *= dims[i]
    _ptrs(arrays, P)
    acc = <double**>malloc(max(nred, 1) * sizeof(double*))
    for r in range(nred):
        acc[r] = <double*>P[code["nin"] + code["nout"] + nred + r]
    g.K = K
    g.nv = <int>nv
    g.nred = <int>nred
    g.nout = code["nout"]
    g.nin = code["nin"]
    g.D = &dims[0]
    g.vk = &vk[0]
    g.vc = &vc[0]
    g.vstr = &vstr[0]
    g.rk = &rk[0] if rk.shape[0] else NULL
    g.rstr = &rstr[0] if rstr.shape[0] else NULL
    g.ok = &ok[0]
    g.ostr = &ostr[0]
    g.fstr = &fstr[0]
    g.pv = &pv[0] if pv.shape[0] else NULL
    g.pvo = &pvo[0]
    g.P = P
    nt = nth if (nch > 1 and ntot >= 65536 and nth > 1) else 1
    try:
        with nogil:
            if local:
                with parallel(num_threads=nt):
                    regs = <float*>malloc(nv * T * sizeof(float))
                    A = <double*>malloc((nred + 1) * 8 * sizeof(double))
                    for ch in prange(nch, schedule='dynamic', chunksize=1):
                        a = ch * c0
                        b = a + c0
                        if b > dims[0]:
                            b = dims[0]
                        for p in range(nphases):
                            if g.pvo[p + 1] > g.pvo[p]:
                                _phase(&g, p, ch, a, b, regs, A, acc, &accper[0], True)
                    free(regs)
                    free(A)
                for r in range(nred):
                    if rk[r * 8 + 6]:
                        _combine(&g, r, acc, &accper[0], nch)
            else:
                for p in range(nphases):
                    if g.pvo[p + 1] == g.pvo[p]:
                        continue
                    for r in range(nred):
                        if rk[r * 8 + 2] == p and rk[r * 8 + 3] == 2:
                            for e in range(accper[r] * (nch if rk[r * 8 + 6] else 1)):
                                acc[r][e] = 0.0 if rk[r * 8 + 1] == 0 else -INFINITY
                    with parallel(num_threads=nt):
                        regs = <float*>malloc(nv * T * sizeof(float))
                        A = <double*>malloc((nred + 1) * 8 * sizeof(double))
                        for ch in prange(nch, schedule='dynamic', chunksize=1):
                            a = ch * c0
                            b = a + c0
                            if b > dims[0]:
                                b = dims[0]
                            _phase(&g, p, ch, a, b, regs, A, acc, &accper[0], False)
                        free(regs)
                        free(A)
                    for r in range(nred):
                        if rk[r * 8 + 2] == p and (rk[r * 8 + 6] or rk[r * 8 + 3] == 2):
                            _combine(&g, r, acc, &accper[0], nch)
            # epilogue: outputs smaller than the domain, one serial loop each
            for k in range(g.nout):
                if ok[k * 4 + 2] != -1:
                    continue
                regs = <float*>malloc(nv * T * sizeof(float))
                _epilogue(&g, k, regs, &pv[0] + epi[k] if pv.shape[0] else NULL, epin[k])
                free(regs)
    finally:
        free(acc)
        free(P)


cdef void _epilogue(const Prog* g, int64_t k, float* regs, const int64_t* need, int64_t nneed) noexcept nogil:
    cdef int K = g.K
    cdef int64_t idx[MAXK]
    cdef int64_t E[MAXK]
    cdef int64_t t, j, n, o, i
    cdef const int64_t* ost = g.ostr + k * K
    cdef float* vals
    cdef float* o32
    cdef uint8_t* o8
    for t in range(K):
        E[t] = g.D[t] if ost[t] != 0 else 1      # axes outside the output's pattern are not iterated
        idx[t] = 0
    while True:
        j = 0
        while j < E[K - 1]:
            n = E[K - 1] - j
            if n > T:
                n = T
            _eval(g, need, nneed, regs, idx, j, n)
            o = j * ost[K - 1]
            for t in range(K - 1):
                o += idx[t] * ost[t]
            vals = regs + g.ok[k * 4] * T
            if g.ok[k * 4 + 1]:
                o8 = <uint8_t*>g.P[g.nin + k]
                for i in range(n):
                    o8[o + i * ost[K - 1]] = 1 if vals[i] != 0.0 else 0
            else:
                o32 = <float*>g.P[g.nin + k]
                for i in range(n):
                    o32[o + i * ost[K - 1]] = vals[i]
            j += n
        if K == 1:
            break
        t = K - 2
        while t >= 0:
            idx[t] += 1
            if idx[t] < E[t]:
                break
            idx[t] = 0
            t -= 1
        if t < 0:
            break
