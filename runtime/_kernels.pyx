# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compute kernels of the numpy training runtime (Cython + OpenMP).

Every public function is a plain ``def`` callable from Python.  The wrapper
part (holding the GIL) validates dtypes / shapes, makes the inputs
C-contiguous, allocates the outputs and dispatches on dtype to a fused
(``floating`` x ``index_t``) implementation that runs its heavy loops with
the GIL released (``prange``, static schedule).

Conventions
-----------
* float arrays: float32 or float64.  The *first* float argument fixes the
  dtype; the other float arguments are cast to it.  Other dtypes -> TypeError.
* index arrays: int32 or int64 are used as is, other integer dtypes are cast
  to int64; non-integer dtypes -> TypeError.
* outputs are freshly allocated, C-contiguous, with the float dtype of the
  first float input (``scatter_add_rows_inplace`` writes into ``table``).
* shape problems -> ValueError naming the function and the shapes; bad
  indices / labels -> IndexError naming the index and the table size.
* reductions (row sums / dots / norms, pooling sums, layernorm parameter
  grads, and the per-index sums of the embedding scatter / segment kernels)
  are accumulated in double.  col2im and the pooling backward scatters
  accumulate in the output dtype (at most kh*kw terms per element).
* threads: a kernel goes parallel only when it has enough work (see _nt);
  otherwise it runs serially without entering an OpenMP region.  The thread
  count follows OMP_NUM_THREADS / omp_get_max_threads().
* float32 exp is a branch-free polynomial (_expf, ~2 ulp) so that the loops
  using it auto-vectorise under the plain -O3 build; float64 uses libm.
"""

import numpy as np
cimport numpy as cnp
cimport openmp
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport exp, log, sqrt, fabs, fabsf, INFINITY
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cnp.import_array()

__all__ = [
    "gelu_fwd", "gelu_bwd",
    "softmax_fwd", "softmax_bwd", "log_softmax_fwd", "log_softmax_bwd",
    "softmax_xent_sparse_fwd", "softmax_xent_sparse_bwd",
    "softmax_xent_dense_fwd", "softmax_xent_dense_bwd",
    "layernorm_fwd", "layernorm_bwd", "layernorm_bwd_params",
    "batchnorm_fwd", "batchnorm_bwd", "batchnorm_bwd_params", "batchnorm_stats",
    "im2col", "col2im",
    "maxpool2d_fwd", "maxpool2d_bwd", "avgpool2d_fwd", "avgpool2d_bwd",
    "embedding_gather", "embedding_scatter_add", "segment_sum_rows",
    "scatter_add_rows_inplace",
]

ctypedef fused index_t:
    int32_t
    int64_t


# ---------------------------------------------------------------------------
# Python-level helpers (GIL held)
# ---------------------------------------------------------------------------

cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)
cdef object _I64 = np.dtype(np.int64)


cdef inline bint _is_carray(cnp.ndarray a):
    return cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a)


cdef inline bint _is32(cnp.ndarray a):
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32


cdef inline str _shp(cnp.ndarray a):
    return str(tuple((<object>a).shape))


cdef inline cnp.ndarray _new_like(cnp.ndarray a, bint zero):
    """Fresh C-contiguous array with the shape and dtype of `a` (C-API: no Python call)."""
    if zero:
        return <cnp.ndarray>cnp.PyArray_ZEROS(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), cnp.PyArray_TYPE(a), 0)
    return <cnp.ndarray>cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), cnp.PyArray_TYPE(a), 0)


cdef cnp.ndarray _new(int typenum, bint zero, Py_ssize_t d0, Py_ssize_t d1=-1,
                      Py_ssize_t d2=-1, Py_ssize_t d3=-1):
    """Fresh C-contiguous array of shape (d0[, d1[, d2[, d3]]])."""
    cdef cnp.npy_intp dims[4]
    cdef int nd = 1
    dims[0] = d0
    if d1 >= 0:
        dims[1] = d1
        nd = 2
        if d2 >= 0:
            dims[2] = d2
            nd = 3
            if d3 >= 0:
                dims[3] = d3
                nd = 4
    if zero:
        return <cnp.ndarray>cnp.PyArray_ZEROS(nd, dims, typenum, 0)
    return <cnp.ndarray>cnp.PyArray_EMPTY(nd, dims, typenum, 0)


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int k, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    for k in range(nd):
        if a.shape[k] != b.shape[k]:
            return False
    return True


cdef cnp.ndarray _float_in(object a, str fn, str name):
    """Primary float input: float32/float64 kept as is, made C-contiguous."""
    cdef cnp.ndarray arr
    cdef int t
    if cnp.PyArray_Check(a):
        arr = <cnp.ndarray>a
    else:
        arr = np.asarray(a)
    t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"{fn}: {name} must be a float32 or float64 array, got dtype {arr.dtype}")
    if not _is_carray(arr):
        arr = np.array(arr, dtype=_F32 if t == cnp.NPY_FLOAT32 else _F64, order='C', copy=True)
    return arr


cdef cnp.ndarray _float_like(object a, cnp.ndarray ref, str fn, str name):
    """Secondary float input: cast to the dtype of `ref`, made C-contiguous."""
    cdef cnp.ndarray arr
    cdef int t = cnp.PyArray_TYPE(ref)
    if cnp.PyArray_Check(a):
        arr = <cnp.ndarray>a
    else:
        arr = np.asarray(a)
    if cnp.PyArray_TYPE(arr) == t and _is_carray(arr):
        return arr
    if arr.dtype.kind not in 'fiub':
        raise TypeError(f"{fn}: {name} must be a real numeric array, got dtype {arr.dtype}")
    return np.array(arr, dtype=ref.dtype, order='C', copy=True)


cdef cnp.ndarray _index_in(object a, str fn, str name):
    """Index input: int32/int64 kept as is, other integer dtypes cast to int64."""
    cdef cnp.ndarray arr
    if cnp.PyArray_Check(a):
        arr = <cnp.ndarray>a
    else:
        arr = np.asarray(a)
    kind = arr.dtype.kind
    if kind == 'i' and (cnp.PyArray_ITEMSIZE(arr) == 4 or cnp.PyArray_ITEMSIZE(arr) == 8) \
            and _is_carray(arr):
        return arr
    if kind in 'iu' or (arr.size == 0 and kind != 'b'):
        if kind == 'i' and cnp.PyArray_ITEMSIZE(arr) == 4:
            return np.array(arr, dtype=np.int32, order='C', copy=True)
        return np.array(arr, dtype=_I64, order='C', copy=True)
    raise TypeError(f"{fn}: {name} must be an integer array, got dtype {arr.dtype}")


cdef inline cnp.ndarray _flat(cnp.ndarray a):
    """1-D view of a C-contiguous array."""
    if cnp.PyArray_NDIM(a) == 1:
        return a
    return a.reshape(-1)


cdef inline bint _is_i32(cnp.ndarray a):
    return cnp.PyArray_ITEMSIZE(a) == 4


cdef inline int _need_ndim(cnp.ndarray a, int nd, str fn, str name) except -1:
    if a.ndim != nd:
        raise ValueError(f"{fn}: {name} must be {nd}-D, got shape {_shp(a)}")
    return 0


cdef inline int _need_same_shape(cnp.ndarray a, cnp.ndarray b, str fn, str na, str nb) except -1:
    if not _same_shape(a, b):
        raise ValueError(f"{fn}: {na} and {nb} must have the same shape, got {na}{_shp(a)} and {nb}{_shp(b)}")
    return 0


cdef inline int _nt(Py_ssize_t work, Py_ssize_t grain, Py_ssize_t tasks) noexcept nogil:
    """Number of threads for `work` elementary items split into `tasks` parallel tasks."""
    cdef Py_ssize_t t
    if work < 2 * grain or tasks < 2:
        return 1
    t = openmp.omp_get_max_threads()
    if t > work // grain:
        t = work // grain
    if t > tasks:
        t = tasks
    if t < 1:
        t = 1
    return <int>t


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# ---------------------------------------------------------------------------
# Scalar math helpers (nogil)
# ---------------------------------------------------------------------------

cdef union _Bits32:
    float f
    uint32_t u
    int32_t i


cdef union _Bits64:
    double f
    uint64_t u


# NOTE on branches: the build uses plain -O3 (no -ffast-math), i.e. -ftrapping-math,
# under which gcc refuses to if-convert a branch guarded by a float comparison, and
# such a branch stops the whole loop from vectorising.  Comparisons used as *values*
# are fine, so the helpers below select with integer bit masks instead of branching.

cdef inline floating _select(bint c, floating a, floating b) noexcept nogil:
    """c ? a : b, branch-free."""
    cdef _Bits32 a32, b32
    cdef _Bits64 a64, b64
    cdef uint32_t m32
    cdef uint64_t m64
    if floating is float:
        m32 = <uint32_t>0 - <uint32_t>c
        a32.f = a
        b32.f = b
        a32.u = (a32.u & m32) | (b32.u & ~m32)
        return a32.f
    else:
        m64 = <uint64_t>0 - <uint64_t>c
        a64.f = a
        b64.f = b
        a64.u = (a64.u & m64) | (b64.u & ~m64)
        return a64.f


cdef inline float _expf(float x) noexcept nogil:
    """exp for float32, branch-free so that loops calling it auto-vectorise.

    Cody-Waite range reduction + Cephes degree-6 polynomial (~2 ulp).
    x < -87.3365 -> 0 (true result is below FLT_MIN), x > 88.37 -> +inf,
    NaN -> NaN.
    """
    cdef _Bits32 t, sc
    cdef float n, r, p
    cdef bint lo = x < <float>-87.3365447505531
    cdef bint hi = x > <float>88.37
    cdef float xc = _select(lo, <float>-87.3365447505531, _select(hi, <float>88.37, x))
    # round(xc / ln2) via the 1.5*2^23 magic constant (exact, no int conversion)
    t.f = xc * <float>1.44269504088896341 + <float>12582912.0
    n = t.f - <float>12582912.0
    r = xc - n * <float>0.693359375
    r = r + n * <float>2.12194440e-4
    p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * (r * r) + r + <float>1.0
    # 2^n: the low mantissa bits of t hold n + 0x400000; rebuild the exponent
    sc.u = (t.u + <uint32_t>0xB4C0007F) << 23
    p = p * sc.f
    return _select(lo, <float>0.0, _select(hi, <float>INFINITY, p))


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return _expf(x)
    else:
        return exp(x)


cdef inline floating _fabs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


# ---- row primitives (4 independent double accumulators) --------------------

cdef inline double _rsum(const floating* x, Py_ssize_t n) noexcept nogil:
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef Py_ssize_t j, n4 = n - (n & 3)
    for j in range(0, n4, 4):
        a0 += x[j]
        a1 += x[j + 1]
        a2 += x[j + 2]
        a3 += x[j + 3]
    for j in range(n4, n):
        a0 += x[j]
    return (a0 + a1) + (a2 + a3)


cdef inline double _rdot(const floating* x, const floating* y, Py_ssize_t n) noexcept nogil:
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef Py_ssize_t j, n4 = n - (n & 3)
    for j in range(0, n4, 4):
        a0 += <double>x[j] * <double>y[j]
        a1 += <double>x[j + 1] * <double>y[j + 1]
        a2 += <double>x[j + 2] * <double>y[j + 2]
        a3 += <double>x[j + 3] * <double>y[j + 3]
    for j in range(n4, n):
        a0 += <double>x[j] * <double>y[j]
    return (a0 + a1) + (a2 + a3)


cdef inline double _rsqdev(const floating* x, double m, Py_ssize_t n) noexcept nogil:
    """sum((x - m)^2) in double."""
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0, d0, d1, d2, d3
    cdef Py_ssize_t j, n4 = n - (n & 3)
    for j in range(0, n4, 4):
        d0 = x[j] - m
        d1 = x[j + 1] - m
        d2 = x[j + 2] - m
        d3 = x[j + 3] - m
        a0 += d0 * d0
        a1 += d1 * d1
        a2 += d2 * d2
        a3 += d3 * d3
    for j in range(n4, n):
        d0 = x[j] - m
        a0 += d0 * d0
    return (a0 + a1) + (a2 + a3)


cdef inline double _rdot_dev(const floating* a, const floating* x, double m,
                            Py_ssize_t n) noexcept nogil:
    """sum(a * (x - m)) in double."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t j, n4 = n - (n & 3)
    for j in range(0, n4, 4):
        s0 += a[j] * (x[j] - m)
        s1 += a[j + 1] * (x[j + 1] - m)
        s2 += a[j + 2] * (x[j + 2] - m)
        s3 += a[j + 3] * (x[j + 3] - m)
    for j in range(n4, n):
        s0 += a[j] * (x[j] - m)
    return (s0 + s1) + (s2 + s3)


