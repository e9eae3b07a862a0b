# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The runtime's GEMMs on the OpenMP threads of its own kernels (see ``runtime/threads.py`` for why).

``gemm(a, b, c, nt)`` computes c[i] = a[i] @ b[i] for every batch index i (or c = a @ b) with ``nt``
OpenMP threads, each calling the BLAS library's single-threaded ``cblas_?gemm`` on its share: a batch
item each when there are at least ``nt`` of them, else a panel of rows (or of columns, whichever
dimension is longer) of every item, panel edges on multiples of 16 so the library's micro-kernels see
the same tiles as in one call. Operands are passed as they lie in memory: an operand whose last axis has
unit stride is row-major, one whose second-to-last axis has unit stride is its transpose (a
``swapaxes`` view costs no copy). The library's function pointers come from ``set_blas`` (found by
``runtime/threads.py`` in the BLAS numpy loaded).
"""

cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport int64_t, int32_t, uintptr_t
from libc.stdlib cimport free, malloc

cnp.import_array()

cdef enum:
    ROW_MAJOR = 101
    NO_TRANS = 111
    TRANS = 112

ctypedef void (*sgemm64_t)(int order, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
                           const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc) noexcept nogil
ctypedef void (*dgemm64_t)(int order, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
                           const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                           double* c, int64_t ldc) noexcept nogil
ctypedef void (*sgemm32_t)(int order, int ta, int tb, int32_t m, int32_t n, int32_t k, float alpha,
                           const float* a, int32_t lda, const float* b, int32_t ldb, float beta,
                           float* c, int32_t ldc) noexcept nogil
ctypedef void (*dgemm32_t)(int order, int ta, int tb, int32_t m, int32_t n, int32_t k, double alpha,
                           const double* a, int32_t lda, const double* b, int32_t ldb, double beta,
                           double* c, int32_t ldc) noexcept nogil

cdef uintptr_t _sgemm = 0
cdef uintptr_t _dgemm = 0
cdef bint _int64 = True


def set_blas(uintptr_t sgemm, uintptr_t dgemm, bint int64):
    """The library's ``cblas_sgemm`` / ``cblas_dgemm`` addresses and whether its integers are 64-bit."""
    global _sgemm, _dgemm, _int64
    _sgemm, _dgemm, _int64 = sgemm, dgemm, int64



cdef inline void _call(bint dbl, int ta, int tb, int64_t m, int64_t n, int64_t k, const char* a, int64_t lda,
                       const char* b, int64_t ldb, char* c, int64_t ldc) noexcept nogil:
    if dbl:
        if _int64:
            (<dgemm64_t>_dgemm)(ROW_MAJOR, ta, tb, m, n, k, 1.0, <const double*>a, lda, <const double*>b, ldb,
                                0.0, <double*>c, ldc)
        else:
            (<dgemm32_t>_dgemm)(ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, 1.0, <const double*>a,
                                <int32_t>lda, <const double*>b, <int32_t>ldb, 0.0, <double*>c, <int32_t>ldc)
    else:
        if _int64:
            (<sgemm64_t>_sgemm)(ROW_MAJOR, ta, tb, m, n, k, <float>1.0, <const float*>a, lda, <const float*>b, ldb,
                                <float>0.0, <float*>c, ldc)
        else:
            (<sgemm32_t>_sgemm)(ROW_MAJOR, ta, tb, <int32_t>m, <int32_t>n, <int32_t>k, <float>1.0,
                                <const float*>a, <int32_t>lda, <const float*>b, <int32_t>ldb, <float>0.0,
                                <float*>c, <int32_t>ldc)


cdef bint _layout(cnp.ndarray x, int nd, Py_ssize_t isz, int* trans, int64_t* ld) noexcept:
    """Transpose flag and leading dimension (elements) of an operand's matrices; False if BLAS can't take
    them as they lie (no unit stride in the last two axes, or a stride that is not a whole element)."""
    cdef cnp.npy_intp* st = cnp.PyArray_STRIDES(x)
    cdef cnp.npy_intp* sh = cnp.PyArray_DIMS(x)
    cdef int j
    cdef Py_ssize_t r = st[nd - 2], cst = st[nd - 1]
    for j in range(nd):
        if st[j] % isz:
            return False
    if cst == isz and r >= sh[nd - 1] * isz and r > 0:
        trans[0] = 0
        ld[0] = r // isz
    elif r == isz and cst >= sh[nd - 2] * isz and cst > 0:
        trans[0] = 1
        ld[0] = cst // isz
    elif sh[nd - 2] == 1 and cst == isz:                 # one row: any row stride will do
        trans[0] = 0
        ld[0] = sh[nd - 1] if sh[nd - 1] > 0 else 1
    else:
        return False
    return True


