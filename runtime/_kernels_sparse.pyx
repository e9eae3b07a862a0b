# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse (graph) kernels for the GNN primitives: CSR SpMM, SDDMM, per-edge gather / scatter-add and
the edge softmax per destination node, with the GIL released and OpenMP over rows.

A graph is a CSR matrix whose row ``i`` is a destination node and whose entries ``p`` in
``indptr[i]:indptr[i+1]`` are its incoming edges from ``indices[p]``. The transposed walk (per
source node) uses ``t_indptr`` / ``t_indices`` (the destination of each edge) and ``t_perm`` (the
edge id of each transposed entry), so every backward is a gather over rows, never an atomic scatter.

Storage dtypes: float32, float64 and float16 (passed as a ``uint16`` view; converted with the
compiler's ``_Float16``, round to nearest even like numpy). float32 and float16 accumulate the
products of SpMM, SDDMM and the edge softmax in float32, float64 in float64; the short per-row sums of
the scatter-add and the softmax backward are taken in double for every dtype. Edge arrays are (E, K); node arrays are (rows, K) or, for SpMM/SDDMM,
(rows, H, D) with edge values (E, H). Outputs are allocated by the caller (``runtime/ops/sparse.py``).
"""

cimport openmp
from cython.parallel cimport prange, parallel
from libc.math cimport exp, expf, INFINITY
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport malloc, free

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* float16 -> float32 through a 65536-entry table (filled once at import, exact);
       float32 -> float16 rounds to nearest even (F. Giesen's float_to_half_fast3_rtne), like numpy. */
    static float insight_h2f_table[65536];
    static inline float insight_h2f(unsigned short h) { return insight_h2f_table[h]; }
    static inline unsigned short insight_f2h(float ff) {
        union { float f; uint32_t u; } f, denorm_magic;
        const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
        unsigned short o;
        uint32_t sign;
        denorm_magic.u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        f.f = ff;
        sign = f.u & 0x80000000u;
        f.u ^= sign;
        if (f.u >= f16max) {
            o = (f.u > f32infty) ? 0x7e00 : 0x7c00;
        } else if (f.u < (113u << 23)) {
            f.f += denorm_magic.f;
            o = (unsigned short)(f.u - denorm_magic.u);
        } else {
            uint32_t mant_odd = (f.u >> 13) & 1u;
            f.u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
            f.u += mant_odd;
            o = (unsigned short)(f.u >> 13);
        }
        return (unsigned short)(o | (sign >> 16));
    }
    static void insight_fill_h2f(const float* values) { memcpy(insight_h2f_table, values, sizeof(insight_h2f_table)); }
    """
    float h2f "insight_h2f"(unsigned short h) nogil
    unsigned short f2h "insight_f2h"(float f) nogil
    void fill_h2f "insight_fill_h2f"(const float* values)

ctypedef unsigned short half_t  # float16 storage

ctypedef fused real:
    float
    double
    half_t

import numpy as np

cdef float[::1] _table = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
fill_h2f(&_table[0])

__all__ = ["spmm", "sddmm", "edge_gather_dst", "edge_gather_src", "edge_reduce",
           "edge_softmax", "edge_softmax_bwd", "threads_for", "f32_to_f16"]

cdef Py_ssize_t _MIN_WORK = 1 << 20  # below this many multiply-adds a kernel runs serially (OpenMP
# start-up and barriers cost more than they save on ~1 ms kernels, and far more on a loaded machine)


cdef inline float ldf(real v) noexcept nogil:
    if real is half_t:
        return h2f(v)
    else:
        return <float>v


cdef inline real stf(float v, real dummy) noexcept nogil:
    if real is half_t:
        return f2h(v)
    else:
        return <real>v


cdef inline double ldd(real v) noexcept nogil:
    if real is half_t:
        return <double>h2f(v)
    else:
        return <double>v


cdef inline real std(double v, real dummy) noexcept nogil:
    if real is half_t:
        return f2h(<float>v)
    else:
        return <real>v


def f32_to_f16(const float[::1] a, half_t[::1] out):
    """The kernels' float32 -> float16 store, exposed so tests can compare its rounding with numpy's."""
    cdef Py_ssize_t i
    for i in range(a.shape[0]):
        out[i] = f2h(a[i])


def threads_for(Py_ssize_t work):
    """How many OpenMP threads a kernel with ``work`` multiply-adds uses (1 when small)."""
    if work < _MIN_WORK:
        return 1
    return max(1, openmp.omp_get_max_threads())


# ---------------------------------------------------------------------------------------------
# SpMM: out[i, h, :] = sum_{p in row i} vals[e(p), h] * x[indices[p], h, :]   (e(p) = perm[p] or p)
# ---------------------------------------------------------------------------------------------
ctypedef fused accum:  # the accumulator: float for float32 / float16 storage, double for float64
    float
    double


cdef inline void _spmm_row(Py_ssize_t i, const int64_t* indptr, const int32_t* indices, const int64_t* perm,
                           bint use_perm, const real* vp, const real* xp, real* op, Py_ssize_t H,
                           Py_ssize_t D, accum* acc) noexcept nogil:
    cdef Py_ssize_t HD = H * D, p, e, h, d
    cdef accum v
    cdef const real* xr
    for d in range(HD):
        acc[d] = 0
    for p in range(indptr[i], indptr[i + 1]):
        e = perm[p] if use_perm else p
        xr = xp + indices[p] * HD
        for h in range(H):
            v = <accum>ldd(vp[e * H + h])
            for d in range(D):
                acc[h * D + d] += v * <accum>ldd(xr[h * D + d])
    for d in range(HD):
        op[i * HD + d] = std(acc[d], op[i * HD + d])


def spmm(const int64_t[::1] indptr, const int32_t[::1] indices, const int64_t[::1] perm, bint use_perm,
         const real[:, ::1] vals, const real[:, :, ::1] x, real[:, :, ::1] out):
    cdef Py_ssize_t M = out.shape[0], H = out.shape[1], D = out.shape[2], HD = H * D, i
    cdef int nt = threads_for(indices.shape[0] * HD)
    cdef float* af
    cdef double* ad
    if M == 0 or HD == 0:
        return
    if x.shape[0] == 0 or vals.shape[0] == 0:
        out[:, :, :] = std(0.0, out[0, 0, 0])
        return
    cdef const real* xp = &x[0, 0, 0]
    cdef const real* vp = &vals[0, 0]
    cdef real* op = &out[0, 0, 0]
    with nogil, parallel(num_threads=nt):
        af = <float*> malloc(sizeof(float) * HD)
        ad = <double*> malloc(sizeof(double) * HD)
        for i in prange(M, schedule='guided'):
            if real is double:
                _spmm_row(i, &indptr[0], &indices[0], &perm[0], use_perm, vp, xp, op, H, D, ad)
            else:
                _spmm_row(i, &indptr[0], &indices[0], &perm[0], use_perm, vp, xp, op, H, D, af)
        free(af)
        free(ad)


# ---------------------------------------------------------------------------------------------
# SDDMM: out[p, h] = <a[i, h, :], b[indices[p], h, :]> for every entry p of row i
# ---------------------------------------------------------------------------------------------
cdef inline void _sddmm_row(Py_ssize_t i, const int64_t* indptr, const int32_t* indices, const real* ap,
                            const real* bp, real* op, Py_ssize_t H, Py_ssize_t D, accum dummy) noexcept nogil:
    cdef Py_ssize_t HD = H * D, p, h, d
    cdef accum acc
    cdef const real* ar
    cdef const real* br
    for p in range(indptr[i], indptr[i + 1]):
        br = bp + indices[p] * HD
        for h in range(H):
            ar = ap + i * HD + h * D
            acc = 0
            for d in range(D):
                acc += <accum>ldd(ar[d]) * <accum>ldd(br[h * D + d])
            op[p * H + h] = std(acc, op[p * H + h])


def sddmm(const int64_t[::1] indptr, const int32_t[::1] indices, const real[:, :, ::1] a,
          const real[:, :, ::1] b, real[:, ::1] out):
    cdef Py_ssize_t M = a.shape[0], H = a.shape[1], D = a.shape[2], i
    cdef int nt = threads_for(indices.shape[0] * H * D)
    if out.shape[0] == 0 or H == 0:
        return
    if D == 0:
        out[:, :] = std(0.0, out[0, 0])
        return
    cdef const real* ap = &a[0, 0, 0]
    cdef const real* bp = &b[0, 0, 0]
    cdef real* op = &out[0, 0]
    with nogil:
        for i in prange(M, schedule='guided', num_threads=nt):
            if real is double:
                _sddmm_row(i, &indptr[0], &indices[0], ap, bp, op, H, D, <double>0)
            else:
                _sddmm_row(i, &indptr[0], &indices[0], ap, bp, op, H, D, <float>0)


# ---------------------------------------------------------------------------------------------
# per-edge gathers and their adjoints (segment sums = scatter-add without atomics)
# ---------------------------------------------------------------------------------------------
def edge_gather_dst(const int64_t[::1] indptr, const real[:, ::1] a, real[:, ::1] out):
    """out[p, :] = a[i, :] for every entry p of row i (the destination node's value on each edge)."""
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], i, p, k
    cdef int nt = threads_for(out.shape[0] * K)
    with nogil:
        for i in prange(M, schedule='static', num_threads=nt):
            for p in range(indptr[i], indptr[i + 1]):
                for k in range(K):
                    out[p, k] = a[i, k]


