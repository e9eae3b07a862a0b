# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Tiled attention kernels (flash-attention style) for ``fused_attention`` / ``fused_attention_grad``.

Per (batch, head): O = softmax(scale * Q Kᵀ + mask) V with an optional dropout on the probabilities
(``u < keep ? p / keep : 0`` from a uniform draw ``u``, the same values ``dropout_mask`` makes).

* forward (``attention_fwd``): OpenMP over (batch*head, block of BQ queries); per block the keys are
  visited in blocks of BK with an online softmax (running row max ``m`` and sum ``l``, the output
  accumulator rescaled by exp(m_old - m_new) when the max grows). Only a BQ x BK tile of scores exists,
  in a per-thread buffer; the (seq x seq) matrix is never stored. It also returns the row statistics
  lse = m + log(l) for the backward, in float64 (see below).
* backward (``attention_bwd``): OpenMP over batch*head; per query block and key block the scores are
  recomputed from Q, K and lse (P = exp(s - lse), in float32 as exp((s - hi) - lo) with lse = hi + lo, so a
  row whose scores all sit near -1e4 (a key mask) keeps its precision), and dV += Pdᵀ dO, dP = dO Vᵀ,
  dS = P (dP - D) with D = rowsum(dO * O), dQ += scale dS K, dK += scale dSᵀ Q. With ``dmask_q`` it also sums dS over the
  queries (the gradient of a key mask, before the sum over heads / batch the caller does).

Inner loops run over a contiguous axis (key index of a transposed key / value tile, or the head dim)
so gcc vectorises them without reassociating a sum; accumulation is in the input precision (float32
like the BLAS GEMMs of the unfused graph, float64 for gradient checks). The tile GEMMs and the float32 exp
(Cephes, ~1 ulp) are C in ``_attention_tile.h`` (AVX-512 / AVX2 / baseline builds picked at import).
"""

import numpy as np
cimport cython
cimport numpy as cnp
cimport openmp
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.math cimport exp, expf, log, INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cnp.import_array()

cdef extern from "_attention_tile.h" nogil:
    void att_gemm_f(int M, int N, int K, const float* A, long ars, long aks, const float* B, long ldb, float* C,
                    long ldc)
    void att_gemm_d(int M, int N, int K, const double* A, long ars, long aks, const double* B, long ldb, double* C,
                    long ldc)
    void att_transpose_f(int rows, int cols, const float* src, long lds, float* dst, long ldd)
    void att_transpose_d(int rows, int cols, const double* src, long lds, double* dst, long ldd)
    float att_exp_sum_f(float* x, int n, float m)
    float att_scale_mask_max_f(float* x, const float* mask, long mjs, int n, float scale, float start)
    void att_dropout_f(float* p, const float* u, int n, float keep, float dscale)
    void att_bwd_row_f(float* s, float* g, const float* u, float* dm, int n, float keep, float dscale, float di,
                       float scale)
    float att_dot_f(const float* a, const float* b, int n)
    int att_init(int cap)

att_init(-1)   # the widest tile GEMM / exp the CPU runs (AVX-512, AVX2 + FMA or the build's baseline)


def use_level(int cap=-1):
    """Restrict the tile code to level ``cap`` (0 baseline, 1 AVX2 + FMA, 2 AVX-512; -1 the widest the CPU
    runs) and return the level in use: tests run every variant the machine has."""
    return att_init(cap)

cdef enum:
    BQ = 128     # queries per block
    BK = 64      # keys per block


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _exp_row(floating* x, Py_ssize_t n, floating m) noexcept nogil:
    """x[j] = exp(x[j] - m) in place; returns the sum (float32: the vectorised Cephes exp of the header)."""
    cdef Py_ssize_t j
    cdef floating t = 0
    if floating is float:
        return att_exp_sum_f(x, <int>n, m)
    else:
        for j in range(n):
            x[j] = exp(x[j] - m)
            t = t + x[j]
        return t


cdef inline void _gemm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating* A, Py_ssize_t lda,
                       const floating* B, Py_ssize_t ldb, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C[M,N] += A[M,K] B[K,N] (row-major, leading dimensions in elements)."""
    if floating is float:
        att_gemm_f(<int>M, <int>N, <int>K, A, lda, 1, B, ldb, C, ldc)
    else:
        att_gemm_d(<int>M, <int>N, <int>K, A, lda, 1, B, ldb, C, ldc)


