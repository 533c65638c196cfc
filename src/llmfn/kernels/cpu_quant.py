"""CPU kernels for weight-only int4 / int8 linears (layouts in llmfn.quant).

Why a small C kernel: on this project's AVX2 machines none of torch's options beat it. Decode
(one activation row) of SmolLM2's [3072, 576] gate/up weight, one thread, weights from memory
(`python benchmarks/quant.py --kernels`): fp32 F.linear 681 us; this int4 kernel 185 us, int8 197 us;
torch `_weight_int4pack_mm_for_cpu` 7866 us with fp32 activations, 279 us with bf16 ones (which
would cost the model its fp32 numerics); `_weight_int8pack_mm` 1589 us; dequantize + F.linear
3685 us, the same fused by torch.compile 5263 us. The kernel streams the packed bytes once and
dequantizes in registers, in fp32:

    y[i, j] = sum_g scales[j, g] * (sum_{t in g} x[i, t] * q[j, t]) + offsets[j, g] * sum_{t in g} x[i, t]

for up to MAX_ROWS activation rows (decode, small batches, short prompts); bigger inputs dequantize the weight in
row chunks and call F.linear (the BLAS matmul is faster once the weight is reused enough).

The source below is compiled once per machine, with kernels/cpu.py's, into LLMFN_HOME/kernels/. Without a compiler, or with
LLMFN_QUANT_KERNEL=torch, `available()` is False and llmfn.quant falls back to dequantize +
F.linear (same numbers up to summation order).
"""

from __future__ import annotations

import ctypes
import os

import torch

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

# Largest number of activation rows the streaming kernels take; more rows go dequant + matmul.
# Measured crossover on 2 cores ([3072, 576], int4 / int8): 64 rows 3.1 / 2.6 ms in the kernel vs
# 4.0 / 4.6 ms dequant + matmul; 128 rows 6.4 / 5.4 vs 5.1 / 5.7 ms.
MAX_ROWS = 64
# Rows of the weight dequantized at a time on the F.linear path (bounds the temporary).
CHUNK_ROWS = 4096

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* x [m, k] -> xp [m, k]: each 32-wide chunk reordered to its 16 even then 16 odd elements
   (the order the low and high nibbles of 16 packed bytes come out in); xs [m, k/g] group sums. */
static void prep4(const float* x, float* xp, float* xs, int64_t m, int64_t k, int64_t g) {
    for (int64_t i = 0; i < m; i++) {
        const float* xr = x + i * k; float* pr = xp + i * k;
        for (int64_t c = 0; c < k; c += 32)
            for (int t = 0; t < 16; t++) { pr[c + t] = xr[c + 2 * t]; pr[c + 16 + t] = xr[c + 2 * t + 1]; }
        for (int64_t gi = 0; gi < k / g; gi++) {
            float a = 0.0f;
            for (int64_t t = 0; t < g; t++) a += xr[gi * g + t];
            xs[i * (k / g) + gi] = a;
        }
    }
}

#ifdef __AVX2__
/* 16 packed bytes -> 32 floats: w[0] = low nibbles of bytes 0..7, w[1] of bytes 8..15, w[2], w[3]
   the high nibbles. One broadcast load and two byte shuffles place each byte in its own 32-bit
   lane; a mask and a shift take the nibbles (fewer shuffles than zero-extending each half). */
static inline void unpack32(const uint8_t* qb, __m256* w) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)qb));
    const __m256i s0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                        4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i s1 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                        12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i m = _mm256_set1_epi32(0x0F);
    __m256i v0 = _mm256_shuffle_epi8(b, s0), v1 = _mm256_shuffle_epi8(b, s1);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

/* 8 int8 -> 8 floats (the sign extension reads straight from memory). */
static inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline float hsum(__m256 t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}

/* One weight row against R activation rows (R fixed at compile time keeps accumulators in
   registers). NA independent accumulators per row hide the FMA latency: with one, every FMA
   waited on the previous one and the kernel ran at a third of its throughput. */
