/* Element-level math shared by the generated graph-kernel C code and the Cython tile
 * interpreter (runtime/_fusion.pyx), so both compute bit-identical float32 results.
 *
 * Rules that keep the two paths identical:
 *   - every operation rounds to float32 (no excess precision; generated code is compiled with
 *     -ffp-contract=off so no multiply-add is contracted into an FMA behind our back);
 *   - the polynomials use explicit fmaf(): a fused multiply-add is exactly specified (one rounding),
 *     so the vectorised vfmadd of the generated code (-march=native) and the interpreter's libm
 *     fmaf (glibc picks the hardware instruction when the CPU has one, an exact software path
 *     otherwise) give the same bits; it halves the instructions of every polynomial step;
 *   - selects are done with integer bit masks (branch-free: loops calling these helpers
 *     vectorise under the default -ftrapping-math; the generated loops carry `#pragma omp simd`);
 *   - exp is the Cephes/Cody-Waite float32 algorithm of runtime/_kernels.pyx (gelu, softmax, cross
 *     entropy), its polynomial evaluated with Estrin's scheme and FMAs (so it may differ from that
 *     kernel's exp in the last bit); log and tanh are Cephes float32 algorithms made branch-free.
 */
#ifndef INSIGHT_FUSION_OPS_H
#define INSIGHT_FUSION_OPS_H
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

typedef union { float f; uint32_t u; int32_t i; } fk_bits;

static inline float fk_from_bits(uint32_t u) { fk_bits b; b.u = u; return b.f; }
static inline uint32_t fk_to_bits(float f) { fk_bits b; b.f = f; return b.u; }

/* c ? a : b for an int condition (0/1), branch-free */
static inline float fk_sel(int c, float a, float b) {
    uint32_t m = (uint32_t)0 - (uint32_t)(c != 0);
    return fk_from_bits((fk_to_bits(a) & m) | (fk_to_bits(b) & ~m));
}
static inline float fk_bool(int c) { return (float)(c != 0); }
static inline float fk_select(float c, float a, float b) { return fk_sel(c != 0.0f, a, b); }

static inline float fk_abs(float x) { return fk_from_bits(fk_to_bits(x) & 0x7FFFFFFFu); }
static inline float fk_neg(float x) { return -x; }
static inline float fk_sqrt(float x) { return sqrtf(x); }
static inline float fk_rsqrt(float x) { return 1.0f / sqrtf(x); }
static inline float fk_recip(float x) { return 1.0f / x; }
static inline float fk_square(float x) { return x * x; }
/* numpy semantics: NaN propagates from either side */
static inline float fk_max(float a, float b) { return fk_sel((a >= b) | (a != a), a, b); }
static inline float fk_min(float a, float b) { return fk_sel((a <= b) | (a != a), a, b); }
static inline float fk_relu(float x) { return fk_max(x, 0.0f); }
static inline float fk_sign(float x) {
    float s = fk_sel(x > 0.0f, 1.0f, fk_sel(x < 0.0f, -1.0f, 0.0f));
    return fk_sel(x != x, x, s);
}
static inline float fk_leaky(float x, float alpha) { return fk_sel(x > 0.0f, x, x * alpha); }
static inline float fk_relu_grad(float x, float g) { return fk_sel(x > 0.0f, g, 0.0f); }

/* exp: Cody-Waite range reduction + Cephes degree-6 polynomial, as in runtime/_kernels.pyx (<= 2 ulp) */
/* e^xc for xc already clamped to [-87.34, 88.37]: the Cephes polynomial, evaluated with Estrin's scheme
   (shorter dependency chains than Horner), scaled by 2^n built from the exponent bits */
static inline float fk_exp_clamped(float xc) {
    float tf = fmaf(xc, (float)1.44269504088896341, (float)12582912.0);   /* round(x / ln 2) + magic */
    float n = tf - (float)12582912.0;
    float r = fmaf(n, -(float)0.693359375, xc);      /* exact: n * C1 has few bits */
    r = fmaf(n, (float)2.12194440e-4, r);
    float r2 = r * r;
    float r4 = r2 * r2;
    float q2 = fmaf((float)1.9875691500e-4, r, (float)1.3981999507e-3);
    float q1 = fmaf((float)8.3334519073e-3, r, (float)4.1665795894e-2);
    float q0 = fmaf((float)1.6666665459e-1, r, (float)5.0000001201e-1);
    float p = fmaf(q2, r4, fmaf(q1, r2, q0));
    p = fmaf(p, r2, r) + (float)1.0;
    float sc = fk_from_bits((fk_to_bits(tf) + (uint32_t)0xB4C0007Fu) << 23);
    return p * sc;
}

static inline float fk_exp(float x) {
    int lo = x < (float)-87.3365447505531;
    int hi = x > (float)88.37;
    float xc = fk_sel(lo, (float)-87.3365447505531, fk_sel(hi, (float)88.37, x));
    return fk_sel(lo, 0.0f, fk_sel(hi, INFINITY, fk_exp_clamped(xc)));
}

