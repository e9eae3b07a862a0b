/* Register-blocked tile GEMMs for runtime/_kernels_attention.pyx (attention tiles of at most 64 x 64 x head_dim).

   C[M,N] += A[M,K] B[K,N]: B and C row-major with leading dimensions, A(r, k) at A[r * ars + k * aks] (so Aᵀ of
   a row-major tile is read in place, no transposed copy). 4 rows x 16 columns of C stay in registers
   while K runs; remainders run the same arithmetic one row / one column at a time. Three builds of the tile
   (function target attributes: AVX-512, AVX2 + FMA, and the baseline of the compile flags); ``att_init``
   picks the widest one the CPU runs, so the extension stays portable (no -march=native at build time).
   Measured on a 64 x 64 x 64 tile, one core: AVX-512 ~115 GFLOP/s, AVX2 ~45, SSE2 ~14
   (target_clones gave the AVX-512 clone only ~35: the per-function target attribute code is better). */
#ifndef INSIGHT_ATTENTION_TILE_H
#define INSIGHT_ATTENTION_TILE_H

#if defined(__x86_64__) && defined(__GNUC__)
#define ATT_X86 1
#else
#define ATT_X86 0
#endif

/* the 4 x 16 register tile as GCC vector extensions: one zmm per row on AVX-512, two ymm on AVX2, four xmm
   otherwise (loads of B rows are unaligned: aligned(sizeof(T))) */
typedef float att_vf __attribute__((vector_size(64), aligned(4)));
typedef double att_vd __attribute__((vector_size(128), aligned(8)));

/* one 4 x 16 tile of C at (i, j): explicit vectors (AVX-512 build) */
#define ATT_TILE_VEC(T, V)                                                                                    \
    {                                                                                                         \
        V c0 = *(const V *)(C + (i + 0) * ldc + j), c1 = *(const V *)(C + (i + 1) * ldc + j);                 \
        V c2 = *(const V *)(C + (i + 2) * ldc + j), c3 = *(const V *)(C + (i + 3) * ldc + j);                 \
        const T *a = A + i * ars;                                                                             \
        for (int k = 0; k < K; k++) {                                                                         \
            V b = *(const V *)(B + k * ldb + j);                                                              \
            c0 += a[k * aks] * b; c1 += a[ars + k * aks] * b;                                                 \
            c2 += a[2 * ars + k * aks] * b; c3 += a[3 * ars + k * aks] * b;                                   \
        }                                                                                                     \
        *(V *)(C + (i + 0) * ldc + j) = c0; *(V *)(C + (i + 1) * ldc + j) = c1;                               \
        *(V *)(C + (i + 2) * ldc + j) = c2; *(V *)(C + (i + 3) * ldc + j) = c3;                               \
    }

/* the same tile as plain loops over 16 columns (gcc vectorises them for AVX2 / SSE better than the 64-byte
   vector type) */
#define ATT_TILE_LOOP(T, V)                                                                                   \
    {                                                                                                         \
        T c0[16], c1[16], c2[16], c3[16];                                                                     \
        for (int jj = 0; jj < 16; jj++) {                                                                     \
            c0[jj] = C[(i + 0) * ldc + j + jj]; c1[jj] = C[(i + 1) * ldc + j + jj];                           \
            c2[jj] = C[(i + 2) * ldc + j + jj]; c3[jj] = C[(i + 3) * ldc + j + jj];                           \
        }                                                                                                     \
        for (int k = 0; k < K; k++) {                                                                         \
            const T *b = B + k * ldb + j;                                                                     \
            T a0 = A[(i + 0) * ars + k * aks], a1 = A[(i + 1) * ars + k * aks];                               \
            T a2 = A[(i + 2) * ars + k * aks], a3 = A[(i + 3) * ars + k * aks];                               \
            for (int jj = 0; jj < 16; jj++) {                                                                 \
                c0[jj] += a0 * b[jj]; c1[jj] += a1 * b[jj]; c2[jj] += a2 * b[jj]; c3[jj] += a3 * b[jj];       \
            }                                                                                                 \
        }                                                                                                     \
        for (int jj = 0; jj < 16; jj++) {                                                                     \
            C[(i + 0) * ldc + j + jj] = c0[jj]; C[(i + 1) * ldc + j + jj] = c1[jj];                           \
            C[(i + 2) * ldc + j + jj] = c2[jj]; C[(i + 3) * ldc + j + jj] = c3[jj];                           \
        }                                                                                                     \
    }