#define INT4_ROWS(NAME, R, NA)                                                                          \
static inline void NAME(const float* xp, const float* xs, const uint8_t* qr, const float* sr,          \
                        const float* orow, float* y, int64_t n, int64_t k, int64_t g, int64_t G) {     \
    __m256 tot[R];                                                                                      \
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();                                          \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        __m256 acc[R][NA];                                                                              \
        for (int r = 0; r < R; r++) for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();      \
        for (int64_t c = gi * g; c < (gi + 1) * g; c += 32) {                                          \
            __m256 w[4];                                                                                \
            unpack32(qr + c / 2, w);                                                                    \
            for (int r = 0; r < R; r++)                                                                 \
                for (int v = 0; v < 4; v++)                                                             \
                    acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xp + r * k + c + 8 * v), acc[r][v % NA]); \
        }                                                                                               \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 a = acc[r][0];                                                                       \
            for (int i = 1; i < NA; i++) a = _mm256_add_ps(a, acc[r][i]);                               \
            tot[r] = _mm256_fmadd_ps(sv, a, tot[r]);                                                   \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) { /* + sum_g offsets[g] * xs[g], eight groups at a time */             \
        const float* xsr = xs + r * G;                                                                  \
        int64_t gi = 0;                                                                                 \
        for (; gi + 8 <= G; gi += 8)                                                                    \
            tot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(orow + gi), _mm256_loadu_ps(xsr + gi), tot[r]);   \
        float a = hsum(tot[r]);                                                                         \
        for (; gi < G; gi++) a += orow[gi] * xsr[gi];                                                  \
        y[r * n] = a;                                                                                   \
    }                                                                                                   \
}

/* sum of a group-32 row's even / odd running totals, plus sum_g offsets[g] * xs[g] (eight groups
   at a time): the end of every int4 group-32 dot product. */
static inline float int4_g32_tail(__m256 te, __m256 to, const float* orow, const float* xs, int64_t G) {
    __m256 t = _mm256_add_ps(te, to);
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(orow + j), _mm256_loadu_ps(xs + j), t);
    float a = hsum(t);
    for (; j < G; j++) a += orow[j] * xs[j];
    return a;
}

/* Groups of 32 (GGUF Q4, llmfn's default): one 16-byte load per group, straight-line code, two
   running totals (even and odd groups) so consecutive groups do not wait on each other. */
