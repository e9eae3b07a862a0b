# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -march=native -fno-math-errno -fno-trapping-math
"""Kernels of quantization-aware training and of the integer-only int8 inference engine.

Fake quantization (float32 / float64, used while training):

* ``fake_quant(x, min, max, num_bits, narrow_range, symmetric, inner)`` -- ``x`` viewed as (outer, C, inner),
  one observed (min, max) per channel C (C == 1: per tensor), nudged in C (``_nudge``, also behind
  ``quant_params``): ``q = floor((clamp(x) - nmin) / scale + 0.5)``
  counted from the range's lowest level, ``out = (q + qmin - zp) * scale`` -- an integer times the scale, so real
  0 comes out as exactly 0 (TensorFlow / MindSpore nudged fake quantization, round half up);
* ``fake_quant_grad(g, x, min, max, num_bits, narrow_range, symmetric, inner)`` -- the straight-through estimator: ``g`` where
  ``nmin <= x <= nmax``, 0 outside the clamp range;
* ``observe_minmax(x, minq, maxq, inner, blend, decay)`` -- the observer: per-channel min and max in one sweep
  (threads on their own shares), returned as one (2C,) array -- the range, or the exponential moving average
  of ``minq`` / ``maxq`` with it;
* ``bn_fold_forward(y, k, gamma, beta, bias, frozen, eps)`` -- the BN-fold correction of a folded conv's output:
  batch norm of z = y * k (k = sigma_running / gamma: the unfolded conv), or ``y + bias`` once frozen; its
  gradients ``bn_fold_backward_params`` (d gamma, d beta, d k, d bias in closed form from one sweep of sums)
  and ``bn_fold_backward_input`` (d y); per channel, statistics in double;
* ``quantize(x, scale, nmin, nmax, qmin)``      -- float32 -> int8 with the same arithmetic as
  ``fake_quant`` (``q + qmin``, signed), so the engine's input equals the simulation's bit for bit.

Integer-only inference (int8 activations and weights, int32 accumulation, no float in the hot loops):

* ``conv2d_int8`` (im2col per image, through a table of source offsets shared by every image, straight into
  int16 pairs in a thread-local buffer, padding = the input zero point; then the GEMM micro-kernel), ``dense_int8``: ``acc = bias + sum x*w`` in int32, then requantised with a
  per-output-channel Q31 multiplier in [0.5, 1) and a rounding right shift (``_mbqm``: one rounding of the
  64-bit product, as TFLite's single-rounding mode), plus the output zero point, clamped to
  [act_min, act_max] (a fused ReLU clamps at the zero point);
* ``requant_int8`` (int8 -> int8 at another scale), ``relu_int8``, ``maxpool_int8``, ``add_int8`` (both
  inputs rescaled to a common scale with 20 bits of headroom, TFLite's quantized add);
* ``dequantize`` -- int8 -> float32 at the model's output.

Every heavy loop runs with the GIL released, in parallel (OpenMP) when there is enough work.
"""

import numpy as np
cimport numpy as cnp
cimport openmp
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.math cimport floor, floorf, sqrt
from libc.stdint cimport int8_t, int32_t, int64_t
from libc.stdlib cimport malloc, free

cnp.import_array()

__all__ = ["quant_params", "fake_quant", "fake_quant_grad", "observe_minmax", "bn_fold_forward",
           "bn_fold_backward_params", "bn_fold_backward_input", "quantize", "dequantize", "conv2d_int8", "dense_int8",
           "requant_int8", "relu_int8", "maxpool_int8", "add_int8", "multiply_by_quantized_multiplier"]

cdef int32_t INT32_MIN = -2147483648
cdef int32_t INT32_MAX = 2147483647


cdef inline int _threads(Py_ssize_t work, Py_ssize_t units) noexcept nogil:
    """Threads for a kernel: serial below ~64k elements of work or with a single unit of parallel work."""
    cdef int nt = openmp.omp_get_max_threads()
    if work < 65536 or units < 2:
        return 1
    if nt > units:
        nt = <int>units
    return nt if nt > 0 else 1


# ---------------------------------------------------------------------------------------------
# fixed-point requantization
# ---------------------------------------------------------------------------------------------
cdef inline int32_t _mbqm(int32_t x, int32_t mult, int shift) noexcept nogil:
    """x * M with M = mult * 2^(shift - 31), mult a Q31 value in [2^30, 2^31): the 64-bit product shifted
    right by 31 - shift with ONE rounding, half up (TFLite's single-rounding MultiplyByQuantizedMultiplier).
    Half up is the rounding of the fake quantization (floor(t + 0.5)); gemmlowp's two-step rounding
    (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT) would round ~0.1% of outputs the other way."""
    cdef int total = 31 - shift
    cdef int64_t p = <int64_t>x * <int64_t>mult
    if total <= 0:
        p = p << (-total)
    else:
        p = (p + (<int64_t>1 << (total - 1))) >> total
    if p > INT32_MAX:
        return INT32_MAX
    if p < INT32_MIN:
        return INT32_MIN
    return <int32_t>p


cdef inline int8_t _clamp8(int32_t v, int32_t lo, int32_t hi) noexcept nogil:
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return <int8_t>v


def multiply_by_quantized_multiplier(acc, mult, shift):
    """Elementwise x * M (int32 in, int32 out) with the engine's fixed-point arithmetic (for tests)."""
    a = np.ascontiguousarray(acc, dtype=np.int32)
    m = np.ascontiguousarray(np.broadcast_to(mult, a.shape), dtype=np.int32)
    s = np.ascontiguousarray(np.broadcast_to(shift, a.shape), dtype=np.int32)
    out = np.empty_like(a)
    cdef int32_t[::1] av = a.reshape(-1), mv = m.reshape(-1), sv = s.reshape(-1), ov = out.reshape(-1)
    cdef Py_ssize_t i, n = a.size
    with nogil:
        for i in range(n):
            ov[i] = _mbqm(av[i], mv[i], sv[i])
    return out


# ---------------------------------------------------------------------------------------------
# fake quantization (training)
# ---------------------------------------------------------------------------------------------
cdef inline floating _fl(floating v) noexcept nogil:
    if floating is float:
        return floorf(v)
    else:
        return floor(v)