cdef void _offsets(cnp.ndarray x, int nd, int nb, cnp.npy_intp* bshape, Py_ssize_t isz, int64_t* off) noexcept:
    """Element offset of each batch item's matrix (batch axes in C order; a 2-d operand repeats)."""
    cdef cnp.npy_intp* st = cnp.PyArray_STRIDES(x)
    cdef int64_t i, rem, o, total = 1
    cdef int j
    for j in range(nb):
        total *= bshape[j]
    for i in range(total):
        o = 0
        if nd > 2:
            rem = i
            for j in range(nb - 1, -1, -1):
                o += (rem % bshape[j]) * (st[j] // isz)
                rem //= bshape[j]
        off[i] = o


def gemm(cnp.ndarray a, cnp.ndarray b, cnp.ndarray c, int nt):
    """c = a @ b (numpy's matmul, batch axes equal, or one operand 2-d) into the C-contiguous ``c`` with
    ``nt`` threads. Returns False, computing nothing, when the operands do not suit (dtype, byte order,
    alignment, a read-only ``c``, layout, an empty dimension): the caller then uses np.matmul."""
    cdef int nda = cnp.PyArray_NDIM(a), ndb = cnp.PyArray_NDIM(b), ndc = cnp.PyArray_NDIM(c)
    cdef int typ = cnp.PyArray_TYPE(a)
    if _sgemm == 0 or nda < 2 or ndb < 2 or typ != cnp.PyArray_TYPE(b) or typ != cnp.PyArray_TYPE(c):
        return False
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        return False
    if not cnp.PyArray_IS_C_CONTIGUOUS(c) or ndc != max(nda, ndb) or (nda != ndb and min(nda, ndb) != 2):
        return False
    # BLAS reads native-order, aligned floats and writes into c: anything else is numpy's
    if not (cnp.PyArray_ISBEHAVED_RO(a) and cnp.PyArray_ISBEHAVED_RO(b) and cnp.PyArray_ISBEHAVED(c)):
        return False
    cdef bint dbl = typ == cnp.NPY_FLOAT64
    cdef Py_ssize_t isz = 8 if dbl else 4
    cdef cnp.npy_intp* sa = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* sb = cnp.PyArray_DIMS(b)
    cdef cnp.npy_intp* sc = cnp.PyArray_DIMS(c)
    cdef int64_t m = sa[nda - 2], k = sa[nda - 1], n = sb[ndb - 1], batch = 1
    cdef int j
    if sb[ndb - 2] != k or sc[ndc - 2] != m or sc[ndc - 1] != n or m == 0 or n == 0 or k == 0:
        return False
    for j in range(ndc - 2):
        if nda == ndc and sa[j] != sc[j] or ndb == ndc and sb[j] != sc[j]:
            return False
        batch *= sc[j]
    cdef int ta, tb
    cdef int64_t lda, ldb
    if not _layout(a, nda, isz, &ta, &lda) or not _layout(b, ndb, isz, &tb, &ldb):
        return False
    cdef int64_t* offs = <int64_t*>malloc(2 * batch * sizeof(int64_t))
    if offs == NULL:
        raise MemoryError()
    _offsets(a, nda, ndc - 2, sc, isz, offs)
    _offsets(b, ndb, ndc - 2, sc, isz, offs + batch)
    try:
        _run(<const char*>cnp.PyArray_DATA(a), ta, lda, offs, <const char*>cnp.PyArray_DATA(b), tb, ldb,
             offs + batch, <char*>cnp.PyArray_DATA(c), n, m * n, batch, m, n, k, dbl, nt)
    finally:
        free(offs)
    return True


cdef void _run(const char* pa, int ta, int64_t lda, const int64_t* a_off, const char* pb, int tb, int64_t ldb,
               const int64_t* b_off, char* pc, int64_t ldc, int64_t c_bs, int64_t batch, int64_t m, int64_t n,
               int64_t k, bint dbl, int nt) noexcept:
    cdef Py_ssize_t isz = 8 if dbl else 4
    cdef int cta = TRANS if ta else NO_TRANS
    cdef int ctb = TRANS if tb else NO_TRANS
    cdef int64_t parts, units, u, i, p, lo, hi, step, rows
    cdef bint split_m
    if nt <= 1:
        with nogil:
            for i in range(batch):
                _call(dbl, cta, ctb, m, n, k, pa + a_off[i] * isz, lda, pb + b_off[i] * isz, ldb,
                      pc + i * c_bs * isz, ldc)
        return
    parts = 1 if batch >= nt else nt
    split_m = m >= n
    rows = m if split_m else n
    step = ((rows + parts - 1) // parts + 15) // 16 * 16
    units = batch * parts
    with nogil:
        for u in prange(units, num_threads=nt, schedule="static"):
            i = u // parts
            p = u - i * parts
            lo = p * step
            hi = rows if lo + step > rows else lo + step
            if lo >= hi:
                continue
            if split_m:      # rows lo:hi of op(a) and of c
                _call(dbl, cta, ctb, hi - lo, n, k,
                      pa + (a_off[i] + (lo if ta else lo * lda)) * isz, lda,
                      pb + b_off[i] * isz, ldb, pc + (i * c_bs + lo * ldc) * isz, ldc)
            else:            # columns lo:hi of op(b) and of c
                _call(dbl, cta, ctb, m, hi - lo, k, pa + a_off[i] * isz, lda,
                      pb + (b_off[i] + (lo * ldb if tb else lo)) * isz, ldb, pc + (i * c_bs + lo) * isz, ldc)
