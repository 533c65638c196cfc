/* The attention tile shared by the encoder attention (attention.c) and the tiled prefill attention
   (attend.h): a register-blocked product of query rows and keys (the scores) or of score rows and
   values, and the softmax of a score row. Every element is one chain of FMAs in k order whatever
   the tile, so a row's results do not depend on the rows beside it. */
#ifndef LLMFN_ATTN_TILE_H
#define LLMFN_ATTN_TILE_H
#include "simd.h"
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* The attention tile: TR query rows x TP panels of TC keys (scores) or value columns; the GEMM has its
   own MR x NR. LANES: the width of the running row maxima and of the softmax's vectors. */
#define TC 16
#if defined(__AVX512F__)
#define TR 12
#define TP 2
#define LANES 16
#else
#define TR 6
#define TP 1
#define LANES 8
#endif

#if defined(__AVX512F__)
/* exp8 (simd.h) on 16 lanes: the same operations, the same bits per element. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* tile() on AVX-512 for `panels` (1 or 2) 16-column runs of b, the second at b + b2. */
static inline __attribute__((always_inline)) void tile512(const float* a, int64_t ar, int64_t ak, const float* b,
                                                          int64_t b2, int64_t bk, int64_t kn, float* out, int64_t ldo,
                                                          const float* bias, float rmax[TR][LANES], const int panels) {
    __m512 c[TR][2];
    #pragma GCC unroll 16
    for (int r = 0; r < TR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0, ko = 0; k < kn; k++, ko += ak, b += bk) {
        __m512 v0 = _mm512_loadu_ps(b), v1 = panels == 2 ? _mm512_loadu_ps(b + b2) : v0;
        #pragma GCC unroll 16
        for (int r = 0; r < TR; r++) {
            __m512 av = _mm512_set1_ps(a[r * ar + ko]);
            c[r][0] = _mm512_fmadd_ps(av, v0, c[r][0]);
            if (panels == 2) c[r][1] = _mm512_fmadd_ps(av, v1, c[r][1]);
        }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < TR; r++) {
        __m512 v0 = c[r][0], v1 = c[r][1];
        if (bias) {
            v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias));
            __m512 m = _mm512_max_ps(_mm512_loadu_ps(rmax[r]), v0);
            if (panels == 2) {
                v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + TC));
                m = _mm512_max_ps(m, v1);
            }
            _mm512_storeu_ps(rmax[r], m);
        }
        _mm512_storeu_ps(out + r * ldo, v0);
        if (panels == 2) _mm512_storeu_ps(out + r * ldo + TC, v1);
    }
}
#endif

/* out[r * ldo + c] = sum over k of a[r * ar + k * ak] * b[k * bk + c'], k ascending, (+ bias[c]);
   r < TR, c < panels * TC (panels <= TP), c' = c for the first TC columns, c - TC + b2 for the second.
   With a bias (the scores' key mask), each row's running maximum rmax[r] (LANES lanes) takes in the
   new scores too, so the softmax needs no pass of its own for it. Every element is one chain of FMAs
   in k order, whatever the tile. */
static inline void tile(const float* a, int64_t ar, int64_t ak, const float* b, int64_t b2, int panels, int64_t bk,
                        int64_t kn, float* out, int64_t ldo, const float* bias, float rmax[TR][LANES]) {
#if defined(__AVX512F__)
    if (panels == 2) tile512(a, ar, ak, b, b2, bk, kn, out, ldo, bias, rmax, 2);
    else tile512(a, ar, ak, b, b2, bk, kn, out, ldo, bias, rmax, 1);
#elif defined(__AVX2__)
    (void)b2, (void)panels;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a, *a1 = a + ar, *a2 = a + 2 * ar, *a3 = a + 3 * ar, *a4 = a + 4 * ar, *a5 = a + 5 * ar;
    for (int64_t k = 0, ko = 0; k < kn; k++, ko += ak, b += bk) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
        av = _mm256_broadcast_ss(a0 + ko); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a1 + ko); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a2 + ko); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a3 + ko); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a4 + ko); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a5 + ko); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    __m256 all[TR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < TR; r++) {
        __m256 v0 = all[r][0], v1 = all[r][1];
        if (bias) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
            _mm256_storeu_ps(rmax[r], _mm256_max_ps(_mm256_loadu_ps(rmax[r]), _mm256_max_ps(v0, v1)));
        }
        _mm256_storeu_ps(out + r * ldo, v0);
        _mm256_storeu_ps(out + r * ldo + 8, v1);
    }
#else  /* without FMA each product would round twice: sum in double instead */
    (void)b2, (void)panels;
    double sum[TR][TC] = {{0.0}};
    for (int64_t k = 0; k < kn; k++, b += bk)
        for (int r = 0; r < TR; r++)
            for (int c = 0; c < TC; c++) sum[r][c] += (double)a[r * ar + k * ak] * b[c];
    for (int r = 0; r < TR; r++)
        for (int c = 0; c < TC; c++) {
            float v = (float)sum[r][c] + (bias ? bias[c] : 0.0f);
            if (bias && v > rmax[r][c % LANES]) rmax[r][c % LANES] = v;
            out[r * ldo + c] = v;
        }
#endif
}

/* s[0..tp) = exp(s - m), masked keys (-inf) giving 0; returns the sum (0: all masked, m = -inf).
   tp is a multiple of LANES. */
static float softmax_row(float* s, float m, int64_t tp) {
    if (m == -INFINITY) { memset(s, 0, sizeof(float) * tp); return 0.0f; }
    int64_t j = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (; j < tp; j += 16) {  /* exp16(-inf) is exactly 0, as exp8's */
        __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
        _mm512_storeu_ps(s + j, p);
        acc = _mm512_add_ps(acc, p);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, acc);
    for (int l = 0; l < 16; l++) sum += lanes[l];
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (; j < tp; j += 8) {  /* exp8(-inf) is exactly 0 (simd.h) */
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        acc = _mm256_add_ps(acc, p);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
    for (; j < tp; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
    return sum;
}

/* out[r * ldo + c] = (score row r . value column c) * inv[r] for r < rows, c < hd: TR score rows
   s [TR][tp] (rows from `rows` on zero) times values vp [keys][hp] over the first tk keys. */
static void weigh_values(const float* s, int64_t tp, const float* vp, int64_t hp, int64_t hd, int64_t tk, int rows,
                         const float* inv, float* out, int64_t ldo) {
    float acc[TR][TP * TC];
    for (int64_t c0 = 0; c0 < hd; c0 += TP * TC) {
        int panels = (hp - c0) / TC < TP ? (int)((hp - c0) / TC) : TP;
        tile(s, tp, 1, vp + c0, TC, panels, hp, tk, acc[0], TP * TC, NULL, NULL);
        int cols = hd - c0 < panels * TC ? (int)(hd - c0) : panels * TC;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) out[r * ldo + c0 + c] = acc[r][c] * inv[r];
    }
}

#endif
