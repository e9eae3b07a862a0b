/* Register-blocked tile GEMMs for runtime/_kernels_attention.pyx (attention tiles of at most 64 x 64 x head_dim).

   C[M,N] += A[M,K] B[K,N], all row-major with leading dimensions. 4 rows x 16 columns of C stay in registers
   while K runs; remainders run the same arithmetic one row / one column at a time. The functions are compiled
   twice (target_clones: Haswell = AVX2 + FMA, and the baseline x86-64 / other targets), the CPU picks at load
   time, so the extension stays portable. */
#ifndef INSIGHT_ATTENTION_TILE_H
#define INSIGHT_ATTENTION_TILE_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATT_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ATT_CLONES
#endif

#define ATT_DEFINE_GEMM(T, NAME)                                                                              \
ATT_CLONES static void NAME(int M, int N, int K, const T *A, long lda, const T *B, long ldb, T *C, long ldc)  \
{                                                                                                             \
    int i = 0;                                                                                                \
    for (; i + 4 <= M; i += 4) {                                                                              \
        int j = 0;                                                                                            \
        for (; j + 16 <= N; j += 16) {                                                                        \
            T c0[16], c1[16], c2[16], c3[16];                                                                 \
            for (int jj = 0; jj < 16; jj++) {                                                                 \
                c0[jj] = C[(i + 0) * ldc + j + jj]; c1[jj] = C[(i + 1) * ldc + j + jj];                       \
                c2[jj] = C[(i + 2) * ldc + j + jj]; c3[jj] = C[(i + 3) * ldc + j + jj];                       \
            }                                                                                                 \
            for (int k = 0; k < K; k++) {                                                                     \
                const T *b = B + k * ldb + j;                                                                 \
                T a0 = A[(i + 0) * lda + k], a1 = A[(i + 1) * lda + k];                                       \
                T a2 = A[(i + 2) * lda + k], a3 = A[(i + 3) * lda + k];                                       \
                for (int jj = 0; jj < 16; jj++) {                                                             \
                    c0[jj] += a0 * b[jj]; c1[jj] += a1 * b[jj]; c2[jj] += a2 * b[jj]; c3[jj] += a3 * b[jj];   \
                }                                                                                             \
            }                                                                                                 \
            for (int jj = 0; jj < 16; jj++) {                                                                 \
                C[(i + 0) * ldc + j + jj] = c0[jj]; C[(i + 1) * ldc + j + jj] = c1[jj];                       \
                C[(i + 2) * ldc + j + jj] = c2[jj]; C[(i + 3) * ldc + j + jj] = c3[jj];                       \
            }                                                                                                 \
        }                                                                                                     \
        for (; j < N; j++) {                                                                                  \
            T s0 = C[(i + 0) * ldc + j], s1 = C[(i + 1) * ldc + j];                                           \
            T s2 = C[(i + 2) * ldc + j], s3 = C[(i + 3) * ldc + j];                                           \
            for (int k = 0; k < K; k++) {                                                                     \
                T b = B[k * ldb + j];                                                                         \
                s0 += A[(i + 0) * lda + k] * b; s1 += A[(i + 1) * lda + k] * b;                               \
                s2 += A[(i + 2) * lda + k] * b; s3 += A[(i + 3) * lda + k] * b;                               \
            }                                                                                                 \
            C[(i + 0) * ldc + j] = s0; C[(i + 1) * ldc + j] = s1;                                             \
            C[(i + 2) * ldc + j] = s2; C[(i + 3) * ldc + j] = s3;                                             \
        }                                                                                                     \
    }                                                                                                         \
    for (; i < M; i++) {                                                                                      \
        T *c = C + i * ldc;                                                                                   \
        for (int k = 0; k < K; k++) {                                                                         \
            T a = A[i * lda + k];                                                                             \
            const T *b = B + k * ldb;                                                                         \
            for (int j = 0; j < N; j++) c[j] += a * b[j];                                                     \
        }                                                                                                     \
    }                                                                                                         \
}

ATT_DEFINE_GEMM(float, att_gemm_f)
ATT_DEFINE_GEMM(double, att_gemm_d)

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