#define INT4_G32(NAME, R)                                                                               \
static inline __m256 NAME##_group(const uint8_t* qb, const float* xp, int64_t k, int r_count, __m256* d) { \
    __m256 w[4];                                                                                        \
    unpack32(qb, w);                                                                                    \
    __m256 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];                                                  \
    for (int r = 0; r < R; r++) {                                                                       \
        const float* p = xp + r * k;                                                                    \
        __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(p));                                             \
        __m256 a1 = _mm256_mul_ps(w1, _mm256_loadu_ps(p + 8));                                         \
        a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p + 16), a0);                                         \
        a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), a1);                                         \
        d[r] = _mm256_add_ps(a0, a1);                                                                   \
    }                                                                                                   \
    return w0;                                                                                          \
}                                                                                                       \
static inline void NAME(const float* xp, const float* xs, const uint8_t* qr, const float* sr,          \
                        const float* orow, float* y, int64_t n, int64_t k, int64_t G) {                \
    __m256 te[R], to[R], d[R];                                                                          \
    for (int r = 0; r < R; r++) te[r] = to[r] = _mm256_setzero_ps();                                   \
    int64_t gi = 0;                                                                                     \
    for (; gi + 2 <= G; gi += 2) {                                                                      \
        NAME##_group(qr + gi * 16, xp + gi * 32, k, R, d);                                             \
        __m256 se = _mm256_set1_ps(sr[gi]);                                                             \
        for (int r = 0; r < R; r++) te[r] = _mm256_fmadd_ps(se, d[r], te[r]);                          \
        NAME##_group(qr + gi * 16 + 16, xp + gi * 32 + 32, k, R, d);                                   \
        __m256 so = _mm256_set1_ps(sr[gi + 1]);                                                         \
        for (int r = 0; r < R; r++) to[r] = _mm256_fmadd_ps(so, d[r], to[r]);                          \
    }                                                                                                   \
    if (gi < G) {                                                                                       \
        NAME##_group(qr + gi * 16, xp + gi * 32, k, R, d);                                             \
        __m256 se = _mm256_set1_ps(sr[gi]);                                                             \
        for (int r = 0; r < R; r++) te[r] = _mm256_fmadd_ps(se, d[r], te[r]);                          \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = int4_g32_tail(te[r], to[r], orow, xs + r * G, G);            \
}

#define INT8_ROWS(NAME, R, NA)                                                                          \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t g, int64_t G) {                                   \
    __m256 tot[R];                                                                                      \
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();                                          \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        __m256 acc[R][NA];                                                                              \
        for (int r = 0; r < R; r++) for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();      \
        int64_t c = gi * g, end = (gi + 1) * g;                                                        \
        for (; c + 32 <= end; c += 32) {                                                               \
            __m256 w[4];                                                                                \
            for (int v = 0; v < 4; v++) w[v] = load8(qr + c + 8 * v);                                  \
            for (int r = 0; r < R; r++)                                                                 \
                for (int v = 0; v < 4; v++)                                                             \
                    acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + r * k + c + 8 * v), acc[r][v % NA]); \
        }                                                                                               \
        for (; c < end; c += 8) {                                                                       \
            __m256 w0 = load8(qr + c);                                                                  \
            for (int r = 0; r < R; r++)                                                                 \
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + c), acc[r][0]);            \
        }                                                                                               \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 a = acc[r][0];                                                                       \
            for (int i = 1; i < NA; i++) a = _mm256_add_ps(a, acc[r][i]);                               \
            tot[r] = _mm256_fmadd_ps(sv, a, tot[r]);                                                   \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = hsum(tot[r]);                                               \
}

/* int8 groups of 32 (GGUF Q8_0): as INT4_G32, straight-line with even / odd running totals. */
#define INT8_G32(NAME, R)                                                                               \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t G) {                                              \
    __m256 te[R], to[R];                                                                                \
    for (int r = 0; r < R; r++) te[r] = to[r] = _mm256_setzero_ps();                                   \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        const int8_t* qb = qr + gi * 32;                                                                \
        __m256 w0 = load8(qb), w1 = load8(qb + 8), w2 = load8(qb + 16), w3 = load8(qb + 24);           \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* p = x + r * k + gi * 32;                                                       \
            __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(p));                                         \
            __m256 a1 = _mm256_mul_ps(w1, _mm256_loadu_ps(p + 8));                                     \
            a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p + 16), a0);                                     \
            a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), a1);                                     \
            if (gi & 1) to[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(a0, a1), to[r]);                     \
            else te[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(a0, a1), te[r]);                            \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = hsum(_mm256_add_ps(te[r], to[r]));                          \
}

INT8_G32(int8_g32_r1, 1) INT8_G32(int8_g32_r2, 2) INT8_G32(int8_g32_r3, 3) INT8_G32(int8_g32_r4, 4)
INT4_ROWS(int4_r1, 1, 4) INT4_ROWS(int4_r2, 2, 2) INT4_ROWS(int4_r3, 3, 2) INT4_ROWS(int4_r4, 4, 2)
INT4_G32(int4_g32_r1, 1) INT4_G32(int4_g32_r2, 2) INT4_G32(int4_g32_r3, 3) INT4_G32(int4_g32_r4, 4)
INT8_ROWS(int8_r1, 1, 4) INT8_ROWS(int8_r2, 2, 2) INT8_ROWS(int8_r3, 3, 2) INT8_ROWS(int8_r4, 4, 2)