def edge_gather_src(const int32_t[::1] indices, const real[:, ::1] a, real[:, ::1] out):
    """out[p, :] = a[indices[p], :] (the source node's value on each edge)."""
    cdef Py_ssize_t E = indices.shape[0], K = a.shape[1], p, k, j
    cdef int nt = threads_for(E * K)
    with nogil:
        for p in prange(E, schedule='static', num_threads=nt):
            j = indices[p]
            for k in range(K):
                out[p, k] = a[j, k]


def edge_reduce(const int64_t[::1] indptr, const int64_t[::1] perm, bint use_perm, const real[:, ::1] g,
                real[:, ::1] out):
    """out[i, :] = sum of g[e(p), :] over the entries p of row i: a scatter-add by destination on the CSR
    (``use_perm`` False) or by source on the transposed structure (``perm`` maps its entries to edges),
    so each output row is owned by one thread and no atomics are needed. Sums in double (a few terms
    per row: exactness costs nothing here)."""
    cdef Py_ssize_t M = out.shape[0], K = out.shape[1], i, p, k, e
    cdef int nt = threads_for(g.shape[0] * K)
    cdef double acc
    with nogil:
        for i in prange(M, schedule='guided', num_threads=nt):
            for k in range(K):
                acc = 0.0
                for p in range(indptr[i], indptr[i + 1]):
                    e = perm[p] if use_perm else p
                    acc = acc + ldd(g[e, k])
                out[i, k] = std(acc, out[i, k])