/* C += A B: 4 x 16 tiles, then the remaining columns and rows one at a time */
#define ATT_DEFINE_GEMM(T, V, NAME, TARGET, TILE)                                                             \
TARGET static void NAME(int M, int N, int K, const T *A, long ars, long aks, const T *B, long ldb, T *C, long ldc)\
{                                                                                                             \
    int i = 0;                                                                                                \
    for (; i + 4 <= M; i += 4) {                                                                              \
        int j = 0;                                                                                            \
        for (; j + 16 <= N; j += 16) TILE(T, V)                                                               \
        for (; j < N; j++) {                                                                                  \
            T s0 = C[(i + 0) * ldc + j], s1 = C[(i + 1) * ldc + j];                                           \
            T s2 = C[(i + 2) * ldc + j], s3 = C[(i + 3) * ldc + j];                                           \
            for (int k = 0; k < K; k++) {                                                                     \
                T b = B[k * ldb + j];                                                                         \
                s0 += A[(i + 0) * ars + k * aks] * b; s1 += A[(i + 1) * ars + k * aks] * b;                   \
                s2 += A[(i + 2) * ars + k * aks] * b; s3 += A[(i + 3) * ars + k * aks] * b;                   \
            }                                                                                                 \
            C[(i + 0) * ldc + j] = s0; C[(i + 1) * ldc + j] = s1;                                             \
            C[(i + 2) * ldc + j] = s2; C[(i + 3) * ldc + j] = s3;                                             \
        }                                                                                                     \
    }                                                                                                         \
    for (; i < M; i++) {                                                                                      \
        T *c = C + i * ldc;                                                                                   \
        for (int k = 0; k < K; k++) {                                                                         \
            T a = A[i * ars + k * aks];                                                                       \
            const T *b = B + k * ldb;                                                                         \
            for (int j = 0; j < N; j++) c[j] += a * b[j];                                                     \
        }                                                                                                     \
    }                                                                                                         \
}

typedef void (*att_gemm_f_t)(int, int, int, const float *, long, long, const float *, long, float *, long);
typedef void (*att_gemm_d_t)(int, int, int, const double *, long, long, const double *, long, double *, long);

ATT_DEFINE_GEMM(float, att_vf, att_gemm_f_base, , ATT_TILE_LOOP)
ATT_DEFINE_GEMM(double, att_vd, att_gemm_d_base, , ATT_TILE_LOOP)
#if ATT_X86
ATT_DEFINE_GEMM(float, att_vf, att_gemm_f_avx2, __attribute__((target("avx2,fma"))), ATT_TILE_LOOP)
ATT_DEFINE_GEMM(double, att_vd, att_gemm_d_avx2, __attribute__((target("avx2,fma"))), ATT_TILE_LOOP)
ATT_DEFINE_GEMM(float, att_vf, att_gemm_f_avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))), ATT_TILE_VEC)
ATT_DEFINE_GEMM(double, att_vd, att_gemm_d_avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))), ATT_TILE_VEC)
#endif

/* x[j] = exp(x[j] - m) for j < n, returns the sum: Cephes' float exp (range reduction by ln 2 in two parts, a
   degree-5 polynomial, the exponent by integer bits; within ~1 ulp of expf), written without branches or
   library calls so the loop vectorises (if-conversion of the selects needs -fno-trapping-math, set for this
   function only); below -87.3 (masked keys, -inf) the result is exactly 0. */