/* Two weight rows against one activation row (decode): each row's arithmetic is int4_g32_r1's,
   operation for operation, so results are bitwise the same; interleaving the rows shares the
   activation loads and doubles the independent work in flight (+8% in a kernel microbenchmark,
   ~3% of SmolLM2's int4 layers). */
static inline __m256 int4_g32_dot(const uint8_t* qb, __m256 x0, __m256 x1, __m256 x2, __m256 x3) {
    __m256 w[4];
    unpack32(qb, w);
    __m256 a0 = _mm256_mul_ps(w[0], x0);
    __m256 a1 = _mm256_mul_ps(w[1], x1);
    a0 = _mm256_fmadd_ps(w[2], x2, a0);
    a1 = _mm256_fmadd_ps(w[3], x3, a1);
    return _mm256_add_ps(a0, a1);
}
static inline void int4_g32_r1x2(const float* xp, const float* xs, const uint8_t* qa, const uint8_t* qb,
                                 const float* sa, const float* sb, const float* oa, const float* ob,
                                 float* ya, float* yb, int64_t G) {
    __m256 tea = _mm256_setzero_ps(), toa = tea, teb = tea, tob = tea;
    for (int64_t gi = 0; gi < G; gi++) {
        const float* p = xp + gi * 32;
        __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + 8), x2 = _mm256_loadu_ps(p + 16), x3 = _mm256_loadu_ps(p + 24);
        __m256 da = int4_g32_dot(qa + gi * 16, x0, x1, x2, x3), db = int4_g32_dot(qb + gi * 16, x0, x1, x2, x3);
        if (gi & 1) {
            toa = _mm256_fmadd_ps(_mm256_set1_ps(sa[gi]), da, toa);
            tob = _mm256_fmadd_ps(_mm256_set1_ps(sb[gi]), db, tob);
        } else {
            tea = _mm256_fmadd_ps(_mm256_set1_ps(sa[gi]), da, tea);
            teb = _mm256_fmadd_ps(_mm256_set1_ps(sb[gi]), db, teb);
        }
    }
    *ya = int4_g32_tail(tea, toa, oa, xs, G);
    *yb = int4_g32_tail(teb, tob, ob, xs, G);
}
#else
/* Portable versions (the compiler vectorizes what it can). */
static void int4_rows(const float* xp, const float* xs, const uint8_t* qr, const float* sr, const float* orow,
                      float* y, int64_t n, int64_t k, int64_t g, int64_t G, int R) {
    for (int r = 0; r < R; r++) {
        const float* p = xp + r * k; const float* xsr = xs + r * G; float a = 0.0f;
        for (int64_t gi = 0; gi < G; gi++) {
            float d = 0.0f;
            for (int64_t c = gi * g; c < (gi + 1) * g; c += 32)
                for (int t = 0; t < 16; t++) {
                    uint8_t b = qr[c / 2 + t];
                    d += (float)(b & 15) * p[c + t] + (float)(b >> 4) * p[c + 16 + t];
                }
            a += sr[gi] * d + orow[gi] * xsr[gi];
        }
        y[r * n] = a;
    }
}
static void int8_rows(const float* x, const int8_t* qr, const float* sr, float* y,
                      int64_t n, int64_t k, int64_t g, int64_t G, int R) {
    for (int r = 0; r < R; r++) {
        float a = 0.0f;
        for (int64_t gi = 0; gi < G; gi++) {
            float d = 0.0f;
            for (int64_t c = gi * g; c < (gi + 1) * g; c++) d += (float)qr[c] * x[r * k + c];
            a += sr[gi] * d;
        }
        y[r * n] = a;
    }
}
#endif

/* Rows i0 .. i0 + R - 1 (R <= 4) of y = x @ w^T at column j, from one weight row: the dispatch on
   R and the group size shared by the linears below and the fused decoder layer (kernels/cpu.py). */