cdef inline void _rdot_pair(const floating* dy, const floating* g, const floating* x, double m,
                            Py_ssize_t n, double* s_g, double* s_gx) noexcept nogil:
    """s_g = sum(dy * g), s_gx = sum(dy * g * (x - m)), both in double, one pass."""
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0
    cdef double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0
    cdef double t0, t1, t2, t3
    cdef Py_ssize_t j, n4 = n - (n & 3)
    for j in range(0, n4, 4):
        t0 = <double>dy[j] * g[j]
        t1 = <double>dy[j + 1] * g[j + 1]
        t2 = <double>dy[j + 2] * g[j + 2]
        t3 = <double>dy[j + 3] * g[j + 3]
        a0 += t0
        a1 += t1
        a2 += t2
        a3 += t3
        b0 += t0 * (x[j] - m)
        b1 += t1 * (x[j + 1] - m)
        b2 += t2 * (x[j + 2] - m)
        b3 += t3 * (x[j + 3] - m)
    for j in range(n4, n):
        t0 = <double>dy[j] * g[j]
        a0 += t0
        b0 += t0 * (x[j] - m)
    s_g[0] = (a0 + a1) + (a2 + a3)
    s_gx[0] = (b0 + b1) + (b2 + b3)


cdef inline floating _rmax(const floating* x, Py_ssize_t n) noexcept nogil:
    """Row max (n >= 1).  A +NaN in the row yields NaN.

    float32: integer max over an order-preserving remap of the bit patterns, which
    vectorises (a float max reduction does not without -ffast-math).
    """
    cdef _Bits32 b
    cdef int32_t mi, vi
    cdef floating m, v
    cdef Py_ssize_t j
    if floating is float:
        mi = -2147483647 - 1
        for j in range(n):
            b.f = x[j]
            vi = b.i ^ ((b.i >> 31) & 0x7FFFFFFF)
            mi = vi if vi > mi else mi
        b.i = mi ^ ((mi >> 31) & 0x7FFFFFFF)
        return b.f
    else:
        m = x[0]
        for j in range(1, n):
            v = x[j]
            if v > m or v != v:
                m = v
        return m


cdef inline void _exp_shift(const floating* x, floating* y, floating m, Py_ssize_t n) noexcept nogil:
    """y = exp(x - m)."""
    cdef Py_ssize_t j
    for j in range(n):
        y[j] = _exp(x[j] - m)