/* exp for arguments known to be <= 0 (or NaN): fk_exp without the overflow clamp (same values) */
static inline float fk_exp_nonpos(float x) {
    int lo = x < (float)-87.3365447505531;
    float xc = fk_sel(lo, (float)-87.3365447505531, x);
    return fk_sel(lo, 0.0f, fk_exp_clamped(xc));
}

/* log: Cephes logf (frexp by bit manipulation, degree-8 polynomial), branch-free */
static inline float fk_log(float x) {
    int den = x < 1.17549435e-38f;                 /* zero, denormal or negative */
    float xs = fk_sel(den, x * 8388608.0f, x);     /* scale denormals by 2^23 */
    uint32_t u = fk_to_bits(xs);
    int32_t e = (int32_t)((u >> 23) & 0xFFu) - 126 - (den ? 23 : 0);
    float m = fk_from_bits((u & 0x007FFFFFu) | 0x3F000000u);   /* in [0.5, 1) */
    int small = m < 0.707106781186547524f;
    e = e - small;
    m = fk_sel(small, m + m - 1.0f, m - 1.0f);
    float z = m * m;
    float y = 7.0376836292E-2f;
    y = fmaf(y, m, -1.1514610310E-1f);
    y = fmaf(y, m, 1.1676998740E-1f);
    y = fmaf(y, m, -1.2420140846E-1f);
    y = fmaf(y, m, 1.4249322787E-1f);
    y = fmaf(y, m, -1.6668057665E-1f);
    y = fmaf(y, m, 2.0000714765E-1f);
    y = fmaf(y, m, -2.4999993993E-1f);
    y = fmaf(y, m, 3.3333331174E-1f);
    y = y * m * z;
    float fe = (float)e;
    y = fmaf(-2.12194440e-4f, fe, y);
    y = fmaf(-0.5f, z, y);
    float r = m + y;
    r = fmaf(0.693359375f, fe, r);
    r = fk_sel(x == INFINITY, INFINITY, r);
    r = fk_sel(x == 0.0f, -INFINITY, r);
    r = fk_sel((x < 0.0f) | (x != x), NAN, r);
    return r;
}

/* tanh: Cephes tanhf: odd polynomial for |x| < 0.625, else 1 - 2/(exp(2|x|) + 1) */
static inline float fk_tanh(float x) {
    float ax = fk_abs(x);
    float z = x * x;
    float p = -5.70498872745E-3f;
    p = fmaf(p, z, 2.06390887954E-2f);
    p = fmaf(p, z, -5.37397155531E-2f);
    p = fmaf(p, z, 1.33314422036E-1f);
    p = fmaf(p, z, -3.33332819422E-1f);
    p = fmaf(p * z, x, x);
    float s = fk_exp(ax + ax);
    float q = 1.0f - 2.0f / (s + 1.0f);
    q = fk_from_bits(fk_to_bits(q) | (fk_to_bits(x) & 0x80000000u));   /* copysign */
    return fk_sel(ax >= 0.625f, q, p);
}

/* sigmoid, split by sign as runtime/ops/prims.py does (no overflow) */
static inline float fk_sigmoid(float x) {
    float e = fk_exp(-fk_abs(x));
    return fk_sel(x >= 0.0f, 1.0f / (1.0f + e), e / (1.0f + e));
}

/* reductions accumulate in double; max keeps NaN */
static inline double fk_dmax(double a, double b) {
    uint64_t ua, ub, m;
    int c = (b > a) | (b != b);
    memcpy(&ua, &a, 8); memcpy(&ub, &b, 8);
    m = (uint64_t)0 - (uint64_t)c;
    ua = (ub & m) | (ua & ~m);
    memcpy(&a, &ua, 8);
    return a;
}
/* fixed combine order of the 8 lane partials */
static inline double fk_tree_sum(const double* a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
static inline float fk_tree_maxf(const float* a) {
    return fk_max(fk_max(fk_max(a[0], a[1]), fk_max(a[2], a[3])), fk_max(fk_max(a[4], a[5]), fk_max(a[6], a[7])));
}
static inline double fk_tree_max(const double* a) {
    return fk_dmax(fk_dmax(fk_dmax(a[0], a[1]), fk_dmax(a[2], a[3])),
                   fk_dmax(fk_dmax(a[4], a[5]), fk_dmax(a[6], a[7])));
}

/* copy a tile to memory with non-temporal stores (large outputs: no read-for-ownership, no cache
 * pollution); a plain copy where AVX is not available. Values are copied bit for bit. */
static inline void fk_stream(float* dst, const float* src, int64_t n) {
#if defined(__AVX__)
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(dst + i) & 31); i++) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
#else
    memcpy(dst, src, (size_t)n * sizeof(float));
#endif
}
static inline void fk_sfence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}
#endif