static inline void int4_block(const float* xpi, const float* xsi, const uint8_t* qr, const float* sr,
                              const float* orow, float* yi, int64_t n, int64_t k, int64_t g, int64_t G, int64_t R) {
#ifdef __AVX2__
    if (g == 32) {
        if (R == 4) int4_g32_r4(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else if (R == 3) int4_g32_r3(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else if (R == 2) int4_g32_r2(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else int4_g32_r1(xpi, xsi, qr, sr, orow, yi, n, k, G);
    }
    else if (R == 4) int4_r4(xpi, xsi, qr, sr, orow, yi, n, k, g, G);
    else if (R == 3) int4_r3(xpi, xsi, qr, sr, orow, yi, n, k, g, G);
    else if (R == 2) int4_r2(xpi, xsi, qr, sr, orow, yi, n, k, g, G);
    else int4_r1(xpi, xsi, qr, sr, orow, yi, n, k, g, G);
#else
    int4_rows(xpi, xsi, qr, sr, orow, yi, n, k, g, G, (int)R);
#endif
}

static inline void int8_block(const float* xi, const int8_t* qr, const float* sr, float* yi,
                              int64_t n, int64_t k, int64_t g, int64_t G, int64_t R) {
#ifdef __AVX2__
    if (g == 32) {
        if (R == 4) int8_g32_r4(xi, qr, sr, yi, n, k, G);
        else if (R == 3) int8_g32_r3(xi, qr, sr, yi, n, k, G);
        else if (R == 2) int8_g32_r2(xi, qr, sr, yi, n, k, G);
        else int8_g32_r1(xi, qr, sr, yi, n, k, G);
    }
    else if (R == 4) int8_r4(xi, qr, sr, yi, n, k, g, G);
    else if (R == 3) int8_r3(xi, qr, sr, yi, n, k, g, G);
    else if (R == 2) int8_r2(xi, qr, sr, yi, n, k, g, G);
    else int8_r1(xi, qr, sr, yi, n, k, g, G);
#else
    int8_rows(xi, qr, sr, yi, n, k, g, G, (int)R);
#endif
}

/* y [m, n] = x [m, k] @ int4 weight [n, k]^T; m <= 16, g % 32 == 0. */
int llmfn_int4_linear(const float* x, const uint8_t* q, const float* s, const float* o, float* y,
                      int64_t m, int64_t n, int64_t k, int64_t g, int nthreads) {
    int64_t G = k / g;
    float* xp = (float*)malloc(sizeof(float) * (m * k + m * G));
    float* xs = xp + m * k;
    prep4(x, xp, xs, m, k, g);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++)
        for (int64_t i0 = 0; i0 < m; i0 += 4)
            int4_block(xp + i0 * k, xs + i0 * G, q + j * (k / 2), s + j * G, o + j * G, y + i0 * n + j, n, k, g, G,
                       (m - i0) < 4 ? (m - i0) : 4);
    free(xp);
    return 0;
}

/* y [m, n] = x [m, k] @ int8 weight [n, k]^T; m <= 16, g % 8 == 0. */
int llmfn_int8_linear(const float* x, const int8_t* q, const float* s, float* y,
                      int64_t m, int64_t n, int64_t k, int64_t g, int nthreads) {
    int64_t G = k / g;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++)
        for (int64_t i0 = 0; i0 < m; i0 += 4)
            int8_block(x + i0 * k, q + j * k, s + j * G, y + i0 * n + j, n, k, g, G, (m - i0) < 4 ? (m - i0) : 4);
    return 0;
}

/* w [n, k] fp32 = q * s + o (int4) and q * s (int8), as llmfn.quant dequantizes. */
int llmfn_int4_dequant(const uint8_t* q, const float* s, const float* o, float* w,
                        int64_t n, int64_t k, int64_t g, int nthreads) {
    int64_t G = k / g;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++)
        for (int64_t gi = 0; gi < G; gi++) {  /* scale and offset hoisted: the inner loop vectorizes */
            const uint8_t* qb = q + j * (k / 2) + gi * (g / 2);
            float* wg = w + j * k + gi * g;
            const float sc = s[j * G + gi], of = o[j * G + gi];
            for (int64_t t = 0; t < g / 2; t++) {
                wg[2 * t] = (float)(qb[t] & 15) * sc + of;
                wg[2 * t + 1] = (float)(qb[t] >> 4) * sc + of;
            }
        }
    return 0;
}