cdef inline void _gemm_tn(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating* A, Py_ssize_t lda,
                          const floating* B, Py_ssize_t ldb, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C[M,N] += A[K,M]ᵀ B[K,N]: A row-major (K rows of M), read transposed in place."""
    if floating is float:
        att_gemm_f(<int>M, <int>N, <int>K, A, 1, lda, B, ldb, C, ldc)
    else:
        att_gemm_d(<int>M, <int>N, <int>K, A, 1, lda, B, ldb, C, ldc)


cdef inline void _transpose(Py_ssize_t rows, Py_ssize_t cols, const floating* src, Py_ssize_t lds, floating* dst,
                            Py_ssize_t ldd) noexcept nogil:
    if floating is float:
        att_transpose_f(<int>rows, <int>cols, src, lds, dst, ldd)
    else:
        att_transpose_d(<int>rows, <int>cols, src, lds, dst, ldd)


cdef inline int _threads(Py_ssize_t tasks, Py_ssize_t work, int cap) noexcept nogil:
    """OpenMP threads for ``tasks`` independent pieces of ``work`` in all; ``cap`` > 0 caps them."""
    cdef int t
    if tasks < 2 or work < 65536:
        return 1
    t = openmp.omp_get_max_threads()
    if 0 < cap < t:
        t = cap
    return t if t > 1 else 1


cdef void _fwd_block(const floating* q, Py_ssize_t qs, const floating* k, Py_ssize_t ks,
                     const floating* v, Py_ssize_t vs, const floating* mk, Py_ssize_t mis, Py_ssize_t mjs,
                     const float* u, Py_ssize_t us, floating* o, Py_ssize_t os, double* lse,
                     Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t Sk, Py_ssize_t D, Py_ssize_t Dv,
                     floating scale, float keep, floating dscale,
                     floating* s, floating* kt, floating* acc, floating* m, floating* l,
                     floating* pout, Py_ssize_t bk) noexcept nogil:
    """Queries i0..i1 of one head. Keys in blocks of ``bk`` (a multiple of 16); with ``pout`` (bk >= Sk: one block,
    so the row statistics are final after it) the probabilities before dropout are written to pout (Sq, Sk)."""
    cdef Py_ssize_t nq = i1 - i0, i, j, d, j0, nk
    cdef floating x, mx, corr, p, t
    cdef floating* srow
    cdef floating* arow
    for i in range(nq):
        m[i] = -INFINITY
        l[i] = 0
        for d in range(Dv):
            acc[i * Dv + d] = 0
    j0 = 0
    while j0 < Sk:
        nk = Sk - j0
        if nk > bk:
            nk = bk
        _transpose(nk, D, k + j0 * ks, ks, kt, bk)              # kt[d, j] = k[j0 + j, d]
        for i in range(nq * bk):
            s[i] = 0
        _gemm(nq, nk, D, q + i0 * qs, qs, kt, bk, s, bk)         # s = q_blk k_blkᵀ
        for i in range(nq):
            srow = s + i * bk
            mx = m[i]
            if floating is float:
                mx = att_scale_mask_max_f(srow, mk + (i0 + i) * mis + j0 * mjs if mk != NULL else NULL, mjs,
                                          <int>nk, scale, mx)
            else:
                for j in range(nk):
                    x = srow[j] * scale
                    if mk != NULL:
                        x = x + mk[(i0 + i) * mis + (j0 + j) * mjs]
                    srow[j] = x
                    if x > mx:
                        mx = x
            if mx == -INFINITY:          # every key so far masked with -inf: nothing to add
                for j in range(nk):
                    srow[j] = 0
                if pout != NULL:
                    for j in range(nk):
                        pout[(i0 + i) * Sk + j] = 0
                continue
            corr = _exp(m[i] - mx)
            t = _exp_row(srow, nk, mx)
            if pout != NULL:             # one block: t is the row's whole sum
                x = 1 / t
                for j in range(nk):
                    pout[(i0 + i) * Sk + j] = srow[j] * x
            if u != NULL:
                if floating is float:
                    att_dropout_f(srow, u + (i0 + i) * us + j0, <int>nk, keep, dscale)
                else:
                    for j in range(nk):
                        srow[j] = srow[j] * dscale if u[(i0 + i) * us + j0 + j] < keep else 0
            l[i] = l[i] * corr + t
            m[i] = mx
            if corr != 1:
                arow = acc + i * Dv
                for d in range(Dv):
                    arow[d] = arow[d] * corr
        _gemm(nq, Dv, nk, s, bk, v + j0 * vs, vs, acc, Dv)       # acc += p_blk v_blk
        j0 = j0 + bk
    for i in range(nq):
        t = 1 / l[i]
        for d in range(Dv):
            o[(i0 + i) * os + d] = acc[i * Dv + d] * t
        lse[i0 + i] = <double>m[i] + log(<double>l[i])


cdef void _bwd_row_generic(floating* srow, floating* prow, const floating* mk, Py_ssize_t mjs, const float* u,
                           floating* dm, Py_ssize_t nk, floating scale, floating li, floating di, float keep,
                           floating dscale, bint have_p) noexcept nogil:
    """The float64 twin of ``att_bwd_row_f`` (scores -> P -> dropout -> scale * dS, dm += dS); with ``have_p``
    srow holds P already."""
    cdef Py_ssize_t j
    cdef floating x, p, pd, g, ds
    if not have_p:
        for j in range(nk):
            x = srow[j] * scale
            if mk != NULL:
                x = x + mk[j * mjs]
            srow[j] = x
        _exp_row(srow, nk, li)
    for j in range(nk):
        p = srow[j]
        g = prow[j]
        pd = p
        if u != NULL:
            if u[j] < keep:
                pd = p * dscale
                g = g * dscale
            else:
                pd = 0
                g = 0
        ds = p * (g - di)
        if dm != NULL:
            dm[j] = dm[j] + ds
        srow[j] = pd
        prow[j] = ds * scale


cdef void _bwd_head(const floating* q, Py_ssize_t qs, const floating* k, Py_ssize_t ks,
                    const floating* v, Py_ssize_t vs, const floating* mk, Py_ssize_t mis, Py_ssize_t mjs,
                    const float* u, Py_ssize_t us, const floating* o, Py_ssize_t os,
                    const floating* do_, Py_ssize_t dos, const double* lse,
                    floating* dq, Py_ssize_t ldq, floating* dk, Py_ssize_t ldk, floating* dv, Py_ssize_t ldv,
                    floating* dmq, Py_ssize_t Sq, Py_ssize_t Sk, Py_ssize_t D, Py_ssize_t Dv, floating scale, float keep,
                    floating dscale, floating* s, floating* dp, floating* kt, floating* vt, floating* pt, floating* Di,
                    const floating* pin) noexcept nogil:
    """dq (Sq, D), dk (Sk, D), dv (Sk, Dv) with row strides ldq, ldk, ldv (contiguous rows), dmq (Sk,), written
    whole. With ``pin`` (Sq, Sk), the probabilities the forward stored, the scores are not recomputed (no q kᵀ
    GEMM, no exp)."""
    cdef Py_ssize_t nq, nk, i, j, d, i0, j0
    cdef floating x, p, pd, g, ds, di, li, lo
    cdef floating* srow
    cdef floating* prow
    for j in range(Sk):
        for d in range(D):
            dk[j * ldk + d] = 0
        for d in range(Dv):
            dv[j * ldv + d] = 0
    for j in range(Sq):
        for d in range(D):
            dq[j * ldq + d] = 0
    if dmq != NULL:
        for j in range(Sk):
            dmq[j] = 0
    i0 = 0
    while i0 < Sq:
        nq = Sq - i0
        if nq > BQ:
            nq = BQ
        for i in range(nq):
            if floating is float:
                Di[i] = att_dot_f(do_ + (i0 + i) * dos, o + (i0 + i) * os, <int>Dv)
            else:
                di = 0
                for d in range(Dv):
                    di = di + do_[(i0 + i) * dos + d] * o[(i0 + i) * os + d]
                Di[i] = di
        j0 = 0
        while j0 < Sk:
            nk = Sk - j0
            if nk > BK:
                nk = BK
            _transpose(nk, Dv, v + j0 * vs, vs, vt, BK)
            for i in range(nq * BK):
                dp[i] = 0
            if pin != NULL:
                for i in range(nq):
                    memcpy(s + i * BK, pin + (i0 + i) * Sk + j0, nk * sizeof(floating))
            else:
                _transpose(nk, D, k + j0 * ks, ks, kt, BK)
                for i in range(nq * BK):
                    s[i] = 0
                _gemm(nq, nk, D, q + i0 * qs, qs, kt, BK, s, BK)        # scores
            _gemm(nq, nk, Dv, do_ + i0 * dos, dos, vt, BK, dp, BK)      # dPd = dO vᵀ
            for i in range(nq):
                srow = s + i * BK
                prow = dp + i * BK
                li = <floating>lse[i0 + i]          # lse = li + lo: exp(s - lse) = exp((s - li) - lo)
                lo = <floating>(lse[i0 + i] - <double>li)
                di = Di[i]
                if floating is float:
                    if pin == NULL:
                        att_scale_mask_max_f(srow, mk + (i0 + i) * mis + j0 * mjs if mk != NULL else NULL, mjs,
                                             <int>nk, scale, 0)
                        for j in range(nk):       # exact where the scores are near their max (Sterbenz)
                            srow[j] = srow[j] - li
                        _exp_row(srow, nk, lo)
                    att_bwd_row_f(srow, prow, u + (i0 + i) * us + j0 if u != NULL else NULL,
                                  dmq + j0 if dmq != NULL else NULL, <int>nk, keep, dscale, di, scale)
                else:
                    _bwd_row_generic(srow, prow, mk + (i0 + i) * mis + j0 * mjs if mk != NULL else NULL, mjs,
                                     u + (i0 + i) * us + j0 if u != NULL else NULL,
                                     dmq + j0 if dmq != NULL else NULL, nk, scale, li, di, keep, dscale,
                                     pin != NULL)
            _gemm_tn(nk, Dv, nq, s, BK, do_ + i0 * dos, dos, dv + j0 * ldv, ldv)   # dV += Pdᵀ dO
            _gemm_tn(nk, D, nq, dp, BK, q + i0 * qs, qs, dk + j0 * ldk, ldk)       # dK += scale dSᵀ Q
            _gemm(nq, D, nk, dp, BK, k + j0 * ks, ks, dq + i0 * ldq, ldq)          # dQ += scale dS K
            j0 = j0 + BK
        i0 = i0 + BQ


cdef inline Py_ssize_t _st(Py_ssize_t nbytes, Py_ssize_t item) noexcept nogil:
    return nbytes // item


def _fwd(const floating[:, :, :, :] q, const floating[:, :, :, :] k, const floating[:, :, :, :] v,
         const floating[:, :, :, :] mask, const float[:, :, :, :] u, floating[:, :, :, :] out,
         double[:, :, ::1] lse, floating[:, :, :, ::1] p, bint has_mask, bint has_drop, bint store_p, double scale,
         double keep, double dscale, int cap=0):
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], D = q.shape[3], Sk = k.shape[2]
    cdef Py_ssize_t Dv = v.shape[3]
    cdef Py_ssize_t it = sizeof(floating), nqb = (Sq + BQ - 1) // BQ, task, bh, b, h, i0, i1
    cdef Py_ssize_t mis = 0, mjs = 0, us = 0
    cdef Py_ssize_t bk = (Sk + 15) // 16 * 16 if store_p else BK     # storing P: all keys in one block
    cdef int nt = _threads(B * H * nqb, B * H * Sq * Sk * D, cap)
    cdef floating* pp
    cdef floating* s
    cdef floating* kt
    cdef floating* acc
    cdef floating* m
    cdef floating* l
    cdef const floating* mp
    cdef const float* up
    cdef floating sc = <floating>scale, ds = <floating>dscale
    cdef float kp = <float>keep
    if has_mask:
        mis = _st(mask.strides[2], it)
        mjs = _st(mask.strides[3], it)
    if has_drop:
        us = u.strides[2] // sizeof(float)
    with nogil, parallel(num_threads=nt):
        s = <floating*>malloc(sizeof(floating) * (BQ * bk + D * bk + BQ * Dv + 2 * BQ))
        kt = s + BQ * bk
        acc = kt + D * bk
        m = acc + BQ * Dv
        l = m + BQ
        for task in prange(B * H * nqb, schedule='static'):
            bh = task // nqb
            b = bh // H
            h = bh % H
            i0 = (task % nqb) * BQ
            i1 = i0 + BQ
            if i1 > Sq:
                i1 = Sq
            mp = &mask[b, h, 0, 0] if has_mask else NULL
            up = &u[b, h, 0, 0] if has_drop else NULL
            pp = &p[b, h, 0, 0] if store_p else NULL
            _fwd_block(&q[b, h, 0, 0], _st(q.strides[2], it), &k[b, h, 0, 0], _st(k.strides[2], it),
                       &v[b, h, 0, 0], _st(v.strides[2], it), mp, mis, mjs, up, us,
                       &out[b, h, 0, 0], _st(out.strides[2], it), &lse[b, h, 0], i0, i1, Sk, D, Dv, sc, kp, ds, s, kt, acc, m, l, pp, bk)
        free(s)


def _bwd(const floating[:, :, :, :] q, const floating[:, :, :, :] k, const floating[:, :, :, :] v,
         const floating[:, :, :, :] mask, const float[:, :, :, :] u, const floating[:, :, :, :] o,
         const double[:, :, ::1] lse, const floating[:, :, :, ::1] p, const floating[:, :, :, :] do_,
         floating[:, :, :, :] dq, floating[:, :, :, :] dk, floating[:, :, :, :] dv,        # rows contiguous
         floating[:, :, ::1] dmq, bint has_mask, bint has_drop, bint want_dmask, bint have_p,
         double scale, double keep, double dscale, int cap=0):
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], D = q.shape[3], Sk = k.shape[2]
    cdef Py_ssize_t Dv = v.shape[3]
    cdef Py_ssize_t it = sizeof(floating), bh, b, h
    cdef Py_ssize_t mis = 0, mjs = 0, us = 0
    cdef int nt = _threads(B * H, B * H * Sq * Sk * D, cap)
    cdef floating* s
    cdef floating* dp
    cdef floating* kt
    cdef floating* vt
    cdef floating* pt
    cdef floating* Di
    cdef const floating* mp
    cdef const float* up
    cdef floating* dmp
    cdef floating sc = <floating>scale, ds = <floating>dscale
    cdef float kp = <float>keep
    if has_mask:
        mis = _st(mask.strides[2], it)
        mjs = _st(mask.strides[3], it)
    if has_drop:
        us = u.strides[2] // sizeof(float)
    with nogil, parallel(num_threads=nt):
        s = <floating*>malloc(sizeof(floating) * (3 * BQ * BK + (D + Dv) * BK + BQ))
        dp = s + BQ * BK
        pt = dp + BQ * BK
        kt = pt + BQ * BK
        vt = kt + D * BK
        Di = vt + Dv * BK
        for bh in prange(B * H, schedule='dynamic'):
            b = bh // H
            h = bh % H
            mp = &mask[b, h, 0, 0] if has_mask else NULL
            up = &u[b, h, 0, 0] if has_drop else NULL
            dmp = &dmq[b, h, 0] if want_dmask else NULL
            _bwd_head(&q[b, h, 0, 0], _st(q.strides[2], it), &k[b, h, 0, 0], _st(k.strides[2], it),
                      &v[b, h, 0, 0], _st(v.strides[2], it), mp, mis, mjs, up, us,
                      &o[b, h, 0, 0], _st(o.strides[2], it), &do_[b, h, 0, 0], _st(do_.strides[2], it),
                      &lse[b, h, 0], &dq[b, h, 0, 0], _st(dq.strides[2], it), &dk[b, h, 0, 0],
                      _st(dk.strides[2], it), &dv[b, h, 0, 0], _st(dv.strides[2], it), dmp,
                      Sq, Sk, D, Dv, sc, kp, ds, s, dp, kt, vt, pt, Di, &p[b, h, 0, 0] if have_p else NULL)
        free(s)


@cython.wraparound(True)
def _as4(x, dtype):
    """A 4-d (batch, heads, rows, cols) view of x whose last axis is contiguous (copies only when it must)."""
    x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"attention kernels: expected {np.dtype(dtype)}, got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim > 4:
        x = x.reshape((-1, 1) + x.shape[-2:])
    elif x.ndim != 4:
        raise ValueError(f"attention kernels: expected a 3-d or 4-d tensor, got shape {x.shape}")
    if x.strides[3] != x.itemsize or any(s % x.itemsize for s in x.strides):
        x = np.ascontiguousarray(x)
    return x


_NO_U = np.zeros((1, 1, 1, 1), np.float32)


@cython.wraparound(True)
def _mask4(mask, full, dtype):
    if mask is None:
        return np.zeros((1, 1, 1, 1), dtype), False
    m = np.broadcast_to(np.asarray(mask, dtype), full)
    return _as4(m if len(full) <= 4 else np.ascontiguousarray(m), dtype), True


@cython.wraparound(True)
def _u4(u, full):
    if u is None:
        return _NO_U, False
    return _as4(np.broadcast_to(np.asarray(u, np.float32), full), np.float32), True


@cython.wraparound(True)
def attention_fwd(q, k, v, mask, u, double scale, double keep_prob, alloc=None, bint store_p=False,
                  bint out_bshd=False, int threads=0):
    """(O, lse): O = dropout(softmax(scale q kᵀ + mask)) v over the last two axes; lse (..., Sq) the row
    log-sum-exp of the (masked, scaled) scores. ``mask`` broadcasts to the scores or is None; ``u`` is the
    float32 uniform draw of the dropout (kept where u < keep_prob, scaled by float(1/keep_prob)) or None.
    ``alloc(shape, dtype)`` makes the C-contiguous outputs (default np.empty). With ``store_p`` (short key
    sequences: all keys in one block) it returns (O, lse, P), P (..., Sq, Sk) the probabilities before dropout,
    which ``attention_bwd`` then reads instead of recomputing them. ``out_bshd`` (4-d inputs (B, H, S, D)): O is
    returned as a C-contiguous (B, Sq, H, Dv) array -- the heads merged back, what the output projection
    reads -- instead of (B, H, Sq, Dv). ``threads`` > 0 caps the OpenMP threads (0: all of them)."""
    q = np.asarray(q)
    dt = q.dtype
    if dt != np.float32 and dt != np.float64:
        raise TypeError(f"attention_fwd: expected float32 or float64 inputs, got {dt}")
    lead, Sq, D, Sk = q.shape[:-2], q.shape[-2], q.shape[-1], np.shape(k)[-2]
    full = lead + (Sq, Sk)
    q4, k4, v4 = _as4(q, dt), _as4(k, dt), _as4(v, dt)
    m4, has_mask = _mask4(mask, full, dt)
    u4, has_drop = _u4(u, full)
    alloc = alloc or np.empty
    if out_bshd and q.ndim != 4:
        raise ValueError(f"attention_fwd: out_bshd needs 4-d inputs, got {q.shape}")
    if out_bshd:
        out_t = alloc((q4.shape[0], Sq, q4.shape[1], v4.shape[3]), dt)
        out = out_t.transpose(0, 2, 1, 3)
    else:
        out = out_t = alloc(q4.shape[:3] + (v4.shape[3],), dt)
    lse = alloc(q4.shape[:3], np.float64)      # float64 whatever the inputs: see attention_bwd
    p = alloc(q4.shape[:3] + (Sk,), dt) if store_p else np.empty((1, 1, 1, 1), dt)
    dscale = float(np.asarray(1.0 / keep_prob, dt)) if has_drop else 1.0
    _fwd(q4, k4, v4, m4, u4, out, lse, p, has_mask, has_drop, store_p, scale, float(np.float32(keep_prob)), dscale,
         threads)
    o = out_t if out_bshd else out.reshape(lead + (Sq, v4.shape[3]))
    if store_p:
        return o, lse.reshape(lead + (Sq,)), p.reshape(full)
    return o, lse.reshape(lead + (Sq,))


@cython.wraparound(True)
def attention_bwd(q, k, v, mask, u, o, lse, dout, double scale, double keep_prob, bint want_dmask, alloc=None,
                  p=None, grads_bshd=(False, False, False), int threads=0):
    """(dq, dk, dv, dmask_q): gradients of ``attention_fwd``'s O given dO = ``dout`` and its lse; dmask_q
    (..., Sk) is the score gradient summed over the queries (None unless ``want_dmask``). ``p``: the
    probabilities ``attention_fwd(store_p=True)`` returned (then ``lse`` may be None). ``grads_bshd``: per
    dq, dk, dv (4-d inputs), return it as a C-contiguous (B, S, H, D) array (heads merged back). ``threads`` > 0
    caps the OpenMP threads."""
    q = np.asarray(q)
    dt = q.dtype
    lead, Sq, Sk = q.shape[:-2], q.shape[-2], np.shape(k)[-2]
    full = lead + (Sq, Sk)
    q4, k4, v4, o4, do4 = _as4(q, dt), _as4(k, dt), _as4(v, dt), _as4(o, dt), _as4(dout, dt)
    have_p = p is not None
    if have_p:
        p4 = np.ascontiguousarray(np.asarray(p, dt).reshape(q4.shape[:3] + (Sk,)))
        lse3 = np.zeros(q4.shape[:3], np.float64) if lse is None else \
            np.ascontiguousarray(np.asarray(lse, np.float64).reshape(q4.shape[:3]))
    else:
        p4 = np.empty((1, 1, 1, 1), dt)
        lse3 = np.ascontiguousarray(np.asarray(lse, np.float64).reshape(q4.shape[:3]))
    m4, has_mask = _mask4(mask, full, dt)
    u4, has_drop = _u4(u, full)
    alloc = alloc or np.empty
    if any(grads_bshd) and q.ndim != 4:
        raise ValueError(f"attention_bwd: grads_bshd needs 4-d inputs, got {q.shape}")
    made = []
    for x4, bshd in zip((q4, k4, v4), grads_bshd):
        g = alloc((x4.shape[0], x4.shape[2], x4.shape[1], x4.shape[3]), dt) if bshd else alloc(x4.shape, dt)
        made.append(g)
    dq, dk, dv = (g.transpose(0, 2, 1, 3) if bshd else g for g, bshd in zip(made, grads_bshd))
    dmq = alloc(k4.shape[:3], dt) if want_dmask else np.empty((1, 1, 1), dt)
    dscale = float(np.asarray(1.0 / keep_prob, dt)) if has_drop else 1.0
    _bwd(q4, k4, v4, m4, u4, o4, lse3, p4, do4, dq, dk, dv, dmq, has_mask, has_drop, want_dmask, have_p, scale,
         float(np.float32(keep_prob)), dscale, threads)
    kl = np.shape(k)[:-2]
    dq, dk, dv = (g if bshd else g.reshape(np.shape(x)) for g, bshd, x in zip(made, grads_bshd, (q, k, v)))
    return (dq, dk, dv,
            dmq.reshape(kl + (Sk,)) if want_dmask else None)