#define ATT_DEFINE_EXP(NAME, TARGET)                                                                          \
TARGET static float NAME(float *x, int n, float m)                                                           \
{                                                                                                             \
    float total = 0.0f;                                                                                       \
    for (int j = 0; j < n; j++) {                                                                             \
        float v = x[j] - m;                                                                                   \
        float xc = v < -87.33654f ? -87.33654f : v;                                                           \
        xc = xc > 88.72283f ? 88.72283f : xc;                                                                 \
        float t = xc * 1.44269504088896341f + 0.5f;                                                           \
        int ti = (int)t;                                                                                      \
        ti -= ((float)ti > t);                                       /* floor */                              \
        float fn = (float)ti;                                                                                 \
        float r = xc - fn * 0.693359375f;                                                                     \
        r = r - fn * -2.12194440e-4f;                                                                         \
        float z = r * r;                                                                                      \
        float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r                    \
                    + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;                       \
        y = y * z + r + 1.0f;                                                                                 \
        int bits = (ti + 127) << 23;                                 /* 2^fn */                               \
        float sc;                                                                                             \
        __builtin_memcpy(&sc, &bits, 4);                                                                      \
        x[j] = v < -87.33654f ? 0.0f : y * sc;                                                                \
    }                                                                                                         \
    float lane[16] = {0};                 /* the sum in 16 lanes (a vector), then across them */              \
    int j = 0;                                                                                                \
    for (; j + 16 <= n; j += 16)                                                                              \
        for (int l = 0; l < 16; l++) lane[l] += x[j + l];                                                     \
    for (; j < n; j++) total += x[j];                                                                         \
    for (int l = 0; l < 16; l++) total += lane[l];                                                            \
    return total;                                                                                             \
}

typedef float (*att_exp_f_t)(float *, int, float);
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
ATT_DEFINE_EXP(att_exp_sum_f_base, )
/* scores row: x[j] = x[j] * scale (+ mask[j * mjs]); returns the row max (16 lanes, then across them) */
static float att_scale_mask_max_f_base(float *x, const float *mask, long mjs, int n, float scale, float start)
{
    float lane[16];
    for (int l = 0; l < 16; l++) lane[l] = start;
    if (mask && mjs == 1)
        for (int j = 0; j < n; j++) x[j] = x[j] * scale + mask[j];
    else if (mask)
        for (int j = 0; j < n; j++) x[j] = x[j] * scale + mask[j * mjs];
    else
        for (int j = 0; j < n; j++) x[j] = x[j] * scale;
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
    float mx = start;
    for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    for (int l = 0; l < 16; l++) mx = lane[l] > mx ? lane[l] : mx;
    return mx;
}

/* dropout on a probability row: p[j] = u[j] < keep ? p[j] * dscale : 0 */
static void att_dropout_f_base(float *p, const float *u, int n, float keep, float dscale)
{
    for (int j = 0; j < n; j++) p[j] = u[j] < keep ? p[j] * dscale : 0.0f;
}

/* backward of one row of a tile, s = P (probabilities), g = dO vᵀ on entry:
   g <- scale * dS where dS = P (dP - di), dP = g (dropped and scaled like P); s <- the dropped P; dm += dS */
static void att_bwd_row_f_base(float *s, float *g, const float *u, float *dm, int n, float keep, float dscale,
                               float di, float scale)
{
    if (u) {
        for (int j = 0; j < n; j++) {
            float kept = u[j] < keep ? dscale : 0.0f;
            float ds = s[j] * (g[j] * kept - di);
            s[j] = s[j] * kept;
            g[j] = ds;
        }
    } else {
        for (int j = 0; j < n; j++) g[j] = s[j] * (g[j] - di);
    }
    if (dm)
        for (int j = 0; j < n; j++) dm[j] += g[j];
    for (int j = 0; j < n; j++) g[j] = g[j] * scale;
}

/* sum_j a[j] b[j] in 16 lanes (then across them): the backward's row term D = rowsum(dO * O) */
static float att_dot_f_base(const float *a, const float *b, int n)
{
    float lane[16] = {0}, total = 0.0f;
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) lane[l] += a[j + l] * b[j + l];
    for (; j < n; j++) total += a[j] * b[j];
    for (int l = 0; l < 16; l++) total += lane[l];
    return total;
}
#pragma GCC pop_options

#if ATT_X86
/* the same arithmetic on explicit 16-float vectors (a target attribute drops the no-trapping-math that lets
   gcc if-convert the scalar loop's selects): selects are bit masks */
typedef float att_v16f __attribute__((vector_size(64), aligned(4)));
typedef int att_v16i __attribute__((vector_size(64), aligned(4)));