int llmfn_int8_dequant(const int8_t* q, const float* s, float* w, int64_t n, int64_t k, int64_t g, int nthreads) {
    int64_t G = k / g;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++)
        for (int64_t gi = 0; gi < G; gi++) {
            const float sc = s[j * G + gi];
            for (int64_t t = gi * g; t < (gi + 1) * g; t++) w[j * k + t] = (float)q[j * k + t] * sc;
        }
    return 0;
}
"""

SIGNATURES = {
    "llmfn_int4_linear": [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i32],
    "llmfn_int8_linear": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i32],
    "llmfn_int4_dequant": [_p, _p, _p, _p, _i64, _i64, _i64, _i32],
    "llmfn_int8_dequant": [_p, _p, _p, _i64, _i64, _i64, _i32],
}


def _load() -> ctypes.CDLL | None:
    """The CPU kernel library (built from this SOURCE and kernels/cpu.py's, which reuses it)."""
    if os.environ.get("LLMFN_QUANT_KERNEL", "c") == "torch":
        return None
    from llmfn.kernels import cpu

    return cpu.library()


def available() -> bool:
    """True when the compiled kernels load (compiling them on first use)."""
    return _load() is not None


def int4_ok(k: int, group_size: int) -> bool:
    return group_size % 32 == 0 and k % group_size == 0


def int8_ok(k: int, group_size: int) -> bool:
    return group_size % 8 == 0 and k % group_size == 0


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [m, k] fp32 contiguous @ int4 weight [n, k]^T -> [m, n] fp32 (layout in llmfn.quant)."""
    lib = _load()
    m, k = x.shape
    n = qweight.shape[0]
    if m > MAX_ROWS:
        return _chunked(x, n, lambda lo, hi: int4_dequantize(qweight[lo:hi], scales[lo:hi], offsets[lo:hi], group_size))
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llmfn_int4_linear(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), y.data_ptr(),
                          m, n, k, group_size, torch.get_num_threads())
    return y


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [m, k] fp32 contiguous @ int8 weight [n, k]^T -> [m, n] fp32."""
    lib = _load()
    m, k = x.shape
    n = qweight.shape[0]
    if m > MAX_ROWS:
        return _chunked(x, n, lambda lo, hi: int8_dequantize(qweight[lo:hi], scales[lo:hi], group_size))
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llmfn_int8_linear(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                          m, n, k, group_size, torch.get_num_threads())
    return y


def _chunked(x: torch.Tensor, n: int, dequant) -> torch.Tensor:
    from llmfn.linear import linear  # the fastest dense fp32 matmul for these rows (oneDNN's)

    if n <= CHUNK_ROWS:
        return linear(x, dequant(0, n))
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        y[:, lo:hi] = linear(x, dequant(lo, hi))
    return y


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dense fp32 [n, k] = q * scales + offsets (contiguous CPU inputs)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, dtype=torch.float32)
    _load().llmfn_int4_dequant(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), w.data_ptr(),
                               n, k, group_size, torch.get_num_threads())
    return w


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dense fp32 [n, k] = q * scales (contiguous CPU inputs)."""
    n, k = qweight.shape
    w = torch.empty(n, k, dtype=torch.float32)
    _load().llmfn_int8_dequant(qweight.data_ptr(), scales.data_ptr(), w.data_ptr(), n, k, group_size,
                               torch.get_num_threads())
    return w