cdef void _nudge(const floating* mn_in, const floating* mx_in, Py_ssize_t C, int qmin, int qmax, bint symmetric,
                 floating* scale, floating* nmin, floating* nmax, floating* zlo, int64_t* zp) noexcept nogil:
    """TensorFlow's nudged range per channel, every step rounded in ``floating`` (the one implementation:
    the kernels and ``runtime.ops.quant.quant_params`` both call it)."""
    cdef Py_ssize_t c
    cdef floating mn, mx, a, s, zf, z
    for c in range(C):
        mn = mn_in[c] if mn_in[c] < 0 else <floating>0
        mx = mx_in[c] if mx_in[c] > 0 else <floating>0
        if symmetric:
            a = -mn if -mn > mx else mx
            mn = -a
            mx = a
        s = (mx - mn) / <floating>(qmax - qmin)
        if not s > 0:
            s = 1
        if symmetric:
            z = <floating>((qmax + 1) // 2)          # signed zero: [0, 2^b - 1] and [1, 2^b - 1] both -> 2^(b-1)
        else:
            zf = <floating>qmin - mn / s
            if zf < qmin:
                zf = qmin
            if zf > qmax:
                zf = qmax
            z = _fl(zf + <floating>0.5)
        scale[c] = s
        nmin[c] = (<floating>qmin - z) * s
        nmax[c] = (<floating>qmax - z) * s
        zlo[c] = <floating>qmin - z
        zp[c] = <int64_t>z


def quant_params(mn, mx, int num_bits, bint narrow_range, bint symmetric, dtype):
    """(scale, nmin, nmax, zlo = qmin - zero_point, zero_point) per channel in ``dtype`` (float32/float64)."""
    dt = np.dtype(dtype)
    lo = np.ascontiguousarray(mn, dtype=dt).reshape(-1)
    _, P = _fq_args(np.empty(lo.shape[0], dt), lo, mx, num_bits, narrow_range, symmetric, 1, "quant_params")
    cdef int qmin = 1 if narrow_range else 0
    return P[0], P[1], P[2], P[3], (qmin - P[3]).astype(np.int64)


cdef inline void _fq_row(const floating* x, floating* out, Py_ssize_t n, floating s, floating l, floating h,
                         floating z) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v, t
    for i in range(n):
        v = x[i]
        v = l if v < l else v
        v = h if v > h else v
        t = _fl((v - l) / s + <floating>0.5) + z
        out[i] = t * s


cdef void _fq(const floating* x, floating* out, const floating* scale, const floating* lo,
              const floating* hi, const floating* zlo, Py_ssize_t rows, Py_ssize_t C, Py_ssize_t inner,
              int nt) noexcept nogil:
    cdef Py_ssize_t r, c
    if rows == 1:
        _fq_row(x, out, inner, scale[0], lo[0], hi[0], zlo[0])
        return
    for r in prange(rows, schedule="static", num_threads=nt):
        c = r % C
        _fq_row(x + r * inner, out + r * inner, inner, scale[c], lo[c], hi[c], zlo[c])


cdef void _fq_grad(const floating* g, const floating* x, floating* out, const floating* lo,
                   const floating* hi, Py_ssize_t rows, Py_ssize_t C, Py_ssize_t inner, int nt) noexcept nogil:
    cdef Py_ssize_t r, i, c
    cdef floating v, l, h
    for r in prange(rows, schedule="static", num_threads=nt):
        c = r % C
        l = lo[c]
        h = hi[c]
        for i in range(inner):
            v = x[r * inner + i]
            out[r * inner + i] = g[r * inner + i] if (v >= l and v <= h) else <floating>0


def _fq_args(x, mn, mx, int num_bits, bint narrow_range, bint symmetric, Py_ssize_t inner, fn):
    """x as a contiguous float array and its per-channel (scale, nmin, nmax, zlo) rows, nudged in C."""
    xa = np.ascontiguousarray(x)
    if xa.dtype != np.float32 and xa.dtype != np.float64:
        raise TypeError(f"{fn}: expects float32 or float64, got {xa.dtype}")
    lo = np.ascontiguousarray(mn, dtype=xa.dtype).reshape(-1)
    hi = np.ascontiguousarray(mx, dtype=xa.dtype).reshape(-1)
    cdef Py_ssize_t C = lo.shape[0]
    if hi.shape[0] != C or C == 0 or inner <= 0 or xa.size % (C * inner):
        raise ValueError(f"{fn}: {C} channels of min / {hi.shape[0]} of max with inner size {inner} do not fit "
                         f"a tensor of shape {xa.shape}")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"{fn}: num_bits must be in 2..16, got {num_bits}")
    P = np.empty((4, C), xa.dtype)
    zp = np.empty(C, np.int64)
    cdef int64_t[::1] zv = zp
    cdef float[:, ::1] pf
    cdef float[::1] lf, hf
    cdef double[:, ::1] pd
    cdef double[::1] ld, hd
    cdef int qmin = 1 if narrow_range else 0, qmax = (1 << num_bits) - 1
    if xa.dtype == np.float32:
        pf, lf, hf = P, lo, hi
        _nudge[float](&lf[0], &hf[0], C, qmin, qmax, symmetric, &pf[0, 0], &pf[1, 0], &pf[2, 0], &pf[3, 0], &zv[0])
    else:
        pd, ld, hd = P, lo, hi
        _nudge[double](&ld[0], &hd[0], C, qmin, qmax, symmetric, &pd[0, 0], &pd[1, 0], &pd[2, 0], &pd[3, 0], &zv[0])
    return xa, P


cdef inline object _float_array(x, str fn):
    """``x`` as a C-contiguous float32/float64 ndarray (no copy when it already is one)."""
    cdef int t
    if type(x) is np.ndarray and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x):
        t = cnp.PyArray_TYPE(<cnp.ndarray>x)
        if t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64:
            return x
    x = np.ascontiguousarray(x)
    if x.dtype != np.float32 and x.dtype != np.float64:
        raise TypeError(f"{fn}: expects float32 or float64, got {x.dtype}")
    return x


cdef inline object _range_vec(v, like, str fn, str what):
    """``v`` as a 1-d C-contiguous array of ``like``'s dtype (no copy when it already is one)."""
    if type(v) is np.ndarray and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>v) \
            and cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.PyArray_TYPE(<cnp.ndarray>like) \
            and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1:
        return v
    return np.ascontiguousarray(v, dtype=like.dtype).reshape(-1)


cdef object _fq_call(int mode, g, x, mn, mx, int num_bits, bint narrow_range, bint symmetric, Py_ssize_t inner,
                     str fn):
    """mode 0: fake quant of x; mode 1: the straight-through gradient of g. The per-channel nudged range is
    computed into a small scratch buffer (no Python objects besides the output)."""
    xa = _float_array(x, fn)
    lo = _range_vec(mn, xa, fn, "min")
    hi = _range_vec(mx, xa, fn, "max")
    cdef Py_ssize_t C = lo.shape[0], n = cnp.PyArray_SIZE(<cnp.ndarray>xa)
    if hi.shape[0] != C or C == 0 or inner <= 0 or n % (C * inner):
        raise ValueError(f"{fn}: {C} channels of min / {hi.shape[0]} of max with inner size {inner} do not fit "
                         f"a tensor of shape {xa.shape}")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"{fn}: num_bits must be in 2..16, got {num_bits}")
    ga = None
    if mode == 1:
        ga = g if (type(g) is np.ndarray and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>g)
                   and cnp.PyArray_TYPE(<cnp.ndarray>g) == cnp.PyArray_TYPE(<cnp.ndarray>xa)) \
            else np.ascontiguousarray(g, dtype=xa.dtype)
        if ga.shape != xa.shape:
            raise ValueError(f"{fn}: g {ga.shape} and x {xa.shape} differ")
    out = np.empty_like(xa)
    if n == 0:
        return out
    cdef Py_ssize_t rows = n // inner
    cdef int nt = _threads(n, rows)
    cdef int qmin = 1 if narrow_range else 0, qmax = (1 << num_bits) - 1
    cdef bint f32 = cnp.PyArray_TYPE(<cnp.ndarray>xa) == cnp.NPY_FLOAT32
    cdef void* xp = cnp.PyArray_DATA(xa)
    cdef void* op = cnp.PyArray_DATA(out)
    cdef void* gp = cnp.PyArray_DATA(ga) if mode == 1 else NULL
    cdef void* lp = cnp.PyArray_DATA(lo)
    cdef void* hp = cnp.PyArray_DATA(hi)
    cdef void* P = malloc(C * (4 * (sizeof(double)) + sizeof(int64_t)))
    if P == NULL:
        raise MemoryError(fn)
    cdef float* pf = <float*>P
    cdef double* pd = <double*>P
    cdef int64_t* zp = <int64_t*>(<char*>P + C * 4 * sizeof(double))
    with nogil:
        if f32:
            _nudge[float](<float*>lp, <float*>hp, C, qmin, qmax, symmetric, pf, pf + C, pf + 2 * C, pf + 3 * C, zp)
            if mode == 0:
                _fq[float](<float*>xp, <float*>op, pf, pf + C, pf + 2 * C, pf + 3 * C, rows, C, inner, nt)
            else:
                _fq_grad[float](<float*>gp, <float*>xp, <float*>op, pf + C, pf + 2 * C, rows, C, inner, nt)
        else:
            _nudge[double](<double*>lp, <double*>hp, C, qmin, qmax, symmetric, pd, pd + C, pd + 2 * C, pd + 3 * C,
                           zp)
            if mode == 0:
                _fq[double](<double*>xp, <double*>op, pd, pd + C, pd + 2 * C, pd + 3 * C, rows, C, inner, nt)
            else:
                _fq_grad[double](<double*>gp, <double*>xp, <double*>op, pd + C, pd + 2 * C, rows, C, inner, nt)
    free(P)
    return out