cdef inline void _scale(floating* y, floating s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        y[j] = y[j] * s


cdef inline double _sumexp_shift(const floating* x, floating m, Py_ssize_t n) noexcept nogil:
    """sum(exp(x - m)) in double, without an output row (stack buffer chunks)."""
    cdef floating buf[256]
    cdef Py_ssize_t off = 0, ln
    cdef double s = 0.0
    while off < n:
        ln = _imin(256, n - off)
        _exp_shift(x + off, buf, m, ln)
        s += _rsum(buf, ln)
        off += ln
    return s


# ---------------------------------------------------------------------------
# 1. GELU (tanh approximation)
#    gelu(x) = 0.5 x (1 + tanh(u)),  u = c (x + 0.044715 x^3),  c = sqrt(2/pi)
#    computed as x * sigmoid(2u) (identical), with a = exp(-2|u|) in (0, 1]
#    so nothing overflows: sigmoid(2u) = (u >= 0 ? 1 : a) / (1 + a),
#    sigmoid'(2u) = s (1 - s) = a / (1 + a)^2.
# ---------------------------------------------------------------------------

cdef inline void _gelu_fwd_blk(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v, u, a, s
    cdef floating c = <floating>0.7978845608028654
    cdef floating k = <floating>0.044715
    for i in range(n):
        v = x[i]
        u = c * (v + k * (v * v * v))
        a = _exp(<floating>-2.0 * _fabs(u))
        s = _select(u >= 0, <floating>1.0, a) / (<floating>1.0 + a)
        y[i] = v * s


cdef inline void _gelu_bwd_blk(const floating* x, const floating* dy, floating* dx,
                               Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v, u, a, inv, s, sp, du
    cdef floating c = <floating>0.7978845608028654
    cdef floating k = <floating>0.044715
    cdef floating k3c2 = <floating>(2.0 * 0.7978845608028654 * 3.0 * 0.044715)
    cdef floating c2 = <floating>(2.0 * 0.7978845608028654)
    for i in range(n):
        v = x[i]
        u = c * (v + k * (v * v * v))
        a = _exp(<floating>-2.0 * _fabs(u))
        inv = <floating>1.0 / (<floating>1.0 + a)
        s = _select(u >= 0, <floating>1.0, a) * inv
        sp = a * inv * inv
        du = c2 + k3c2 * (v * v)          # d(2u)/dx
        dx[i] = dy[i] * (s + v * sp * du)


cdef int _gelu_fwd(const floating[::1] x, floating[::1] y) except -1:
    cdef Py_ssize_t n = x.shape[0], bs, b, s
    cdef int nt = _nt(n, 16384, n)
    cdef const floating* xp = &x[0]
    cdef floating* yp = &y[0]
    bs = ((n + nt - 1) // nt + 15) & ~(<Py_ssize_t>15)
    with nogil:
        if nt == 1:
            _gelu_fwd_blk(xp, yp, n)
        else:
            for b in prange(nt, schedule='static', num_threads=nt):
                s = b * bs
                if s < n:
                    _gelu_fwd_blk(xp + s, yp + s, _imin(bs, n - s))
    return 0


cdef int _gelu_bwd(const floating[::1] x, const floating[::1] dy, floating[::1] dx) except -1:
    cdef Py_ssize_t n = x.shape[0], bs, b, s
    cdef int nt = _nt(n, 16384, n)
    cdef const floating* xp = &x[0]
    cdef const floating* gp = &dy[0]
    cdef floating* dp = &dx[0]
    bs = ((n + nt - 1) // nt + 15) & ~(<Py_ssize_t>15)
    with nogil:
        if nt == 1:
            _gelu_bwd_blk(xp, gp, dp, n)
        else:
            for b in prange(nt, schedule='static', num_threads=nt):
                s = b * bs
                if s < n:
                    _gelu_bwd_blk(xp + s, gp + s, dp + s, _imin(bs, n - s))
    return 0


def gelu_fwd(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, any shape."""
    cdef cnp.ndarray xa = _float_in(x, "gelu_fwd", "x")
    cdef cnp.ndarray y = _new_like(xa, False)
    if xa.size == 0:
        return y
    if _is32(xa):
        _gelu_fwd[float](_flat(xa), _flat(y))
    else:
        _gelu_fwd[double](_flat(xa), _flat(y))
    return y


def gelu_bwd(x, dy):
    """dx = dy * gelu'(x), elementwise, any shape (x and dy same shape)."""
    cdef cnp.ndarray xa = _float_in(x, "gelu_bwd", "x")
    cdef cnp.ndarray ga = _float_like(dy, xa, "gelu_bwd", "dy")
    _need_same_shape(xa, ga, "gelu_bwd", "x", "dy")
    cdef cnp.ndarray dx = _new_like(xa, False)
    if xa.size == 0:
        return dx
    if _is32(xa):
        _gelu_bwd[float](_flat(xa), _flat(ga), _flat(dx))
    else:
        _gelu_bwd[double](_flat(xa), _flat(ga), _flat(dx))
    return dx


# ---------------------------------------------------------------------------
# 2. softmax / log-softmax over the last axis of (N, C)
# ---------------------------------------------------------------------------

cdef inline void _softmax_row(const floating* x, floating* y, Py_ssize_t C) noexcept nogil:
    cdef floating m = _rmax(x, C)
    _exp_shift(x, y, m, C)
    _scale(y, <floating>(1.0 / _rsum(y, C)), C)


cdef inline void _softmax_bwd_row(const floating* y, const floating* dy, floating* dx,
                                  Py_ssize_t C) noexcept nogil:
    cdef floating s = <floating>_rdot(dy, y, C)
    cdef Py_ssize_t j
    for j in range(C):
        dx[j] = y[j] * (dy[j] - s)


cdef inline void _log_softmax_row(const floating* x, floating* y, Py_ssize_t C) noexcept nogil:
    cdef floating m = _rmax(x, C)
    cdef Py_ssize_t j
    _exp_shift(x, y, m, C)                       # y used as scratch
    cdef floating ls = <floating>log(_rsum(y, C))
    for j in range(C):
        y[j] = (x[j] - m) - ls


cdef inline void _log_softmax_bwd_row(const floating* y, const floating* dy, floating* dx,
                                      Py_ssize_t C) noexcept nogil:
    cdef floating s = <floating>_rsum(dy, C)
    cdef Py_ssize_t j
    for j in range(C):
        dx[j] = dy[j] - _exp(y[j]) * s


cdef int _softmax_fwd(const floating[:, ::1] x, floating[:, ::1] y, bint logsm) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    cdef int nt = _nt(N * C, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    with nogil:
        if logsm:
            if nt == 1:
                for i in range(N):
                    _log_softmax_row(xp + i * C, yp + i * C, C)
            else:
                for i in prange(N, schedule='static', num_threads=nt):
                    _log_softmax_row(xp + i * C, yp + i * C, C)
        else:
            if nt == 1:
                for i in range(N):
                    _softmax_row(xp + i * C, yp + i * C, C)
            else:
                for i in prange(N, schedule='static', num_threads=nt):
                    _softmax_row(xp + i * C, yp + i * C, C)
    return 0


cdef int _softmax_bwd(const floating[:, ::1] y, const floating[:, ::1] dy, floating[:, ::1] dx,
                      bint logsm) except -1:
    cdef Py_ssize_t N = y.shape[0], C = y.shape[1], i
    cdef int nt = _nt(N * C, 32768, N)
    cdef const floating* yp = &y[0, 0]
    cdef const floating* gp = &dy[0, 0]
    cdef floating* dp = &dx[0, 0]
    with nogil:
        if logsm:
            if nt == 1:
                for i in range(N):
                    _log_softmax_bwd_row(yp + i * C, gp + i * C, dp + i * C, C)
            else:
                for i in prange(N, schedule='static', num_threads=nt):
                    _log_softmax_bwd_row(yp + i * C, gp + i * C, dp + i * C, C)
        else:
            if nt == 1:
                for i in range(N):
                    _softmax_bwd_row(yp + i * C, gp + i * C, dp + i * C, C)
            else:
                for i in prange(N, schedule='static', num_threads=nt):
                    _softmax_bwd_row(yp + i * C, gp + i * C, dp + i * C, C)
    return 0


cdef object _softmax_fwd_wrap(object x, bint logsm, str fn):
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    _need_ndim(xa, 2, fn, "x")
    cdef cnp.ndarray y = _new_like(xa, False)
    if xa.size == 0:
        return y
    if _is32(xa):
        _softmax_fwd[float](xa, y, logsm)
    else:
        _softmax_fwd[double](xa, y, logsm)
    return y


cdef object _softmax_bwd_wrap(object y, object dy, bint logsm, str fn):
    cdef cnp.ndarray ya = _float_in(y, fn, "y")
    cdef cnp.ndarray ga = _float_like(dy, ya, fn, "dy")
    _need_ndim(ya, 2, fn, "y")
    _need_same_shape(ya, ga, fn, "y", "dy")
    cdef cnp.ndarray dx = _new_like(ya, False)
    if ya.size == 0:
        return dx
    if _is32(ya):
        _softmax_bwd[float](ya, ga, dx, logsm)
    else:
        _softmax_bwd[double](ya, ga, dx, logsm)
    return dx


def softmax_fwd(x):
    """Row softmax of a 2-D array (N, C) over the last axis."""
    return _softmax_fwd_wrap(x, False, "softmax_fwd")


def softmax_bwd(y, dy):
    """dx = y * (dy - sum(dy * y, -1, keepdims=True)); y is the softmax output."""
    return _softmax_bwd_wrap(y, dy, False, "softmax_bwd")


def log_softmax_fwd(x):
    """Row log-softmax of a 2-D array (N, C) over the last axis."""
    return _softmax_fwd_wrap(x, True, "log_softmax_fwd")


def log_softmax_bwd(y, dy):
    """dx = dy - exp(y) * sum(dy, -1, keepdims=True); y is the log-softmax output."""
    return _softmax_bwd_wrap(y, dy, True, "log_softmax_bwd")


# ---------------------------------------------------------------------------
# 3. softmax cross entropy (sparse labels / dense targets)
# ---------------------------------------------------------------------------

cdef Py_ssize_t _first_bad_index(const index_t[::1] idx, Py_ssize_t size) noexcept:
    """Position of the first index outside [0, size), or -1."""
    cdef Py_ssize_t k, n = idx.shape[0]
    cdef int64_t v
    with nogil:
        for k in range(n):
            v = idx[k]
            if v < 0 or v >= size:
                return k
    return -1


cdef int _check_index_range(cnp.ndarray idx, Py_ssize_t size, str fn, str name, str what) except -1:
    cdef Py_ssize_t pos
    if idx.shape[0] == 0:
        return 0
    if _is_i32(idx):
        pos = _first_bad_index[int32_t](idx, size)
    else:
        pos = _first_bad_index[int64_t](idx, size)
    if pos >= 0:
        raise IndexError(f"{fn}: {name}[{pos}] = {int(idx[pos])} is out of range for {what} of size {size}")
    return 0


cdef int _xent_sparse_fwd(const floating[:, ::1] x, const index_t[::1] lab,
                          floating[::1] loss) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    cdef int nt = _nt(N * C, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* row
    cdef floating m
    with nogil:
        if nt == 1:
            for i in range(N):
                row = xp + i * C
                m = _rmax(row, C)
                loss[i] = <floating>(log(_sumexp_shift(row, m, C)) - (<double>row[lab[i]] - m))
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                row = xp + i * C
                m = _rmax(row, C)
                loss[i] = <floating>(log(_sumexp_shift(row, m, C)) - (<double>row[lab[i]] - m))
    return 0


cdef int _xent_sparse_bwd(const floating[:, ::1] x, const index_t[::1] lab,
                          const floating[::1] dloss, floating[:, ::1] dx) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    cdef int nt = _nt(N * C, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef floating* dp = &dx[0, 0]
    with nogil:
        if nt == 1:
            for i in range(N):
                _xent_sparse_bwd_row(xp + i * C, lab[i], dloss[i], dp + i * C, C)
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                _xent_sparse_bwd_row(xp + i * C, lab[i], dloss[i], dp + i * C, C)
    return 0


cdef inline void _xent_sparse_bwd_row(const floating* x, Py_ssize_t lab, floating g,
                                      floating* dx, Py_ssize_t C) noexcept nogil:
    cdef floating m = _rmax(x, C)
    _exp_shift(x, dx, m, C)
    _scale(dx, <floating>(<double>g / _rsum(dx, C)), C)
    dx[lab] -= g


cdef inline floating _xent_dense_row(const floating* x, const floating* t,
                                     Py_ssize_t C) noexcept nogil:
    # loss = -sum t (x - lse) = sum(t) * log(S) - sum(t * (x - m)),  S = sum exp(x - m)
    cdef floating m = _rmax(x, C)
    cdef double S = _sumexp_shift(x, m, C)
    cdef double st = _rsum(t, C)
    cdef double stx = _rdot_dev(t, x, <double>m, C)
    return <floating>(st * log(S) - stx)


cdef inline void _xent_dense_bwd_row(const floating* x, const floating* t, floating g,
                                     floating* dx, Py_ssize_t C) noexcept nogil:
    # dx = (softmax * sum(t) - t) * g
    cdef floating m = _rmax(x, C)
    cdef Py_ssize_t j
    _exp_shift(x, dx, m, C)
    cdef double S = _rsum(dx, C)
    cdef double st = _rsum(t, C)
    cdef floating a = <floating>(st * g / S)
    for j in range(C):
        dx[j] = dx[j] * a - t[j] * g


cdef int _xent_dense_fwd(const floating[:, ::1] x, const floating[:, ::1] t,
                         floating[::1] loss) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    cdef int nt = _nt(N * C, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* tp = &t[0, 0]
    with nogil:
        if nt == 1:
            for i in range(N):
                loss[i] = _xent_dense_row(xp + i * C, tp + i * C, C)
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                loss[i] = _xent_dense_row(xp + i * C, tp + i * C, C)
    return 0


cdef int _xent_dense_bwd(const floating[:, ::1] x, const floating[:, ::1] t,
                         const floating[::1] dloss, floating[:, ::1] dx) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    cdef int nt = _nt(N * C, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* tp = &t[0, 0]
    cdef floating* dp = &dx[0, 0]
    with nogil:
        if nt == 1:
            for i in range(N):
                _xent_dense_bwd_row(xp + i * C, tp + i * C, dloss[i], dp + i * C, C)
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                _xent_dense_bwd_row(xp + i * C, tp + i * C, dloss[i], dp + i * C, C)
    return 0


cdef int _check_logits_labels(cnp.ndarray x, cnp.ndarray lab, str fn) except -1:
    _need_ndim(x, 2, fn, "logits")
    if lab.ndim != 1 or lab.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: labels must have shape ({x.shape[0]},) to match logits{_shp(x)}, "
                         f"got labels{_shp(lab)}")
    _check_index_range(lab, x.shape[1], fn, "labels", "number of classes")
    return 0


cdef int _check_dloss(cnp.ndarray x, cnp.ndarray g, str fn) except -1:
    if g.ndim != 1 or g.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: dloss must have shape ({x.shape[0]},) to match logits{_shp(x)}, "
                         f"got dloss{_shp(g)}")
    return 0


def softmax_xent_sparse_fwd(logits, labels):
    """Per-row loss (N,) = logsumexp(logits[n]) - logits[n, labels[n]]."""
    fn = "softmax_xent_sparse_fwd"
    cdef cnp.ndarray xa = _float_in(logits, fn, "logits")
    cdef cnp.ndarray la = _index_in(labels, fn, "labels")
    _check_logits_labels(xa, la, fn)
    cdef cnp.ndarray loss = _new(cnp.PyArray_TYPE(xa), False, xa.shape[0])
    if xa.shape[0] == 0:
        return loss
    if _is32(xa):
        if _is_i32(la):
            _xent_sparse_fwd[float, int32_t](xa, la, loss)
        else:
            _xent_sparse_fwd[float, int64_t](xa, la, loss)
    else:
        if _is_i32(la):
            _xent_sparse_fwd[double, int32_t](xa, la, loss)
        else:
            _xent_sparse_fwd[double, int64_t](xa, la, loss)
    return loss


def softmax_xent_sparse_bwd(logits, labels, dloss):
    """dlogits (N, C) = (softmax(logits) - onehot(labels)) * dloss[:, None]."""
    fn = "softmax_xent_sparse_bwd"
    cdef cnp.ndarray xa = _float_in(logits, fn, "logits")
    cdef cnp.ndarray la = _index_in(labels, fn, "labels")
    cdef cnp.ndarray ga = _float_like(dloss, xa, fn, "dloss")
    _check_logits_labels(xa, la, fn)
    _check_dloss(xa, ga, fn)
    cdef cnp.ndarray dx = _new_like(xa, False)
    if xa.shape[0] == 0:
        return dx
    if _is32(xa):
        if _is_i32(la):
            _xent_sparse_bwd[float, int32_t](xa, la, ga, dx)
        else:
            _xent_sparse_bwd[float, int64_t](xa, la, ga, dx)
    else:
        if _is_i32(la):
            _xent_sparse_bwd[double, int32_t](xa, la, ga, dx)
        else:
            _xent_sparse_bwd[double, int64_t](xa, la, ga, dx)
    return dx


def softmax_xent_dense_fwd(logits, targets):
    """Per-row loss (N,) = -sum(targets * log_softmax(logits), -1)."""
    fn = "softmax_xent_dense_fwd"
    cdef cnp.ndarray xa = _float_in(logits, fn, "logits")
    cdef cnp.ndarray ta = _float_like(targets, xa, fn, "targets")
    _need_ndim(xa, 2, fn, "logits")
    _need_same_shape(xa, ta, fn, "logits", "targets")
    cdef cnp.ndarray loss
    if xa.shape[1] == 0:
        return _new(cnp.PyArray_TYPE(xa), True, xa.shape[0])
    loss = _new(cnp.PyArray_TYPE(xa), False, xa.shape[0])
    if xa.shape[0] == 0:
        return loss
    if _is32(xa):
        _xent_dense_fwd[float](xa, ta, loss)
    else:
        _xent_dense_fwd[double](xa, ta, loss)
    return loss


def softmax_xent_dense_bwd(logits, targets, dloss):
    """dlogits = (softmax(logits) * sum(targets, -1) - targets) * dloss[:, None]."""
    fn = "softmax_xent_dense_bwd"
    cdef cnp.ndarray xa = _float_in(logits, fn, "logits")
    cdef cnp.ndarray ta = _float_like(targets, xa, fn, "targets")
    cdef cnp.ndarray ga = _float_like(dloss, xa, fn, "dloss")
    _need_ndim(xa, 2, fn, "logits")
    _need_same_shape(xa, ta, fn, "logits", "targets")
    _check_dloss(xa, ga, fn)
    cdef cnp.ndarray dx = _new_like(xa, False)
    if xa.size == 0:
        return dx
    if _is32(xa):
        _xent_dense_bwd[float](xa, ta, ga, dx)
    else:
        _xent_dense_bwd[double](xa, ta, ga, dx)
    return dx


# ---------------------------------------------------------------------------
# 4. LayerNorm over the last axis of (N, D)
# ---------------------------------------------------------------------------

cdef inline void _ln_stats(const floating* x, Py_ssize_t D, double eps,
                           double* mean, double* rstd) noexcept nogil:
    cdef double m = _rsum(x, D) / D
    mean[0] = m
    rstd[0] = 1.0 / sqrt(_rsqdev(x, m, D) / D + eps)


cdef inline void _ln_fwd_row(const floating* x, const floating* g, const floating* b,
                             floating* y, Py_ssize_t D, double eps) noexcept nogil:
    cdef double mean, rstd
    cdef Py_ssize_t j
    _ln_stats(x, D, eps, &mean, &rstd)
    cdef floating mf = <floating>mean
    cdef floating rf = <floating>rstd
    for j in range(D):
        y[j] = (x[j] - mf) * rf * g[j] + b[j]


cdef inline void _ln_bwd_row(const floating* x, const floating* g, const floating* dy,
                             floating* dx, Py_ssize_t D, double eps) noexcept nogil:
    # dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g*xhat))
    cdef double mean, rstd
    cdef Py_ssize_t j
    _ln_stats(x, D, eps, &mean, &rstd)
    cdef double sg, sgx
    _rdot_pair(dy, g, x, mean, D, &sg, &sgx)
    cdef double mg = sg / D
    cdef double mgx = sgx * rstd / D
    cdef floating a = <floating>rstd
    cdef floating mgf = <floating>mg
    cdef floating cc = <floating>(rstd * mgx)
    cdef floating mf = <floating>mean
    # cancel inside the bracket first, then scale by rstd (which can be ~1/sqrt(eps))
    for j in range(D):
        dx[j] = a * ((dy[j] * g[j] - mgf) - (x[j] - mf) * cc)


cdef inline void _ln_params_row(const floating* x, const floating* dy, double* acc,
                                Py_ssize_t D, double eps) noexcept nogil:
    # acc[0:D] += dy * xhat ; acc[D:2D] += dy
    cdef double mean, rstd
    cdef Py_ssize_t j
    cdef double* ab = acc + D
    _ln_stats(x, D, eps, &mean, &rstd)
    for j in range(D):
        acc[j] += <double>dy[j] * ((x[j] - mean) * rstd)
        ab[j] += dy[j]


cdef int _ln_fwd(const floating[:, ::1] x, const floating[::1] g, const floating[::1] b,
                 floating[:, ::1] y, double eps) except -1:
    cdef Py_ssize_t N = x.shape[0], D = x.shape[1], i
    cdef int nt = _nt(N * D, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* gp = &g[0]
    cdef const floating* bp = &b[0]
    cdef floating* yp = &y[0, 0]
    with nogil:
        if nt == 1:
            for i in range(N):
                _ln_fwd_row(xp + i * D, gp, bp, yp + i * D, D, eps)
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                _ln_fwd_row(xp + i * D, gp, bp, yp + i * D, D, eps)
    return 0


cdef int _ln_bwd(const floating[:, ::1] x, const floating[::1] g, const floating[:, ::1] dy,
                 floating[:, ::1] dx, double eps) except -1:
    cdef Py_ssize_t N = x.shape[0], D = x.shape[1], i
    cdef int nt = _nt(N * D, 16384, N)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* gp = &g[0]
    cdef const floating* dyp = &dy[0, 0]
    cdef floating* dxp = &dx[0, 0]
    with nogil:
        if nt == 1:
            for i in range(N):
                _ln_bwd_row(xp + i * D, gp, dyp + i * D, dxp + i * D, D, eps)
        else:
            for i in prange(N, schedule='static', num_threads=nt):
                _ln_bwd_row(xp + i * D, gp, dyp + i * D, dxp + i * D, D, eps)
    return 0


cdef int _ln_bwd_params(const floating[:, ::1] x, const floating[:, ::1] dy,
                        floating[:, ::1] out, double eps) except -1:
    # per-thread partial sums (nt, 2, D) in double, combined in thread order
    cdef Py_ssize_t N = x.shape[0], D = x.shape[1], i, j, t
    cdef int nt = _nt(N * D, 16384, N)
    cdef int tid = 0
    cdef double[:, ::1] part = _new(cnp.NPY_FLOAT64, True, nt, 2 * D)
    cdef double* pp = &part[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    cdef double sg, sb
    with nogil:
        if nt == 1:
            for i in range(N):
                _ln_params_row(xp + i * D, dyp + i * D, pp, D, eps)
        else:
            with parallel(num_threads=nt):
                tid = threadid()
                for i in prange(N, schedule='static'):
                    _ln_params_row(xp + i * D, dyp + i * D, pp + tid * 2 * D, D, eps)
        for j in range(D):
            sg = 0.0
            sb = 0.0
            for t in range(nt):
                sg = sg + pp[t * 2 * D + j]
                sb = sb + pp[t * 2 * D + D + j]
            out[0, j] = <floating>sg
            out[1, j] = <floating>sb
    return 0


cdef int _check_eps(double eps, str fn) except -1:
    if not (eps >= 0.0):
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    return 0


cdef int _check_vec(cnp.ndarray v, Py_ssize_t D, cnp.ndarray x, str fn, str name) except -1:
    if v.ndim != 1 or v.shape[0] != D:
        raise ValueError(f"{fn}: {name} must have shape ({D},) to match x{_shp(x)}, got {name}{_shp(v)}")
    return 0


def layernorm_fwd(x, gamma, beta, double eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis of (N, D)."""
    fn = "layernorm_fwd"
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    cdef cnp.ndarray ga = _float_like(gamma, xa, fn, "gamma")
    cdef cnp.ndarray ba = _float_like(beta, xa, fn, "beta")
    _need_ndim(xa, 2, fn, "x")
    _check_vec(ga, xa.shape[1], xa, fn, "gamma")
    _check_vec(ba, xa.shape[1], xa, fn, "beta")
    _check_eps(eps, fn)
    cdef cnp.ndarray y = _new_like(xa, False)
    if xa.size == 0:
        return y
    if _is32(xa):
        _ln_fwd[float](xa, ga, ba, y, eps)
    else:
        _ln_fwd[double](xa, ga, ba, y, eps)
    return y


def layernorm_bwd(x, gamma, dy, double eps):
    """dx of layernorm (mean / rstd recomputed from x)."""
    fn = "layernorm_bwd"
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    cdef cnp.ndarray ga = _float_like(gamma, xa, fn, "gamma")
    cdef cnp.ndarray gy = _float_like(dy, xa, fn, "dy")
    _need_ndim(xa, 2, fn, "x")
    _check_vec(ga, xa.shape[1], xa, fn, "gamma")
    _need_same_shape(xa, gy, fn, "x", "dy")
    _check_eps(eps, fn)
    cdef cnp.ndarray dx = _new_like(xa, False)
    if xa.size == 0:
        return dx
    if _is32(xa):
        _ln_bwd[float](xa, ga, gy, dx, eps)
    else:
        _ln_bwd[double](xa, ga, gy, dx, eps)
    return dx


def layernorm_bwd_params(x, dy, double eps):
    """(2, D) array: row 0 = dgamma = sum_n dy * xhat, row 1 = dbeta = sum_n dy."""
    fn = "layernorm_bwd_params"
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    cdef cnp.ndarray gy = _float_like(dy, xa, fn, "dy")
    _need_ndim(xa, 2, fn, "x")
    _need_same_shape(xa, gy, fn, "x", "dy")
    _check_eps(eps, fn)
    cdef cnp.ndarray out
    if xa.size == 0:
        return _new(cnp.PyArray_TYPE(xa), True, 2, xa.shape[1])
    out = _new(cnp.PyArray_TYPE(xa), False, 2, xa.shape[1])
    if _is32(xa):
        _ln_bwd_params[float](xa, gy, out, eps)
    else:
        _ln_bwd_params[double](xa, gy, out, eps)
    return out


# ---------------------------------------------------------------------------
# 4b. BatchNorm (training statistics) over (N, C, S): per channel c, over n and s
#     S is the product of the trailing axes (H*W for BatchNorm2d, 1 for BatchNorm1d).
#     Statistics in double (two passes); each channel is one parallel task.
# ---------------------------------------------------------------------------

cdef inline void _bn_stats(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                           Py_ssize_t c, double* mean, double* var) noexcept nogil:
    cdef Py_ssize_t n
    cdef double s = 0.0, q = 0.0, m
    cdef double cnt = <double>(N * S)
    for n in range(N):
        s += _rsum(x + (n * C + c) * S, S)
    m = s / cnt
    for n in range(N):
        q += _rsqdev(x + (n * C + c) * S, m, S)
    mean[0] = m
    var[0] = q / cnt


cdef inline void _bn_fwd_chan(const floating* x, const floating* g, const floating* b, floating* y,
                              Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                              double eps) noexcept nogil:
    cdef double mean, var
    cdef Py_ssize_t n, j
    cdef const floating* xr
    cdef floating* yr
    _bn_stats(x, N, C, S, c, &mean, &var)
    cdef floating mf = <floating>mean
    cdef floating rf = <floating>(1.0 / sqrt(var + eps))
    cdef floating gf = g[c]
    cdef floating bf = b[c]
    for n in range(N):
        xr = x + (n * C + c) * S
        yr = y + (n * C + c) * S
        for j in range(S):
            yr[j] = (xr[j] - mf) * rf * gf + bf


cdef inline void _bn_bwd_sums(const floating* x, const floating* dy, Py_ssize_t N, Py_ssize_t C,
                              Py_ssize_t S, Py_ssize_t c, double eps, double* mean, double* rstd,
                              double* sdy, double* sdyx) noexcept nogil:
    cdef double var, a = 0.0, q = 0.0
    cdef Py_ssize_t n, off
    _bn_stats(x, N, C, S, c, mean, &var)
    rstd[0] = 1.0 / sqrt(var + eps)
    for n in range(N):
        off = (n * C + c) * S
        a += _rsum(dy + off, S)
        q += _rdot_dev(dy + off, x + off, mean[0], S)
    sdy[0] = a
    sdyx[0] = q


cdef inline void _bn_bwd_chan(const floating* x, const floating* g, const floating* dy, floating* dx,
                              Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                              double eps) noexcept nogil:
    # dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    cdef double mean, rstd, sdy, sdyx
    cdef double cnt = <double>(N * S)
    cdef Py_ssize_t n, j, off
    _bn_bwd_sums(x, dy, N, C, S, c, eps, &mean, &rstd, &sdy, &sdyx)
    cdef floating a = <floating>(g[c] * rstd)
    cdef floating mdy = <floating>(sdy / cnt)
    cdef floating cc = <floating>(rstd * rstd * sdyx / cnt)
    cdef floating mf = <floating>mean
    for n in range(N):
        off = (n * C + c) * S
        for j in range(S):
            dx[off + j] = a * ((dy[off + j] - mdy) - (x[off + j] - mf) * cc)


cdef inline void _bn_task(const floating* xp, const floating* gp, const floating* bp, const floating* dyp,
                          floating* op, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c, double eps,
                          int what, double unb) noexcept nogil:
    cdef double mean, rstd, sdy, sdyx, var
    if what == 0:
        _bn_fwd_chan(xp, gp, bp, op, N, C, S, c, eps)
    elif what == 1:
        _bn_bwd_chan(xp, gp, dyp, op, N, C, S, c, eps)
    elif what == 2:
        _bn_bwd_sums(xp, dyp, N, C, S, c, eps, &mean, &rstd, &sdy, &sdyx)
        op[c] = <floating>(sdyx * rstd)
        op[C + c] = <floating>sdy
    else:
        _bn_stats(xp, N, C, S, c, &mean, &var)
        op[c] = <floating>mean
        op[C + c] = <floating>(var * unb)


cdef int _bn_run(const floating[:, :, ::1] x, const floating[::1] g, const floating[::1] b,
                 const floating[:, :, ::1] dy, floating[:, :, ::1] out, double eps, int what) except -1:
    """what: 0 forward (g, b -> y), 1 input gradient (g, dy -> dx), 2 parameter gradients (dy -> (2, C)),
    3 statistics ((2, C): mean, unbiased variance)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], c
    # measured on 2 cores: a (64, 16, 8, 8) batch norm takes 41 us on one thread and 52 us on two
    cdef int nt = _nt(N * C * S, 131072, C)
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* gp = &g[0]
    cdef const floating* bp = &b[0]
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef floating* op = &out[0, 0, 0]
    cdef double unb = (<double>(N * S)) / (N * S - 1.0) if N * S > 1 else 1.0
    with nogil:
        if nt == 1:
            for c in range(C):
                _bn_task(xp, gp, bp, dyp, op, N, C, S, c, eps, what, unb)
        else:
            for c in prange(C, schedule='static', num_threads=nt):
                _bn_task(xp, gp, bp, dyp, op, N, C, S, c, eps, what, unb)
    return 0


cdef cnp.ndarray _bn_x(object x, str fn):
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    if xa.ndim < 2:
        raise ValueError(f"{fn}: x must be (N, C, ...) with at least 2 axes, got x{_shp(xa)}")
    return xa


cdef object _bn3(cnp.ndarray a):
    """(N, C, ...) -> (N, C, S) view of a C-contiguous array."""
    return a.reshape(a.shape[0], a.shape[1], -1)


cdef object _bn_dispatch(cnp.ndarray xa, object ga, object ba, object gy, cnp.ndarray out, double eps, int what):
    cdef Py_ssize_t C = xa.shape[1]
    if xa.size == 0:
        return out
    x3 = _bn3(xa)
    o3 = _bn3(out) if what <= 1 else out.reshape(1, 2, C)
    dummy_v = np.zeros(1, dtype=xa.dtype)
    g = ga if ga is not None else dummy_v
    b = ba if ba is not None else dummy_v
    d = _bn3(gy) if gy is not None else x3
    if _is32(xa):
        _bn_run[float](x3, g, b, d, o3, eps, what)
    else:
        _bn_run[double](x3, g, b, d, o3, eps, what)
    return out


def batchnorm_fwd(x, gamma, beta, double eps):
    """Training-mode batch norm of (N, C, ...): per channel c, y = (x - mean) / sqrt(var + eps) * gamma + beta
    with the batch mean and biased variance over every axis but 1."""
    fn = "batchnorm_fwd"
    cdef cnp.ndarray xa = _bn_x(x, fn)
    cdef cnp.ndarray ga = _float_like(gamma, xa, fn, "gamma")
    cdef cnp.ndarray ba = _float_like(beta, xa, fn, "beta")
    _check_vec(ga, xa.shape[1], xa, fn, "gamma")
    _check_vec(ba, xa.shape[1], xa, fn, "beta")
    _check_eps(eps, fn)
    return _bn_dispatch(xa, ga, ba, None, _new_like(xa, False), eps, 0)


def batchnorm_bwd(x, gamma, dy, double eps):
    """dx of batchnorm_fwd (the statistics recomputed from x)."""
    fn = "batchnorm_bwd"
    cdef cnp.ndarray xa = _bn_x(x, fn)
    cdef cnp.ndarray ga = _float_like(gamma, xa, fn, "gamma")
    cdef cnp.ndarray gy = _float_like(dy, xa, fn, "dy")
    _check_vec(ga, xa.shape[1], xa, fn, "gamma")
    _need_same_shape(xa, gy, fn, "x", "dy")
    _check_eps(eps, fn)
    return _bn_dispatch(xa, ga, None, gy, _new_like(xa, False), eps, 1)


def batchnorm_bwd_params(x, dy, double eps):
    """(2, C): row 0 = dgamma = sum dy * xhat, row 1 = dbeta = sum dy (over every axis but 1)."""
    fn = "batchnorm_bwd_params"
    cdef cnp.ndarray xa = _bn_x(x, fn)
    cdef cnp.ndarray gy = _float_like(dy, xa, fn, "dy")
    _need_same_shape(xa, gy, fn, "x", "dy")
    _check_eps(eps, fn)
    return _bn_dispatch(xa, None, None, gy, _new(cnp.PyArray_TYPE(xa), True, 2, xa.shape[1]), eps, 2)


def batchnorm_stats(x):
    """(2, C): row 0 = batch mean, row 1 = unbiased batch variance (n / (n - 1) times the biased one; the
    biased one when n == 1), n = the number of elements per channel."""
    fn = "batchnorm_stats"
    cdef cnp.ndarray xa = _bn_x(x, fn)
    return _bn_dispatch(xa, None, None, None, _new(cnp.PyArray_TYPE(xa), True, 2, xa.shape[1]), 0.0, 3)


# ---------------------------------------------------------------------------
# 5. im2col / col2im (NCHW)
# ---------------------------------------------------------------------------

cdef inline void _ow_range(Py_ssize_t j, Py_ssize_t W, Py_ssize_t OW, Py_ssize_t sw, Py_ssize_t pw,
                           Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """[lo, hi): output columns ow whose input column ow*sw - pw + j lies in [0, W)."""
    cdef Py_ssize_t a = 0, b, num
    if pw > j:
        a = (pw - j + sw - 1) // sw
    num = W - 1 + pw - j
    b = num // sw + 1 if num >= 0 else 0
    a = _imin(a, OW)
    b = _imin(b, OW)
    if b < a:
        b = a
    lo[0] = a
    hi[0] = b


cdef inline void _strided_copy(floating* dst, const floating* src, Py_ssize_t cnt,
                               Py_ssize_t sw) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(cnt):
        dst[k] = src[k * sw]


cdef inline void _strided_copy_s(floating* dst, const floating* src, Py_ssize_t cnt,
                                 Py_ssize_t sw) noexcept nogil:
    if sw == 2:
        _strided_copy(dst, src, cnt, 2)
    else:
        _strided_copy(dst, src, cnt, sw)


cdef void _im2col_plane_same(const floating* x, floating* cols, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t OH, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t L) noexcept nogil:
    # stride 1 and OW == W ("same" width): for tap (i, j) output element k = oh*W + ow reads x[k + off]
    # with off = (i - ph)*W + (j - pw), so the valid rows are ONE copy from the first to the last valid
    # element; the columns outside [lo, hi) that the copy picked up from neighbouring rows are zeroed after.
    # (Small planes: one copy per tap instead of one per output row, 3-4x fewer calls for 4x4 planes.)
    cdef Py_ssize_t i, j, oh, ow, lo, hi, a, b, s0, s1
    cdef floating* dst
    cdef floating* row
    for i in range(kh):
        a = ph - i if ph > i else 0                     # output rows whose input row is inside the image
        b = H + ph - i
        if b > OH:
            b = OH
        if b < a:
            b = a
        for j in range(kw):
            _ow_range(j, W, W, 1, pw, &lo, &hi)
            dst = cols + (i * kw + j) * L
            if b == a or hi == lo:
                memset(dst, 0, OH * W * sizeof(floating))
                continue
            if a > 0:
                memset(dst, 0, a * W * sizeof(floating))
            if b < OH:
                memset(dst + b * W, 0, (OH - b) * W * sizeof(floating))
            s0 = a * W + lo
            s1 = (b - 1) * W + hi
            memcpy(dst + s0, x + s0 + (i - ph) * W + (j - pw), (s1 - s0) * sizeof(floating))
            for oh in range(a, b):
                row = dst + oh * W
                for ow in range(lo):
                    row[ow] = 0
                for ow in range(hi, W):
                    row[ow] = 0


cdef void _im2col_plane(const floating* x, floating* cols, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                        Py_ssize_t L) noexcept nogil:
    # L: distance between two rows (kernel taps) of cols: OH*OW in the (N, CKK, L) layout,
    # N*OH*OW in the (CKK, N*L) layout
    cdef Py_ssize_t i, j, oh, ih, lo, hi
    cdef floating* dst
    cdef const floating* src
    if sh == 1 and sw == 1 and OW == W:
        _im2col_plane_same(x, cols, H, W, OH, kh, kw, ph, pw, L)
        return
    for i in range(kh):
        for j in range(kw):
            _ow_range(j, W, OW, sw, pw, &lo, &hi)
            for oh in range(OH):
                dst = cols + (i * kw + j) * L + oh * OW
                ih = oh * sh - ph + i
                if ih < 0 or ih >= H or hi == lo:
                    memset(dst, 0, OW * sizeof(floating))
                    continue
                if lo > 0:
                    memset(dst, 0, lo * sizeof(floating))
                src = x + ih * W + (lo * sw - pw + j)
                if sw == 1:
                    memcpy(dst + lo, src, (hi - lo) * sizeof(floating))
                else:
                    _strided_copy_s(dst + lo, src, hi - lo, sw)
                if hi < OW:
                    memset(dst + hi, 0, (OW - hi) * sizeof(floating))


cdef void _col2im_plane(const floating* cols, floating* x, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                        Py_ssize_t L) noexcept nogil:
    # x must be zeroed; accumulates (adjoint of _im2col_plane; L as there)
    cdef Py_ssize_t i, j, oh, ih, lo, hi
    cdef const floating* src
    cdef floating* dst
    for i in range(kh):
        for j in range(kw):
            _ow_range(j, W, OW, sw, pw, &lo, &hi)
            if hi == lo:
                continue
            for oh in range(OH):
                ih = oh * sh - ph + i
                if ih < 0 or ih >= H:
                    continue
                src = cols + (i * kw + j) * L + oh * OW + lo
                dst = x + ih * W + (lo * sw - pw + j)
                _spread_acc_s(dst, src, hi - lo, sw)


cdef int _im2col(const floating[:, :, :, ::1] x, floating* cp,
                 Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                 Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t OH, Py_ssize_t OW, bint t) except -1:
    # t: the (C*kh*kw, N*OH*OW) layout (one GEMM over the batch) instead of (N, C*kh*kw, OH*OW)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], p
    cdef Py_ssize_t P = N * C, K = kh * kw * OH * OW, L = OH * OW
    # measured on 2 cores: (144, 1024) columns in 182 us on one thread, 192 us on two (no gain below ~256k)
    cdef int nt = _nt(P * K, 131072, P)
    cdef const floating* xp = &x[0, 0, 0, 0]
    with nogil:
        if nt == 1:
            for p in range(P):
                _im2col_plane(xp + p * H * W, cp + _col_base(p, N, C, K, L, t), H, W, OH, OW, kh, kw,
                              sh, sw, ph, pw, N * L if t else L)
        else:
            for p in prange(P, schedule='static', num_threads=nt):
                _im2col_plane(xp + p * H * W, cp + _col_base(p, N, C, K, L, t), H, W, OH, OW, kh, kw,
                              sh, sw, ph, pw, N * L if t else L)
    return 0


cdef inline Py_ssize_t _col_base(Py_ssize_t p, Py_ssize_t N, Py_ssize_t C, Py_ssize_t K, Py_ssize_t L,
                                 bint t) noexcept nogil:
    """Offset of plane p = (n, c)'s first tap in cols: (N, CKK, L) or (CKK, N*L) layout."""
    if not t:
        return p * K
    return (p % C) * K * N + (p // C) * L


cdef int _col2im(const floating* cp, floating[:, :, :, ::1] x,
                 Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                 Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t OH, Py_ssize_t OW, bint t) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], p
    cdef Py_ssize_t P = N * C, K = kh * kw * OH * OW, L = OH * OW
    # measured on 2 cores: (144, 1024) columns in 182 us on one thread, 192 us on two (no gain below ~256k)
    cdef int nt = _nt(P * K, 131072, P)
    cdef floating* xp = &x[0, 0, 0, 0]
    with nogil:
        if nt == 1:
            for p in range(P):
                _col2im_plane(cp + _col_base(p, N, C, K, L, t), xp + p * H * W, H, W, OH, OW, kh, kw,
                              sh, sw, ph, pw, N * L if t else L)
        else:
            for p in prange(P, schedule='static', num_threads=nt):
                _col2im_plane(cp + _col_base(p, N, C, K, L, t), xp + p * H * W, H, W, OH, OW, kh, kw,
                              sh, sw, ph, pw, N * L if t else L)
    return 0


cdef tuple _out_hw(str fn, Py_ssize_t H, Py_ssize_t W, int kh, int kw, int sh, int sw,
                   int ph, int pw):
    if kh < 1 or kw < 1:
        raise ValueError(f"{fn}: kernel size must be >= 1, got (kh, kw) = ({kh}, {kw})")
    if sh < 1 or sw < 1:
        raise ValueError(f"{fn}: stride must be >= 1, got (sh, sw) = ({sh}, {sw})")
    if ph < 0 or pw < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got (ph, pw) = ({ph}, {pw})")
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(f"{fn}: kernel ({kh}, {kw}) larger than padded input "
                         f"({H} + 2*{ph}, {W} + 2*{pw})")
    return ((H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def im2col(x, int kh, int kw, int sh, int sw, int ph, int pw, bint batch_cols=False):
    """x (N, C, H, W) -> cols (N, C*kh*kw, OH*OW), row = (c*kh + i)*kw + j, zero padding.
    With ``batch_cols`` the layout is (C*kh*kw, N*OH*OW), column = n*OH*OW + oh*OW + ow: the whole batch
    is one matrix, so a convolution and its filter gradient are each ONE GEMM."""
    fn = "im2col"
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    _need_ndim(xa, 4, fn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1], H = xa.shape[2], W = xa.shape[3]
    OH, OW = _out_hw(fn, H, W, kh, kw, sh, sw, ph, pw)
    cdef cnp.ndarray cols
    if batch_cols:
        cols = _new(cnp.PyArray_TYPE(xa), False, C * kh * kw, N * OH * OW)
    else:
        cols = _new(cnp.PyArray_TYPE(xa), False, N, C * kh * kw, OH * OW)
    if cols.size == 0:
        return cols
    if xa.size == 0:            # H or W == 0 with enough padding: all zeros
        cols.fill(0)
        return cols
    if _is32(xa):
        _im2col[float](xa, <float*>cnp.PyArray_DATA(cols), kh, kw, sh, sw, ph, pw, OH, OW, batch_cols)
    else:
        _im2col[double](xa, <double*>cnp.PyArray_DATA(cols), kh, kw, sh, sw, ph, pw, OH, OW, batch_cols)
    return cols


def col2im(cols, int N, int C, int H, int W, int kh, int kw, int sh, int sw, int ph, int pw,
           bint batch_cols=False):
    """Adjoint of im2col: scatter-add cols (N, C*kh*kw, OH*OW) -- or (C*kh*kw, N*OH*OW) with
    ``batch_cols`` -- into an (N, C, H, W) array."""
    fn = "col2im"
    if N < 0 or C < 0 or H < 0 or W < 0:
        raise ValueError(f"{fn}: N, C, H, W must be >= 0, got ({N}, {C}, {H}, {W})")
    cdef cnp.ndarray ca = _float_in(cols, fn, "cols")
    OH, OW = _out_hw(fn, H, W, kh, kw, sh, sw, ph, pw)
    expect = (C * kh * kw, N * OH * OW) if batch_cols else (N, C * kh * kw, OH * OW)
    if (<object>ca).shape != expect:
        raise ValueError(f"{fn}: cols must have shape {expect} for x(N, C, H, W) = ({N}, {C}, {H}, {W}), "
                         f"kernel ({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw}); got cols{_shp(ca)}")
    cdef cnp.ndarray x = _new(cnp.PyArray_TYPE(ca), True, N, C, H, W)
    if x.size == 0 or ca.size == 0:
        return x
    if _is32(ca):
        _col2im[float](<float*>cnp.PyArray_DATA(ca), x, kh, kw, sh, sw, ph, pw, OH, OW, batch_cols)
    else:
        _col2im[double](<double*>cnp.PyArray_DATA(ca), x, kh, kw, sh, sw, ph, pw, OH, OW, batch_cols)
    return x


# ---------------------------------------------------------------------------
# 6. pooling (NCHW).  max pool pads with -inf, avg pool divides by kh*kw
# ---------------------------------------------------------------------------

# Every plane routine below walks, for one output row oh, the kernel taps (i, j)
# in row-major order and updates the whole output row at once: the inner loop
# runs over output columns ow in [lo, hi) (the columns whose input column is
# inside the image, see _ow_range), reading the input with stride sw.  Those
# inner loops are branch-free and vectorise; strides 1 and 2 get constant-stride
# copies so that gcc can use packed loads.

cdef inline void _max_acc(floating* m, const floating* src, Py_ssize_t cnt,
                          Py_ssize_t sw) noexcept nogil:
    """m[k] = max(m[k], src[k*sw]); a NaN wins (first NaN kept)."""
    cdef Py_ssize_t k
    cdef floating v, a
    for k in range(cnt):
        v = src[k * sw]
        a = m[k]
        m[k] = _select((v > a) | ((v != v) & (a == a)), v, a)


cdef inline void _argmax_acc(floating* m, int32_t* ix, const floating* src, Py_ssize_t cnt,
                             Py_ssize_t sw, int32_t base) noexcept nogil:
    """Running first-argmax: src[k*sw] (plane index base + k*sw) replaces the current
    best if it is larger, if nothing was recorded yet, or if it is the first NaN."""
    cdef Py_ssize_t k
    cdef floating v, a
    cdef int32_t cur, upd
    for k in range(cnt):
        v = src[k * sw]
        a = m[k]
        cur = ix[k]
        upd = (v > a) | (cur < 0) | ((v != v) & (a == a))
        m[k] = _select(upd, v, a)
        ix[k] = cur ^ ((cur ^ (base + <int32_t>(k * sw))) & -upd)


cdef inline void _sum_acc(double* acc, const floating* src, Py_ssize_t cnt,
                          Py_ssize_t sw) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(cnt):
        acc[k] += src[k * sw]


cdef inline void _spread_acc(floating* dst, const floating* g, Py_ssize_t cnt,
                             Py_ssize_t sw) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(cnt):
        dst[k * sw] += g[k]


cdef inline void _max_acc_s(floating* m, const floating* src, Py_ssize_t cnt,
                            Py_ssize_t sw) noexcept nogil:
    if sw == 1:
        _max_acc(m, src, cnt, 1)
    elif sw == 2:
        _max_acc(m, src, cnt, 2)
    else:
        _max_acc(m, src, cnt, sw)


cdef inline void _argmax_acc_s(floating* m, int32_t* ix, const floating* src, Py_ssize_t cnt,
                               Py_ssize_t sw, int32_t base) noexcept nogil:
    if sw == 1:
        _argmax_acc(m, ix, src, cnt, 1, base)
    elif sw == 2:
        _argmax_acc(m, ix, src, cnt, 2, base)
    else:
        _argmax_acc(m, ix, src, cnt, sw, base)


cdef inline void _sum_acc_s(double* acc, const floating* src, Py_ssize_t cnt,
                            Py_ssize_t sw) noexcept nogil:
    if sw == 1:
        _sum_acc(acc, src, cnt, 1)
    elif sw == 2:
        _sum_acc(acc, src, cnt, 2)
    else:
        _sum_acc(acc, src, cnt, sw)


cdef inline void _spread_acc_s(floating* dst, const floating* g, Py_ssize_t cnt,
                               Py_ssize_t sw) noexcept nogil:
    if sw == 1:
        _spread_acc(dst, g, cnt, 1)
    elif sw == 2:
        _spread_acc(dst, g, cnt, 2)
    else:
        _spread_acc(dst, g, cnt, sw)


cdef void _maxpool_plane(const floating* x, floating* y, Py_ssize_t H, Py_ssize_t W,
                         Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, ih, lo, hi
    cdef floating* yrow
    cdef const floating* xrow
    for oh in range(OH):
        yrow = y + oh * OW
        for ow in range(OW):
            yrow[ow] = -INFINITY
        for i in range(kh):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= H:
                continue
            xrow = x + ih * W
            for j in range(kw):
                _ow_range(j, W, OW, sw, pw, &lo, &hi)
                if hi > lo:
                    _max_acc_s(yrow + lo, xrow + (lo * sw - pw + j), hi - lo, sw)


cdef void _maxpool_bwd_plane(const floating* x, const floating* dy, floating* dx,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                             Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, floating* m, int32_t* ix) noexcept nogil:
    # dx must be zeroed; m / ix are OW-long scratch rows.  Gradient goes to the
    # first max of the window (row-major window order, first NaN if any); a window
    # lying entirely in the padding receives nothing.
    cdef Py_ssize_t oh, ow, i, j, ih, lo, hi, off
    cdef const floating* xrow
    cdef const floating* grow
    for oh in range(OH):
        for ow in range(OW):
            m[ow] = -INFINITY
            ix[ow] = -1
        for i in range(kh):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= H:
                continue
            xrow = x + ih * W
            for j in range(kw):
                _ow_range(j, W, OW, sw, pw, &lo, &hi)
                if hi > lo:
                    off = lo * sw - pw + j
                    _argmax_acc_s(m + lo, ix + lo, xrow + off, hi - lo, sw, <int32_t>(ih * W + off))
        grow = dy + oh * OW
        for ow in range(OW):
            if ix[ow] >= 0:
                dx[ix[ow]] += grow[ow]


cdef void _avgpool_plane(const floating* x, floating* y, Py_ssize_t H, Py_ssize_t W,
                         Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         double* acc) noexcept nogil:
    # acc is an OW-long double scratch row
    cdef Py_ssize_t oh, ow, i, j, ih, lo, hi
    cdef double inv = 1.0 / (kh * kw)
    cdef const floating* xrow
    cdef floating* yrow
    for oh in range(OH):
        for ow in range(OW):
            acc[ow] = 0.0
        for i in range(kh):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= H:
                continue
            xrow = x + ih * W
            for j in range(kw):
                _ow_range(j, W, OW, sw, pw, &lo, &hi)
                if hi > lo:
                    _sum_acc_s(acc + lo, xrow + (lo * sw - pw + j), hi - lo, sw)
        yrow = y + oh * OW
        for ow in range(OW):
            yrow[ow] = <floating>(acc[ow] * inv)


cdef void _avgpool_bwd_plane(const floating* dy, floating* dx, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             floating* g) noexcept nogil:
    # dx must be zeroed; g is an OW-long scratch row
    cdef Py_ssize_t oh, ow, i, j, ih, lo, hi
    cdef floating inv = <floating>(1.0 / (kh * kw))
    cdef const floating* grow
    cdef floating* xrow
    for oh in range(OH):
        grow = dy + oh * OW
        for ow in range(OW):
            g[ow] = grow[ow] * inv
        for i in range(kh):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= H:
                continue
            xrow = dx + ih * W
            for j in range(kw):
                _ow_range(j, W, OW, sw, pw, &lo, &hi)
                if hi > lo:
                    _spread_acc_s(xrow + (lo * sw - pw + j), g + lo, hi - lo, sw)


cdef inline void _max2_upd(floating v, floating* m, int32_t* k, int32_t kv) noexcept nogil:
    """One step of the running first-max (a NaN wins, the first NaN kept), branch-free."""
    cdef floating a = m[0]
    cdef int32_t upd = (v > a) | ((v != v) & (a == a))
    m[0] = _select(upd, v, a)
    k[0] = k[0] ^ ((k[0] ^ kv) & -upd)


cdef inline int32_t _max2x2(const floating* r0, const floating* r1, Py_ssize_t ow, floating* m) noexcept nogil:
    """First max of the window (r0[2ow], r0[2ow+1], r1[2ow], r1[2ow+1]) into m; returns its tap (0..3)."""
    cdef int32_t k = 0
    m[0] = r0[2 * ow]
    _max2_upd(r0[2 * ow + 1], m, &k, 1)
    _max2_upd(r1[2 * ow], m, &k, 2)
    _max2_upd(r1[2 * ow + 1], m, &k, 3)
    return k


cdef void _maxpool2x2_plane(const floating* x, floating* y, Py_ssize_t W, Py_ssize_t OH,
                            Py_ssize_t OW) noexcept nogil:
    # 2x2 windows, stride 2, no padding: the same first-max rule as _maxpool_plane, taps in row-major order
    cdef Py_ssize_t oh, ow
    cdef const floating* r0
    cdef const floating* r1
    cdef floating* yr
    for oh in range(OH):
        r0 = x + 2 * oh * W
        r1 = r0 + W
        yr = y + oh * OW
        for ow in range(OW):
            _max2x2(r0, r1, ow, &yr[ow])


cdef void _maxpool2x2_bwd_plane(const floating* x, const floating* dy, floating* dx, Py_ssize_t W,
                                Py_ssize_t OH, Py_ssize_t OW) noexcept nogil:
    # windows do not overlap: each of the 4 taps gets dy or 0 (dx pre-zeroed for rows/columns no window covers)
    cdef Py_ssize_t oh, ow
    cdef const floating* r0
    cdef const floating* r1
    cdef floating* d0
    cdef floating* d1
    cdef floating m, g
    cdef int32_t k
    for oh in range(OH):
        r0 = x + 2 * oh * W
        r1 = r0 + W
        d0 = dx + 2 * oh * W
        d1 = d0 + W
        for ow in range(OW):
            k = _max2x2(r0, r1, ow, &m)
            g = dy[oh * OW + ow]
            d0[2 * ow] = _select(k == 0, g, <floating>0)
            d0[2 * ow + 1] = _select(k == 1, g, <floating>0)
            d1[2 * ow] = _select(k == 2, g, <floating>0)
            d1[2 * ow + 1] = _select(k == 3, g, <floating>0)


cdef inline bint _is2x2(Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    return kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0


cdef int _pool_fwd(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] y,
                   Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                   Py_ssize_t ph, Py_ssize_t pw, bint is_max) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = y.shape[2], OW = y.shape[3], P = N * C, p
    cdef int nt = _nt(P * OH * OW * kh * kw, 65536, P)
    cdef int tid = 0
    cdef double[:, ::1] acc = _new(cnp.NPY_FLOAT64, False, nt, 1 if is_max else OW)
    cdef double* ap = &acc[0, 0]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &y[0, 0, 0, 0]
    with nogil:
        if is_max and _is2x2(kh, kw, sh, sw, ph, pw):
            if nt == 1:
                for p in range(P):
                    _maxpool2x2_plane(xp + p * H * W, yp + p * OH * OW, W, OH, OW)
            else:
                for p in prange(P, schedule='static', num_threads=nt):
                    _maxpool2x2_plane(xp + p * H * W, yp + p * OH * OW, W, OH, OW)
        elif is_max:
            if nt == 1:
                for p in range(P):
                    _maxpool_plane(xp + p * H * W, yp + p * OH * OW, H, W, OH, OW, kh, kw, sh, sw, ph, pw)
            else:
                for p in prange(P, schedule='static', num_threads=nt):
                    _maxpool_plane(xp + p * H * W, yp + p * OH * OW, H, W, OH, OW, kh, kw, sh, sw, ph, pw)
        else:
            if nt == 1:
                for p in range(P):
                    _avgpool_plane(xp + p * H * W, yp + p * OH * OW, H, W, OH, OW,
                                   kh, kw, sh, sw, ph, pw, ap)
            else:
                with parallel(num_threads=nt):
                    tid = threadid()
                    for p in prange(P, schedule='static'):
                        _avgpool_plane(xp + p * H * W, yp + p * OH * OW, H, W, OH, OW,
                                       kh, kw, sh, sw, ph, pw, ap + tid * OW)
    return 0


cdef int _maxpool_bwd(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dy,
                      floating[:, :, :, ::1] dx, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
                      Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = dy.shape[2], OW = dy.shape[3], P = N * C, p
    cdef int nt = _nt(P * OH * OW * kh * kw, 65536, P)
    cdef int tid = 0
    cdef floating[:, ::1] mbuf
    cdef int32_t[:, ::1] ibuf = _new(cnp.NPY_INT32, False, nt, OW)
    mbuf = _new(cnp.NPY_FLOAT32 if floating is float else cnp.NPY_FLOAT64, False, nt, OW)
    cdef floating* mp = &mbuf[0, 0]
    cdef int32_t* ip = &ibuf[0, 0]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* gp = &dy[0, 0, 0, 0]
    cdef floating* dp = &dx[0, 0, 0, 0]
    with nogil:
        if _is2x2(kh, kw, sh, sw, ph, pw):
            if nt == 1:
                for p in range(P):
                    _maxpool2x2_bwd_plane(xp + p * H * W, gp + p * OH * OW, dp + p * H * W, W, OH, OW)
            else:
                for p in prange(P, schedule='static', num_threads=nt):
                    _maxpool2x2_bwd_plane(xp + p * H * W, gp + p * OH * OW, dp + p * H * W, W, OH, OW)
        elif nt == 1:
            for p in range(P):
                _maxpool_bwd_plane(xp + p * H * W, gp + p * OH * OW, dp + p * H * W,
                                   H, W, OH, OW, kh, kw, sh, sw, ph, pw, mp, ip)
        else:
            with parallel(num_threads=nt):
                tid = threadid()
                for p in prange(P, schedule='static'):
                    _maxpool_bwd_plane(xp + p * H * W, gp + p * OH * OW, dp + p * H * W,
                                       H, W, OH, OW, kh, kw, sh, sw, ph, pw,
                                       mp + tid * OW, ip + tid * OW)
    return 0


cdef int _avgpool_bwd(const floating[:, :, :, ::1] dy, floating[:, :, :, ::1] dx,
                      Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                      Py_ssize_t ph, Py_ssize_t pw) except -1:
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t OH = dy.shape[2], OW = dy.shape[3], P = N * C, p
    cdef int nt = _nt(P * OH * OW * kh * kw, 65536, P)
    cdef int tid = 0
    cdef floating[:, ::1] gbuf
    gbuf = _new(cnp.NPY_FLOAT32 if floating is float else cnp.NPY_FLOAT64, False, nt, OW)
    cdef floating* bp = &gbuf[0, 0]
    cdef const floating* gp = &dy[0, 0, 0, 0]
    cdef floating* dp = &dx[0, 0, 0, 0]
    with nogil:
        if nt == 1:
            for p in range(P):
                _avgpool_bwd_plane(gp + p * OH * OW, dp + p * H * W, H, W, OH, OW,
                                   kh, kw, sh, sw, ph, pw, bp)
        else:
            with parallel(num_threads=nt):
                tid = threadid()
                for p in prange(P, schedule='static'):
                    _avgpool_bwd_plane(gp + p * OH * OW, dp + p * H * W, H, W, OH, OW,
                                       kh, kw, sh, sw, ph, pw, bp + tid * OW)
    return 0


cdef object _pool_fwd_wrap(object x, int kh, int kw, int sh, int sw, int ph, int pw,
                           bint is_max, str fn):
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    _need_ndim(xa, 4, fn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1], H = xa.shape[2], W = xa.shape[3]
    OH, OW = _out_hw(fn, H, W, kh, kw, sh, sw, ph, pw)
    cdef cnp.ndarray y = _new(cnp.PyArray_TYPE(xa), False, N, C, OH, OW)
    if y.size == 0:
        return y
    if xa.size == 0:            # H or W == 0: windows are all padding
        y.fill(-np.inf if is_max else 0.0)
        return y
    if _is32(xa):
        _pool_fwd[float](xa, y, kh, kw, sh, sw, ph, pw, is_max)
    else:
        _pool_fwd[double](xa, y, kh, kw, sh, sw, ph, pw, is_max)
    return y


def maxpool2d_fwd(x, int kh, int kw, int sh, int sw, int ph, int pw):
    """Max pooling over (N, C, H, W); padding acts as -inf."""
    return _pool_fwd_wrap(x, kh, kw, sh, sw, ph, pw, True, "maxpool2d_fwd")


def avgpool2d_fwd(x, int kh, int kw, int sh, int sw, int ph, int pw):
    """Average pooling over (N, C, H, W); divisor is always kh*kw (count_include_pad)."""
    return _pool_fwd_wrap(x, kh, kw, sh, sw, ph, pw, False, "avgpool2d_fwd")


def maxpool2d_bwd(x, dy, int kh, int kw, int sh, int sw, int ph, int pw):
    """dx: each dy goes to the first max of its window (row-major window order)."""
    fn = "maxpool2d_bwd"
    cdef cnp.ndarray xa = _float_in(x, fn, "x")
    cdef cnp.ndarray ga = _float_like(dy, xa, fn, "dy")
    _need_ndim(xa, 4, fn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1], H = xa.shape[2], W = xa.shape[3]
    OH, OW = _out_hw(fn, H, W, kh, kw, sh, sw, ph, pw)
    if (<object>ga).shape != (N, C, OH, OW):
        raise ValueError(f"{fn}: dy must have shape {(N, C, OH, OW)} for x{_shp(xa)}, "
                         f"kernel ({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw}); got dy{_shp(ga)}")
    if H * W > 2147483647:
        raise ValueError(f"{fn}: planes of x{_shp(xa)} are too large (H*W must fit in int32)")
    cdef cnp.ndarray dx = _new_like(xa, True)
    if xa.size == 0 or ga.size == 0:
        return dx
    if _is32(xa):
        _maxpool_bwd[float](xa, ga, dx, kh, kw, sh, sw, ph, pw)
    else:
        _maxpool_bwd[double](xa, ga, dx, kh, kw, sh, sw, ph, pw)
    return dx


def avgpool2d_bwd(dy, int N, int C, int H, int W, int kh, int kw, int sh, int sw, int ph, int pw):
    """dx (N, C, H, W) of avgpool2d_fwd: every window position gets dy / (kh*kw)."""
    fn = "avgpool2d_bwd"
    if N < 0 or C < 0 or H < 0 or W < 0:
        raise ValueError(f"{fn}: N, C, H, W must be >= 0, got ({N}, {C}, {H}, {W})")
    cdef cnp.ndarray ga = _float_in(dy, fn, "dy")
    OH, OW = _out_hw(fn, H, W, kh, kw, sh, sw, ph, pw)
    if (<object>ga).shape != (N, C, OH, OW):
        raise ValueError(f"{fn}: dy must have shape {(N, C, OH, OW)} for x(N, C, H, W) = ({N}, {C}, {H}, {W}), "
                         f"kernel ({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw}); got dy{_shp(ga)}")
    cdef cnp.ndarray dx = _new(cnp.PyArray_TYPE(ga), True, N, C, H, W)
    if dx.size == 0 or ga.size == 0:
        return dx
    if _is32(ga):
        _avgpool_bwd[float](ga, dx, kh, kw, sh, sw, ph, pw)
    else:
        _avgpool_bwd[double](ga, dx, kh, kw, sh, sw, ph, pw)
    return dx


# ---------------------------------------------------------------------------
# 7. embedding gather / scatter-add / segment sum
# ---------------------------------------------------------------------------

cdef int _gather(const floating[:, ::1] table, const index_t[::1] idx,
                 floating[:, ::1] out) except -1:
    cdef Py_ssize_t n = idx.shape[0], D = table.shape[1], k
    cdef int nt = _nt(n * D, 65536, n)
    cdef const floating* tp = &table[0, 0]
    cdef floating* op = &out[0, 0]
    with nogil:
        if nt == 1:
            for k in range(n):
                memcpy(op + k * D, tp + <Py_ssize_t>idx[k] * D, D * sizeof(floating))
        else:
            for k in prange(n, schedule='static', num_threads=nt):
                memcpy(op + k * D, tp + <Py_ssize_t>idx[k] * D, D * sizeof(floating))
    return 0


def embedding_gather(table, indices):
    """out (n, D) = table[indices] for table (V, D) and 1-D integer indices (n,)."""
    fn = "embedding_gather"
    cdef cnp.ndarray ta = _float_in(table, fn, "table")
    cdef cnp.ndarray ia = _index_in(indices, fn, "indices")
    _need_ndim(ta, 2, fn, "table")
    _need_ndim(ia, 1, fn, "indices")
    _check_index_range(ia, ta.shape[0], fn, "indices", "table")
    cdef cnp.ndarray out = _new(cnp.PyArray_TYPE(ta), False, ia.shape[0], ta.shape[1])
    if out.size == 0:
        return out
    if _is32(ta):
        if _is_i32(ia):
            _gather[float, int32_t](ta, ia, out)
        else:
            _gather[float, int64_t](ta, ia, out)
    else:
        if _is_i32(ia):
            _gather[double, int32_t](ta, ia, out)
        else:
            _gather[double, int64_t](ta, ia, out)
    return out


cdef int _check_rows(cnp.ndarray ia, cnp.ndarray ra, str fn, str rname) except -1:
    _need_ndim(ia, 1, fn, "indices")
    _need_ndim(ra, 2, fn, rname)
    if ra.shape[0] != ia.shape[0]:
        raise ValueError(f"{fn}: {rname} must have one row per index, got indices{_shp(ia)} "
                         f"and {rname}{_shp(ra)}")
    return 0


# ---- grouping rows by index -------------------------------------------------
# embedding_scatter_add, scatter_add_rows_inplace and segment_sum_rows all group
# the n rows by index first (stable counting sort when the index range is small,
# numpy's stable argsort otherwise) and then sum each group in double, in
# parallel over groups: every output row is written by exactly one thread
# (race-free, deterministic, independent of the thread count).

cdef int64_t _min_max(const index_t[::1] idx, int64_t* hi) noexcept:
    cdef Py_ssize_t k, n = idx.shape[0]
    cdef int64_t lo = idx[0], h = idx[0], v
    with nogil:
        for k in range(1, n):
            v = idx[k]
            if v < lo:
                lo = v
            if v > h:
                h = v
    hi[0] = h
    return lo


cdef Py_ssize_t _count_pass(const index_t[::1] idx, int64_t[::1] counts) noexcept:
    """counts[v] = multiplicity of v; returns the number of distinct values."""
    cdef Py_ssize_t k, n = idx.shape[0], R = counts.shape[0], U = 0
    with nogil:
        for k in range(n):
            counts[idx[k]] += 1
        for k in range(R):
            if counts[k] != 0:
                U += 1
    return U


cdef void _counting_order(const index_t[::1] idx, int64_t[::1] counts, int64_t[::1] uniq,
                          int64_t[::1] starts, int64_t[::1] order) noexcept:
    """Stable counting sort: uniq values, segment starts (U+1) and row order."""
    cdef Py_ssize_t k, n = idx.shape[0], R = counts.shape[0], u = 0
    cdef int64_t pos = 0, c, v
    with nogil:
        for k in range(R):
            c = counts[k]
            if c != 0:
                uniq[u] = k
                starts[u] = pos
                counts[k] = pos          # becomes the write cursor
                pos += c
                u += 1
        starts[u] = n
        for k in range(n):
            v = idx[k]
            order[counts[v]] = k
            counts[v] += 1


cdef tuple _group(cnp.ndarray ia, int64_t hi):
    """(uniq (U,) int64 sorted, starts (U+1,) int64, order (n,) int64) for indices in [0, hi]:
    rows order[starts[u]:starts[u+1]] (in their original order) carry index uniq[u]."""
    cdef Py_ssize_t n = ia.shape[0], U
    cdef cnp.ndarray uniq, starts, order, counts
    if hi < 4 * <int64_t>n + 65536:
        counts = _new(cnp.NPY_INT64, True, hi + 1)
        U = _count_pass[int32_t](ia, counts) if _is_i32(ia) else _count_pass[int64_t](ia, counts)
        uniq = _new(cnp.NPY_INT64, False, U)
        starts = _new(cnp.NPY_INT64, False, U + 1)
        order = _new(cnp.NPY_INT64, False, n)
        if _is_i32(ia):
            _counting_order[int32_t](ia, counts, uniq, starts, order)
        else:
            _counting_order[int64_t](ia, counts, uniq, starts, order)
    else:
        order = np.argsort(ia, kind='stable').astype(_I64, copy=False)
        sidx = ia[order]
        first = np.empty(n, dtype=bool)
        first[0] = True
        np.not_equal(sidx[1:], sidx[:n - 1], out=first[1:])
        starts = np.flatnonzero(first).astype(_I64, copy=False)
        uniq = sidx[starts].astype(_I64)
        starts = np.append(starts, n).astype(_I64, copy=False)
    return uniq, starts, order


cdef inline void _group_row(const floating* rows, const int64_t* order, Py_ssize_t s,
                            Py_ssize_t e, Py_ssize_t D, floating* dst, double* acc,
                            bint add) noexcept nogil:
    """dst (=|+=) sum of rows[order[s:e]], summed in double."""
    cdef Py_ssize_t k, d, k0 = s
    cdef const floating* src = rows + order[s] * D
    if e - s == 1:
        if add:
            for d in range(D):
                dst[d] += src[d]
        else:
            memcpy(dst, src, D * sizeof(floating))
        return
    if floating is double:
        if not add:                  # dst itself is the double accumulator
            memcpy(dst, src, D * sizeof(double))
            k0 = s + 1
        for k in range(k0, e):
            src = rows + order[k] * D
            for d in range(D):
                dst[d] += src[d]
    else:
        for d in range(D):
            acc[d] = src[d]
        for k in range(s + 1, e):
            src = rows + order[k] * D
            for d in range(D):
                acc[d] += src[d]
        if add:
            for d in range(D):
                dst[d] = <float>(dst[d] + acc[d])
        else:
            for d in range(D):
                dst[d] = <float>acc[d]


cdef int _group_sum(const floating[:, ::1] rows, const int64_t[::1] order,
                    const int64_t[::1] starts, const int64_t[::1] dest,
                    floating[:, ::1] out, bint use_dest, bint add) except -1:
    """For every group u: out[dest[u] if use_dest else u] (=|+=) group sum."""
    cdef Py_ssize_t U = starts.shape[0] - 1, D = rows.shape[1], n = rows.shape[0], u
    cdef int nt = _nt(n * D, 65536, U)
    cdef int tid = 0
    cdef double[:, ::1] acc = _new(cnp.NPY_FLOAT64, False, nt, D if floating is float else 1)
    cdef double* ap = &acc[0, 0]
    cdef Py_ssize_t astride = acc.shape[1]
    cdef const floating* rp = &rows[0, 0]
    cdef floating* op = &out[0, 0]
    cdef const int64_t* orp = &order[0]
    cdef const int64_t* sp = &starts[0]
    cdef const int64_t* dp = &dest[0]
    with nogil:
        if nt == 1:
            for u in range(U):
                _group_row(rp, orp, sp[u], sp[u + 1], D,
                           op + (dp[u] if use_dest else u) * D, ap, add)
        else:
            with parallel(num_threads=nt):
                tid = threadid()
                for u in prange(U, schedule='static'):
                    _group_row(rp, orp, sp[u], sp[u + 1], D,
                               op + (dp[u] if use_dest else u) * D, ap + tid * astride, add)
    return 0


cdef int _group_dispatch(cnp.ndarray rows, cnp.ndarray order, cnp.ndarray starts,
                         cnp.ndarray dest, cnp.ndarray out, bint use_dest, bint add) except -1:
    if _is32(rows):
        _group_sum[float](rows, order, starts, dest, out, use_dest, add)
    else:
        _group_sum[double](rows, order, starts, dest, out, use_dest, add)
    return 0


cdef int64_t _index_max(cnp.ndarray ia):
    cdef int64_t hi = 0
    if _is_i32(ia):
        _min_max[int32_t](ia, &hi)
    else:
        _min_max[int64_t](ia, &hi)
    return hi


def embedding_scatter_add(indices, grads, int V):
    """Dense (V, D) gradient: out[indices[k]] += grads[k] (duplicates accumulate, in double)."""
    fn = "embedding_scatter_add"
    cdef cnp.ndarray ga = _float_in(grads, fn, "grads")
    cdef cnp.ndarray ia = _index_in(indices, fn, "indices")
    _check_rows(ia, ga, fn, "grads")
    if V < 0:
        raise ValueError(f"{fn}: V must be >= 0, got {V}")
    _check_index_range(ia, V, fn, "indices", "table")
    cdef cnp.ndarray out = _new(cnp.PyArray_TYPE(ga), True, V, ga.shape[1])
    if ia.shape[0] == 0 or ga.shape[1] == 0:
        return out
    uniq, starts, order = _group(ia, _index_max(ia))
    _group_dispatch(ga, order, starts, uniq, out, True, False)
    return out


def scatter_add_rows_inplace(table, indices, rows):
    """table[indices[k]] += rows[k] in place (duplicates accumulate, in double); returns None."""
    fn = "scatter_add_rows_inplace"
    if not cnp.PyArray_Check(table):
        raise TypeError(f"{fn}: table must be a numpy array, got {type(table).__name__}")
    cdef cnp.ndarray ta = <cnp.ndarray>table
    cdef int t = cnp.PyArray_TYPE(ta)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"{fn}: table must be float32 or float64, got dtype {ta.dtype}")
    _need_ndim(ta, 2, fn, "table")
    if not _is_carray(ta) or not cnp.PyArray_ISWRITEABLE(ta):
        raise ValueError(f"{fn}: table{_shp(ta)} must be a writeable, C-contiguous, native-byte-order array "
                         "(it is updated in place)")
    cdef cnp.ndarray ia = _index_in(indices, fn, "indices")
    cdef cnp.ndarray ra = _float_like(rows, ta, fn, "rows")
    _check_rows(ia, ra, fn, "rows")
    if ra.shape[1] != ta.shape[1]:
        raise ValueError(f"{fn}: rows must have {ta.shape[1]} columns to match table{_shp(ta)}, "
                         f"got rows{_shp(ra)}")
    _check_index_range(ia, ta.shape[0], fn, "indices", "table")
    if ia.shape[0] == 0 or ra.shape[1] == 0:
        return None
    uniq, starts, order = _group(ia, _index_max(ia))
    _group_dispatch(ra, order, starts, uniq, ta, True, True)
    return None


def segment_sum_rows(indices, rows):
    """Sum rows sharing an index.

    Returns (unique_sorted_indices (u,) int64, summed (u, D)) with
    summed[i] = rows[indices == unique_sorted_indices[i]].sum(0) (summed in double).
    Negative indices raise IndexError.
    """
    fn = "segment_sum_rows"
    cdef cnp.ndarray ra = _float_in(rows, fn, "rows")
    cdef cnp.ndarray ia = _index_in(indices, fn, "indices")
    _check_rows(ia, ra, fn, "rows")
    cdef Py_ssize_t n = ia.shape[0], D = ra.shape[1]
    cdef int64_t lo, hi = 0
    cdef cnp.ndarray out
    if n == 0:
        return _new(cnp.NPY_INT64, False, 0), _new(cnp.PyArray_TYPE(ra), False, 0, D)
    lo = _min_max[int32_t](ia, &hi) if _is_i32(ia) else _min_max[int64_t](ia, &hi)
    if lo < 0:
        pos = int(np.argmax(ia < 0))
        raise IndexError(f"{fn}: indices[{pos}] = {int(ia[pos])} is negative; indices must be >= 0")
    uniq, starts, order = _group(ia, hi)
    out = _new(cnp.PyArray_TYPE(ra), False, uniq.shape[0], D)
    if D > 0:
        _group_dispatch(ra, order, starts, uniq, out, False, False)
    return uniq, out