__attribute__((target("avx512f,avx512vl,avx2,fma"))) static float att_exp_sum_f_avx512(float *x, int n, float m)
{
    int j = 0;
    float total = 0.0f;
    att_v16f acc = {0};
    for (; j + 16 <= n; j += 16) {
        att_v16f v = *(att_v16f *)(x + j) - m;
        att_v16i lo = v < -87.33654f, hi = v > 88.72283f;
        att_v16f lo_c = v * 0.0f - 87.33654f, hi_c = v * 0.0f + 88.72283f;
        att_v16i xb = ((att_v16i)v & ~(lo | hi)) | ((att_v16i)lo_c & lo) | ((att_v16i)hi_c & hi);
        att_v16f xc = (att_v16f)xb;
        att_v16f t = xc * 1.44269504088896341f + 0.5f;
        att_v16i ti = __builtin_convertvector(t, att_v16i);
        ti += (att_v16i)(__builtin_convertvector(ti, att_v16f) > t);       /* floor: -1 where truncation rounded up */
        att_v16f fn = __builtin_convertvector(ti, att_v16f);
        att_v16f r = xc - fn * 0.693359375f;
        r = r - fn * -2.12194440e-4f;
        att_v16f z = r * r;
        att_v16f y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                       + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
        y = y * z + r + 1.0f;
        att_v16f sc = (att_v16f)((ti + 127) << 23);
        att_v16f e = (att_v16f)((att_v16i)(y * sc) & ~lo);
        *(att_v16f *)(x + j) = e;
        acc += e;
    }
    for (int l = 0; l < 16; l++) total += acc[l];
    if (j < n) total += att_exp_sum_f_base(x + j, n - j, m);
    return total;
}

#define ATT_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))

ATT_AVX512 static float att_scale_mask_max_f_avx512(float *x, const float *mask, long mjs, int n, float scale,
                                                     float start)
{
    if (mask && mjs != 1) return att_scale_mask_max_f_base(x, mask, mjs, n, scale, start);
    int j = 0;
    att_v16f lane = {0};
    lane += start;
    for (; j + 16 <= n; j += 16) {
        att_v16f v = *(att_v16f *)(x + j) * scale;
        if (mask) v += *(const att_v16f *)(mask + j);
        *(att_v16f *)(x + j) = v;
        att_v16i gt = v > lane;
        lane = (att_v16f)(((att_v16i)v & gt) | ((att_v16i)lane & ~gt));
    }
    float mx = j < n ? att_scale_mask_max_f_base(x + j, mask ? mask + j : 0, mjs, n - j, scale, start) : start;
    for (int l = 0; l < 16; l++) mx = lane[l] > mx ? lane[l] : mx;
    return mx;
}

ATT_AVX512 static void att_dropout_f_avx512(float *p, const float *u, int n, float keep, float dscale)
{
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        att_v16i kept = *(const att_v16f *)(u + j) < keep;
        *(att_v16f *)(p + j) = (att_v16f)((att_v16i)(*(att_v16f *)(p + j) * dscale) & kept);
    }
    if (j < n) att_dropout_f_base(p + j, u + j, n - j, keep, dscale);
}

ATT_AVX512 static void att_bwd_row_f_avx512(float *s, float *g, const float *u, float *dm, int n, float keep,
                                            float dscale, float di, float scale)
{
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        att_v16f sv = *(att_v16f *)(s + j), gv = *(att_v16f *)(g + j), ds;
        if (u) {
            att_v16i keepm = *(const att_v16f *)(u + j) < keep;
            att_v16f kept = (att_v16f)((att_v16i)(sv * 0.0f + dscale) & keepm);
            ds = sv * (gv * kept - di);
            *(att_v16f *)(s + j) = sv * kept;
        } else {
            ds = sv * (gv - di);
        }
        if (dm) *(att_v16f *)(dm + j) += ds;
        *(att_v16f *)(g + j) = ds * scale;
    }
    if (j < n) att_bwd_row_f_base(s + j, g + j, u ? u + j : 0, dm ? dm + j : 0, n - j, keep, dscale, di, scale);
}

ATT_AVX512 static float att_dot_f_avx512(const float *a, const float *b, int n)
{
    int j = 0;
    att_v16f acc = {0};
    for (; j + 16 <= n; j += 16) acc += *(const att_v16f *)(a + j) * *(const att_v16f *)(b + j);
    float total = j < n ? att_dot_f_base(a + j, b + j, n - j) : 0.0f;
    for (int l = 0; l < 16; l++) total += acc[l];
    return total;
}
#endif