def fake_quant(x, mn, mx, int num_bits, bint narrow_range, bint symmetric, Py_ssize_t inner):
    """Fake-quantize ``x`` (float32/64, viewed as (outer, C, inner)) with the nudged range of each channel's
    observed (min, max) (``mn`` / ``mx`` of shape (C,))."""
    return _fq_call(0, None, x, mn, mx, num_bits, narrow_range, symmetric, inner, "fake_quant")


def fake_quant_grad(g, x, mn, mx, int num_bits, bint narrow_range, bint symmetric, Py_ssize_t inner):
    """Straight-through estimator: ``g`` inside each channel's nudged [nmin, nmax], 0 outside."""
    return _fq_call(1, g, x, mn, mx, num_bits, narrow_range, symmetric, inner, "fake_quant_grad")


# ---------------------------------------------------------------------------------------------
# the observer: min and max per channel in one sweep, then the EMA, written in place
# ---------------------------------------------------------------------------------------------
cdef extern from *:
    """
    /* min and max of x[0..n) folded into *lo / *hi: AVX vector min / max (scalar without AVX). A NaN never
       wins (vminps returns its second operand when one is NaN, as the scalar compares do), so the observed
       range stays finite. */
    #if defined(__AVX__)
    #include <immintrin.h>
    #endif
    static void iq_minmax_f32(const float* x, Py_ssize_t n, float* lo, float* hi) {
        Py_ssize_t i = 0;
        float l = *lo, h = *hi, t[8];
        int j;
    #if defined(__AVX__)
        if (n >= 32) {
            __m256 l0 = _mm256_set1_ps(l), l1 = l0, h0 = _mm256_set1_ps(h), h1 = h0;
            for (; i + 16 <= n; i += 16) {
                __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
                l0 = _mm256_min_ps(a, l0); l1 = _mm256_min_ps(b, l1);
                h0 = _mm256_max_ps(a, h0); h1 = _mm256_max_ps(b, h1);
            }
            _mm256_storeu_ps(t, _mm256_min_ps(l0, l1));
            for (j = 0; j < 8; j++) l = t[j] < l ? t[j] : l;
            _mm256_storeu_ps(t, _mm256_max_ps(h0, h1));
            for (j = 0; j < 8; j++) h = t[j] > h ? t[j] : h;
        }
    #endif
        for (; i < n; i++) { float v = x[i]; l = v < l ? v : l; h = v > h ? v : h; }
        *lo = l; *hi = h;
    }
    static void iq_minmax_f64(const double* x, Py_ssize_t n, double* lo, double* hi) {
        Py_ssize_t i;
        double l = *lo, h = *hi;
        for (i = 0; i < n; i++) { double v = x[i]; l = v < l ? v : l; h = v > h ? v : h; }
        *lo = l; *hi = h;
    }
    #define IQ_EMA(NAME, T) \
        __attribute__((optimize("fp-contract=off"))) \
        static void NAME(T* mn, T* mx, const T* lo, const T* hi, Py_ssize_t C, int blend, T d, T e) { \
            Py_ssize_t c; \
            for (c = 0; c < C; c++) { \
                if (blend) { \
                    volatile T a = mn[c] * d, b = lo[c] * e, p = mx[c] * d, q = hi[c] * e; \
                    mn[c] = a + b; mx[c] = p + q; \
                } else { mn[c] = lo[c]; mx[c] = hi[c]; } \
            } \
        }
    IQ_EMA(iq_ema_f32, float)
    IQ_EMA(iq_ema_f64, double)
    """
    void iq_minmax_f32(const float* x, Py_ssize_t n, float* lo, float* hi) noexcept nogil
    void iq_minmax_f64(const double* x, Py_ssize_t n, double* lo, double* hi) noexcept nogil
    void iq_ema_f32(float* mn, float* mx, const float* lo, const float* hi, Py_ssize_t C, int blend, float d,
                    float e) noexcept nogil
    void iq_ema_f64(double* mn, double* mx, const double* lo, const double* hi, Py_ssize_t C, int blend, double d,
                    double e) noexcept nogil


cdef inline void _minmax(const floating* x, Py_ssize_t n, floating* lo, floating* hi) noexcept nogil:
    if floating is float:
        iq_minmax_f32(x, n, lo, hi)
    else:
        iq_minmax_f64(x, n, lo, hi)


cdef void _observe(const floating* x, Py_ssize_t n, Py_ssize_t C, Py_ssize_t inner, floating* lo, floating* hi,
                   floating* part, int nt) noexcept nogil:
    """Per channel c of x viewed as (outer, C, inner): lo[c] = min, hi[c] = max. ``part`` holds 2 * C * nt
    partial results: thread t sweeps its own contiguous share (rows, or a slice of the one row when x is a
    single channel of a single row) into its own partials, merged at the end."""
    cdef Py_ssize_t rows = n // inner, t, r, c, a, b, share
    cdef floating* pl
    cdef floating* ph
    for t in range(nt):
        for c in range(C):             # seeded with an element of the channel (row c belongs to channel c)
            part[2 * (C * t + c)] = x[c * inner]
            part[2 * (C * t + c) + 1] = x[c * inner]
    if nt > 1 and rows >= nt:
        for t in prange(nt, schedule="static", num_threads=nt):
            pl = part + 2 * C * t
            a = rows * t // nt
            b = rows * (t + 1) // nt
            for r in range(a, b):
                c = r % C
                _minmax(x + r * inner, inner, pl + 2 * c, pl + 2 * c + 1)
    elif nt > 1 and C == 1:
        for t in prange(nt, schedule="static", num_threads=nt):
            pl = part + 2 * t
            a = n * t // nt
            b = n * (t + 1) // nt
            _minmax(x + a, b - a, pl, pl + 1)
    else:
        nt = 1
        for r in range(rows):
            c = r % C
            _minmax(x + r * inner, inner, part + 2 * c, part + 2 * c + 1)
    for c in range(C):
        lo[c] = part[2 * c]
        hi[c] = part[2 * c + 1]
        for t in range(1, nt):
            pl = part + 2 * (C * t + c)
            if pl[0] < lo[c]:
                lo[c] = pl[0]
            if pl[1] > hi[c]:
                hi[c] = pl[1]


cdef inline void _ema_store(floating* minq, floating* maxq, const floating* lo, const floating* hi, Py_ssize_t C,
                            bint blend, double decay) noexcept nogil:
    """minq / maxq (holding the previous range) <- the observed range, or (blend) the moving average
    var * d + observed * (1 - d), each product rounded to ``floating`` before the sum (no fused multiply-add:
    the arithmetic of the float graph)."""
    if floating is float:
        iq_ema_f32(minq, maxq, lo, hi, C, blend, <float>decay, <float>(1.0 - decay))
    else:
        iq_ema_f64(minq, maxq, lo, hi, C, blend, decay, 1.0 - decay)