# ---------------------------------------------------------------------------------------------
# edge softmax over each destination node's incoming edges, per column (head)
# ---------------------------------------------------------------------------------------------
def edge_softmax(const int64_t[::1] indptr, const real[:, ::1] s, real[:, ::1] out):
    cdef Py_ssize_t M = indptr.shape[0] - 1, K = s.shape[1], i, p, k
    cdef int nt = threads_for(s.shape[0] * K * 8)
    cdef float mf, zf, vf
    cdef double md, zd, vd
    with nogil:
        for i in prange(M, schedule='guided', num_threads=nt):
            for k in range(K):
                if real is double:
                    md = -INFINITY
                    for p in range(indptr[i], indptr[i + 1]):
                        if s[p, k] > md:
                            md = s[p, k]
                    zd = 0.0
                    for p in range(indptr[i], indptr[i + 1]):
                        vd = exp(s[p, k] - md)
                        out[p, k] = vd
                        zd = zd + vd
                    for p in range(indptr[i], indptr[i + 1]):
                        out[p, k] = out[p, k] / zd
                else:
                    mf = -INFINITY
                    for p in range(indptr[i], indptr[i + 1]):
                        vf = ldf(s[p, k])
                        if vf > mf:
                            mf = vf
                    zf = 0.0
                    for p in range(indptr[i], indptr[i + 1]):
                        zf = zf + expf(ldf(s[p, k]) - mf)
                    zf = 1.0 / zf
                    for p in range(indptr[i], indptr[i + 1]):
                        out[p, k] = stf(expf(ldf(s[p, k]) - mf) * zf, out[p, k])


def edge_softmax_bwd(const int64_t[::1] indptr, const real[:, ::1] y, const real[:, ::1] g,
                     real[:, ::1] out):
    """out = y * (g - sum_row(g * y)): the adjoint of the edge softmax (y its output); row sums in double."""
    cdef Py_ssize_t M = indptr.shape[0] - 1, K = y.shape[1], i, p, k
    cdef int nt = threads_for(y.shape[0] * K * 4)
    cdef double acc
    with nogil:
        for i in prange(M, schedule='guided', num_threads=nt):
            for k in range(K):
                acc = 0.0
                for p in range(indptr[i], indptr[i + 1]):
                    acc = acc + ldd(g[p, k]) * ldd(y[p, k])
                for p in range(indptr[i], indptr[i + 1]):
                    out[p, k] = std(ldd(y[p, k]) * (ldd(g[p, k]) - acc), out[p, k])