static att_exp_f_t att_exp_f_impl = 0;

static inline float att_exp_sum_f(float *x, int n, float m) { return att_exp_f_impl(x, n, m); }

/* the row operations of the tiles, dispatched like the exp */
static float (*att_scale_mask_max_f_impl)(float *, const float *, long, int, float, float) = 0;
static void (*att_dropout_f_impl)(float *, const float *, int, float, float) = 0;
static void (*att_bwd_row_f_impl)(float *, float *, const float *, float *, int, float, float, float, float) = 0;
static float (*att_dot_f_impl)(const float *, const float *, int) = 0;

static inline float att_scale_mask_max_f(float *x, const float *mask, long mjs, int n, float scale, float start)
{
    return att_scale_mask_max_f_impl(x, mask, mjs, n, scale, start);
}

static inline void att_dropout_f(float *p, const float *u, int n, float keep, float dscale)
{
    att_dropout_f_impl(p, u, n, keep, dscale);
}

static inline void att_bwd_row_f(float *s, float *g, const float *u, float *dm, int n, float keep, float dscale,
                                 float di, float scale)
{
    att_bwd_row_f_impl(s, g, u, dm, n, keep, dscale, di, scale);
}

static inline float att_dot_f(const float *a, const float *b, int n) { return att_dot_f_impl(a, b, n); }

/* the widest variant the CPU runs (2: AVX-512, 1: AVX2 + FMA, 0: the build's baseline), chosen once */
static int att_level(void)
{
#if ATT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static att_gemm_f_t att_gemm_f_impl = 0;
static att_gemm_d_t att_gemm_d_impl = 0;

/* call with the GIL, outside any parallel region: the variants up to ``cap`` (-1: the widest the CPU runs);
   returns the level in use */
static int att_init(int cap)
{
    int level = att_level();
    if (cap >= 0 && cap < level) level = cap;
    att_gemm_f_impl = att_gemm_f_base;
    att_gemm_d_impl = att_gemm_d_base;
    att_exp_f_impl = att_exp_sum_f_base;
    att_scale_mask_max_f_impl = att_scale_mask_max_f_base;
    att_dropout_f_impl = att_dropout_f_base;
    att_bwd_row_f_impl = att_bwd_row_f_base;
    att_dot_f_impl = att_dot_f_base;
#if ATT_X86
    if (level == 2) {
        att_gemm_f_impl = att_gemm_f_avx512;
        att_gemm_d_impl = att_gemm_d_avx512;
        att_exp_f_impl = att_exp_sum_f_avx512;
        att_scale_mask_max_f_impl = att_scale_mask_max_f_avx512;
        att_dropout_f_impl = att_dropout_f_avx512;
        att_bwd_row_f_impl = att_bwd_row_f_avx512;
        att_dot_f_impl = att_dot_f_avx512;
    } else if (level == 1) {
        att_gemm_f_impl = att_gemm_f_avx2;
        att_gemm_d_impl = att_gemm_d_avx2;
    }
#endif
    return level;
}

static inline void att_gemm_f(int M, int N, int K, const float *A, long ars, long aks, const float *B, long ldb,
                              float *C, long ldc)
{
    att_gemm_f_impl(M, N, K, A, ars, aks, B, ldb, C, ldc);
}

static inline void att_gemm_d(int M, int N, int K, const double *A, long ars, long aks, const double *B, long ldb,
                              double *C, long ldc)
{
    att_gemm_d_impl(M, N, K, A, ars, aks, B, ldb, C, ldc);
}

/* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols */
#define ATT_DEFINE_TRANSPOSE(T, NAME)                                                                         \
static inline void NAME(int rows, int cols, const T *src, long lds, T *dst, long ldd)                         \
{                                                                                                             \
    for (int r = 0; r < rows; r++)                                                                            \
        for (int c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];                                   \
}

ATT_DEFINE_TRANSPOSE(float, att_transpose_f)
ATT_DEFINE_TRANSPOSE(double, att_transpose_d)

#endif