def observe_minmax(x, minq, maxq, Py_ssize_t inner, bint blend, double decay):
    """The observer of a fake quant: per channel of ``x`` (viewed as (outer, C, inner), C = len(minq)) its min
    and max in one sweep; returns the new range as one (2 * C,) array [min..., max...] of x's dtype -- the
    observed range, or with ``blend`` the exponential moving average ``var * decay + observed *
    (1 - decay)`` of the current ``minq`` / ``maxq`` (which are only read)."""
    fn = "observe_minmax"
    xa = _float_array(x, fn)
    dt = xa.dtype
    lo = _range_vec(minq, xa, fn, "min")
    hi = _range_vec(maxq, xa, fn, "max")
    cdef Py_ssize_t C = lo.shape[0], n = xa.size
    if hi.shape[0] != C or C == 0 or inner <= 0 or n == 0 or n % (C * inner):
        raise ValueError(f"{fn}: {C} channels of min / {hi.shape[0]} of max with inner size {inner} do not fit a "
                         f"tensor of shape {xa.shape} (an empty tensor has no range)")
    out = np.empty(2 * C, dt)
    out[:C] = lo
    out[C:] = hi
    cdef Py_ssize_t rows = n // inner
    cdef int nt = _threads(n, rows if rows > 1 else (n // 4096))
    cdef bint f32 = dt == np.float32
    cdef size_t w = sizeof(float) if f32 else sizeof(double)
    cdef char* buf = <char*>malloc(w * (2 * C + 2 * C * nt))
    if buf == NULL:
        raise MemoryError(fn)
    cdef void* xp = cnp.PyArray_DATA(xa)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    with nogil:
        if f32:
            _observe[float](<float*>xp, n, C, inner, <float*>buf, <float*>buf + C, <float*>buf + 2 * C, nt)
            _ema_store[float](<float*>op, <float*>op + C, <float*>buf, <float*>buf + C, C, blend, decay)
        else:
            _observe[double](<double*>xp, n, C, inner, <double*>buf, <double*>buf + C, <double*>buf + 2 * C, nt)
            _ema_store[double](<double*>op, <double*>op + C, <double*>buf, <double*>buf + C, C, blend, decay)
    free(buf)
    return out


# ---------------------------------------------------------------------------------------------
# the BN-fold correction (training): batch norm of the unfolded conv z = y * k, or the frozen bias
# ---------------------------------------------------------------------------------------------
cdef extern from *:
    """
    /* The BN-fold loops over one (N, C) row of HW values, in double, eight lanes at a time with GCC vector
       types (float rows converted on load): channel sums in one sweep shifted by a value K of the channel
       (sum (x - K), sum (x - K)^2 -- no cancellation when the mean is far from 0 --, with g also sum g and
       sum g (x - K)), the affine forward a (x - m) + o, and the input gradient a (g - mg - (x - m) cz). */
    #include <string.h>
    typedef float iq_v8sf __attribute__((vector_size(32)));
    typedef double iq_v8df __attribute__((vector_size(64)));
    #define IQ_HSUM(v) ((((v)[0] + (v)[1]) + ((v)[2] + (v)[3])) + (((v)[4] + (v)[5]) + ((v)[6] + (v)[7])))
    static inline iq_v8df iq_load_f32(const float* p) {
        iq_v8sf v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, iq_v8df); }
    static inline iq_v8df iq_load_f64(const double* p) { iq_v8df v; memcpy(&v, p, sizeof v); return v; }
    static inline void iq_store_f32(float* p, iq_v8df v) {
        iq_v8sf w = __builtin_convertvector(v, iq_v8sf); memcpy(p, &w, sizeof w); }
    static inline void iq_store_f64(double* p, iq_v8df v) { memcpy(p, &v, sizeof v); }
    #define IQ_BNF(SUFFIX, T) \
    static void iq_moments_##SUFFIX(const T* x, const T* g, Py_ssize_t n, double K, double* s) { \
        iq_v8df a = {0}, b = {0}, c = {0}, e = {0}, d, gv; double t, u; \
        Py_ssize_t i = 0; \
        if (g == NULL) { \
            for (; i + 8 <= n; i += 8) { d = iq_load_##SUFFIX(x + i) - K; a += d; b += d * d; } \
        } else { \
            for (; i + 8 <= n; i += 8) { \
                d = iq_load_##SUFFIX(x + i) - K; gv = iq_load_##SUFFIX(g + i); \
                a += d; b += d * d; c += gv; e += gv * d; } \
        } \
        s[0] += IQ_HSUM(a); s[1] += IQ_HSUM(b); s[2] += IQ_HSUM(c); s[3] += IQ_HSUM(e); \
        for (; i < n; i++) { \
            t = (double)x[i] - K; s[0] += t; s[1] += t * t; \
            if (g != NULL) { u = (double)g[i]; s[2] += u; s[3] += u * t; } } \
    } \
    static void iq_affine_##SUFFIX(const T* x, T* out, Py_ssize_t n, double a, double m, double o) { \
        Py_ssize_t i = 0; \
        for (; i + 8 <= n; i += 8) iq_store_##SUFFIX(out + i, a * (iq_load_##SUFFIX(x + i) - m) + o); \
        for (; i < n; i++) out[i] = (T)(a * ((double)x[i] - m) + o); \
    } \
    static void iq_bnf_dy_##SUFFIX(const T* g, const T* x, T* out, Py_ssize_t n, double a, double mg, double m, \
                                   double cz) { \
        Py_ssize_t i = 0; \
        for (; i + 8 <= n; i += 8) \
            iq_store_##SUFFIX(out + i, a * (iq_load_##SUFFIX(g + i) - mg - (iq_load_##SUFFIX(x + i) - m) * cz)); \
        for (; i < n; i++) out[i] = (T)(a * ((double)g[i] - mg - ((double)x[i] - m) * cz)); \
    }
    IQ_BNF(f32, float)
    IQ_BNF(f64, double)
    """
    void iq_moments_f32(const float* x, const float* g, Py_ssize_t n, double K, double* s) noexcept nogil
    void iq_moments_f64(const double* x, const double* g, Py_ssize_t n, double K, double* s) noexcept nogil
    void iq_affine_f32(const float* x, float* out, Py_ssize_t n, double a, double m, double o) noexcept nogil
    void iq_affine_f64(const double* x, double* out, Py_ssize_t n, double a, double m, double o) noexcept nogil
    void iq_bnf_dy_f32(const float* g, const float* x, float* out, Py_ssize_t n, double a, double mg, double m,
                       double cz) noexcept nogil
    void iq_bnf_dy_f64(const double* g, const double* x, double* out, Py_ssize_t n, double a, double mg, double m,
                       double cz) noexcept nogil


cdef void _bnf_moments(const floating* y, const floating* g, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                       Py_ssize_t c, double* mean, double* var, double* sg, double* sgc) noexcept nogil:
    """Mean and biased variance of channel c of an (N, C, HW) tensor in one sweep (double, shifted by the
    channel's first value); with ``g`` (not NULL) also sum g and sum g (y - mean)."""
    cdef Py_ssize_t b
    cdef double s[4]
    cdef double K = y[c * HW], n = <double>(N * HW), d
    s[0] = 0
    s[1] = 0
    s[2] = 0
    s[3] = 0
    for b in range(N):
        if floating is float:
            iq_moments_f32(y + (b * C + c) * HW, (g + (b * C + c) * HW) if g != NULL else NULL, HW, K, s)
        else:
            iq_moments_f64(y + (b * C + c) * HW, (g + (b * C + c) * HW) if g != NULL else NULL, HW, K, s)
    d = s[0] / n
    mean[0] = K + d
    var[0] = s[1] / n - d * d
    if var[0] < 0:
        var[0] = 0
    if g != NULL:
        sg[0] = s[2]
        sgc[0] = s[3] - d * s[2]


cdef void _bnf_fwd(const floating* y, floating* out, const floating* k, const floating* gamma,
                   const floating* beta, const floating* bias, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW,
                   bint frozen, double eps, int nt) noexcept nogil:
    cdef Py_ssize_t c, b
    cdef double m, v, a, o, sg, sgc
    for c in prange(C, schedule="static", num_threads=nt):
        if frozen:
            a = 1.0
            m = 0.0
            o = bias[c]
        else:
            _bnf_moments(y, <floating*>NULL, N, C, HW, c, &m, &v, &sg, &sgc)
            a = <double>gamma[c] * <double>k[c] / sqrt(<double>k[c] * <double>k[c] * v + eps)
            o = beta[c]
        for b in range(N):
            if floating is float:
                iq_affine_f32(y + (b * C + c) * HW, out + (b * C + c) * HW, HW, a, m, o)
            else:
                iq_affine_f64(y + (b * C + c) * HW, out + (b * C + c) * HW, HW, a, m, o)


cdef void _bnf_params(const floating* g, const floating* y, const floating* k, const floating* gamma,
                      floating* P, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, bint frozen, double eps,
                      int nt) noexcept nogil:
    """P (6, C): dgamma, dbeta, dk, dbias, mean(y), var(y) (the last two for the dy pass)."""
    cdef Py_ssize_t c
    cdef double m, v, sg, sgc, sd, kk
    for c in prange(C, schedule="static", num_threads=nt):
        _bnf_moments(y, g, N, C, HW, c, &m, &v, &sg, &sgc)
        if frozen:
            m = 0.0
            v = 0.0
        if frozen:
            P[c] = 0
            P[C + c] = 0
            P[2 * C + c] = 0
            P[3 * C + c] = <floating>sg
        else:
            kk = k[c]
            sd = sqrt(kk * kk * v + eps)
            # dgamma = sum g * zhat, zhat = k (y - mean) / sigma_z; dbeta = sum g; d k = sum dz * y, which is
            # gamma * dgamma * eps / (sigma_z^2 k) (sum dz = 0 and sum dz zhat = gamma dgamma eps / sigma_z^2)
            P[c] = <floating>(kk * sgc / sd)
            P[C + c] = <floating>sg
            P[2 * C + c] = <floating>(<double>gamma[c] * (kk * sgc / sd) * eps / (sd * sd * kk))
            P[3 * C + c] = 0
        P[4 * C + c] = <floating>m
        P[5 * C + c] = <floating>v


cdef void _bnf_dy(const floating* g, const floating* y, const floating* k, const floating* gamma,
                  const floating* P, floating* dy, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, bint frozen,
                  double eps, int nt) noexcept nogil:
    """dy = k * dz, dz = gamma / sigma_z (g - sum g / n - zhat sum(g zhat) / n); frozen: dy = g."""
    cdef Py_ssize_t c, b
    cdef double n = <double>(N * HW), kk, sd, a, mg, cz, m
    for c in prange(C, schedule="static", num_threads=nt):
        if frozen:
            a = 1.0
            mg = 0.0
            cz = 0.0
            m = 0.0
        else:
            kk = k[c]
            m = P[4 * C + c]
            sd = sqrt(kk * kk * <double>P[5 * C + c] + eps)
            a = <double>gamma[c] * kk / sd
            mg = <double>P[C + c] / n
            cz = kk * <double>P[c] / (sd * n)          # zhat * sum(g zhat) / n = (y - mean) * cz
        for b in range(N):
            if floating is float:
                iq_bnf_dy_f32(g + (b * C + c) * HW, y + (b * C + c) * HW, dy + (b * C + c) * HW, HW, a, mg, m, cz)
            else:
                iq_bnf_dy_f64(g + (b * C + c) * HW, y + (b * C + c) * HW, dy + (b * C + c) * HW, HW, a, mg, m, cz)


cdef tuple _bnf_arrays(str fn, y, vecs, g=None):
    ya = _float_array(y, fn)
    if ya.ndim < 2:
        raise ValueError(f"{fn}: expects an (N, C, ...) tensor, got shape {ya.shape}")
    cdef Py_ssize_t C = ya.shape[1]
    out = [ya]
    for what, v in vecs:
        va = _range_vec(v, ya, fn, what)
        if va.shape[0] != C:
            raise ValueError(f"{fn}: {what} must have {C} values for y {ya.shape}, got {va.shape[0]}")
        out.append(va)
    if g is not None:
        ga = g if (type(g) is np.ndarray and g.dtype == ya.dtype and (<cnp.ndarray>g).flags.c_contiguous) \
            else np.ascontiguousarray(g, dtype=ya.dtype)
        if ga.shape != ya.shape:
            raise ValueError(f"{fn}: g {ga.shape} and y {ya.shape} differ")
        out.append(ga)
    return tuple(out)


cdef inline void* _dp(a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef void _bnf_dispatch(int op, bint f32, void** p, Py_ssize_t N, Py_ssize_t C, Py_ssize_t HW, bint frozen,
                        double eps, int nt) noexcept nogil:
    """op 0: forward (y, out, k, gamma, beta, bias); 1: params (g, y, k, gamma, P); 2: d y (g, y, k, gamma, P, dy)."""
    if op == 0 and f32:
        _bnf_fwd[float](<float*>p[0], <float*>p[1], <float*>p[2], <float*>p[3], <float*>p[4], <float*>p[5],
                        N, C, HW, frozen, eps, nt)
    elif op == 0:
        _bnf_fwd[double](<double*>p[0], <double*>p[1], <double*>p[2], <double*>p[3], <double*>p[4], <double*>p[5],
                         N, C, HW, frozen, eps, nt)
    elif op == 1 and f32:
        _bnf_params[float](<float*>p[0], <float*>p[1], <float*>p[2], <float*>p[3], <float*>p[4], N, C, HW, frozen,
                           eps, nt)
    elif op == 1:
        _bnf_params[double](<double*>p[0], <double*>p[1], <double*>p[2], <double*>p[3], <double*>p[4], N, C, HW,
                            frozen, eps, nt)
    elif f32:
        _bnf_dy[float](<float*>p[0], <float*>p[1], <float*>p[2], <float*>p[3], <float*>p[4], <float*>p[5],
                       N, C, HW, frozen, eps, nt)
    else:
        _bnf_dy[double](<double*>p[0], <double*>p[1], <double*>p[2], <double*>p[3], <double*>p[4], <double*>p[5],
                        N, C, HW, frozen, eps, nt)


cdef object _bnf_run(int op, arrays, result, bint frozen, double eps):
    """Run kernel ``op`` over ``arrays`` (y-shaped first) and return ``result`` (written in place)."""
    y = arrays[1] if op else arrays[0]
    if y.size == 0:
        return result
    cdef void* p[6]
    cdef Py_ssize_t j, N = y.shape[0], C = y.shape[1], HW = y.size // (N * C)
    for j in range(len(arrays)):
        p[j] = _dp(arrays[j])
    cdef int nt = _threads(y.size, C)
    cdef bint f32 = y.dtype == np.float32
    with nogil:
        _bnf_dispatch(op, f32, p, N, C, HW, frozen, eps, nt)
    return result


def bn_fold_forward(y, k, gamma, beta, bias, bint frozen, double eps):
    """The corrected output of a BN-folded conv ``y`` (N, C, ...): batch norm (batch mean, biased variance,
    ``eps``) of z = y * k with ``gamma`` / ``beta``; ``frozen``: y + bias (the running statistics' bias)."""
    ya, ka, ga, ba, bb = _bnf_arrays("bn_fold_forward", y, (("k", k), ("gamma", gamma), ("beta", beta),
                                                             ("bias", bias)))
    out = np.empty_like(ya)
    return _bnf_run(0, (ya, out, ka, ga, ba, bb), out, frozen, eps)


def bn_fold_backward_params(g, y, k, gamma, bint frozen, double eps):
    """(6, C) in y's dtype: d gamma, d beta, d k, d bias of ``bn_fold_forward`` for the upstream gradient ``g``,
    then the batch mean and biased variance of y (read by ``bn_fold_backward_input``)."""
    ya, ka, gm, ga = _bnf_arrays("bn_fold_backward_params", y, (("k", k), ("gamma", gamma)), g)
    P = np.zeros((6, ya.shape[1]), ya.dtype)
    return _bnf_run(1, (ga, ya, ka, gm, P), P, frozen, eps)


def bn_fold_backward_input(g, y, k, gamma, P, bint frozen, double eps):
    """d y of ``bn_fold_forward`` for the upstream gradient ``g`` (``P``: ``bn_fold_backward_params``)."""
    ya, ka, gm, ga = _bnf_arrays("bn_fold_backward_input", y, (("k", k), ("gamma", gamma)), g)
    Pa = np.ascontiguousarray(P, dtype=ya.dtype)
    if Pa.shape != (6, ya.shape[1]):
        raise ValueError(f"bn_fold_backward_input: P must be (6, {ya.shape[1]}), got {Pa.shape}")
    dy = np.empty_like(ya)
    return _bnf_run(2, (ga, ya, ka, gm, Pa, dy), dy, frozen, eps)


# ---------------------------------------------------------------------------------------------
# the model boundary: float32 <-> int8
# ---------------------------------------------------------------------------------------------
def quantize(x, float scale, float nmin, float nmax, int qmin):
    """float32 -> int8 exactly as ``fake_quant`` rounds: ``floor((clamp(x) - nmin) / scale + 0.5) + qmin``."""
    xa = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(xa.shape, dtype=np.int8)
    cdef float[::1] xv = xa.reshape(-1)
    cdef int8_t[::1] ov = out.reshape(-1)
    cdef Py_ssize_t i, n = xa.size
    cdef float v, t
    cdef int nt = _threads(n, n)
    if n == 0:
        return out
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            v = xv[i]
            if v < nmin:
                v = nmin
            if v > nmax:
                v = nmax
            t = (v - nmin) / scale + <float>0.5
            ov[i] = <int8_t>(<int32_t>floor(t) + qmin)
    return out


def dequantize(q, float scale, int zero_point):
    """int8 -> float32: (q - zero_point) * scale."""
    qa = np.ascontiguousarray(q, dtype=np.int8)
    out = np.empty(qa.shape, dtype=np.float32)
    cdef int8_t[::1] qv = qa.reshape(-1)
    cdef float[::1] ov = out.reshape(-1)
    cdef Py_ssize_t i, n = qa.size
    cdef int nt = _threads(n, n)
    if n == 0:
        return out
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            ov[i] = <float>(<int32_t>qv[i] - zero_point) * scale
    return out


# ---------------------------------------------------------------------------------------------
# int8 GEMM-like kernels
# ---------------------------------------------------------------------------------------------
DEF OB = 16       # output channels per register block: one 512-bit vector of int32 (or two 256-bit, ...)

cdef extern from *:
    """
    /* The int8 GEMM micro-kernel. Activations come as int32 words of two int16 (k even, k odd): P[k2, m];
       weights likewise: W[k2, o]. A tile of up to 4 rows x 2 blocks of 16 output channels accumulates in
       int32 vectors: with AVX-512BW one vpmaddwd (VNNI: vpdpwssd) does two k for 16 channels; other targets
       use GCC generic vectors that unpack the halves. Both are exact integer arithmetic (same results).
       Requantization per lane: zp + ((acc * mult + rnd) >> total) in int64 (one rounding, half up),
       clamped to [lo, hi]. */
    #include <string.h>
    #if defined(__AVX512BW__)
    #include <immintrin.h>
    #endif
    typedef int32_t iq_v16si __attribute__((vector_size(64)));
    typedef int64_t iq_v16di __attribute__((vector_size(128)));

    static inline int32_t iq_pair(int32_t a0, int32_t a1) {
        return (int32_t)((uint32_t)(uint16_t)(int16_t)a0 | ((uint32_t)(uint16_t)(int16_t)a1 << 16));
    }

    /* acc[r * 2 + b] = bias[16 b ..] + sum_k2 P[k2 * ps + r] . W[k2 * Op + 16 b ..], r < nr, b < nb */
    static inline __attribute__((always_inline)) void iq_tile(const int32_t* P, Py_ssize_t ps, Py_ssize_t K2,
                                                            const int32_t* W, Py_ssize_t Op, const int nr,
                                                            const int nb, const int32_t* bias, iq_v16si* acc) {
    #if defined(__AVX512BW__)
        __m512i c[4][2], w[2];
        for (int r = 0; r < nr; ++r)
            for (int b = 0; b < nb; ++b)
                c[r][b] = _mm512_loadu_si512((const void*)(bias + 16 * b));
        for (Py_ssize_t k2 = 0; k2 < K2; ++k2) {
            for (int b = 0; b < nb; ++b)
                w[b] = _mm512_loadu_si512((const void*)(W + k2 * Op + 16 * b));
            for (int r = 0; r < nr; ++r) {
                __m512i p = _mm512_set1_epi32(P[k2 * ps + r]);
                for (int b = 0; b < nb; ++b)
    #if defined(__AVX512VNNI__)
                    c[r][b] = _mm512_dpwssd_epi32(c[r][b], p, w[b]);
    #else
                    c[r][b] = _mm512_add_epi32(c[r][b], _mm512_madd_epi16(p, w[b]));
    #endif
            }
        }
        for (int r = 0; r < nr; ++r)
            for (int b = 0; b < nb; ++b)
                _mm512_storeu_si512((void*)&acc[r * 2 + b], c[r][b]);
    #else
        iq_v16si c[4][2], w[2], wl[2], wh[2];
        for (int r = 0; r < nr; ++r)
            for (int b = 0; b < nb; ++b)
                memcpy(&c[r][b], bias + 16 * b, sizeof(iq_v16si));
        for (Py_ssize_t k2 = 0; k2 < K2; ++k2) {
            for (int b = 0; b < nb; ++b) {
                memcpy(&w[b], W + k2 * Op + 16 * b, sizeof(iq_v16si));
                wl[b] = (w[b] << 16) >> 16;
                wh[b] = w[b] >> 16;
            }
            for (int r = 0; r < nr; ++r) {
                int32_t p = P[k2 * ps + r];
                int32_t a0 = (int16_t)(p & 0xffff), a1 = p >> 16;
                for (int b = 0; b < nb; ++b)
                    c[r][b] += a0 * wl[b] + a1 * wh[b];
            }
        }
        for (int r = 0; r < nr; ++r)
            for (int b = 0; b < nb; ++b)
                acc[r * 2 + b] = c[r][b];
    #endif
    }

    static inline void iq_requant16(iq_v16si acc, const int64_t* mult, const int64_t* rnd, const int64_t* total,
                                    int64_t zp, int64_t lo, int64_t hi, int nvalid, int8_t* out,
                                    Py_ssize_t ostride) {
        iq_v16di v, m, r, t, lov, hiv, mask;
        memcpy(&m, mult, sizeof(m));
        memcpy(&r, rnd, sizeof(r));
        memcpy(&t, total, sizeof(t));
        v = __builtin_convertvector(acc, iq_v16di);
        v = ((v * m + r) >> t) + zp;
        lov = v - v + lo;
        hiv = v - v + hi;
        mask = v < lov;
        v = (mask & lov) | (~mask & v);
        mask = v > hiv;
        v = (mask & hiv) | (~mask & v);
        for (int j = 0; j < nvalid; ++j)
            out[j * ostride] = (int8_t)v[j];
    }

    /* out[m * ms + o * os] for m < M, o < O: P is (K2, ps) pairs with the M rows at columns 0..M-1. */
    static void iq_gemm_requant(const int32_t* P, Py_ssize_t ps, Py_ssize_t M, Py_ssize_t K2, const int32_t* W,
                                Py_ssize_t O, Py_ssize_t Op, const int32_t* bias, const int64_t* mult,
                                const int64_t* rnd, const int64_t* total, int64_t zp, int64_t lo, int64_t hi,
                                int8_t* out, Py_ssize_t ms, Py_ssize_t os) {
        iq_v16si acc[8];
        for (Py_ssize_t m0 = 0; m0 < M; m0 += 4) {
            int nr = (M - m0) >= 4 ? 4 : (int)(M - m0);
            for (Py_ssize_t o0 = 0; o0 < Op; o0 += 32) {
                int nb = (Op - o0) >= 32 ? 2 : 1;
                const int32_t* Wb = W + o0;
                const int32_t* Pm = P + m0;
                if (nr == 4 && nb == 2) iq_tile(Pm, ps, K2, Wb, Op, 4, 2, bias + o0, acc);
                else if (nr == 4) iq_tile(Pm, ps, K2, Wb, Op, 4, 1, bias + o0, acc);
                else if (nb == 2) iq_tile(Pm, ps, K2, Wb, Op, nr, 2, bias + o0, acc);
                else iq_tile(Pm, ps, K2, Wb, Op, nr, 1, bias + o0, acc);
                for (int r = 0; r < nr; ++r)
                    for (int b = 0; b < nb; ++b) {
                        Py_ssize_t oc = o0 + 16 * b;
                        int nvalid = (O - oc) >= 16 ? 16 : (int)(O - oc);
                        if (nvalid <= 0) continue;
                        iq_requant16(acc[r * 2 + b], mult + oc, rnd + oc, total + oc, zp, lo, hi, nvalid,
                                     out + (m0 + r) * ms + oc * os, os);
                    }
            }
        }
    }

    /* im2col straight into pairs: P[k2 * L + l] = pair(x[off[2 k2 * L + l]], x[off[(2 k2 + 1) * L + l]]), an
       offset < 0 (padding, or k past K) reading as pad. off is the same for every image. */
    static void iq_im2pairs(const int8_t* x, const int32_t* off, Py_ssize_t K2, Py_ssize_t L, int32_t pad,
                            int32_t* P) {
        for (Py_ssize_t k2 = 0; k2 < K2; ++k2) {
            const int32_t* o0 = off + 2 * k2 * L;
            const int32_t* o1 = o0 + L;
            int32_t* dst = P + k2 * L;
            for (Py_ssize_t l = 0; l < L; ++l) {
                int32_t a0 = o0[l] >= 0 ? x[o0[l]] : pad;
                int32_t a1 = o1[l] >= 0 ? x[o1[l]] : pad;
                dst[l] = iq_pair(a0, a1);
            }
        }
    }

    /* P[k2 * ps + m] = pair(a[m * am + 2 k2 * ak], a[m * am + (2 k2 + 1) * ak]) (0 past K), m < M */
    static void iq_pairs(const int8_t* a, Py_ssize_t am, Py_ssize_t ak, Py_ssize_t M, Py_ssize_t K, int32_t* P,
                         Py_ssize_t ps) {
        Py_ssize_t K2 = (K + 1) / 2;
        for (Py_ssize_t k2 = 0; k2 < K2; ++k2) {
            const int8_t* r0 = a + 2 * k2 * ak;
            int has1 = 2 * k2 + 1 < K;
            for (Py_ssize_t m = 0; m < M; ++m)
                P[k2 * ps + m] = iq_pair(r0[m * am], has1 ? r0[m * am + ak] : 0);
        }
    }
    """
    void iq_gemm_requant(const int32_t* P, Py_ssize_t ps, Py_ssize_t M, Py_ssize_t K2, const int32_t* W,
                         Py_ssize_t O, Py_ssize_t Op, const int32_t* bias, const int64_t* mult, const int64_t* rnd,
                         const int64_t* total, int64_t zp, int64_t lo, int64_t hi, int8_t* out, Py_ssize_t ms,
                         Py_ssize_t os) noexcept nogil
    void iq_pairs(const int8_t* a, Py_ssize_t am, Py_ssize_t ak, Py_ssize_t M, Py_ssize_t K, int32_t* P,
                  Py_ssize_t ps) noexcept nogil
    void iq_im2pairs(const int8_t* x, const int32_t* off, Py_ssize_t K2, Py_ssize_t L, int32_t pad,
                     int32_t* P) noexcept nogil


def _im2col_offsets(Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh,
                    Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t K2):
    """off[k, oh*OW + ow] = the offset of x[c, oh*sh - ph + i, ow*sw - pw + j] in one image, k = (c*kh + i)*kw + j,
    -1 where that falls in the padding; rows up to 2*K2 (a last odd row is all -1)."""
    c, i, j = np.meshgrid(np.arange(C), np.arange(kh), np.arange(kw), indexing="ij")
    oh, ow = np.meshgrid(np.arange(OH), np.arange(OW), indexing="ij")
    ih = oh.reshape(1, -1) * sh - ph + i.reshape(-1, 1)
    iw = ow.reshape(1, -1) * sw - pw + j.reshape(-1, 1)
    off = np.where((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W), (c.reshape(-1, 1) * H + ih) * W + iw, -1)
    out = np.full((2 * K2, OH * OW), -1, np.int32)
    out[:C * kh * kw] = off
    return out.reshape(-1)


def _vec32(a, n, what, fn):
    v = np.ascontiguousarray(a, dtype=np.int32).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{fn}: {what} has {v.shape[0]} entries for {n} output channels")
    return v


def _gemm_operands(w, bias, mult, shift, fn):
    """(the weights as (ceil(K/2), Op) int32 words of two int16 -- w[o, 2k], w[o, 2k+1] -- and per channel the
    bias, multiplier, rounding constant, right shift), zero-padded to Op = a multiple of OB channels."""
    cdef Py_ssize_t O = w.shape[0], Op = (w.shape[0] + OB - 1) // OB * OB
    b = np.zeros(Op, np.int32)
    b[:O] = _vec32(bias, O, "bias", fn)
    total = np.full(Op, 31, np.int64)
    total[:O] = 31 - _vec32(shift, O, "shift", fn).astype(np.int64)
    if np.any(total < 1) or np.any(total > 62):
        raise ValueError(f"{fn}: requantization shifts must be in [-31, 30], got {list(31 - total[:O])}")
    m = np.zeros(Op, np.int64)
    m[:O] = _vec32(mult, O, "mult", fn)
    rnd = np.left_shift(np.int64(1), total - 1)
    K = w.shape[1]
    K2 = (K + 1) // 2
    pairs = np.zeros((Op, 2 * K2), np.int16)          # w[o, k] as int16, k padded to even, o to Op
    pairs[:O, :K] = w
    # (K2, Op) int32 words: low half w[o, 2 k2], high half w[o, 2 k2 + 1] (little-endian)
    wT2 = np.ascontiguousarray(pairs.reshape(Op, K2, 2).transpose(1, 0, 2)).view(np.int32).reshape(K2, Op)
    return wT2, b, m, rnd, total


def conv2d_int8(x, w, bias, mult, shift, int kh, int kw, int sh, int sw, int ph, int pw,
                int zp_x, int zp_y, int act_min, int act_max):
    """int8 NCHW convolution: w (O, C*kh*kw) int8, bias (O,) int32 with the input zero point folded in
    (bias - zp_x * sum(w[o])), padding = zp_x (real zero); returns (N, O, OH, OW) int8."""
    fn = "conv2d_int8"
    xa = np.ascontiguousarray(x)
    wa = np.ascontiguousarray(w)
    if xa.dtype != np.int8 or wa.dtype != np.int8 or xa.ndim != 4 or wa.ndim != 2:
        raise TypeError(f"{fn}: expects int8 x (N, C, H, W) and int8 w (O, C*kh*kw), got {xa.dtype} {xa.shape} "
                        f"and {wa.dtype} {wa.shape}")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1], H = xa.shape[2], W = xa.shape[3]
    cdef Py_ssize_t O = wa.shape[0], K = wa.shape[1]
    if K != C * kh * kw:
        raise ValueError(f"{fn}: weight rows of {K} do not match C*kh*kw = {C}*{kh}*{kw}")
    cdef Py_ssize_t OH = (H + 2 * ph - kh) // sh + 1, OW = (W + 2 * pw - kw) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError(f"{fn}: a {kh}x{kw} kernel does not fit {H}x{W} with padding ({ph}, {pw})")
    wT, b, m, rnd, total = _gemm_operands(wa, bias, mult, shift, fn)
    out = np.empty((N, O, OH, OW), dtype=np.int8)
    if out.size == 0:
        return out
    cdef const int8_t[:, :, :, ::1] xv = xa
    cdef const int32_t[:, ::1] wv = wT
    cdef const int32_t[::1] bv = b
    cdef const int64_t[::1] mv = m, rv = rnd, tv = total
    cdef int8_t[:, :, :, ::1] ov = out
    cdef Py_ssize_t L = OH * OW, n, Op = wT.shape[1]
    cdef int nt = _threads(N * L * O * K, N)
    cdef Py_ssize_t K2 = (K + 1) // 2
    cdef const int32_t[::1] offv = _im2col_offsets(C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, K2)
    cdef int32_t* pairs
    with nogil, parallel(num_threads=nt):
        pairs = <int32_t*>malloc(L * K2 * sizeof(int32_t))
        if pairs != NULL:
            for n in prange(N, schedule="static"):
                iq_im2pairs(&xv[n, 0, 0, 0], &offv[0], K2, L, zp_x, pairs)
                iq_gemm_requant(pairs, L, L, K2, &wv[0, 0], O, Op, &bv[0], &mv[0], &rv[0], &tv[0], zp_y, act_min,
                                act_max, &ov[n, 0, 0, 0], 1, L)
        free(pairs)
    return out


DEF ROW_BLOCK = 32


def dense_int8(x, w, bias, mult, shift, int zp_y, int act_min, int act_max):
    """int8 fully connected layer: x (N, K), w (O, K), bias (O,) int32 with the input zero point folded in."""
    fn = "dense_int8"
    xa = np.ascontiguousarray(x)
    wa = np.ascontiguousarray(w)
    if xa.dtype != np.int8 or wa.dtype != np.int8 or xa.ndim != 2 or wa.ndim != 2 or xa.shape[1] != wa.shape[1]:
        raise ValueError(f"{fn}: expects int8 x (N, K) and w (O, K), got {xa.dtype} {xa.shape} and "
                         f"{wa.dtype} {wa.shape}")
    cdef Py_ssize_t N = xa.shape[0], K = xa.shape[1], O = wa.shape[0], blk, r0, rn
    wT, b, m, rnd, total = _gemm_operands(wa, bias, mult, shift, fn)
    cdef Py_ssize_t Op = wT.shape[1]
    out = np.empty((N, O), dtype=np.int8)
    if out.size == 0:
        return out
    cdef const int8_t[:, ::1] xv = xa
    cdef const int32_t[:, ::1] wv = wT
    cdef const int32_t[::1] bv = b
    cdef const int64_t[::1] mv = m, rv = rnd, tv = total
    cdef int8_t[:, ::1] ov = out
    cdef Py_ssize_t nblk = (N + ROW_BLOCK - 1) // ROW_BLOCK, K2 = (K + 1) // 2
    cdef int nt = _threads(N * O * K, nblk)
    cdef int32_t* pairs
    with nogil, parallel(num_threads=nt):
        pairs = <int32_t*>malloc(ROW_BLOCK * K2 * sizeof(int32_t))
        if pairs != NULL:
            for blk in prange(nblk, schedule="static"):
                r0 = blk * ROW_BLOCK
                rn = N - r0 if N - r0 < ROW_BLOCK else ROW_BLOCK
                iq_pairs(&xv[r0, 0], K, 1, rn, K, pairs, ROW_BLOCK)
                iq_gemm_requant(pairs, ROW_BLOCK, rn, K2, &wv[0, 0], O, Op, &bv[0], &mv[0], &rv[0], &tv[0], zp_y,
                                act_min, act_max, &ov[r0, 0], O, 1)
        free(pairs)
    return out


# ---------------------------------------------------------------------------------------------
# int8 elementwise and pooling
# ---------------------------------------------------------------------------------------------
def requant_int8(x, int zp_in, int mult, int shift, int zp_out, int act_min, int act_max):
    """int8 at one scale -> int8 at another: zp_out + (x - zp_in) * M, clamped."""
    xa = np.ascontiguousarray(x, dtype=np.int8)
    out = np.empty(xa.shape, dtype=np.int8)
    cdef const int8_t[::1] xv = xa.reshape(-1)
    cdef int8_t[::1] ov = out.reshape(-1)
    cdef Py_ssize_t i, n = xa.size
    cdef int nt = _threads(n, n)
    if n == 0:
        return out
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            ov[i] = _clamp8(zp_out + _mbqm(<int32_t>xv[i] - zp_in, mult, shift), act_min, act_max)
    return out


def relu_int8(x, int zero_point, int act_max):
    """ReLU in the quantized domain: clamp to [zero_point, act_max] (real 0 is exactly zero_point); a requant
    with multiplier 1 (2^30 * 2^(1 - 31)), which is exact."""
    return requant_int8(x, zero_point, 1 << 30, 1, zero_point, zero_point, act_max)


def maxpool_int8(x, int kh, int kw, int sh, int sw):
    """Max pooling of int8 NCHW without padding (max commutes with the monotonic quantization)."""
    fn = "maxpool_int8"
    xa = np.ascontiguousarray(x)
    if xa.dtype != np.int8 or xa.ndim != 4:
        raise TypeError(f"{fn}: expects an int8 (N, C, H, W) tensor, got {xa.dtype} {xa.shape}")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1], H = xa.shape[2], W = xa.shape[3]
    cdef Py_ssize_t OH = (H - kh) // sh + 1, OW = (W - kw) // sw + 1, p, oh, ow, i, j
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or OH <= 0 or OW <= 0:
        raise ValueError(f"{fn}: a {kh}x{kw} window with stride ({sh}, {sw}) does not fit {H}x{W}")
    out = np.empty((N, C, OH, OW), dtype=np.int8)
    if out.size == 0:
        return out
    cdef const int8_t[::1] xv = xa.reshape(-1)
    cdef int8_t[::1] ov = out.reshape(-1)
    cdef int8_t m, v
    cdef int nt = _threads(xa.size, N * C)
    cdef const int8_t* r0
    cdef const int8_t* r1
    cdef int8_t a, b
    if kh == 2 and kw == 2 and sh == 2 and sw == 2:       # the common case, without the window loops
        with nogil:
            for p in prange(N * C, schedule="static", num_threads=nt):
                for oh in range(OH):
                    r0 = &xv[p * H * W + 2 * oh * W]
                    r1 = r0 + W
                    for ow in range(OW):
                        a = r0[2 * ow] if r0[2 * ow] > r0[2 * ow + 1] else r0[2 * ow + 1]
                        b = r1[2 * ow] if r1[2 * ow] > r1[2 * ow + 1] else r1[2 * ow + 1]
                        ov[p * OH * OW + oh * OW + ow] = a if a > b else b
        return out
    with nogil:
        for p in prange(N * C, schedule="static", num_threads=nt):
            for oh in range(OH):
                for ow in range(OW):
                    m = -128
                    for i in range(kh):
                        for j in range(kw):
                            v = xv[p * H * W + (oh * sh + i) * W + ow * sw + j]
                            if v > m:
                                m = v
                    ov[p * OH * OW + oh * OW + ow] = m
    return out


def add_int8(a, b, int zp_a, int mult_a, int shift_a, int zp_b, int mult_b, int shift_b, int left_shift,
             int zp_out, int mult_out, int shift_out, int act_min, int act_max):
    """Quantized a + b (same shape): both rescaled to a common scale with ``left_shift`` bits of headroom,
    summed in int32, requantised to the output scale (TFLite's int8 add)."""
    aa = np.ascontiguousarray(a, dtype=np.int8)
    ba = np.ascontiguousarray(b, dtype=np.int8)
    if aa.shape != ba.shape:
        raise ValueError(f"add_int8: shapes {aa.shape} and {ba.shape} differ")
    out = np.empty(aa.shape, dtype=np.int8)
    cdef const int8_t[::1] av = aa.reshape(-1)
    cdef const int8_t[::1] bv = ba.reshape(-1)
    cdef int8_t[::1] ov = out.reshape(-1)
    cdef Py_ssize_t i, n = aa.size
    cdef int32_t sa, sb
    cdef int nt = _threads(n, n)
    if n == 0:
        return out
    with nogil:
        for i in prange(n, schedule="static", num_threads=nt):
            sa = _mbqm((<int32_t>av[i] - zp_a) * (1 << left_shift), mult_a, shift_a)
            sb = _mbqm((<int32_t>bv[i] - zp_b) * (1 << left_shift), mult_b, shift_b)
            ov[i] = _clamp8(zp_out + _mbqm(sa + sb, mult_out, shift_out), act_min, act_max)
    return out
